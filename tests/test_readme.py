"""README.md cannot rot: the blocks it marks as run are run here as written, and every row of its
exit-status table has a test through the command line (here, or the one `EXIT_STATUS_TESTS` names).
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hv import Kvm, VmConfig
from hv.guests.builtin import GuestParams
from hv.vmm.builder import VirtioConfig, builtin_machine
from hv.vmm.command import INTERRUPTED, ExitStatus
from hv.vmm.control import call
from hv.vmm.machine import discard
from migrate import Listener, snapshot

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
MARK = "<!-- run by tests/test_readme.py -->"
BIN = Path(sys.executable).parent  # the venv's: hv and migrate are there
MIGRATE = [sys.executable, "-m", "migrate.cli"]
HV = [sys.executable, "-m", "hv.vmm.cli"]


def marked_blocks(language: str) -> list[str]:
    """The fenced `language` blocks that follow the README's run mark."""
    pattern = re.escape(MARK) + r"\s*```" + language + r"\n(.*?)```"
    return re.findall(pattern, README, re.DOTALL)


def test_the_readme_marks_a_shell_session_and_a_python_example() -> None:
    assert len(marked_blocks("sh")) == 1 and len(marked_blocks("python")) == 1
    assert README.count(MARK) == 2  # nothing marked that this module does not run


