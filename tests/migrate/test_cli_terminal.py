"""The VM-running commands started from a terminal (a pty, as a user's shell gives them) end
cleanly in every way a run ends: Ctrl-C, SIGTERM, --timeout, the guest finishing, the guest
migrating away. Before the fix each of these aborted at interpreter shutdown (`Fatal Python
error: _enter_buffered_busy`, status 134) because a thread was blocked in sys.stdin's reader."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hv.vmm.control import call
from migrate.transport.listener import Listener

HV = [sys.executable, "-m", "hv.vmm.cli"]
MIGRATE = [sys.executable, "-m", "migrate.cli"]


class Terminal:
    """A command on its own pty: stdin, stdout and stderr all the terminal."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: run the command with the pty as its terminal
            os.execv(argv[0], argv)
        self.output = b""

    def read_until(self, text: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert time.monotonic() < deadline, f"no {text!r} in {self.output[-2000:]!r}"
            self._read(0.2)

    def _read(self, wait: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed its side
            return False
        self.output += data
        return bool(data)

    def finish(self, timeout: float = 60) -> int:
        """Read to the end; the exit status (negative: killed by that signal)."""
        deadline = time.monotonic() + timeout
        while self._read(0.2):
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _assert_clean(term: Terminal, status: int) -> str:
    """The terminal's text without its colours, checked: no crash, no traceback, status 0."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", term.output.decode(errors="replace"))
    assert "Fatal Python error" not in text and "Traceback" not in text, text[-3000:]
    assert status == 0, text[-3000:]
    return text


@pytest.mark.parametrize("ending", ["timeout", "ctrl-c", "sigterm", "guest-finished"])
def test_hv_run_on_a_terminal_ends_cleanly(tmp_path: Path, ending: str) -> None:
    api = tmp_path / "vm.sock"
    argv = [*HV, "run", "--mem", "64", "--ws", "4", "--api", str(api)]
    argv += {"timeout": ["--timeout", "1.5"], "guest-finished": ["--passes", "20"]}.get(ending, [])
    term = Terminal(argv)
    try:
        term.read_until(b"control socket")
        if ending == "ctrl-c":
            term.read_until(b"kvmig: pass")
            os.write(term.fd, b"\x03")  # the terminal's own Ctrl-C: SIGINT to its foreground
        elif ending == "sigterm":
            os.kill(term.pid, signal.SIGTERM)
        text = _assert_clean(term, term.finish())
    finally:
        term.kill()
    assert "hv: stopped" in text
    assert not api.exists()  # the socket file goes with the VM, SIGTERM included
    if ending == "sigterm":
        assert "SIGTERM" in text


def test_restore_and_recv_on_terminals_end_cleanly(tmp_path: Path) -> None:
    """migrate recv on a terminal takes a guest that `hv run` (on another terminal) migrates away
    from it: the source ends cleanly with the guest gone, the target with Ctrl-C; then migrate
    restore of a snapshot ends by --timeout."""
    source_api, target_api = tmp_path / "source.sock", tmp_path / "target.sock"
    listener = Listener("127.0.0.1:0", b"")
    port = listener.address.rsplit(":", 1)[1]
    listener.close()
    source = Terminal([*HV, "run", "--mem", "64", "--ws", "4", "--rate", "20", "--api", str(source_api)])
    target = Terminal([*MIGRATE, "recv", "--listen", f"127.0.0.1:{port}", "--api", str(target_api)])
    try:
        source.read_until(b"control socket")
        target.read_until(b"listening on")
        snap = tmp_path / "vm.snap"
        subprocess.run([*MIGRATE, "snapshot", "--api", str(source_api), "--out", str(snap)], check=True,
                       capture_output=True, timeout=60)
        sent = subprocess.run([*MIGRATE, "send", "--api", str(source_api), "--to", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        text = _assert_clean(source, source.finish())
        assert "migrated to" in text
        target.read_until(b"control socket")
        call(target_api, "status")
        os.kill(target.pid, signal.SIGINT)
        _assert_clean(target, target.finish())
        restored = Terminal([*MIGRATE, "restore", str(snap), "--timeout", "1"])
        try:
            assert "--timeout" in _assert_clean(restored, restored.finish())
        finally:
            restored.kill()
    finally:
        source.kill()
        target.kill()


def test_hv_run_with_stdin_an_open_pipe_ends_cleanly() -> None:
    """stdin a pipe that stays open (a supervisor's): the forwarding thread is stopped, not left
    blocked in a read while the interpreter finalizes."""
    proc = subprocess.Popen([*HV, "run", "--mem", "32", "--ws", "4", "--timeout", "1"], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = proc.stderr.read()  # to its end: the process exits with our end of stdin still open
        assert proc.wait(timeout=60) == 0, err
        assert "Fatal Python error" not in err and "hv: stopped" in err
    finally:
        proc.kill()
        proc.stdin.close()
