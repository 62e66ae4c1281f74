"""Moving protocol messages over a socket: framing, the message codec, authentication.

A frame is `le32 body length ‖ u8 message kind ‖ body`. Bodies are msgpack maps of the message's
fields, except PAGES, whose body is `le32 round ‖ payload` so page data is never repacked. Input
from the network is hostile, on both sides: a frame's length is checked against its kind's cap
(`FRAME_CAPS`) before the body is read, a body is decoded within a budget (`BODY_LIMITS`: a flat
map of a few fields, checked by `formats` before msgpack allocates), every field is type-checked,
and the texts a peer sends (an error, a reason, a list of problems) are cut to `MAX_TEXT` bytes
before they are decoded. What breaks these rules is a `ProtocolViolation`.

Before any message, the target authenticates the source: it sends a random challenge; the source
answers HMAC-SHA256(key, challenge ‖ "kvmigrate-auth-v1"). The key is pre-shared; on loopback it
may be empty (the connection then proves only that the peer is on this machine). With `Tls`, the
link is TLS with certificates checked both ways against a private CA (mutual authentication and
encryption); the challenge still runs inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import secrets
import select
import socket
import ssl
import struct
import time
import typing
from dataclasses import dataclass

import msgpack

from formats import FormatError, MsgpackLimits, unpack_msgpack
from migrate.errors import AuthenticationFailed, ProtocolViolation, TransportError
from migrate.protocol import MESSAGE_TYPES, ErrorCode, Message, MessageKind, Pages

FRAME = struct.Struct("<IB")
MAX_FRAME = 64 << 20
MAX_FIELD = 16 << 20
K = MessageKind
# The largest body each kind may have, checked from the frame header before the body is read:
# pages are bulk data, state one bin field of at most MAX_FIELD; HELLO holds a config, a layout of at most 1024 devices and a
# CPUID; the rest are a few fields (a Reject's problems, an error's text: cut to MAX_TEXT).
FRAME_CAPS: dict[MessageKind, int] = {
    K.HELLO: 4 << 20, K.ACCEPT: 4 << 10, K.REJECT: 1 << 20, K.PAGES: MAX_FRAME, K.ROUND_DONE: 4 << 10,
    K.STATE: MAX_FIELD + 64, K.COMPLETE: 64 << 10, K.READY: 4 << 10, K.COMMIT: 4 << 10, K.RESUMED: 4 << 10,
    K.CANCEL: 1 << 20, K.ERROR: 1 << 20, K.CHANNEL: 4 << 10, K.QUERY: 4 << 10, K.VERDICT: 8 << 10,
    # post-copy: a bitmap of the guest's pages (one bit per 4 KiB: 512 GiB in MAX_FIELD), a few
    # thousand addresses a fetch
    K.POSTCOPY: MAX_FIELD + 64, K.FETCH: 64 << 10, K.FINISHED: 4 << 10, K.RECONNECT: 4 << 10,
    K.MISSING: MAX_FIELD + 64, K.DISCARD: MAX_FIELD + 64, K.DISCARDED: 4 << 10,
}
MAX_TEXT = 4096  # bytes of one text from the peer that are kept (and decoded); the rest is cut
MAX_PROBLEMS = 256  # problems of a Reject that are kept
# A message body: one map of at most 64 fields, each a scalar, bytes or a list of strings.
BODY_LIMITS = MsgpackLimits(max_str_len=MAX_FIELD, max_bin_len=MAX_FIELD, max_array_len=1 << 16,
                            max_map_len=64, max_blob_len=MAX_FRAME, max_items=1 << 16, max_depth=2)
# Messages whose str fields are the peer's own words: decoded raw, then cut, then UTF-8.
_TEXT_KINDS = frozenset({K.REJECT, K.CANCEL, K.ERROR})  # (VERDICT: bytes too; its 8 KiB cap bounds it)
AUTH_CONTEXT = b"kvmigrate-auth-v1"
CHALLENGE_BYTES = 32
DEFAULT_PORT = 7380


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if int(port) > 65535:
        raise ValueError(f"port {port} of {text!r} is not 0..65535")
    return host.strip("[]") or "127.0.0.1", int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


# --- message codec ------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls)


def encode(message: Message) -> list[bytes | memoryview]:
    """A message as frame parts (header first), ready for `sendall` of each."""
    if isinstance(message, Pages):
        body_len = 4 + len(message.payload)
        return [FRAME.pack(body_len, message.kind) + struct.pack("<I", message.round), message.payload]
    fields = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    for name, value in fields.items():
        if isinstance(value, ErrorCode):
            fields[name] = int(value)
        elif isinstance(value, tuple):
            fields[name] = list(value)
    body = msgpack.packb(fields, use_bin_type=True)
    return [FRAME.pack(len(body), message.kind), body]


def decode(kind: int, body: bytes | bytearray | memoryview) -> Message:
    """A frame's message; a `ProtocolViolation` for anything malformed."""
    try:
        mkind = MessageKind(kind)
        cls = MESSAGE_TYPES[mkind]
    except (ValueError, KeyError):
        raise ProtocolViolation(f"unknown message kind {kind}") from None
    if len(body) > FRAME_CAPS[mkind]:
        raise ProtocolViolation(f"a {len(body)}-byte {mkind.name} (at most {FRAME_CAPS[mkind]})")
    if cls is Pages:
        if len(body) < 4:
            raise ProtocolViolation("PAGES frame shorter than its round number")
        return Pages(struct.unpack_from("<I", body)[0], memoryview(body)[4:])
    text = mkind in _TEXT_KINDS
    try:
        fields = unpack_msgpack(body, BODY_LIMITS, raw=text)  # a peer's texts: decoded once cut
    except FormatError as e:
        raise ProtocolViolation(f"{mkind.name}: undecodable body ({e})") from None
    if not isinstance(fields, dict):
        raise ProtocolViolation(f"{mkind.name}: body is not a map")
    if text:
        fields = _cut_texts(fields)
    hints = _field_types(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            if f.default is not dataclasses.MISSING:
                continue
            raise ProtocolViolation(f"{mkind.name}: missing field {f.name!r}")
        values[f.name] = _check(mkind.name, f.name, hints[f.name], fields[f.name])
    return cls(**values)


def _text(raw: object) -> object:
    """A peer's text cut to MAX_TEXT bytes, then decoded (a character split by the cut, or bytes
    that are not UTF-8, become U+FFFD); anything but a string is left for the type check."""
    if isinstance(raw, bytes):
        return raw[:MAX_TEXT].decode("utf-8", "replace")
    return raw


def _cut_texts(fields: dict) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in fields.items():
        if not isinstance(key, bytes) or len(key) > 64:
            continue  # not a field name of ours: ignored, as unknown fields are
        if isinstance(value, list):
            value = [_text(v) for v in value[:MAX_PROBLEMS]]
        out[key.decode("ascii", "replace")] = _text(value)
    return out


def _check(kind: str, name: str, hint: object, value: object) -> object:
    if hint is bytes and isinstance(value, bytes):
        return value
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is ErrorCode and isinstance(value, int):
        try:
            return ErrorCode(value)
        except ValueError:
            return ErrorCode.INVALID
    if typing.get_origin(hint) is tuple and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ProtocolViolation(f"{kind}.{name}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")


# --- a connection -------------------------------------------------------------------------------


class Connection:
    """A socket that carries whole messages. Not thread-safe for concurrent senders."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.bytes_sent = 0
        self.bytes_received = 0
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, message: Message, timeout: float | None = None) -> int:
        """Send a whole message; with `timeout`, within that many seconds or a `TransportError`
        (a peer that stops reading cannot hold us longer)."""
        n = 0
        try:
            if timeout is not None:
                self.sock.settimeout(max(timeout, 1e-3))  # sendall: the timeout bounds the whole send
            for part in encode(message):
                self.sock.sendall(part)
                n += len(part)
        except TimeoutError as e:
            raise TransportError(f"sending {type(message).__name__} to {self.peer}: not taken within "
                                 f"{timeout:.2f} s") from e
        except OSError as e:
            raise TransportError(f"sending {type(message).__name__} to {self.peer}: {e}") from e
        self.bytes_sent += n
        return n

    def send_pages(self, round_number: int, parts: list[bytes | memoryview], timeout: float | None = None) -> int:
        """A PAGES message from its pieces, without joining them (vectored send); with `timeout`,
        all of it within that many seconds or a `TransportError`."""
        body_len = 4 + sum(len(p) for p in parts)
        if body_len > MAX_FRAME:
            raise TransportError(f"a {body_len}-byte PAGES frame (at most {MAX_FRAME})")
        buffers = [memoryview(FRAME.pack(body_len, MessageKind.PAGES) + struct.pack("<I", round_number)),
                   *(memoryview(p).cast("B") for p in parts)]
        total = sum(len(b) for b in buffers)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            if isinstance(self.sock, ssl.SSLSocket):  # no sendmsg over TLS
                if timeout is not None:
                    self.sock.settimeout(max(timeout, 1e-3))
                self.sock.sendall(b"".join(buffers))
            else:
                while buffers:
                    if deadline is not None:  # each sendmsg may wait only what is left
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError
                        self.sock.settimeout(left)
                    sent = self.sock.sendmsg(buffers[:512])
                    while buffers and sent >= len(buffers[0]):
                        sent -= len(buffers[0])
                        buffers.pop(0)
                    if sent:
                        buffers[0] = buffers[0][sent:]
        except TimeoutError as e:
            raise TransportError(f"sending PAGES to {self.peer}: not taken within {timeout:.2f} s") from e
        except OSError as e:
            raise TransportError(f"sending PAGES to {self.peer}: {e}") from e
        self.bytes_sent += total
        return total

    def _read_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:])
            except TimeoutError as e:
                raise TransportError(f"{self.peer}: timed out") from e
            except OSError as e:
                raise TransportError(f"{self.peer}: {e}") from e
            if k == 0:
                raise TransportError(f"{self.peer} closed the connection")
            got += k
        self.bytes_received += n
        return buf

    def receive(self, timeout: float | None = None) -> Message:
        self.sock.settimeout(timeout)
        length, kind = FRAME.unpack(self._read_exact(FRAME.size))
        cap = FRAME_CAPS.get(kind, 0)  # an unknown kind: its (empty) body is refused by decode
        if length > cap:  # refused before a byte of the body is read or buffered
            raise ProtocolViolation(f"{self.peer} sent a {length}-byte frame of kind {kind} (at most {cap})")
        return decode(kind, self._read_exact(length))

    def has_message(self) -> bool:
        """Something arrived that we have not read (the peer may be telling us it gave up)."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def close_after_telling(self, timeout: float = 2.0) -> None:
        """Close so that what we last sent is read: stop sending, drain what the peer is still
        sending (closing with unread data would reset the link and lose our last message)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(timeout)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except OSError:
            pass
        self.close()

    def interrupt(self) -> None:
        """Wake whoever is blocked on this connection (from another thread): it sees the link
        end. The socket stays open until its user closes it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.interrupt()
        self.sock.close()

    # --- authentication (before any message) ---

    def prove(self, key: bytes, timeout: float = 10.0) -> None:
        """Source side: answer the target's challenge."""
        self.sock.settimeout(timeout)
        challenge = bytes(self._read_exact(CHALLENGE_BYTES))
        self.sock.sendall(hmac.new(key, challenge + AUTH_CONTEXT, hashlib.sha256).digest())
        verdict = bytes(self._read_exact(1))
        if verdict != b"\x01":
            raise TransportError(f"{self.peer} refused our authentication (wrong key?)")

    def challenge(self, key: bytes, timeout: float = 10.0) -> None:
        """Target side: make the source prove it holds the key; nothing else is read before."""
        self.sock.settimeout(timeout)
        challenge = secrets.token_bytes(CHALLENGE_BYTES)
        self.sock.sendall(challenge)
        answer = bytes(self._read_exact(hashlib.sha256().digest_size))
        ok = hmac.compare_digest(answer, hmac.new(key, challenge + AUTH_CONTEXT, hashlib.sha256).digest())
        self.sock.sendall(b"\x01" if ok else b"\x00")
        if not ok:
            raise AuthenticationFailed(f"{self.peer} failed authentication")


@dataclass(frozen=True)
class Tls:
    """Mutual TLS: our certificate and key, and the CA that must have signed the peer's."""

    cert: str
    key: str
    ca: str

    def context(self, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
            ctx.load_verify_locations(self.ca)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"TLS setup: {e}") from e
        ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: the peer's certificate must chain to `ca`
        ctx.check_hostname = False  # peers are pinned by the private CA, not by DNS names
        return ctx


def connect(address: str, key: bytes, timeout: float = 10.0, tls: Tls | None = None) -> Connection:
    host, port = parse_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            sock = tls.context(server=False).wrap_socket(sock)
    except (OSError, ssl.SSLError) as e:
        raise TransportError(f"cannot connect to {address}: {e}") from e
    conn = Connection(sock, address)
    try:
        conn.prove(key, timeout)
    except BaseException:
        conn.close()
        raise
    return conn


class Listener:
    """The target's listening socket. Binds loopback unless told otherwise; refuses to listen
    elsewhere without a key."""

    def __init__(self, address: str, key: bytes, tls: Tls | None = None) -> None:
        host, port = parse_address(address)
        if not key and tls is None and not is_loopback(host):
            raise TransportError(f"listening on {host} needs a key (--key-file) or TLS: anyone who "
                                 f"can reach it could send a guest")
        self.key = key
        self._tls = tls.context(server=True) if tls else None
        self.sock = socket.create_server((host, port), reuse_port=False)
        self.address = f"{host}:{self.sock.getsockname()[1]}"

    def accept(self, timeout: float | None = None) -> Connection:
        """The next connection, authenticated (TLS, then the key's challenge)."""
        sock, peer = self.accept_raw(timeout)
        return self.secure(sock, peer)

    def accept_raw(self, timeout: float | None = None) -> tuple[socket.socket, str]:
        """The next connection as it comes, before TLS or authentication (for a server that
        authenticates on threads of its own: `secure`)."""
        self.sock.settimeout(timeout)
        try:
            sock, peer = self.sock.accept()
        except TimeoutError as e:
            raise TransportError(f"no source connected to {self.address} within {timeout}s") from e
        except OSError as e:
            raise TransportError(f"accepting on {self.address}: {e}") from e
        return sock, f"{peer[0]}:{peer[1]}"

    def secure(self, sock: socket.socket, peer: str, timeout: float = 10.0) -> Connection:
        """TLS (if configured) and the key's challenge on an accepted socket; nothing else is
        read before. Closes it and raises `TransportError` if either fails."""
        if self._tls is not None:
            try:
                sock.settimeout(timeout)
                sock = self._tls.wrap_socket(sock, server_side=True)
            except (OSError, ssl.SSLError) as e:
                sock.close()
                raise TransportError(f"TLS with {peer} failed: {e}") from e
        conn = Connection(sock, peer)
        try:
            conn.challenge(self.key, timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self.sock.close()
