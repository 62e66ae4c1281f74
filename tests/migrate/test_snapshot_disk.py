"""A snapshot holds its guest's disk as it was at the snapshot's instant (format 2.1): restored, the
guest finds its disk as it left it then, however long the source ran on; a disk changed since, a
damaged or missing copy, a record naming a file elsewhere are refused before any VM exists; the
record round-trips through the format and an older reader ignores it; a snapshot from before 2.1
restores as it did. The pieces without a VM: tests/migrate/test_snapshot_disk_parts.py."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hostile import kvm_vm_fds

import formats
from formats import StreamWriter
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, builtin_machine
from hv.vmm.control import call
from hv.vmm.machine import Machine, RunState
from migrate.errors import DiskRefused, SnapshotError
from migrate.records import state_sections
from migrate.snapshot import disk_copy
from migrate.snapshot.files import read_config, read_stream
from migrate.snapshot.snapshots import inspect, restore, snapshot
from migrate.state import PRODUCER, DiskCopyKind, expected_layout, registry

from tests.console_log import console_log, console_text

MiB = 1 << 20
BUSY = VmConfig(mem_size=64 * MiB, vcpus=2)  # CPU 1 writes its disk, reads it back and checks it
EVERY_SLOT = bg.BLK_SLOTS + 8  # rounds after which the guest has rewritten every slot of its disk


def _busy(kvm: Kvm, disk: Path, console: bg.GuestConsole) -> Machine:
    disk.write_bytes(bytes(MiB))
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=4, rate_mib_s=40), BUSY, console,
                              virtio=VirtioConfig(disk, False, None, False))
    machine.start()
    _wait(lambda: _rounds(machine) >= 2, "disk rounds")
    return machine


def _rounds(machine: Machine) -> int:
    return bg.read_status(machine.vm.memory).cpu_work[1]


def _wait(done: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling interval only


def _snapshot_at(machine: Machine, disk: Path, path: Path, **options) -> tuple[bytes, int]:
    """Snapshot the running `machine` and give the disk's bytes and the guest's rounds at that
    instant, read while it is paused for it; it runs on after."""
    machine.pause()
    try:
        at, rounds = disk.read_bytes(), _rounds(machine)
        snapshot(machine, path, **options)
    finally:
        machine.resume()
    return at, rounds


def _device_disk(machine: Machine) -> bytes:
    """The bytes of the disk the machine's virtio-blk device has (whatever file it is)."""
    fd = machine.devices["virtio-blk0"].backend.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _close(machine: Machine) -> None:
    machine.stop()
    machine.vm.close()


def test_the_restored_guest_finds_its_disk_as_it_was_at_the_snapshot(kvm: Kvm, tmp_path: Path) -> None:
    """The issue's reproduction: snapshot, the guest runs on and rewrites its disk, restore. The
    disk then named is refused (it changed), nothing is created; written from the snapshot, it is
    the snapshot-instant disk and the guest's own read-back checks and the disk's rule hold."""
    disk, path = tmp_path / "disk.img", tmp_path / "s"
    source = _busy(kvm, disk, bg.GuestConsole())
    try:
        at, rounds = _snapshot_at(source, disk, path)
        _wait(lambda: _rounds(source) >= rounds + EVERY_SLOT, "the source to rewrite its disk")
    finally:
        _close(source)
    later = disk.read_bytes()
    assert later != at and (tmp_path / "s.disk").read_bytes() == at
    assert bg.check_disk(at, rounds) == []

    before = kvm_vm_fds()
    with pytest.raises(DiskRefused, match=r"disk.img: changed since the snapshot: 1 of its 1 MiB differ from s.disk"):
        restore(path, kvm, disk=disk)
    assert kvm_vm_fds() == before and disk.read_bytes() == later

    said: list[str] = []
    console = bg.GuestConsole()
    restored = restore(path, kvm, disk=disk, disk_from_snapshot=True, console=console, say_disk=said.append)
    try:
        assert disk.read_bytes() == at and said == [f"disk: {disk}, written from s.disk (the disk at the "
                                                    "snapshot's instant)"]
        restored.resume()
        _wait(lambda: _rounds(restored) >= rounds + 8, "the restored guest's disk rounds")
        restored.pause()
        assert console.failure() is None  # its own check: each round's write read back the same
        assert bg.check_disk(disk.read_bytes(), _rounds(restored)) == []
        assert bg.check_memory(restored.vm.memory).ok
    finally:
        _close(restored)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left

    for _ in range(2):  # with no disk named, a private copy of s.disk each time: s.disk stays as it was
        again = restore(path, kvm)
        try:
            assert _device_disk(again) == at
            again.resume()
            _wait(lambda: _rounds(again) >= rounds + 4, "disk rounds on the private copy")
        finally:
            _close(again)
    assert (tmp_path / "s.disk").read_bytes() == at and inspect(path)["disk"]["check"] == "verified"


