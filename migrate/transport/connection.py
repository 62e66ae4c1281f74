"""A socket that carries whole protocol messages (`migrate.transport.framing`), and the
authentication that opens it.

Before any message, the target authenticates the source: it sends a random challenge; the source
answers HMAC-SHA256(key, challenge ‖ "kvmigrate-auth-v1"). The key is pre-shared; on loopback it
may be empty (the connection then proves only that the peer is on this machine). With `Tls`, the
link is TLS with certificates checked both ways against a private CA (mutual authentication and
encryption); the challenge still runs inside it.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import select
import socket
import struct
import ssl
import time

from migrate.errors import AuthenticationFailed, ProtocolViolation, TransportError
from migrate.protocol import Message, MessageKind
from migrate.transport.framing import FRAME, FRAME_CAPS, MAX_FRAME, decode, encode, parse_address
from migrate.transport.tls import Tls

AUTH_CONTEXT = b"kvmigrate-auth-v1"
CHALLENGE_BYTES = 32


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
        return self.wait_readable(0)

    def wait_readable(self, timeout: float) -> bool:
        """Whether something arrives to be read within `timeout` seconds (0: already there)."""
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], timeout)
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
