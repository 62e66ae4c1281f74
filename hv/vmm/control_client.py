"""The client of a control socket (`hv.vmm.control`): one command, its progress, its answer.

It trusts nothing: the whole answer within its timeout, every line at most `MAX_REPLY` bytes,
each of the reply's shape (`parse_reply`), and the fields a command reads of the types it reads
them as (`expect`); anything else is `ControlError` "BadReply" or "Timeout" (a transport error,
exit 4), never a hang, a read of whatever the socket sends, or a traceback.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hv.errors import HvError

Progress = Callable[[dict[str, Any]], None]
MAX_REPLY = 1 << 20  # a client reads no reply line longer (a status is a few hundred bytes)
CALL_TIMEOUT = 30.0  # seconds a client waits for a whole answer, unless its command says otherwise


class ControlError(HvError):
    """A control command failed (locally: bad request; remotely: the error the server sent).
    `facts`: what the server said with it (a `Busy` names the holder and since when)."""

    def __init__(self, kind: str, message: str, facts: dict[str, Any] | None = None) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message, self.facts = kind, message, dict(facts or {})


def call(path: str | Path, command: str, progress: Progress | None = None, timeout: float | None = CALL_TIMEOUT,
         **args: Any) -> dict[str, Any]:
    """Send one command to a control socket; progress events go to `progress`; returns the result
    or raises ControlError with the server's error type and message. `timeout`: seconds for the
    whole answer (None: as long as the command takes, for one that reports progress as it
    works). What the socket says is checked: lines of at most `MAX_REPLY` bytes, JSON objects of
    the reply's shape; else ControlError "BadReply" (or "Timeout"), a transport error."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except TimeoutError as e:
            raise ControlError("Timeout", f"the control socket {path} did not take the connection within "
                                          f"{timeout:.0f} s") from e
        except OSError as e:
            raise ControlError("ConnectionError", f"cannot reach the control socket {path}: {e}") from e
        try:
            sock.sendall(json.dumps({"command": command, **args}).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # a server that refused us at once (too many connections) said why: read it
        except TimeoutError as e:
            raise ControlError("Timeout", f"the control socket {path} took no request within {timeout:.0f} s") from e
        lines = _reply_lines(sock, path, command, deadline)
        for line in lines:
            reply = parse_reply(line, path)
            if "progress" in reply:
                if progress is not None:
                    progress(reply["progress"])
                continue
            if reply["ok"]:
                return reply["result"]
            err = reply["error"]
            raise ControlError(err["type"], err["message"], err.get("facts"))
    raise ControlError("ConnectionError", f"{path} closed the connection before answering {command!r}")


def _reply_lines(sock: socket.socket, path: str | Path, command: str,
                 deadline: float | None) -> Iterator[bytes]:
    """The reply's lines as they come, each at most `MAX_REPLY` bytes, all before `deadline`."""
    buf = bytearray()
    while True:
        while (newline := buf.find(b"\n")) >= 0:
            yield bytes(buf[:newline])
            del buf[:newline + 1]
        if len(buf) > MAX_REPLY:
            raise ControlError("BadReply", f"{path} sent a reply line longer than {MAX_REPLY} bytes to {command!r}")
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError("Timeout", f"{path} did not answer {command!r} in time")
            sock.settimeout(left)
        try:
            chunk = sock.recv(MAX_REPLY + 1 - len(buf))
        except TimeoutError as e:
            raise ControlError("Timeout", f"{path} did not answer {command!r} in time") from e
        except OSError as e:
            raise ControlError("ConnectionError", f"{path}: {e}") from e
        if not chunk:
            return  # (a last line without its newline is no answer: it may have been cut)
        buf += chunk


def parse_reply(line: bytes, path: str | Path) -> dict[str, Any]:
    """One reply line, checked: `{"progress": {...}}`, `{"ok": true, "result": {...}}` or
    `{"ok": false, "error": {"type": str, "message": str[, "facts": {...}]}}`."""
    try:
        reply = json.loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ControlError("BadReply", f"{path} answered with something that is not JSON ({e})") from None
    shape = ""
    if not isinstance(reply, dict):
        shape = "not a JSON object"
    elif "progress" in reply:
        shape = "" if isinstance(reply["progress"], dict) else "a progress that is not an object"
    elif reply.get("ok") is True:
        shape = "" if isinstance(reply.get("result"), dict) else "a result that is not an object"
    elif reply.get("ok") is False:
        err = reply.get("error")
        if not (isinstance(err, dict) and isinstance(err.get("type"), str) and isinstance(err.get("message"), str)
                and isinstance(err.get("facts", {}), dict | None)):
            shape = "an error without a type and a message"
    else:
        shape = "neither progress nor an answer"
    if shape:
        raise ControlError("BadReply", f"{path} answered with {shape}: {line[:200]!r}")
    return reply


def expect(result: dict[str, Any], path: str | Path, command: str, required: dict[str, type | tuple[type, ...]],
           optional: dict[str, type | tuple[type, ...]] | None = None) -> dict[str, Any]:
    """`result`, if its fields a client reads have the types it reads them as; else ControlError
    "BadReply" naming the first that does not (a number is an int or a float, never a bool)."""
    for name, types in [*required.items(), *(optional or {}).items()]:
        if name not in result:
            if name in required:
                raise ControlError("BadReply", f"{path} answered {command!r} without {name!r}")
            continue
        value = result[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _flat(types)):
            raise ControlError("BadReply", f"{path} answered {command!r} with {name!r} = {str(value)[:80]!r}, "
                                           f"not {' or '.join(t.__name__ for t in _flat(types))}")
    return result


def _flat(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)
