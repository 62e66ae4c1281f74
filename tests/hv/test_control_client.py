"""The control socket's client against a hostile server (issue 21, item 4): it has a timeout,
reads a bounded amount, and checks the shape of what it is told; a malformed answer is a
transport error (exit 4) with a message. And the server answers a last request that has no
newline before its client half-closes (item 5). The servers here are the peer under test: a
unix socket that answers what a hostile VM process might."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hv.vmm.command import ExitStatus
from hv.vmm.control import MAX_REPLY, ControlContext, ControlError, ControlServer, call

HV = [sys.executable, "-m", "hv.vmm.cli"]
MIGRATE = [sys.executable, "-m", "migrate.cli"]
MiB = 1 << 20


@contextmanager
def hostile(path: Path, answer: Callable[[socket.socket], None]) -> Iterator[None]:
    """A server at `path` that reads each connection's request line and then does `answer`."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    stop = threading.Event()

    def one(conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                answer(conn)
            except OSError:
                pass  # the client went: what it should do

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(10)


def _says(line: bytes) -> Callable[[socket.socket], None]:
    return lambda conn: conn.sendall(line)


def _silent(conn: socket.socket) -> None:
    conn.recv(1)  # waits for the client to go


def _floods(conn: socket.socket) -> None:
    chunk = b"x" * MiB
    for _ in range(200):  # 200 MB, one line
        conn.sendall(chunk)


MALFORMED = {
    "not JSON": b"<html>\n",
    "not an object": b'[1, 2]\n',
    "result not an object": b'{"ok": true, "result": "not an object"}\n',
    "neither": b'{"hello": 1}\n',
    "error without a type": b'{"ok": false, "error": {"message": 5}}\n',
    "progress not an object": b'{"progress": 7}\n',
    "bad utf-8": b'{"ok": true, "result": {"a": "\xff"}}\n',
}


@pytest.mark.parametrize("what", MALFORMED)
def test_a_malformed_answer_is_a_bad_reply(tmp_path: Path, what: str) -> None:
    path = tmp_path / "h.sock"
    with hostile(path, _says(MALFORMED[what])), pytest.raises(ControlError) as caught:
        call(path, "status", timeout=5)
    assert caught.value.kind == "BadReply", caught.value


def test_a_silent_server_times_out(tmp_path: Path) -> None:
    path = tmp_path / "h.sock"
    with hostile(path, _silent), pytest.raises(ControlError) as caught:
        t0 = time.monotonic()
        call(path, "status", timeout=0.5)
    assert caught.value.kind == "Timeout" and time.monotonic() - t0 < 5


def test_a_200_mb_reply_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "h.sock"
    with hostile(path, _floods):
        tracemalloc.start()
        try:
            with pytest.raises(ControlError) as caught:
                call(path, "status", timeout=30)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert caught.value.kind == "BadReply" and "longer than" in caught.value.message
    assert peak < 4 * MAX_REPLY, peak


def test_the_commands_exit_4_with_a_message_on_a_hostile_socket(tmp_path: Path) -> None:
    answers = {"flood": _floods, "not-object": _says(MALFORMED["result not an object"]),
               "bad-phase": _says(b'{"ok": true, "result": {"phase": 5}}\n'),
               "bad-round": _says(b'{"ok": true, "result": {"round": "x", "phase": "precopy"}}\n'),
               "silent": _silent, "bare": _says(b'{"ok": true, "result": {"outcome": "completed"}}\n')}
    commands = {"flood": [[*HV, "status"]],
                "not-object": [[*MIGRATE, "resolve"], [*HV, "stop"]],
                "bad-phase": [[*MIGRATE, "status"]],
                "bad-round": [[*MIGRATE, "cancel"]],
                "silent": [[*MIGRATE, "status", "--timeout", "0.5"]],
                "bare": [[*MIGRATE, "send", "--to", "127.0.0.1:1", "--api"], [*MIGRATE, "snapshot", "--out", "x", "--api"]]}
    with (hostile(tmp_path / "flood.sock", answers["flood"]), hostile(tmp_path / "not-object.sock", answers["not-object"]),
          hostile(tmp_path / "bad-phase.sock", answers["bad-phase"]),
          hostile(tmp_path / "bad-round.sock", answers["bad-round"]), hostile(tmp_path / "silent.sock", answers["silent"]),
          hostile(tmp_path / "bare.sock", answers["bare"])):
        runs = [(name, subprocess.Popen([*argv, str(tmp_path / f"{name}.sock"), "--json"], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL))
                for name, argvs in commands.items() for argv in argvs]
        for name, proc in runs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == ExitStatus.TRANSPORT, (name, proc.args, err)
            error = json.loads(out)["error"]
            assert error["type"] in ("BadReply", "Timeout") and error["message"], (name, error)
            assert "Traceback" not in err


def test_a_last_request_without_a_newline_is_answered_before_the_half_close(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    server = ControlServer(path, ControlContext(machine=None), load_extensions=False)  # type: ignore[arg-type]
    server.register("echo", lambda _ctx, args, _progress: {"echo": args})
    with server, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b'{"command": "echo", "x": 1}')  # no newline
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert json.loads(reply) == {"ok": True, "result": {"echo": {"x": 1}}}
