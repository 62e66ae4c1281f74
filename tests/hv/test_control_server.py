"""The control socket against careless and hostile clients: its path claimed safely (never a
non-socket deleted, never a live socket taken over, a stale one cleaned, a missing directory said
before boot, the file gone after SIGTERM), many clients at once, idle connections that cost no
thread and are closed, a bound on connections, and the run state's owner refusing others."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.errors import Busy, ControlSocketError
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.control import ControlContext, ControlError, ControlServer, call
from hv.vmm.machine import Machine
from hv.vmm.owner import owner_of

from tests.console_log import console_log

MiB = 1 << 20


@pytest.fixture
def machine(kvm: Kvm) -> Iterator[Machine]:
    console = bg.GuestConsole()
    m = builtin_machine(kvm, bg.GuestParams(ws_mib=4, rate_mib_s=20), VmConfig(mem_size=32 * MiB), console)
    m.start()
    console.wait_pass(1, timeout=30)
    try:
        yield m
    finally:
        m.stop()
        m.vm.close()


def _server(machine: Machine, path: Path, **kwargs) -> ControlServer:
    return ControlServer(path, ControlContext(machine), load_extensions=False, **kwargs)


# --- the path -------------------------------------------------------------------------------------


def test_a_file_or_link_at_the_path_is_never_replaced(machine: Machine, tmp_path: Path) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"not a socket\n")
    link = tmp_path / "link.sock"
    link.symlink_to(precious)
    for path, kind in ((precious, "a regular file"), (link, "a symbolic link"), (tmp_path, "a directory")):
        with pytest.raises(ControlSocketError, match=f"is {kind}, not a socket"):
            _server(machine, path).start()
    assert precious.read_bytes() == b"not a socket\n" and link.is_symlink()


def test_a_live_socket_is_never_taken_over_and_a_stale_one_is_cleaned(machine: Machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    with _server(machine, path):
        with pytest.raises(ControlSocketError, match="in use by a running VM"):
            _server(machine, path).start()
        assert call(path, "status", timeout=5)["state"] == "running"  # the first VM still answers
    assert not path.exists()

    stale = socket.socket(socket.AF_UNIX)  # a VM that died without removing its socket
    stale.bind(str(path))
    stale.close()
    assert path.exists()
    with _server(machine, path):
        assert call(path, "status", timeout=5)["state"] == "running"
    assert not path.exists()


def test_close_removes_only_its_own_socket_file(machine: Machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    server = _server(machine, path)
    server.start()
    path.unlink()  # someone removed it and put a file of theirs there
    path.write_text("theirs")
    server.close()
    assert path.read_text() == "theirs"


def _hv_run(console_dir: Path, *args: str) -> subprocess.Popen:
    """`hv run` of the built-in guest at full rate (its console to a file in `console_dir`)."""
    return subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "32M", "--ws", "4", *args],
                            stdout=console_log(console_dir, f"hv-run-{time.monotonic_ns()}"), stderr=subprocess.PIPE,
                            text=True)


def test_hv_run_refuses_a_bad_api_path_before_booting(tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("keep me")
    for path, words in ((tmp_path / "missing" / "vm.sock", "does not exist"), (regular, "regular file")):
        proc = _hv_run(tmp_path, "--api", str(path))
        _, err = proc.communicate(timeout=60)
        err = " ".join(err.split())  # the terminal's line wrapping, undone
        assert proc.returncode == 2, err
        assert "ControlSocketError" in err and words in err and "Traceback" not in err
        assert "booting" not in err  # said before any VM exists
    assert regular.read_text() == "keep me"


def test_a_second_hv_run_cannot_steal_a_running_vms_socket_and_sigterm_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    first = _hv_run(tmp_path, "--api", str(path))
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            time.sleep(0.05)
        second = _hv_run(tmp_path, "--api", str(path))
        _, err = second.communicate(timeout=60)
        err = " ".join(err.split())
        assert second.returncode == 2 and "in use by a running VM" in err, err
        assert call(path, "status", timeout=10)["state"] == "running"  # still the first VM's
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=30)
        assert first.returncode == 0 and "SIGTERM" in err, err
        assert not path.exists()
    finally:
        first.kill()


# --- many clients ---------------------------------------------------------------------------------


def test_sixty_concurrent_clients_with_timeouts_are_all_answered(machine: Machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    results: list[object] = []
    start = threading.Barrier(60)

    def client() -> None:
        start.wait()
        try:
            results.append(call(path, "status", timeout=20)["state"])
        except Exception as e:  # noqa: BLE001 - the assertion below shows it
            results.append(e)

    with _server(machine, path):
        threads = [threading.Thread(target=client) for _ in range(60)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == ["running"] * 60


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(str(path))
    return s


def test_300_idle_connections_hold_no_thread_and_are_closed(machine: Machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    with _server(machine, path, request_timeout=2.0, max_connections=400) as server:
        idle = [_connect(path) for _ in range(300)]
        try:
            deadline = time.monotonic() + 30
            while server.open_connections < 300:  # accepted, each waiting for its request
                assert time.monotonic() < deadline, server.open_connections
                time.sleep(0.05)
            assert server.threads == 0  # no thread per idle connection
            assert call(path, "status", timeout=20)["state"] == "running"  # and others are served
            for s in idle:
                assert s.recv(1) == b""  # the server closed it: it sent no request in time
            assert server.open_connections == 0
        finally:
            for s in idle:
                s.close()


def test_connections_past_the_bound_are_refused_politely(machine: Machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    with _server(machine, path, max_connections=20) as server:
        idle = [_connect(path) for _ in range(20)]
        try:
            deadline = time.monotonic() + 30
            while server.open_connections < 20:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with pytest.raises(ControlError) as e:
                call(path, "status", timeout=20)
            assert e.value.kind == "TooManyConnections"
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 30
        while True:  # once they are gone, clients are served again
            try:
                assert call(path, "status", timeout=20)["state"] == "running"
                break
            except ControlError as e:
                assert e.kind == "TooManyConnections" and time.monotonic() < deadline
                time.sleep(0.05)


def test_an_oversized_or_garbled_request_gets_a_typed_error(machine: Machine, tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    with _server(machine, path):
        for payload, kind in ((b"x" * (70 * 1024), "BadRequest"), (b"{not json\n", "BadRequest"),
                              (b'["status"]\n', "BadRequest")):
            with _connect(path) as s:
                s.sendall(payload)
                reply = json.loads(s.makefile("rb").readline())
            assert reply["ok"] is False and reply["error"]["type"] == kind
        assert call(path, "status", timeout=20)["state"] == "running"


# --- the run state's owner ------------------------------------------------------------------------


def test_lifecycle_commands_are_refused_while_someone_holds_the_run_state(machine: Machine,
                                                                           tmp_path: Path) -> None:
    path = tmp_path / "vm.sock"
    with _server(machine, path):
        with owner_of(machine).hold("migration to 192.0.2.1:7380") as lease:
            machine.pause()  # the holder pauses, as a migration's final copy does
            for command in ("resume", "pause", "stop", "guest-check"):
                with pytest.raises(ControlError) as e:
                    call(path, command, timeout=10)
                assert e.value.kind == "Busy" and "192.0.2.1" in e.value.message
                assert e.value.facts["owner"] == "migration to 192.0.2.1:7380"
                assert e.value.facts["state"] == "held" and e.value.facts["action"] == command
                assert abs(e.value.facts["since"] - time.time()) < 3600
            status = call(path, "status", timeout=10)
            assert status["state"] == "paused" and status["held_by"]["owner"].startswith("migration")
            with pytest.raises(Busy):  # nor may a second holder take it
                with owner_of(machine).hold("snapshot to /tmp/x"):
                    pass
            lease.leave_in_doubt({"whatever": "the holder keeps"})
        status = call(path, "status", timeout=10)
        assert status["state"] == "in-doubt" and status["run_state"] == "paused"
        with pytest.raises(ControlError) as e:
            call(path, "resume", timeout=10)
        assert e.value.kind == "Busy" and e.value.facts["state"] == "in-doubt" and "resolve" in e.value.message
        with owner_of(machine).settling("test") as lease:
            assert lease.hold.record == {"whatever": "the holder keeps"}
        assert call(path, "resume", timeout=10)["state"] == "running"  # settled: the lifecycle is free
        assert call(path, "status", timeout=10)["held_by"] is None
