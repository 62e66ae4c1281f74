"""The built-in guest on 2 vCPUs with its virtio-blk, virtio-console and virtio-rng drivers busy
(on CPU 1) while CPU 0 dirties memory: snapshot it mid-operation and restore it in a new process,
and migrate it live; the requests in flight complete, the disk holds what the guest wrote, both
vCPUs carry on, and the virtio console keeps printing on the other side."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hv.guests import builtin as bg
from hv.vmm.builder import VirtioConfig, builtin_machine
from hv.vmm.control import call
from hv.kvm.kvm import Kvm
from hv.vmm.machine import Machine, RunState
from hv.kvm.vm import VmConfig
from migrate import MigrationOptions, ReceiveOptions, listen_and_receive, send
from migrate.snapshot.snapshots import snapshot
from migrate.transport.listener import Listener

from tests.console_log import console_log, console_text

MiB = 1 << 20


ON_PCI = ("virtio-blk0", "virtio-console0", "virtio-rng0")


def _busy_machine(kvm: Kvm, disk: Path, console: bg.GuestConsole, vcon: bg.GuestConsole,
                  pci: tuple[str, ...] = ()) -> Machine:
    """`pci`: those devices on virtio-pci, which the guest drives with a MSI-X vector per queue."""
    disk.write_bytes(bytes(1 * MiB))
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=16, rate_mib_s=40), VmConfig(mem_size=64 * MiB, vcpus=2),
                              console, virtio=VirtioConfig(disk, False, vcon, True, pci=pci))
    machine.start()
    console.wait_for(lambda: any(isinstance(e, bg.DeviceRound) for _, e in console.events), 30, "device rounds")
    console.wait_pass(2, timeout=30)
    return machine


def _vcon_rounds(lines: list[str]) -> list[int]:
    return [int(line.split()[-1]) for line in lines if line.startswith("kvmig-vcon: round ")]


@pytest.mark.parametrize(("pci", "live"), [((), False), (ON_PCI, False), ((), True)], ids=["mmio", "pci", "mmio-live"])
def test_snapshot_mid_operation_restores_in_a_new_process(kvm: Kvm, tmp_path: Path, pci: tuple[str, ...],
                                                           live: bool) -> None:
    """`live`: the guest runs on while the snapshot is written, both vCPUs and the devices busy
    (their writes to memory and to the disk after the pause are not the snapshot's)."""
    disk, console = tmp_path / "disk.img", bg.GuestConsole()
    machine = _busy_machine(kvm, disk, console, bg.GuestConsole(), pci)
    try:
        passes = console.last_pass()
        info = snapshot(machine, tmp_path / "busy.snap", live=live)  # taken while the drivers are mid-request
        if live:
            assert info.live is not None and info.live.taken > 0
            console.wait_pass(passes + 2, timeout=30)  # it ran on, and wrote on
    finally:
        machine.stop()  # it wrote its disk on after the snapshot: disk.img is not the snapshot's now
        machine.vm.close()
    api = tmp_path / "restored.sock"
    proc = subprocess.Popen([sys.executable, "-m", "migrate.cli", "restore", str(tmp_path / "busy.snap"),
                             "--disk-dir", str(tmp_path), "--disk-from-snapshot", "--api", str(api),
                             "--timeout", "90"],
                            stdout=console_log(tmp_path, "restored"), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not api.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        first = call(api, "guest-check")
        while (later := call(api, "guest-check"))["passes"] < first["passes"] + 2 or \
                later["cpu_work"][1] < first["cpu_work"][1] + 300:
            assert time.monotonic() < deadline + 30, later
            time.sleep(0.05)
        assert later["ok"] and later["cpus_up"] == 2, later
        call(api, "pause")
        rounds = call(api, "guest-check")["cpu_work"][1]
        problems = bg.check_disk(disk.read_bytes(), rounds)
        call(api, "stop")
        proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert not problems, problems
    out = console_text(tmp_path, "restored")
    vcon = _vcon_rounds(out.splitlines())
    assert vcon and vcon[0] > first["cpu_work"][1] - 64  # virtio-console output carries on
    assert "error" not in out


@pytest.mark.parametrize(("postcopy", "pci"), [(False, ()), (True, ()), (False, ON_PCI)],
                         ids=["precopy", "postcopy", "precopy-pci"])
def test_live_migration_with_busy_devices(kvm: Kvm, tmp_path: Path, postcopy: bool, pci: tuple[str, ...]) -> None:
    """Post-copy too: the device threads then touch missing pages (rings, buffers) and wait for
    them without holding up the fetcher. On PCI, MSI-X interrupts are in flight as it moves: the
    guest waits for each used buffer's, so a lost one would stop it (its error, exit code 4)."""
    disk, console = tmp_path / "disk.img", bg.GuestConsole()
    machine = _busy_machine(kvm, disk, console, bg.GuestConsole(), pci)
    listener = Listener("127.0.0.1:0", b"")
    target_console, target_vcon = bg.GuestConsole(), bg.GuestConsole()
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        incoming=listen_and_receive(listener, kvm, ReceiveOptions(console=target_console, virtio_console=target_vcon,
                                                                   disk=str(disk)), accept_timeout=20)))  # shared storage, named here
    thread.start()
    try:
        moved_from = bg.read_status(machine.vm.memory)
        stats = send(machine, listener.address, MigrationOptions(postcopy=postcopy))
        thread.join(60)
        assert stats.outcome == "completed", stats.reason
        assert (stats.postcopy is not None and stats.postcopy.missing_pages > 0) == postcopy
        assert machine.state is RunState.STOPPED
        target = result["incoming"].machine
        try:
            at = bg.read_status(target.vm.memory)
            target_console.wait_pass(at.passes + 2, timeout=30)
            target_vcon.wait_for(lambda: len(_vcon_rounds(target_vcon.lines)) >= 3, 30, "virtio console")
            target.pause()
            status = bg.read_status(target.vm.memory)
            assert bg.check_memory(target.vm.memory).ok
            assert status.cpu_work[1] > at.cpu_work[1] >= moved_from.cpu_work[1] > 0  # CPU 1 carried on
            assert not bg.check_disk(disk.read_bytes(), status.cpu_work[1])
            assert target_console.failure() is None and console.failure() is None
            if pci:  # the guest kept taking its MSI-X interrupts on the target
                counts = bg.read_msi_counts(target.vm.memory)
                assert counts[0] >= 2 * status.cpu_work[1] - 2, (counts, status.cpu_work)
        finally:
            target.stop()
            target.vm.close()
    finally:
        listener.close()
        machine.stop()
        machine.vm.close()


def test_check_disk_finds_a_damaged_slot(tmp_path: Path) -> None:
    import numpy as np

    image = np.zeros(64 * 512, dtype="<u8")
    for r in range(1, 101):  # 100 rounds
        slot = r % 64
        image[slot * 512:(slot + 1) * 512] = (r << 32) | (slot << 16) | np.arange(512)
    assert bg.check_disk(image.tobytes(), 100) == []
    assert bg.check_disk(image.tobytes(), 90)  # rounds 91..100 are not supposed to be there yet
    image[5 * 512 + 7] ^= 1
    assert bg.check_disk(image.tobytes(), 100) == ["slot 5: round 69's words are damaged"]


@pytest.mark.parametrize("rounds", [0, 1, 63, 64, 65, 1000])
def test_check_disk_accepts_what_the_workload_writes(rounds: int) -> None:
    import numpy as np

    image = np.zeros(64 * 512, dtype="<u8")
    for r in range(1, rounds + 2):  # + the round in flight
        slot = r % 64
        image[slot * 512:(slot + 1) * 512] = (r << 32) | (slot << 16) | np.arange(512)
    assert bg.check_disk(image.tobytes(), rounds) == []
