"""The control socket: lifecycle commands against a real running guest, typed errors back."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.control import ControlContext, ControlError, ControlServer, call

MiB = 1 << 20


def test_pause_resume_status_and_errors_over_the_socket(kvm: Kvm, tmp_path) -> None:
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=4, rate_mib_s=20), VmConfig(mem_size=32 * MiB),
                              console)
    sock = tmp_path / "vm.sock"
    server = ControlServer(sock, ControlContext(machine), load_extensions=False)
    server.register("echo", lambda ctx, args, progress: (progress({"step": 1}), args)[1])
    try:
        with server:
            assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
            machine.start()
            console.wait_pass(1, timeout=20)
            assert call(sock, "status")["state"] == "running"
            assert call(sock, "pause")["pause_seconds"] < 0.05
            frozen = bg.read_status(machine.vm.memory)
            time.sleep(0.3)  # a window for a wrong run to show; a right one passes on any host
            assert bg.read_status(machine.vm.memory) == frozen
            with pytest.raises(ControlError) as e:
                call(sock, "pause")  # already paused: the lifecycle's typed error comes back
            assert e.value.kind == "LifecycleError"
            call(sock, "resume")
            console.wait_pass(frozen.passes + 1, timeout=5)
            seen = []
            assert call(sock, "echo", progress=seen.append, x=1) == {"x": 1} and seen == [{"step": 1}]
            with pytest.raises(ControlError, match="UnknownCommand"):
                call(sock, "fly")
            assert call(sock, "stop") == {"state": "stopped"} and server.ctx.finished.is_set()
        assert not sock.exists()
        with pytest.raises(ControlError, match="ConnectionError"):
            call(sock, "status")
    finally:
        machine.stop()
        machine.vm.close()


def test_hv_run_serves_the_socket_and_stops_on_request(tmp_path) -> None:
    sock = tmp_path / "vm.sock"
    proc = subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "64M", "--ws", "8",
                             "--rate", "50", "--api", str(sock)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        assert call(sock, "status")["devices"] == ["debug-exit", "i8042", "serial0"]
        call(sock, "pause")
        call(sock, "resume")
        # The guest's memory, checked from outside its process, until a pass has completed: the
        # status page turns valid just before the guest prints its whole "ready" line.
        while True:
            try:
                check = call(sock, "guest-check")
                assert check["ok"], check
                if check["passes"] >= 1:
                    break
            except ControlError as e:
                assert "status page not valid" in e.message  # still filling its working set
            assert time.monotonic() < deadline
            time.sleep(0.05)
        call(sock, "stop")
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "kvmig: ready" in out and "stopped through the control socket" in err
    finally:
        proc.kill()


def test_a_machine_ended_by_a_command_is_closed_at_low_priority_by_another_thread(kvm: Kvm, monkeypatch) -> None:
    """After a completed migration `hv run` closes the VM at nice 19 so that the guest's new home
    on this host gets the CPU, but only in the thread that closes it: the process's own end at
    nice 19 waited behind any busy process (6-15 s beside two busy cores)."""
    import threading

    from hv.vmm.cli import _close_yielding

    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1, rate_mib_s=1), VmConfig(mem_size=32 * MiB),
                              bg.GuestConsole())
    closing_nice: list[int] = []
    close = machine.vm.close

    def watched_close() -> None:
        closing_nice.append(os.getpriority(os.PRIO_PROCESS, 0))
        closing_nice.append(threading.get_native_id())
        close()

    monkeypatch.setattr(machine.vm, "close", watched_close)
    before = os.getpriority(os.PRIO_PROCESS, 0)
    _close_yielding(machine)
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # this thread's priority is untouched
    assert closing_nice == [19, closing_nice[1]] and closing_nice[1] != threading.get_native_id()
    assert not machine.vm.memory.regions  # closed: its RAM unmapped


def test_commands_served_before_a_machine_then_refused_once_one_is_attached(kvm: Kvm, tmp_path) -> None:
    """A VMM waiting for its guest answers its own commands at once (not after `attach_wait`),
    each handler told when its request arrived; once a machine is attached the names only served
    that way are told NotWaiting, and a name served both ways goes to the machine's handler."""
    sock = tmp_path / "vm.sock"
    server = ControlServer(sock, load_extensions=False, attach_wait=30.0)
    arrivals: list[int] = []

    def make(args: dict, _progress: object, received_ns: int) -> dict:
        arrivals.append(received_ns)
        return {"made": args["what"]}

    server.register_unattached("make", make, exclusive=True)
    server.register_unattached("status", lambda args, progress, received_ns: {"state": "waiting"})
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=32 * MiB))
    try:
        with server:
            sent = time.monotonic_ns()
            assert call(sock, "status", timeout=5) == {"state": "waiting"}
            assert call(sock, "make", timeout=5, what="a guest") == {"made": "a guest"}
            assert sent <= arrivals[0] <= time.monotonic_ns()
            server.attach(ControlContext(machine))
            assert call(sock, "status")["state"] == "created"  # hv's own, of the machine
            with pytest.raises(ControlError) as e:
                call(sock, "make", what="another")
            assert e.value.kind == "NotWaiting" and len(arrivals) == 1
    finally:
        machine.vm.close()
