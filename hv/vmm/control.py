"""A running VM's control socket: `hv run --api SOCK` (pause, resume, stop, status, and more).

One request per connection line, as JSON: `{"command": "pause", ...arguments}`. Replies are JSON
lines: any number of `{"progress": {...}}` while the command works, then exactly one
`{"ok": true, "result": {...}}` or `{"ok": false, "error": {"type": ..., "message": ...}}`.

hv serves the lifecycle commands itself. Other packages add commands (snapshot, migration)
through the `kvmigrate.control` entry-point group: each entry point is a callable that takes the
`ControlServer` and calls `register` on it. hv thus knows their names only at run time.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hv.errors import HvError
from hv.vmm.machine import Machine

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
Handler = Callable[["ControlContext", dict[str, Any], Progress], dict[str, Any]]
ENTRY_POINT_GROUP = "kvmigrate.control"
MAX_REQUEST = 64 * 1024


class ControlError(HvError):
    """A control command failed (locally: bad request; remotely: the error the server sent)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind, self.message = kind, message


@dataclass
class ControlContext:
    """What a command handler may use: the machine, and where to record that the process
    should end (a migrated-away VM has nothing left to run)."""

    machine: Machine
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the console, the guest params
    finished: threading.Event = field(default_factory=threading.Event)
    finish_reason: str = ""

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.finished.set()


def _status(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    m = ctx.machine
    return {
        "state": m.state.value,
        "vcpus": len(m.vcpus),
        "memory_bytes": m.vm.memory.total_size,
        "exits": sum(s.exits for s in m.stats),
        "devices": [d.device_id for d in m.device_layout()],
        "throttle": m.throttle,
    }


def _pause(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    return {"state": "paused", "pause_seconds": ctx.machine.pause()}


def _resume(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    return {"state": "running", "resume_seconds": ctx.machine.resume()}


def _guest_check(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    """The built-in guest's memory check, on a briefly paused guest (tests and the demo use it
    to look inside a VM running in another process)."""
    from hv.guests import builtin as builtin_guest

    m = ctx.machine
    was_running = m.state.value == "running"
    if was_running:
        m.pause()
    try:
        status = builtin_guest.read_status(m.vm.memory)
        check = builtin_guest.check_memory(m.vm.memory)
    finally:
        if was_running:
            m.resume()
    return {"ok": check.ok, "passes": status.passes, "split": check.split, "summary": str(check),
            "bad_counters": list(check.bad_counters), "bad_fill": list(check.bad_fill),
            "cpus_up": status.cpus_up, "cpu_work": list(status.cpu_work)}


def _stop(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    ctx.machine.stop()
    ctx.finish("stopped through the control socket")
    return {"state": "stopped"}


@functools.cache
def extensions() -> tuple[Callable[[ControlServer], None], ...]:
    """The registrars other packages add through the `kvmigrate.control` entry point, found and
    imported once. The scan and the imports hold the interpreter lock for tens to hundreds of ms,
    so a VMM that is about to run a guest (a migration target) calls this first, not after."""
    return tuple(ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP))


class ControlServer:
    """Serves a Machine's control socket on a thread; one thread per connection."""

    def __init__(self, path: str | Path, ctx: ControlContext, *, load_extensions: bool = True) -> None:
        self.path = Path(path)
        self.ctx = ctx
        self.handlers: dict[str, Handler] = {
            "status": _status, "pause": _pause, "resume": _resume, "stop": _stop,
            "guest-check": _guest_check,
        }
        self._exclusive: set[str] = set()
        if load_extensions:
            for register in extensions():
                register(self)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._busy = threading.Lock()  # one exclusive command at a time (two snapshots would fight)
        self._connections: set[threading.Thread] = set()

    def register(self, name: str, handler: Handler, *, exclusive: bool = False) -> None:
        """Add a command. `exclusive` ones (snapshot, migration) run one at a time; the others
        (status, a cancel) are served while one of those runs."""
        self.handlers[name] = handler
        if exclusive:
            self._exclusive.add(name)

    def start(self) -> None:
        if self.path.exists():
            self.path.unlink()  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        sock.bind(str(staging))
        os.chmod(staging, 0o600)  # the socket can pause, stop and copy out the guest: owner only
        sock.listen(4)
        os.replace(staging, self.path)  # the path appears only once it accepts connections
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        # Commands still being answered (a `stop` that ended the run loop, say) get their reply
        # out before the process goes; a long one (a migration) is not waited for forever.
        for thread in list(self._connections):
            if thread is not threading.current_thread():
                thread.join(5.0)

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True)
            self._connections.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError as e:  # the client went before its reply was out: the command's work stands
            log.info("control client gone before the reply: %s", e)
        finally:
            self._connections.discard(threading.current_thread())

    def _answer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            def reply(obj: dict[str, Any]) -> None:
                f.write(json.dumps(obj).encode() + b"\n")
                f.flush()

            line = f.readline(MAX_REQUEST + 1)
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("command"), str):
                    raise ControlError("BadRequest", "expected a JSON object with a 'command' string")
                name = request.pop("command")
                handler = self.handlers.get(name)
                if handler is None:
                    raise ControlError("UnknownCommand",
                                       f"{name!r} (this VM serves: {', '.join(sorted(self.handlers))})")
                if name in self._exclusive:
                    if not self._busy.acquire(blocking=False):
                        raise ControlError("Busy", f"another long command is running; {name!r} refused")
                    try:
                        result = handler(self.ctx, request, lambda p: reply({"progress": p}))
                    finally:
                        self._busy.release()
                else:
                    result = handler(self.ctx, request, lambda p: reply({"progress": p}))
                reply({"ok": True, "result": result})
            except (ValueError, UnicodeDecodeError) as e:
                self._reply_error(reply, ControlError("BadRequest", f"not JSON: {e}"))
            except Exception as e:
                log.info("control command failed: %s", e)
                self._reply_error(reply, e)

    @staticmethod
    def _reply_error(reply: Callable[[dict[str, Any]], None], error: BaseException) -> None:
        kind = error.kind if isinstance(error, ControlError) else type(error).__name__
        message = error.message if isinstance(error, ControlError) else str(error)
        try:
            reply({"ok": False, "error": {"type": kind, "message": message}})
        except OSError:
            pass  # the caller went away


def call(path: str | Path, command: str, progress: Progress | None = None, timeout: float | None = None,
         **args: Any) -> dict[str, Any]:
    """Send one command to a control socket; progress events go to `progress`; returns the result
    or raises ControlError with the server's error type and message."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as e:
            raise ControlError("ConnectionError", f"cannot reach the control socket {path}: {e}") from e
        with sock.makefile("rwb") as f:
            f.write(json.dumps({"command": command, **args}).encode() + b"\n")
            f.flush()
            for line in f:
                reply = json.loads(line)
                if "progress" in reply:
                    if progress is not None:
                        progress(reply["progress"])
                    continue
                if reply.get("ok"):
                    return reply.get("result", {})
                err = reply.get("error", {})
                raise ControlError(err.get("type", "Error"), err.get("message", ""))
    raise ControlError("ConnectionError", f"{path} closed the connection before answering {command!r}")