def test_snapshot_inspect_and_restore_with_a_disk_through_the_cli(tmp_path: Path) -> None:
    """`migrate snapshot` says what it holds (text and --json), `inspect` shows it, a restore of
    the changed disk exits refused naming it, and a restore naming none runs on a private copy
    whose contents the guest's rule accepts."""
    api, disk = tmp_path / "vm.sock", tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    cli = [sys.executable, "-m", "migrate.cli"]
    vm = subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "64M", "--cpus", "2", "--ws", "4",
                           "--rate", "40", "--disk", str(disk), "--api", str(api)],
                          stdout=console_log(tmp_path, "source"), stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: api.exists() or vm.poll() is not None, "the control socket")
        assert vm.poll() is None, vm.stderr.read() if vm.stderr else ""
        _wait(lambda: "kvmig: pass" in console_text(tmp_path, "source"), "the guest's first pass")
        _wait(lambda: call(api, "guest-check").get("cpu_work", [0, 0])[1] >= 2, "disk rounds")
        taken = subprocess.run(cli + ["snapshot", "--api", str(api), "--out", str(tmp_path / "s"), "--json"],
                               capture_output=True, text=True, timeout=60)
        assert taken.returncode == 0, taken.stderr
        said = json.loads(taken.stdout)["disk"]
        assert said["name"] == "s.disk" and said["guest_disk"] == str(disk) and said["bytes"] == MiB
        assert said["copy"] in ("sparse", "reflink") and len(said["digest"]) == 32
        text = subprocess.run(cli + ["snapshot", "--api", str(api), "--out", str(tmp_path / "t")],
                              capture_output=True, text=True, timeout=60)
        assert text.returncode == 0 and "with its disk disk.img as it was then: t.disk, 1.0 MiB" in text.stdout
        rounds = call(api, "guest-check")["cpu_work"][1]
        _wait(lambda: call(api, "guest-check")["cpu_work"][1] >= rounds + EVERY_SLOT, "the disk rewritten")
        call(api, "stop")
        vm.communicate(timeout=20)
    finally:
        vm.kill()
    shown = json.loads(subprocess.run(cli + ["inspect", str(tmp_path / "s"), "--json"], capture_output=True,
                                      text=True, timeout=60).stdout)
    assert shown["disk"] == {"guest_disk": str(disk), "held": True, "name": "s.disk", "bytes": MiB,
                             "copy": said["copy"], "digest": said["digest"], "check": "verified"}
    assert shown["header"]["format_version"] == "2.1"

    refused = subprocess.run(cli + ["restore", str(tmp_path / "s"), "--disk", str(disk)], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 3 and f"disk {disk}: changed since the snapshot" in refused.stderr

    restored_api = tmp_path / "restored.sock"
    proc = subprocess.Popen(cli + ["restore", str(tmp_path / "s"), "--api", str(restored_api), "--timeout", "60"],
                            stdout=console_log(tmp_path, "restored"), stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: restored_api.exists() or proc.poll() is not None, "the restored VM's socket")
        start = call(restored_api, "guest-check", timeout=60)["cpu_work"][1]
        _wait(lambda: call(restored_api, "guest-check")["cpu_work"][1] >= start + 8, "restored disk rounds")
        call(restored_api, "pause")
        check = call(restored_api, "guest-check")
        private = [fd for fd, target in _open_files(proc.pid).items()
                   if target.startswith(str(tmp_path)) and target.endswith("(deleted)")]
        assert len(private) == 1, _open_files(proc.pid)  # the copy: unlinked, in the snapshot's directory
        assert bg.check_disk(private[0].read_bytes(), check["cpu_work"][1]) == [] and check["ok"]
        call(restored_api, "stop")
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "disk: a private copy of s.disk" in err and "error" not in console_text(tmp_path, "restored")


def _open_files(pid: int) -> dict[Path, str]:
    """What the process's descriptors name now (one closing meanwhile is left out)."""
    named = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            named[fd] = os.readlink(fd)
        except OSError:
            pass
    return named


def _disk_snapshot(kvm: Kvm, tmp_path: Path, name: str = "s", fill: bytes = b"precious", **options) -> Path:
    """A snapshot of a guest (not started) whose disk holds `fill` over 1 MiB."""
    disk = tmp_path / f"{name}.img"
    disk.write_bytes(fill * (MiB // len(fill)))
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=64 * MiB),
                              virtio=VirtioConfig(disk=disk))
    try:
        snapshot(machine, tmp_path / name, **options)
    finally:
        machine.vm.close()
    return tmp_path / name


def _damage(copy: Path, how: str, other: Path) -> str:
    """Damage the snapshot's `.disk` as `how` says; the refusal to expect."""
    if how == "flip":
        data = bytearray(copy.read_bytes())
        data[MiB // 2] ^= 0x01
        copy.write_bytes(bytes(data))
        return "the disk copy's digest is"
    if how == "truncate":
        os.truncate(copy, MiB // 2)
        return f"is {MiB // 2} bytes, the snapshot says {MiB}"
    if how == "missing":
        copy.unlink()
        return "the disk copy cannot be opened"
    if how == "symlink":  # even to a file of the right contents: a name beside it, never a link
        os.replace(copy, copy.with_name("elsewhere"))
        copy.symlink_to(copy.with_name("elsewhere"))
        return "the disk copy cannot be opened"
    os.replace(other, copy)  # another snapshot's: the same size, other contents
    return "it is damaged or another's"


@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "symlink", "another"])
def test_a_damaged_or_missing_disk_copy_is_refused_before_any_vm(kvm: Kvm, tmp_path: Path, how: str) -> None:
    path = _disk_snapshot(kvm, tmp_path)
    _disk_snapshot(kvm, tmp_path, "o", fill=b"another!")  # another snapshot's .disk, the same size
    refusal = _damage(tmp_path / "s.disk", how, tmp_path / "o.disk")
    before = kvm_vm_fds()
    with pytest.raises(SnapshotError, match=refusal):
        restore(path, kvm)
    with pytest.raises(SnapshotError, match=refusal):  # nothing written from it either
        restore(path, kvm, disk=tmp_path / "new.img", disk_from_snapshot=True)
    assert kvm_vm_fds() == before and not (tmp_path / "new.img").exists()
    report = inspect(path)
    assert report["verified"] is False and report["error"]["type"] == "SnapshotError", report
    assert inspect(path, verify=False)["disk"]["check"] == "not checked (--no-verify)"
    assert (tmp_path / "s.img").read_bytes() == b"precious" * (MiB // 8)
    _close(restore(path, kvm, disk=tmp_path / "s.img"))  # the disk it had, unchanged: still restores


def _rewrite(path: Path, out: Path, *, minor: int | None = None, **config_changes) -> None:
    """`path` (a mappable snapshot: no PAGES) written again to `out` with its CONFIG changed, and
    with another minor version in its header: what another writer could have written."""
    loaded = read_stream(path, expected_layout(read_config(path)), None)
    state, end = loaded.state(), loaded.ended()[2]
    if minor is not None:
        saved, formats.stream.FORMAT_MINOR = formats.stream.FORMAT_MINOR, minor
    try:
        writer = StreamWriter(registry(), producer=PRODUCER)
        parts = [writer.header(), writer.config(replace(state.config, **config_changes)), writer.layout(state.layout)]
    finally:
        if minor is not None:
            formats.stream.FORMAT_MINOR = saved
    out.write_bytes(b"".join(parts + state_sections(writer, state) + [writer.end(end.digest)]))


@pytest.mark.parametrize("named", ["../s.disk", "/etc/passwd", "sub/s.disk", "..", ""])
def test_a_disk_record_naming_a_file_elsewhere_is_refused_before_any_vm(kvm: Kvm, tmp_path: Path,
                                                                      named: str) -> None:
    path = _disk_snapshot(kvm, tmp_path, mappable=True)
    record = read_config(path).disk_file
    assert record is not None
    _rewrite(path, path, disk_file=replace(record, path=named))
    before = kvm_vm_fds()
    with pytest.raises(SnapshotError, match="which is not a file next to it"):
        restore(path, kvm)
    assert kvm_vm_fds() == before
    assert inspect(path)["error"]["type"] == "SnapshotError"


def test_a_disk_record_for_a_guest_without_a_disk_is_refused(kvm: Kvm, tmp_path: Path) -> None:
    path = _disk_snapshot(kvm, tmp_path, mappable=True)
    _rewrite(path, path, virtio=None)
    before = kvm_vm_fds()
    for attempt in (lambda: restore(path, kvm), lambda: restore(path, kvm, disk=tmp_path / "s.img")):
        with pytest.raises(SnapshotError, match="records a disk copy, but its guest has no disk"):
            attempt()
    assert kvm_vm_fds() == before and inspect(path)["error"]["type"] == "SnapshotError"


def test_a_snapshot_from_before_disks_were_held_restores_as_before(kvm: Kvm, tmp_path: Path) -> None:
    path = _disk_snapshot(kvm, tmp_path, mappable=True)
    _rewrite(path, path, minor=0, disk_file=None)  # as kvmigrate wrote it at format 2.0
    (tmp_path / "s.disk").unlink()
    report = inspect(path)
    assert report["verified"] and report["header"]["format_version"] == "2.0"
    assert report["disk"]["held"] is False and "not in the snapshot" in report["disk"]["check"]
    before = kvm_vm_fds()
    with pytest.raises(DiskRefused, match="never opened"):
        restore(path, kvm)
    with pytest.raises(DiskRefused, match="holds no copy of its disk"):
        restore(path, kvm, disk=tmp_path / "s.img", disk_from_snapshot=True)
    assert kvm_vm_fds() == before
    said: list[str] = []
    machine = restore(path, kvm, disk=tmp_path / "s.img", say_disk=said.append)
    try:
        assert said == [f"disk: {tmp_path / 's.img'} as it is now (the snapshot does not hold its disk: written "
                        "by an older kvmigrate)"]
        assert machine.state is RunState.PAUSED
    finally:
        _close(machine)


def test_each_snapshot_of_a_chain_a_mappable_and_a_live_one_holds_its_own_disk(kvm: Kvm, tmp_path: Path) -> None:
    """Each snapshot copies the disk whole (an incremental one too); a live one copies it in its
    short pause, so the disk it holds goes with the memory of that instant: restored, the guest's
    rounds in memory and the rounds on the disk agree."""
    disk = tmp_path / "disk.img"
    source = _busy(kvm, disk, bg.GuestConsole())
    try:
        at: dict[str, bytes] = {}
        for name, options in (("s0", {"track_dirty": True}), ("s1", {"base": tmp_path / "s0"}),
                              ("m", {"mappable": True})):
            at[name], rounds = _snapshot_at(source, disk, tmp_path / name, **options)
            _wait(lambda: _rounds(source) >= rounds + 8, "disk rounds")
        rounds = _rounds(source)
        info = snapshot(source, tmp_path / "l", live=True)  # the guest running, writing its disk
        assert info.disk is not None and info.disk.name == "l.disk" and source.state is RunState.RUNNING
        _wait(lambda: _rounds(source) >= rounds + 8, "disk rounds")
    finally:
        _close(source)
    assert len(set(at.values())) == 3
    for name in at:
        assert (tmp_path / f"{name}.disk").read_bytes() == at[name], name
    for name, options in (("s1", {}), ("m", {"share_memory": True}), ("l", {})):
        restored = restore(tmp_path / name, kvm, **options)  # a chain takes its head's disk
        try:
            held = _device_disk(restored)
            assert held == (tmp_path / f"{name}.disk").read_bytes() and held == at.get(name, held), name
            assert bg.check_disk(held, _rounds(restored)) == [], name  # the memory's rounds are the disk's
        finally:
            _close(restored)


def test_the_disk_copy_itself_is_never_a_guests_disk(kvm: Kvm, tmp_path: Path) -> None:
    path = _disk_snapshot(kvm, tmp_path)
    for options in ({"disk": tmp_path / "s.disk"}, {"disk_dir": tmp_path, "disk_from_snapshot": True}):
        copy = tmp_path / "s.disk"
        if "disk_dir" in options:  # the disk's name in that directory is the copy itself
            os.replace(tmp_path / "s.img", tmp_path / "keep.img")
            os.link(copy, tmp_path / "s.img")
        with pytest.raises(DiskRefused, match="is the snapshot's own s.disk"):
            restore(path, kvm, **options)


def test_a_snapshot_whose_disk_cannot_be_copied_fails_and_leaves_nothing(kvm: Kvm, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def full(src: int, dst: int, size: int) -> tuple[DiskCopyKind, int]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    disk = tmp_path / "disk.img"
    source = _busy(kvm, disk, bg.GuestConsole())
    try:
        monkeypatch.setattr(disk_copy, "clone_file", full)
        with pytest.raises(SnapshotError, match=f"the guest's disk {disk} cannot be copied to s.disk: No space"):
            snapshot(source, tmp_path / "s")
        assert source.state is RunState.RUNNING  # resumed
    finally:
        _close(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.img"]
