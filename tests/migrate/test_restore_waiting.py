"""Restoring into a VMM that is already running (`migrate restore --wait`, `--into`), on real KVM
with the built-in guest: the restore takes the VM built ahead and the guest carries on; a refused
request (no such file, a corrupt snapshot, a wrong disk, a bad argument) is answered with its
typed error and leaves nothing behind, and the same process then restores a good one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hostile import kvm_vm_fds

import formats
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, builtin_machine
from hv.vmm.control import ControlError, call
from hv.vmm.machine import Machine, RunState
from migrate.commands.restoring import TIMINGS_FIELDS
from migrate.snapshot.snapshots import restore, snapshot
from migrate.snapshot.spare import SpareMachine

from tests.console_log import console_log, console_text

MiB = 1 << 20
CONFIG = VmConfig(mem_size=64 * MiB)
MIGRATE = [sys.executable, "-m", "migrate.cli"]


@pytest.fixture
def running(kvm: Kvm, tmp_path: Path) -> Iterator[Machine]:
    """The built-in guest making passes, with a 1 MiB virtio disk."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=8, rate_mib_s=40), CONFIG, bg.GuestConsole(),
                              virtio=VirtioConfig(disk=disk))
    machine.start()
    try:
        while bg.read_status(machine.vm.memory).passes < 1:  # (its console goes to the guest's own object)
            time.sleep(0.05)
        yield machine
    finally:
        machine.stop()
        machine.vm.close()


class Waiting:
    """A `migrate restore --wait` process; its guest's console in a file (never an unread pipe)."""

    def __init__(self, tmp_path: Path, name: str = "waiting", mem: str = "64M") -> None:
        self.tmp_path, self.name, self.api = tmp_path, name, tmp_path / f"{name}.sock"
        with open(tmp_path / f"{name}.stderr", "wb") as err:
            self.proc = subprocess.Popen([*MIGRATE, "restore", "--wait", "--api", str(self.api), "--mem", mem,
                                          "--timeout", "60"], stdout=console_log(tmp_path, name), stderr=err,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:  # the socket is claimed first; the VM built ahead comes next
            try:
                if call(self.api, "status")["state"] == "waiting":
                    break
            except ControlError as e:
                assert e.kind == "ConnectionError", e
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.05)

    def stderr(self) -> str:
        return (self.tmp_path / f"{self.name}.stderr").read_text(errors="replace")

    def passes(self) -> list[int]:
        lines = console_text(self.tmp_path, self.name).splitlines()
        return [e.number for e in map(bg.parse_line, lines) if isinstance(e, bg.Pass)]

    def wait_passes(self, at_least: int) -> dict:
        deadline = time.monotonic() + 30
        while (check := call(self.api, "guest-check"))["passes"] < at_least:
            assert time.monotonic() < deadline, check
            time.sleep(0.05)
        return check

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


def saved_passes(path: Path, kvm: Kvm, **disks: Path) -> int:
    restored = restore(path, kvm, **disks)  # (in this process, only to read the pass counter it holds)
    try:
        return bg.read_status(restored.vm.memory).passes
    finally:
        restored.stop()
        restored.vm.close()


def test_a_restore_takes_the_vm_built_ahead_and_moves_the_pages_in(running: Machine, kvm: Kvm, tmp_path: Path) -> None:
    path = tmp_path / "guest.snap"
    snapshot(running, path)
    console = bg.GuestConsole()
    spare = SpareMachine(kvm, CONFIG, console)
    other = SpareMachine(kvm, VmConfig(mem_size=128 * MiB), console)  # a shape the snapshot does not have
    assert spare.machine is not None
    addresses = [r.host_address for r in spare.machine.vm.memory.regions]
    before = kvm_vm_fds()
    try:
        reference = restore(path, kvm, disk=tmp_path / "disk.img")
        machine = restore(path, kvm, console=console, disk=tmp_path / "disk.img", build=spare)
        try:
            assert spare.taken and not other.taken and kvm_vm_fds() == before + 1  # the reference's VM only
            assert [r.host_address for r in machine.vm.memory.regions] == addresses  # its slots, kept
            for mine, theirs in zip(machine.vm.memory.regions, reference.vm.memory.regions, strict=True):
                assert np.array_equal(mine.pages_array(), theirs.pages_array())
            assert "virtio-blk0" in machine.devices  # added to the machine built ahead
            passes = bg.read_status(machine.vm.memory).passes
            machine.resume(wait_running=True)
            assert machine.unparked_ns > 0
            console.wait_pass(passes + 2, timeout=20)
            machine.pause()
            assert bg.check_memory(machine.vm.memory).ok
        finally:
            for m in (machine, reference):
                m.stop()
                m.vm.close()
        fresh = restore(path, kvm, console=console, disk=tmp_path / "disk.img", build=other)
        try:  # another shape: a VM built on request, the one built ahead left as it was
            assert not other.taken and fresh.state is RunState.PAUSED
        finally:
            fresh.stop()
            fresh.vm.close()
    finally:
        other.close()


