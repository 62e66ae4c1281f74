"""Snapshot files as hostile input: a tampered or missing `.mem`, a `.mem` truncated under a running
restored VM, a disk path inside the file, state nested too deep or shaped unlike its layout. Each is
refused with a typed error before any VM exists, or (the truncation) cannot reach the VM at all."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from hostile import kvm_vm_fds, sample_state

import formats
from formats import SectionKind, StreamWriter
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, builtin_machine
from hv.vmm.control import call
from hv.vmm.machine import Machine
from migrate.errors import DiskRefused, SnapshotError, StateShapeError
from migrate.snapshot.snapshots import inspect, restore, snapshot
from migrate.state import PRODUCER, registry

MiB = 1 << 20
CONFIG = VmConfig(mem_size=64 * MiB)


@pytest.fixture
def running(kvm: Kvm) -> Iterator[Machine]:
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=8, rate_mib_s=40), CONFIG, console)
    machine.start()
    try:
        console.wait_pass(1, timeout=20)
        yield machine
    finally:
        machine.stop()
        machine.vm.close()


def _flip_a_data_byte(mem: Path) -> None:
    """Change one byte of guest memory the guest wrote (inside the .mem's first data extent)."""
    fd = os.open(mem, os.O_RDWR)
    try:
        at = os.lseek(fd, 1 << 20, os.SEEK_DATA)  # past the first MiB: the guest's own memory
        byte = os.pread(fd, 1, at + 100)
        os.pwrite(fd, bytes([byte[0] ^ 0x40]), at + 100)
    finally:
        os.close(fd)


# --- mappable snapshots ---------------------------------------------------------------------------


@pytest.mark.parametrize("share", [False, True], ids=["copied", "shared"])
def test_a_tampered_mem_is_refused_by_default(running: Machine, kvm: Kvm, tmp_path: Path, share: bool) -> None:
    snapshot(running, tmp_path / "s", mappable=True)
    _flip_a_data_byte(tmp_path / "s.mem")
    before = kvm_vm_fds()
    with pytest.raises(formats.DigestMismatch):
        restore(tmp_path / "s", kvm, share_memory=share)
    assert kvm_vm_fds() == before
    report = inspect(tmp_path / "s")
    assert report["verified"] is False and report["error"]["type"] == "DigestMismatch"


def test_inspect_verifies_the_mem_it_names(running: Machine, tmp_path: Path) -> None:
    snapshot(running, tmp_path / "s", mappable=True)
    report = inspect(tmp_path / "s")
    assert report["verified"] is True and report["digest"] == "verified (with s.mem)"
    (tmp_path / "s.mem").unlink()
    report = inspect(tmp_path / "s")
    assert report["verified"] is False
    assert report["error"]["type"] == "SnapshotError" and "s.mem" in report["error"]["message"]
    assert inspect(tmp_path / "s", verify=False)["digest"] == "not checked (--no-verify)"


def test_a_mem_that_is_a_symlink_is_refused(running: Machine, kvm: Kvm, tmp_path: Path) -> None:
    snapshot(running, tmp_path / "s", mappable=True)
    os.replace(tmp_path / "s.mem", tmp_path / "elsewhere.mem")
    (tmp_path / "s.mem").symlink_to(tmp_path / "elsewhere.mem")
    with pytest.raises(SnapshotError, match="cannot be opened"):
        restore(tmp_path / "s", kvm)


def test_a_mem_truncated_under_the_restored_vm_does_not_kill_it(running: Machine, tmp_path: Path) -> None:
    path = tmp_path / "s"
    snapshot(running, path, mappable=True)
    api = tmp_path / "restored.sock"
    proc = subprocess.Popen([sys.executable, "-m", "migrate.cli", "restore", str(path), "--api", str(api),
                             "--timeout", "90"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not api.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        call(api, "status", timeout=60)  # answered once the restored guest runs (the socket comes first)
        os.truncate(tmp_path / "s.mem", 0)  # every page the file had is gone
        passes = call(api, "guest-check")["passes"]
        while (check := call(api, "guest-check"))["passes"] < passes + 2:  # the guest reads all its set
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline + 30
            time.sleep(0.05)
        assert check["ok"], check
        call(api, "stop")
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()


# --- disks ----------------------------------------------------------------------------------------


def _snapshot_with_disk(kvm: Kvm, disk: Path, path: Path) -> None:
    disk.write_bytes(b"precious" * (MiB // 8))
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), CONFIG, virtio=VirtioConfig(disk=disk))
    try:
        snapshot(machine, path)
    finally:
        machine.vm.close()


def test_a_restore_never_opens_the_disk_path_the_snapshot_names(kvm: Kvm, tmp_path: Path) -> None:
    victim = tmp_path / "victim.img"
    _snapshot_with_disk(kvm, victim, tmp_path / "s")
    stamp = victim.stat().st_mtime_ns
    machine = restore(tmp_path / "s", kvm)  # nothing named: a private copy of s.disk, not the path
    try:
        device = machine.devices["virtio-blk0"]
        assert device.path == Path("victim.img")  # only a name (the guest's disk id)
        assert not os.path.samestat(os.fstat(device.backend.fileno()), victim.stat())
        assert os.fstat(device.backend.fileno()).st_nlink == 0  # unlinked: gone with the guest
    finally:
        machine.stop()
        machine.vm.close()
    assert victim.stat().st_mtime_ns == stamp

    disks = tmp_path / "here"
    disks.mkdir()
    (disks / "victim.img").write_bytes(victim.read_bytes())  # this host's disk of that name, the same
    machine = restore(tmp_path / "s", kvm, disk_dir=disks)
    try:
        assert machine.devices["virtio-blk0"].path == disks / "victim.img"
    finally:
        machine.stop()
        machine.vm.close()
    with pytest.raises(DiskRefused, match="No such file"):
        restore(tmp_path / "s", kvm, disk_dir=tmp_path / "nowhere")
    assert victim.stat().st_mtime_ns == stamp


def test_a_disk_of_another_size_is_refused_before_any_vm(kvm: Kvm, tmp_path: Path) -> None:
    _snapshot_with_disk(kvm, tmp_path / "d.img", tmp_path / "s")
    other = tmp_path / "other.img"
    other.write_bytes(bytes(2 * MiB))
    before = kvm_vm_fds()
    with pytest.raises(DiskRefused, match=f"other.img: is {2 * MiB} bytes, the snapshot's disk {MiB}"):
        restore(tmp_path / "s", kvm, disk=other)
    assert kvm_vm_fds() == before


# --- state the file holds -------------------------------------------------------------------------


def _write_stream(path: Path, state, device_sections) -> None:
    """A snapshot file of `state` with the DEVICE sections given (raw: bodies as built by the test)."""
    writer = StreamWriter(registry(), producer=PRODUCER)
    parts = [writer.header(), writer.config(state.config), writer.layout(state.layout)]
    parts += [writer.vcpu(v) for v in state.vcpus] + [writer.vm_state(state.vm)]
    parts += [writer.section(SectionKind.DEVICE, body) for body in device_sections]
    parts.append(writer.end(0))
    path.write_bytes(b"".join(parts))


def test_state_nested_450_deep_in_a_file_is_a_schema_error(kvm: Kvm, tmp_path: Path) -> None:
    state = sample_state(kvm)
    reg = registry()
    entry, saved = state.devices[0]
    wire = reg.to_wire(saved)
    for _ in range(450):
        wire = ["formats.device", 1, {"entry": reg.to_wire(entry)[2], "state": wire}]
    _write_stream(tmp_path / "s", state, [msgpack.packb(wire, use_bin_type=True)])
    before = kvm_vm_fds()
    with pytest.raises(formats.SchemaError, match="nesting"):
        restore(tmp_path / "s", kvm)
    assert kvm_vm_fds() == before
    report = inspect(tmp_path / "s")
    assert report["verified"] is False and report["error"]["type"] == "SchemaError"


def test_a_device_state_unlike_the_layout_is_refused_before_any_vm(kvm: Kvm, tmp_path: Path) -> None:
    state = sample_state(kvm)
    reg = registry()
    devices = [reg.encode(formats.DeviceSection(e, s)) for e, s in state.devices]
    entry, saved = state.devices[0]
    devices.append(reg.encode(formats.DeviceSection(replace(entry, device_id="stranger"), saved)))
    _write_stream(tmp_path / "s", state, devices)
    before = kvm_vm_fds()
    with pytest.raises(StateShapeError, match="'stranger', which the layout does not have"):
        restore(tmp_path / "s", kvm, verify_memory=False)
    assert kvm_vm_fds() == before
    assert inspect(tmp_path / "s", verify=False)["error"]["type"] == "StateShapeError"


def test_a_base_the_snapshot_names_that_is_not_a_regular_file_is_refused_without_blocking(
        kvm: Kvm, tmp_path: Path) -> None:
    from migrate.state import SnapshotRef

    state = sample_state(kvm)
    os.mkfifo(tmp_path / "fifo")  # opened for reading without O_NONBLOCK, this would wait forever
    for base in ("fifo", ".", "/dev/zero"):
        config = replace(state.config, base=SnapshotRef("someone", 0, base))
        _write_stream(tmp_path / "s", replace(state, config=config),
                      [registry().encode(formats.DeviceSection(e, s)) for e, s in state.devices])
        with pytest.raises(SnapshotError, match="not a regular file"):
            restore(tmp_path / "s", kvm)
