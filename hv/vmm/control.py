"""A running VM's control socket: `hv run --api SOCK` (pause, resume, stop, status, and more).

One request per connection line, as JSON: `{"command": "pause", ...arguments}`. Replies are JSON
lines: any number of `{"progress": {...}}` while the command works, then exactly one
`{"ok": true, "result": {...}}` or `{"ok": false, "error": {"type": ..., "message": ...}}`; an
error that has facts adds them as `"facts": {...}` (`Busy`: `action`, `owner`, `since` (Unix
time), `state` "held" or "in-doubt").

hv serves the lifecycle commands itself: `status`, `pause`, `resume`, `stop`, `guest-check`.
While a migration or snapshot owns the run state (`hv.vmm.owner`), or a hand-over is in doubt,
`pause`, `resume`, `stop` and `guest-check` are refused with `Busy`; `status` says who holds it
(`state` is "in-doubt" while a hand-over is). Other packages add commands (snapshot, migration)
through the `kvmigrate.control` entry-point group: each entry point is a callable that takes the
`ControlServer` and calls `register` on it. hv thus knows their names only at run time.

The server survives its clients: one thread reads every connection's request (a selector), so an
idle connection costs a file descriptor and no thread, and is closed after `REQUEST_TIMEOUT`; a
command runs on a thread of its own; at most `MAX_CONNECTIONS` are open at once (one more is told
`TooManyConnections` and closed); a client that stops reading its replies is dropped after
`REPLY_TIMEOUT` without stopping the command. A request whose client half-closes without a
newline is answered as if it had one. The socket path is claimed safely: a file that is not a
socket is never replaced, a socket a live VM answers on is never taken over, a stale one is
(`claim_socket`), and a path AF_UNIX cannot hold is refused.

A server is claimed before its machine exists (`ControlServer(path)`, `start()`) and serves it
from `attach(ctx)` on: a command that comes before waits for it up to `ATTACH_WAIT` (a boot),
then is told `NoMachine` (a `migrate recv` still waiting for its guest). So a VMM claims
its socket before it boots, restores, or (a migration target) says Ready, and nothing about the
socket can fail once the guest runs (after Commit nothing may fail that loses the guest).
Commands registered with `register_unattached` are what a VMM waiting for its machine serves
itself (`migrate restore --wait`: `restore`, which makes the machine, and its own `status`):
answered at once while no machine is attached; once one is, a command only served that way is
told `NotWaiting`. Their handlers get the request's arrival (`time.monotonic_ns`, when its line
was whole), so a VMM can say how long it took from there.

The client is `hv.vmm.control_client` (`call`, re-exported here). This module passes 450 lines
because its parts are one concern that only works whole: the path claimed, the one selector
thread reading requests, a thread per command, and the built-in lifecycle commands.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import resource
import secrets
import selectors
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from hv.errors import Busy, ControlSocketError
# the client's side (`call`), where callers have always found it; the server's answers are its input
from hv.vmm.control_client import (CALL_TIMEOUT, MAX_REPLY, ControlError, Progress, call,  # noqa: F401
                                   expect, parse_reply)
from hv.vmm.machine import Machine
from hv.vmm.owner import owner_of

log = logging.getLogger(__name__)

Handler = Callable[["ControlContext", dict[str, Any], Progress], dict[str, Any]]
# a command served before there is a machine: its arguments, progress, and when the request arrived (ns)
UnattachedHandler = Callable[[dict[str, Any], Progress, int], dict[str, Any]]
ENTRY_POINT_GROUP = "kvmigrate.control"
MAX_REQUEST = 64 * 1024
ATTACH_WAIT = 30.0  # seconds a request that came before the machine waits for it (a boot), then NoMachine
SOCKET_PATH_MAX = 107  # bytes of an AF_UNIX path: sun_path's 108 less the terminating NUL
REQUEST_TIMEOUT = 10.0  # seconds a connection may take to send its request line
REPLY_TIMEOUT = 10.0  # seconds a reply (or a progress line) may wait for the client to read it
# open at once, idle or busy: well inside the process's file descriptors (the VM needs its own)
MAX_CONNECTIONS = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)


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
    hold = owner_of(m).current
    return {
        "state": "in-doubt" if hold is not None and hold.in_doubt else m.state.value,
        "run_state": m.state.value,
        "held_by": hold.facts() if hold is not None else None,
        "vcpus": len(m.vcpus),
        "memory_bytes": m.vm.memory.total_size,
        "exits": sum(s.exits + s.fast_io_exits for s in m.stats),
        "fast_io_exits": sum(s.fast_io_exits for s in m.stats),  # served in C, in the vCPU loop
        "devices": [d.device_id for d in m.device_layout()],
        "throttle": m.throttle,
    }


def _pause(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    owner_of(ctx.machine).check("pause")
    return {"state": "paused", "pause_seconds": ctx.machine.pause()}


def _resume(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    owner_of(ctx.machine).check("resume")
    return {"state": "running", "resume_seconds": ctx.machine.resume()}


def _guest_check(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    """The built-in guest's memory check, on a briefly paused guest (tests and the demo use it
    to look inside a VM running in another process)."""
    from hv.guests import builtin as builtin_guest

    m = ctx.machine
    owner_of(m).check("guest-check")  # it pauses and resumes: not while someone else owns that
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
    owner_of(ctx.machine).check("stop")
    ctx.machine.stop()
    ctx.finish("stopped through the control socket")
    return {"state": "stopped"}


@functools.cache
def extensions() -> tuple[Callable[[ControlServer], None], ...]:
    """The registrars other packages add through the `kvmigrate.control` entry point, found and
    imported once. The scan and the imports hold the interpreter lock for tens to hundreds of ms,
    so a VMM that is about to run a guest (a migration target) calls this first, not after."""
    return tuple(ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP))


# --- the socket path ------------------------------------------------------------------------------


def _socket_at(path: Path) -> os.stat_result | None:
    """What is at `path`: None if nothing; the stat of a socket that nobody answers on (stale);
    `ControlSocketError` for anything else (never ours to remove)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        kind = ("a symbolic link" if stat.S_ISLNK(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a regular file" if stat.S_ISREG(st.st_mode) else "not a socket")
        raise ControlSocketError(path, f"is {kind}, not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return st  # nobody listens: a socket left by a VM that ended without cleaning up
        except OSError as e:
            raise ControlSocketError(path, f"cannot tell whether a VM serves this socket ({e}); "
                                           "refusing to replace it") from e
    raise ControlSocketError(path, "in use by a running VM (it answers on this socket); "
                                   "stop that VM or choose another path")


def check_socket_path(path: str | Path) -> None:
    """Can `path` become a control socket? Raises `ControlSocketError` saying why not (missing
    directory, a non-socket there, a live VM's socket). For commands to ask before they boot."""
    path = Path(path)
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        raise ControlSocketError(path, f"is {len(os.fsencode(path))} bytes long; a unix socket's path holds at "
                                       f"most {SOCKET_PATH_MAX}")
    if not path.parent.is_dir():
        raise ControlSocketError(path, f"the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise ControlSocketError(path, f"cannot create a socket in {path.parent} (permission denied)")
    _socket_at(path)


def _staging(path: Path) -> Path:
    """A fresh name beside `path` that AF_UNIX can hold whenever `path` fits: as long as the
    room left allows (a hidden random name; for a path at the very limit, a short random one)."""
    room = len(os.fsencode(path.name)) + SOCKET_PATH_MAX - len(os.fsencode(path))
    token = secrets.token_hex(8)
    return path.with_name(("." + token)[:room] if room >= 8 else token[:room])


def claim_socket(path: str | Path) -> tuple[socket.socket, os.stat_result]:
    """A listening socket at `path`, made owner-only and put there atomically (`link`, which
    never replaces): a stale socket is removed first, anything else refused. Returns the socket
    and the stat of what is now at `path` (so `close` removes only its own). The socket is bound
    under a random staging name first, never one that exists (bind does not replace)."""
    path = Path(path)
    check_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging: Path | None = None
    try:
        for _ in range(32):
            candidate = _staging(path)
            try:
                sock.bind(str(candidate))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    continue  # someone's file of that name: never ours to remove; another name
                raise ControlSocketError(path, f"cannot bind a socket beside it ({e})") from e
            staging = candidate
            break
        else:
            raise ControlSocketError(path, "found no free staging name beside it")
        os.chmod(staging, 0o600)  # the socket can pause, stop and copy out the guest: owner only
        sock.listen(socket.SOMAXCONN)  # a burst of clients waits in the queue, never EAGAIN
        for _ in range(3):
            try:
                os.link(staging, path)  # the path appears only once it accepts connections
                break
            except FileExistsError:
                stale = _socket_at(path)  # raises for a live socket or a non-socket
                if stale is not None:
                    current = os.lstat(path)
                    if (current.st_dev, current.st_ino) == (stale.st_dev, stale.st_ino):
                        path.unlink()
            except OSError as e:
                raise ControlSocketError(path, f"cannot put the socket there ({e})") from e
        else:
            raise ControlSocketError(path, "another process keeps creating this path")
        return sock, os.lstat(path)
    except BaseException:
        sock.close()
        raise
    finally:
        if staging is not None:
            try:
                staging.unlink()
            except FileNotFoundError:
                pass


# --- the server -----------------------------------------------------------------------------------


@dataclass
class _Pending:
    """A connection whose request line has not all arrived."""

    sock: socket.socket
    deadline: float
    data: bytearray = field(default_factory=bytearray)


class ControlServer:
    """Serves a Machine's control socket: one selector thread reads requests, a thread per
    command being answered. Without `ctx` the socket is claimed (`start`) before there is a
    machine, and commands are told `NoMachine` until `attach`."""

    def __init__(self, path: str | Path, ctx: ControlContext | None = None, *, load_extensions: bool = True,
                 max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 reply_timeout: float = REPLY_TIMEOUT, attach_wait: float = ATTACH_WAIT) -> None:
        self.path = Path(path)
        self.attach_wait = attach_wait
        self.ctx = ctx
        self.max_connections, self.request_timeout, self.reply_timeout = (max_connections, request_timeout,
                                                                          reply_timeout)
        self.handlers: dict[str, Handler] = {
            "status": _status, "pause": _pause, "resume": _resume, "stop": _stop,
            "guest-check": _guest_check,
        }
        self.unattached: dict[str, UnattachedHandler] = {}
        self._exclusive: set[str] = set()
        if load_extensions:
            for register in extensions():
                register(self)
        self._sock: socket.socket | None = None
        self._claimed: os.stat_result | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._closing = threading.Event()
        self._attached = threading.Event()  # a machine is served (or the server closes)
        if ctx is not None:
            self._attached.set()
        self._busy = threading.Lock()  # one exclusive command at a time (two snapshots would fight)
        self._busy_with: tuple[str, float] = ("", 0.0)
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._connections: set[threading.Thread] = set()

    def register(self, name: str, handler: Handler, *, exclusive: bool = False) -> None:
        """Add a command. `exclusive` ones (snapshot, migration) run one at a time; the others
        (status, a cancel) are served while one of those runs."""
        self.handlers[name] = handler
        if exclusive:
            self._exclusive.add(name)

    def register_unattached(self, name: str, handler: UnattachedHandler, *, exclusive: bool = False) -> None:
        """Add a command served while no machine is attached (see the module's docstring); a
        name may have both kinds of handler (`status`). `exclusive` as for `register` (one
        `restore` at a time)."""
        self.unattached[name] = handler
        if exclusive:
            self._exclusive.add(name)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._pending) + len(self._connections)

    @property
    def threads(self) -> int:
        """Threads answering commands now (idle connections have none)."""
        with self._lock:
            return len(self._connections)

    def attach(self, ctx: ControlContext) -> None:
        """Serve `ctx`'s machine from now on (nothing here can fail: the socket is claimed)."""
        self.ctx = ctx
        self._attached.set()

    def start(self) -> None:
        self._sock, self._claimed = claim_socket(self.path)
        self._sock.setblocking(False)
        self._thread = threading.Thread(target=self._select_loop, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        self._attached.set()  # a request waiting for a machine is told there is none
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._thread is None or not self._thread.is_alive():
            self._wake_r.close()
            self._wake_w.close()
        self._remove_path()
        # Commands still being answered (a `stop` that ended the run loop, say) get their reply
        # out before the process goes; a long one (a migration) is not waited for forever.
        with self._lock:
            threads = list(self._connections)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(5.0)

    def _remove_path(self) -> None:
        """Remove the socket file if it is still the one we put there (never someone else's)."""
        if self._claimed is None:
            return
        try:
            current = os.lstat(self.path)
            if (current.st_dev, current.st_ino) == (self._claimed.st_dev, self._claimed.st_ino):
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._claimed = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading requests: one thread, every connection -------------------------------------------

    def _select_loop(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._sock, selectors.EVENT_READ, "listen")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._closing.is_set():
                with self._lock:
                    deadlines = [p.deadline for p in self._pending.values()]
                timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
                for key, _ in selector.select(timeout):
                    if key.data == "listen":
                        self._accept_all(selector)
                    elif key.data == "wake":
                        return
                    else:
                        self._read(selector, key.data)
                self._expire(selector)
        finally:
            with self._lock:
                pending, self._pending = list(self._pending.values()), {}
            for p in pending:
                p.sock.close()
            selector.close()

    def _accept_all(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors, say: wait rather than spin on a ready socket
                log.warning("control socket: accept failed: %s", e)
                self._closing.wait(0.1)
                return
            if self.open_connections >= self.max_connections:
                # refused politely: the reason fits in an empty socket buffer, so this cannot block
                self._refuse(conn, ControlError("TooManyConnections",
                                                f"{self.max_connections} connections are open; try again"))
                continue
            conn.setblocking(False)
            pending = _Pending(conn, time.monotonic() + self.request_timeout)
            with self._lock:
                self._pending[conn.fileno()] = pending
            selector.register(conn, selectors.EVENT_READ, pending)

    @staticmethod
    def _refuse(conn: socket.socket, error: ControlError) -> None:
        try:
            conn.setblocking(False)
            conn.send(json.dumps({"ok": False, "error": {"type": error.kind, "message": error.message}})
                      .encode() + b"\n")
        except OSError:
            pass
        conn.close()

    def _drop(self, selector: selectors.BaseSelector, pending: _Pending) -> None:
        selector.unregister(pending.sock)
        with self._lock:
            self._pending.pop(pending.sock.fileno(), None)

    def _read(self, selector: selectors.BaseSelector, pending: _Pending) -> None:
        try:
            chunk = pending.sock.recv(MAX_REQUEST + 1 - len(pending.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk and not pending.data:
            self._drop(selector, pending)
            pending.sock.close()
            return
        pending.data += chunk
        newline = pending.data.find(b"\n")
        if chunk and newline < 0 and len(pending.data) <= MAX_REQUEST:
            return
        self._drop(selector, pending)
        if newline < 0 and len(pending.data) > MAX_REQUEST:
            self._refuse(pending.sock, ControlError("BadRequest", f"a request longer than {MAX_REQUEST} bytes"))
            return
        # a line, or what came before the client half-closed (its last request: no newline needed)
        line = bytes(pending.data[:newline + 1] if newline >= 0 else pending.data)
        received_ns = time.monotonic_ns()
        pending.sock.setblocking(True)
        pending.sock.settimeout(self.reply_timeout)
        thread = threading.Thread(target=self._serve, args=(pending.sock, line, received_ns), name="control-conn",
                                  daemon=True)
        with self._lock:
            self._connections.add(thread)
        thread.start()

    def _expire(self, selector: selectors.BaseSelector) -> None:
        now = time.monotonic()
        with self._lock:
            late = [p for p in self._pending.values() if p.deadline <= now]
        for pending in late:
            log.debug("control socket: closing a connection that sent no request in %.0f s",
                      self.request_timeout)
            self._drop(selector, pending)
            pending.sock.close()

    # --- answering: a thread per command ----------------------------------------------------------

    def _serve(self, conn: socket.socket, line: bytes, received_ns: int) -> None:
        try:
            with conn:
                self._answer(conn, line, received_ns)
        except OSError as e:  # the client went before its reply was out: the command's work stands
            log.info("control client gone before the reply: %s", e)
        finally:
            with self._lock:
                self._connections.discard(threading.current_thread())

    def _answer(self, conn: socket.socket, line: bytes, received_ns: int) -> None:
        gone = threading.Event()  # the client stopped reading: the command goes on without it

        def reply(obj: dict[str, Any]) -> None:
            if gone.is_set():
                return
            try:
                conn.sendall(json.dumps(obj).encode() + b"\n")
            except OSError as e:
                gone.set()
                log.info("control client went away (%s); the command goes on", e)

        try:
            name, request = parse_request(line)
            progress: Progress = lambda p: reply({"progress": p})  # noqa: E731
            waiting = self.unattached.get(name)
            if waiting is not None and self.ctx is None and not self._closing.is_set():
                result = self._run(name, lambda: waiting(request, progress, received_ns))
                reply({"ok": True, "result": result})
                return
            self._attached.wait(self.attach_wait)  # a request that came during the boot waits for it
            if self.ctx is None:
                raise ControlError("NoMachine", f"no guest runs here yet; {name!r} is served once one does")
            ctx, handler = self.ctx, self.handlers.get(name)
            if handler is None and waiting is not None:
                raise ControlError("NotWaiting", f"{name!r} is served only while this process waits for its "
                                                 "guest, and one runs here now")
            if handler is None:
                raise ControlError("UnknownCommand",
                                   f"{name!r} (this VM serves: {', '.join(sorted(self.handlers))})")
            result = self._run(name, lambda: handler(ctx, request, progress))
            reply({"ok": True, "result": result})
        except Exception as e:
            log.info("control command failed: %s", e)
            self._reply_error(reply, e)

    def _run(self, name: str, command: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`command`, one at a time with the other exclusive ones if `name` is one of them."""
        if name not in self._exclusive:
            return command()
        if not self._busy.acquire(blocking=False):
            running, since = self._busy_with
            raise Busy(name, f"the {running!r} command", since)
        try:
            self._busy_with = (name, time.time())
            return command()
        finally:
            self._busy.release()

    @staticmethod
    def _reply_error(reply: Callable[[dict[str, Any]], None], error: BaseException) -> None:
        kind = error.kind if isinstance(error, ControlError) else type(error).__name__
        message = error.message if isinstance(error, ControlError) else str(error)
        body: dict[str, Any] = {"type": kind, "message": message}
        facts = error.facts if isinstance(error, ControlError) else getattr(error, "facts", None)
        if callable(facts):
            facts = facts()
        if facts:
            body["facts"] = facts
        reply({"ok": False, "error": body})


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """A request line (what a client sent, at most `MAX_REQUEST` bytes) -> the command's name and
    its arguments; ControlError "BadRequest" for anything else."""
    try:
        request = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ControlError("BadRequest", f"not JSON: {e}") from None
    except RecursionError:
        raise ControlError("BadRequest", "not JSON: nested too deep") from None
    if not isinstance(request, dict) or not isinstance(request.get("command"), str):
        raise ControlError("BadRequest", "expected a JSON object with a 'command' string")
    name = request.pop("command")
    return name, request