def test_a_waiting_vmm_restores_on_request_and_the_guest_carries_on(running: Machine, kvm: Kvm,
                                                                      tmp_path: Path) -> None:
    path = tmp_path / "guest.snap"
    snapshot(running, path, mappable=True)
    passes = saved_passes(path, kvm, disk=tmp_path / "disk.img")
    waiting = Waiting(tmp_path)
    try:
        assert kvm_vm_fds(waiting.proc.pid) == 1  # the VM built ahead
        client = subprocess.run([*MIGRATE, "restore", str(path), "--into", str(waiting.api), "--share-mem",
                                 "--disk", str(tmp_path / "disk.img")], capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr + waiting.stderr()
        assert f"restored {path} into {waiting.api}: first guest instruction" in client.stdout, client.stdout
        assert "a VM built ahead" in client.stdout and "read and check" in client.stdout
        # the guest's RAM is the .mem, mapped (private) where the VM built ahead had its RAM
        maps = Path(f"/proc/{waiting.proc.pid}/maps").read_text().splitlines()
        assert [line for line in maps if line.endswith(f"{path}.mem")]
        assert kvm_vm_fds(waiting.proc.pid) == 1  # that VM, no other
        check = waiting.wait_passes(passes + 3)
        assert check["ok"], check
        assert waiting.passes()[:2] == [passes + 1, passes + 2]  # the counter continues
        # the socket is the guest's now, as any VM's
        assert call(waiting.api, "status")["state"] == "running"
        call(waiting.api, "pause")
        call(waiting.api, "resume")
        again = call(waiting.api, "snapshot", out=str(tmp_path / "again.snap"))
        assert again["kind"] == "full"
        with pytest.raises(ControlError) as e:
            call(waiting.api, "restore", file=str(path))
        assert e.value.kind == "NotWaiting"
        call(waiting.api, "stop")
        assert waiting.proc.wait(timeout=20) == 0, waiting.stderr()
    finally:
        waiting.end()


def test_a_refused_request_leaves_the_vmm_waiting_for_the_next(running: Machine, kvm: Kvm, tmp_path: Path) -> None:
    path, corrupt = tmp_path / "guest.snap", tmp_path / "corrupt.snap"
    snapshot(running, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    corrupt.write_bytes(bytes(data))
    smaller = tmp_path / "smaller.img"
    smaller.write_bytes(bytes(MiB // 2))
    passes = saved_passes(path, kvm, disk=tmp_path / "disk.img")
    waiting = Waiting(tmp_path)
    format_errors = {c.__name__ for c in _subclasses(formats.FormatError)}
    try:
        refusals = [  # (arguments, the kind of error: its class's name in the VMM's process)
            ({"file": str(tmp_path / "missing.snap")}, {"SnapshotError"}),
            ({"file": str(path), "disk": str(tmp_path / "missing.img")}, {"DiskRefused"}),  # no such disk here
            # a disk that is not the snapshot's (another size): refused before any VM is touched
            ({"file": str(path), "disk": str(smaller)}, {"DiskRefused"}),
            ({"file": "guest.snap"}, {"BadRequest"}),  # not an absolute path
            ({"file": str(path), "turbo": True}, {"BadRequest"}),  # an argument it does not know
            ({"file": str(path), "record_ms": 50}, {"BadRequest"}),  # recording is a lazy restore's
        ]
        for number, (arguments, kinds) in enumerate(refusals, 1):
            with pytest.raises(ControlError) as e:
                call(waiting.api, "restore", **arguments)
            assert e.value.kind in kinds, (arguments, e.value)
            status = call(waiting.api, "status")
            assert status["state"] == "waiting" and status["built_ahead"] == {"mem_size": CONFIG.mem_size,
                                                                              "vcpus": 1}, status
            assert kvm_vm_fds(waiting.proc.pid) == 1, (arguments, waiting.stderr())  # nothing half built
        # a corrupt snapshot, through the command line's client: the VMM's error, and its exit status
        refused = subprocess.run([*MIGRATE, "restore", str(corrupt), "--into", str(waiting.api), "--disk",
                                  str(tmp_path / "disk.img"), "--json"], capture_output=True, text=True, timeout=60)
        error = json.loads(refused.stdout)["error"]
        assert refused.returncode == 3 and error["type"] in format_errors, refused.stdout
        status = call(waiting.api, "status")
        assert status["state"] == "waiting" and status["refused"] == 4  # (the three bad requests were not restores)
        assert kvm_vm_fds(waiting.proc.pid) == 1

        client = subprocess.run([*MIGRATE, "restore", str(path), "--into", str(waiting.api), "--disk",
                                 str(tmp_path / "disk.img"), "--json"], capture_output=True, text=True, timeout=60)
        assert client.returncode == 0, client.stderr + waiting.stderr()
        timings = json.loads(client.stdout)
        for name, kind in TIMINGS_FIELDS.items():
            assert isinstance(timings[name], kind), (name, timings)
        assert timings["built_ahead"] is True and timings["path"] == str(path)
        phases = [timings[p] for p in ("read_check_ms", "build_ms", "apply_ms", "resume_ms")]
        assert all(p > 0 for p in phases) and sum(phases) == pytest.approx(timings["first_kvm_run_ms"])
        assert timings["first_kvm_run_ns"] - timings["started_ns"] == pytest.approx(timings["first_kvm_run_ms"] * 1e6)
        assert 0 < timings["first_kvm_run_ms"] <= timings["sent_to_first_kvm_run_ms"] <= timings["answered_ms"]
        check = waiting.wait_passes(passes + 3)
        assert check["ok"], check
        assert waiting.passes()[:2] == [passes + 1, passes + 2]
        call(waiting.api, "stop")
        assert waiting.proc.wait(timeout=20) == 0, waiting.stderr()
    finally:
        waiting.end()


def test_sigterm_ends_the_wait_and_takes_the_socket_away(tmp_path: Path) -> None:
    waiting = Waiting(tmp_path)
    try:
        waiting.proc.send_signal(signal.SIGTERM)
        assert waiting.proc.wait(timeout=20) == 0, waiting.stderr()
        assert "stopped waiting (SIGTERM)" in waiting.stderr() and not waiting.api.exists()
    finally:
        waiting.end()


def _subclasses(root: type) -> Iterator[type]:
    yield root
    for subclass in root.__subclasses__():
        yield from _subclasses(subclass)
