"""Protocol messages as frames, and back: the codec every connection uses, and peers' addresses.

A frame is `le32 body length ‖ u8 message kind ‖ body`. Bodies are msgpack maps of the message's
fields, except PAGES, whose body is `le32 round ‖ payload` so page data is never repacked. Input
from the network is hostile, on both sides: a frame's length is checked against its kind's cap
(`FRAME_CAPS`) before the body is read, a body is decoded within a budget (`BODY_LIMITS`: a flat
map of a few fields, checked by `formats` before msgpack allocates), every field is type-checked,
and the texts a peer sends (an error, a reason, a list of problems) are cut to `MAX_TEXT` bytes
before they are decoded. What breaks these rules is a `ProtocolViolation`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import struct
import typing

import msgpack

from formats import FormatError, MsgpackLimits, unpack_msgpack
from migrate.errors import ProtocolViolation
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
    K.MISSING: MAX_FIELD + 64, K.DISCARD: MAX_FIELD + 64, K.DISCARDED: 4 << 10, K.APPLIED: 4 << 10,
}
MAX_TEXT = 4096  # bytes of one text from the peer that are kept (and decoded); the rest is cut
MAX_PROBLEMS = 256  # problems of a Reject that are kept
# A message body: one map of at most 64 fields, each a scalar, bytes or a list of strings.
BODY_LIMITS = MsgpackLimits(max_str_len=MAX_FIELD, max_bin_len=MAX_FIELD, max_array_len=1 << 16,
                            max_map_len=64, max_blob_len=MAX_FRAME, max_items=1 << 16, max_depth=2)
# Messages whose str fields are the peer's own words: decoded raw, then cut, then UTF-8.
_TEXT_KINDS = frozenset({K.REJECT, K.CANCEL, K.ERROR})  # (VERDICT: bytes too; its 8 KiB cap bounds it)
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