def test_the_readme_shell_session_runs_as_written(tmp_path: Path) -> None:
    """The session in a scratch directory, `set -e`: every command must succeed (exit 0)."""
    (script,) = marked_blocks("sh")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["sh", "-e", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the session's background VM too, whatever happened
    assert proc.returncode == 0, err[-3000:]
    assert {"vm.snap", "vm.inc", "console.txt", "restored.txt"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "console.txt").stat().st_size > 0 and (tmp_path / "restored.txt").stat().st_size > 0
    assert not (tmp_path / "vm.sock").exists()  # `hv stop` ended it and its socket went


def test_the_readme_python_example_runs_as_written(tmp_path: Path) -> None:
    (example,) = marked_blocks("python")
    for node in ast.walk(ast.parse(example)):  # the public packages only, no module internals
        if isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in ("migrate", "hv"):
            assert node.module in ("migrate", "hv", "hv.guests.builtin", "hv.vmm.builder"), node.module
    done = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "completed" in done.stdout.lower(), done.stdout


# --- the exit-status table, row by row through the command line ---------------------------------------

# rows tested elsewhere, through the CLI (this module has the rest)
EXIT_STATUS_TESTS = {
    1: "tests/migrate/test_cli.py::test_verify_checks_digest_and_the_guests_rule",
    6: "tests/migrate/test_postcopy.py::test_migrate_recv_keeps_a_stranded_guest_paused_until_told",
}
HERE = {0: "test_the_readme_shell_session_runs_as_written",  # `migrate restore --timeout` among others
        2: "test_exit_2_restore_of_a_file_that_is_not_there",
        3: "test_exit_3_restore_onto_a_disk_that_changed_since",
        4: "test_exit_4_recv_on_a_port_in_use",
        5: "test_exit_5_and_130_ctrl_c_in_send_cancels_and_while_recv_waits",
        7: "test_exit_7_a_completed_migration_past_its_downtime_target"}
HERE[130] = HERE[5]


def test_every_row_of_the_exit_status_table_has_a_test() -> None:
    table = README[README.index("| status | meaning |"):]
    statuses = {int(m) for m in re.findall(r"^\| (\d+) \|", table.split("\n\n")[0], re.MULTILINE)}
    assert statuses == {int(s) for s in ExitStatus} | {INTERRUPTED}  # the table is the whole of it
    assert statuses == set(EXIT_STATUS_TESTS) | set(HERE), statuses
    for status, test in EXIT_STATUS_TESTS.items():
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test
        assert re.search(rf"== ({status}|ExitStatus\.\w+)\b", (ROOT / path).read_text()), test
    mine = Path(__file__).read_text()
    assert all(f"def {name}(" in mine for name in HERE.values())


def test_exit_2_restore_of_a_file_that_is_not_there(tmp_path: Path) -> None:
    done = subprocess.run([*MIGRATE, "restore", str(tmp_path / "nosuch.snap")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == ExitStatus.USAGE == 2, done.stderr
    assert "nosuch.snap: no such snapshot file" in done.stderr and "Traceback" not in done.stderr


def test_exit_3_restore_onto_a_disk_that_changed_since(kvm: Kvm, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    machine = builtin_machine(kvm, GuestParams(ws_mib=2), VmConfig(mem_size=32 << 20, vcpus=2),
                              virtio=VirtioConfig(disk=disk))
    try:
        machine.start()
        snapshot(machine, tmp_path / "vm.snap")
    finally:
        discard(machine)
    disk.write_bytes(b"changed!" * (1 << 17))  # the snapshot holds the disk as it was
    done = subprocess.run([*MIGRATE, "restore", str(tmp_path / "vm.snap"), "--disk", str(disk)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == ExitStatus.REFUSED == 3, done.stderr
    assert "DiskRefused" in done.stderr and "changed since the snapshot" in done.stderr
    assert "Traceback" not in done.stderr


def test_exit_4_recv_on_a_port_in_use() -> None:
    """A listening address in use is the transport's failure (status 4, as every other failure to
    set up the link is), said as such: a typed error naming the address, no raw errno."""
    taken = Listener("127.0.0.1:0", b"")
    try:
        done = subprocess.run([*MIGRATE, "recv", "--listen", taken.address, "--once"], capture_output=True,
                              text=True, timeout=60)
    finally:
        taken.close()
    assert done.returncode == ExitStatus.TRANSPORT == 4, done.stderr
    assert f"CannotListen: cannot listen on {taken.address}: the address is in use" in done.stderr, done.stderr
    assert "Errno" not in done.stderr and "Traceback" not in done.stderr


def _wait_line(proc: subprocess.Popen, text: str, timeout: float = 30) -> None:
    deadline, said = time.monotonic() + timeout, ""
    while text not in said:
        line = proc.stderr.readline()
        assert line and time.monotonic() < deadline, said
        said += line


def test_exit_5_and_130_ctrl_c_in_send_cancels_and_while_recv_waits(tmp_path: Path) -> None:
    """Ctrl-C in `migrate send` while round 0 goes (held to 1 MiB/s: it lasts) cancels: 5, the
    guest runs on at the source; Ctrl-C in `migrate recv` waiting for a guest: 130."""
    api, port = tmp_path / "vm.sock", Listener("127.0.0.1:0", b"")
    address = port.address
    port.close()
    vm = subprocess.Popen([*HV, "run", "--mem", "64M", "--ws", "8", "--api", str(api), "--timeout", "120"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    recv = subprocess.Popen([*MIGRATE, "recv", "--listen", address], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    waiting = subprocess.Popen([*MIGRATE, "recv", "--listen", "127.0.0.1:0"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    sender = None
    try:
        _wait_line(waiting, "listening on")
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=30) == INTERRUPTED == 130
        _wait_line(recv, "listening on")
        deadline = time.monotonic() + 30
        while not api.exists():
            assert vm.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # polling interval only
        sender = subprocess.Popen([*MIGRATE, "send", "--api", str(api), "--to", address, "--bandwidth", "1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while call(api, "migrate-status").get("phase") != "precopy":
            assert sender.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        sender.send_signal(signal.SIGINT)
        assert sender.wait(timeout=30) == ExitStatus.MIGRATION_FAILED == 5, sender.stderr.read()
        assert call(api, "status")["state"] == "running"  # the guest runs on at the source
    finally:
        for proc in (vm, recv, waiting, sender):
            if proc is not None:
                proc.kill()


def test_exit_7_a_completed_migration_past_its_downtime_target(tmp_path: Path) -> None:
    """Structural: the guest dirties its 8 MiB of incompressible pages flat out while one round
    goes at 16 MiB/s, so the final copy, paced at that cap too, is ~8 MiB: ~0.5 s against a 1 ms
    target; finish anyway: the guest moves (the target runs it) and the broken promise is the
    exit status, 7."""
    api, target_api, port = tmp_path / "vm.sock", tmp_path / "target.sock", Listener("127.0.0.1:0", b"")
    address = port.address
    port.close()
    vm = subprocess.Popen([*HV, "run", "--mem", "64M", "--ws", "8", "--api", str(api), "--timeout", "120"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    recv = subprocess.Popen([*MIGRATE, "recv", "--listen", address, "--once", "--api", str(target_api)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_line(recv, "listening on")
        deadline = time.monotonic() + 30
        while not api.exists():
            assert vm.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)  # polling interval only
        sent = subprocess.run([*MIGRATE, "send", "--api", str(api), "--to", address, "--downtime-ms", "1",
                               "--bandwidth", "16", "--final-copy-margin-ms", "60000", "--max-rounds", "1",
                               "--finish-anyway", "--no-auto-converge"],
                              capture_output=True, text=True, timeout=120)
        assert sent.returncode == ExitStatus.OVERRAN == 7, sent.stderr
        assert call(target_api, "status")["state"] == "running"  # it moved: the target runs it
        assert vm.wait(timeout=30) == 0  # the source's process ends: its guest moved away
    finally:
        for proc in (vm, recv):
            proc.kill()
            proc.wait()
