"""Snapshots of the built-in guest on real KVM: restored in a new process the guest carries on;
incremental chains restore bit for bit; mismatches and corruption are refused before any VM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import formats
from hv.devices.serial import Serial16550
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.state import vcpu_state_differences
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.control import call
from hv.vmm.machine import Machine, RunState
from migrate.errors import IncompatibleError, SnapshotError
from migrate.snapshot.snapshots import inspect, restore, snapshot
from migrate.state import capture

from tests.console_log import console_log, console_text
from tests.migrate.processes import run_together

MiB = 1 << 20
CONFIG = VmConfig(mem_size=64 * MiB)


def kvm_vm_fds() -> int:
    """VMs this process holds open: a refused restore must not have created one."""
    fd_dir = Path("/proc/self/fd")
    count = 0
    for fd in fd_dir.iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:kvm-vm"
        except OSError:
            pass
    return count


@pytest.fixture
def running(kvm: Kvm) -> Iterator[tuple[Machine, bg.GuestConsole]]:
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=16, rate_mib_s=40), CONFIG, console)
    machine.start()
    try:
        console.wait_pass(1, timeout=20)
        yield machine, console
    finally:
        machine.stop()
        machine.vm.close()


def _ram(machine: Machine) -> list[np.ndarray]:
    return [r.pages_array().copy() for r in machine.vm.memory.regions]


@pytest.mark.parametrize("mappable", [False, True], ids=["compressed", "mappable"])
def test_snapshot_mid_run_continues_in_a_new_process(kvm: Kvm, running, tmp_path, mappable: bool) -> None:
    machine, console = running
    path = tmp_path / "guest.snap"
    info = snapshot(machine, path, mappable=mappable)
    assert machine.state is RunState.RUNNING  # paused for the copy only
    assert info.kind == ("mappable" if mappable else "full") and info.pause_seconds < 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
    saved_passes = bg.read_status(restore(path, kvm).vm.memory).passes  # also in-process

    # a mappable snapshot is restored by mapping its .mem (--share-mem), checked against the digest
    mem_files = [p for p in tmp_path.iterdir() if p.suffix == ".mem"]
    assert len(mem_files) == (1 if mappable else 0), list(tmp_path.iterdir())
    api = tmp_path / "restored.sock"
    proc = subprocess.Popen([sys.executable, "-m", "migrate.cli", "restore", str(path), "--api", str(api),
                             "--timeout", "60", *(["--share-mem"] if mappable else [])],
                            stdout=console_log(tmp_path, "restored"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not api.exists():  # the socket is claimed before the restore begins
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)  # polling interval only
        call(api, "status")  # answered once the restored machine is attached: its RAM is mapped
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        mapped = [line for line in maps.splitlines() if line.endswith(".mem")]
        if mappable:  # guest RAM is the file, mapped (private): not a copy in anonymous memory
            assert mapped and all(line.endswith(str(mem_files[0].resolve())) for line in mapped), mapped
        else:
            assert not mapped
        # pass N+3 on the status page: the guest finished printing pass N+2's line before it
        while (check := call(api, "guest-check"))["passes"] < saved_passes + 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert check["ok"], check
        call(api, "stop")
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    out = console_text(tmp_path, "restored")
    passes = [e.number for e in map(bg.parse_line, out.splitlines()) if isinstance(e, bg.Pass)]
    assert passes[:2] == [saved_passes + 1, saved_passes + 2], out  # the counter continues
    assert "restored" in err


def test_incremental_chain_of_three_restores_bit_exactly(running, kvm: Kvm, tmp_path) -> None:
    machine, console = running
    full = snapshot(machine, tmp_path / "s0", track_dirty=True)
    console.wait_pass(console.last_pass() + 1, timeout=10)
    first = snapshot(machine, tmp_path / "s1", base=tmp_path / "s0")
    console.wait_pass(console.last_pass() + 1, timeout=10)
    machine.pause()
    second = snapshot(machine, tmp_path / "s2", base=tmp_path / "s1")
    expected, state = _ram(machine), capture(machine)
    machine.resume()
    assert first.kind == second.kind == "incremental"
    assert second.pages < full.pages  # only what changed: 16 MiB dirtied, not every touched page

    restored = restore(tmp_path / "s2", kvm)
    try:
        for want, got in zip(expected, _ram(restored), strict=True):
            assert np.array_equal(want, got)
        assert [v.regs for v in capture(restored).vcpus] == [v.regs for v in state.vcpus]
    finally:
        restored.stop()
        restored.vm.close()

    # a base that is not the VM's last tracked snapshot is refused, naming it
    with pytest.raises(SnapshotError, match="s0"):
        snapshot(machine, tmp_path / "s3", base=tmp_path / "s0")


def test_layout_mismatch_lists_every_difference_and_creates_no_vm(running, kvm: Kvm, tmp_path) -> None:
    machine, _ = running
    snapshot(machine, tmp_path / "snap")
    before = kvm_vm_fds()
    with pytest.raises(IncompatibleError) as e:
        restore(tmp_path / "snap", kvm, config=VmConfig(mem_size=128 * MiB, vcpus=2))
    assert len(e.value.problems) == 2
    assert "mem_size" in e.value.problems[0] and "vcpus" in e.value.problems[1]
    assert kvm_vm_fds() == before


def test_different_device_set_is_refused_with_every_difference(kvm: Kvm, tmp_path) -> None:
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=4), CONFIG)
    machine.add_device("serial1", Serial16550(lambda b: None), pio=(0x2F8, 8), irqs=(3,))
    try:
        snapshot(machine, tmp_path / "snap")
    finally:
        machine.vm.close()
    before = kvm_vm_fds()
    with pytest.raises(formats.LayoutMismatch) as e:
        restore(tmp_path / "snap", kvm)
    assert any("serial1" in str(d) for d in e.value.differences)
    assert kvm_vm_fds() == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "trailing"])
def test_corrupt_snapshot_is_refused_before_any_vm(running, kvm: Kvm, tmp_path, damage: str) -> None:
    machine, _ = running
    path = tmp_path / "snap"
    snapshot(machine, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    elif damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data += b"\0" * 100
    path.write_bytes(bytes(data))
    before = kvm_vm_fds()
    with pytest.raises(formats.FormatError):
        restore(path, kvm)
    assert kvm_vm_fds() == before
    assert inspect(path)["verified"] is False


def test_mappable_memory_file_must_belong_to_its_snapshot(running, kvm: Kvm, tmp_path) -> None:
    machine, _ = running
    snapshot(machine, tmp_path / "a", mappable=True)
    snapshot(machine, tmp_path / "b", mappable=True)
    os.replace(tmp_path / "b.mem", tmp_path / "a.mem")
    with pytest.raises(SnapshotError, match="another snapshot"):
        restore(tmp_path / "a", kvm)


# Registers a guest could hold; the property: snapshot -> restore -> snapshot gives the same state.
gpr = st.integers(min_value=0, max_value=2**64 - 1)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(gpr, min_size=15, max_size=15))
def test_snapshot_restore_snapshot_gives_identical_state(kvm: Kvm, tmp_path_factory, values) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), CONFIG)
    try:
        regs = machine.vcpus[0].get_regs()
        names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12",
                 "r13", "r14", "r15"]
        machine.vcpus[0].set_regs(replace(regs, **dict(zip(names, values, strict=True))))
        snapshot(machine, tmp / "one")
        first = capture(machine)
    finally:
        machine.vm.close()
    restored = restore(tmp / "one", kvm)
    try:
        snapshot(restored, tmp / "two")
        second = capture(restored)
    finally:
        restored.stop()
        restored.vm.close()
    assert vcpu_state_differences(first.vcpus[0], second.vcpus[0]) == []
    assert first.devices == second.devices and first.layout == second.layout
    assert first.vm.irqchip == second.vm.irqchip


def test_snapshot_and_inspect_through_the_cli(tmp_path) -> None:
    api = tmp_path / "vm.sock"
    vm = subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "64M", "--ws", "8", "--rate", "40",
                           "--api", str(api)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not api.exists():
            assert vm.poll() is None and time.monotonic() < deadline, vm.stderr.read()
            time.sleep(0.05)
        cli = [sys.executable, "-m", "migrate.cli"]
        base = subprocess.run(cli + ["snapshot", "--api", str(api), "--out", str(tmp_path / "s0"), "--track-dirty",
                                     "--json"], capture_output=True, text=True, timeout=60)
        assert base.returncode == 0, base.stderr
        (tmp_path / "s0-cut").write_bytes((tmp_path / "s0").read_bytes()[:-10])
        inc, shown, broken = run_together(  # the increment, and the base inspected whole and cut short
            cli + ["snapshot", "--api", str(api), "--out", str(tmp_path / "s1"), "--incremental-from",
                   str(tmp_path / "s0"), "--json"],
            cli + ["inspect", str(tmp_path / "s0"), "--json"], cli + ["inspect", str(tmp_path / "s0-cut"), "--json"])
        assert inc.returncode == 0, inc.stderr
        assert json.loads(inc.stdout)["kind"] == "incremental"
        assert json.loads(inc.stdout)["pages"] < json.loads(base.stdout)["pages"]
        report = json.loads(shown.stdout)
        assert shown.returncode == 0 and report["verified"] and report["digest"] == "verified"
        assert report["header"]["format_version"] == f"{formats.FORMAT_MAJOR}.{formats.FORMAT_MINOR}" and report["header"]["producer"].startswith("kvmigrate")
        assert report["sections"]["vcpu"] == 1 and report["sections"]["pages"] >= 1 and report["sections"]["end"] == 1
        assert [d["id"] for d in report["layout"]] == ["debug-exit", "i8042", "serial0"]
        assert broken.returncode == 3 and json.loads(broken.stdout)["error"]["type"] == "TruncatedError"  # refused
        call(api, "stop")
    finally:
        vm.kill()


def test_a_state_goes_into_a_machine_started_paused_but_not_into_one_that_ran(running, kvm: Kvm) -> None:
    """A migration target starts its vCPU threads parked before the state arrives: KVM_RUN with
    immediate_exit enters no guest code, so the machine still takes a state (and runs it)."""
    from hv.vmm.builder import blank_machine
    from migrate.errors import StateError
    from migrate.state import apply, machine_config

    machine, _console = running
    parked = blank_machine(kvm, machine_config(machine).vm_config())
    try:
        parked.start(paused=True)
        assert not parked.ever_ran
        machine.pause()
        try:
            state, passes = capture(machine), state_passes(machine)
            for mine, theirs in zip(parked.vm.memory.regions, machine.vm.memory.regions, strict=True):
                mine.view[:] = theirs.view
        finally:
            machine.resume()
        apply(parked, state)
        parked.resume(wait_running=True)
        assert parked.ever_ran
        deadline = time.monotonic() + 20
        while state_passes(parked) <= passes and time.monotonic() < deadline:
            time.sleep(0.05)
        parked.pause()
        assert state_passes(parked) > passes and bg.check_memory(parked.vm.memory).ok
        with pytest.raises(StateError):
            apply(parked, state)
    finally:
        parked.stop()
        parked.vm.close()


def state_passes(machine: Machine) -> int:
    return bg.read_status(machine.vm.memory).passes
