"""The built-in guest finds its virtio devices on PCI and drives them with MSI-X interrupts: on
kvmigrate (the interrupts it counted per vector match what the devices sent, the disk holds what
it wrote) and on QEMU's PCI from the very same image (its drivers pass there too: a read-back
mismatch, an empty rng buffer or a missing interrupt would end the run with exit code 4)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from hv.devices.pci import VirtioPci
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, builtin_machine

MiB = 1 << 20
ALL = ("virtio-blk0", "virtio-console0", "virtio-rng0")


def test_the_guest_drives_virtio_pci_with_msix(kvm: Kvm, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    console, vcon = bg.GuestConsole(), bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=8, rate_mib_s=40), VmConfig(mem_size=64 * MiB, vcpus=2),
                              console, virtio=VirtioConfig(disk, False, vcon, True, pci=ALL))
    try:
        machine.start()
        console.wait_for(lambda: any(isinstance(e, bg.Devices) for _, e in console.events), 30, "devices")
        vcon.wait_for(lambda: len(vcon.lines) >= 2, 30, "virtio console rounds")
        machine.pause()
        assert console.failure() is None, console.failure()
        (found,) = [e for _, e in console.events if isinstance(e, bg.Devices)]
        layout = {d: machine.placements[d].pci.bars[0][2] for d in ALL}
        # the guest found each on PCI, at BAR 0 + 0 (the common configuration)
        assert (found.blk, found.console, found.rng) == (layout["virtio-blk0"], layout["virtio-console0"],
                                                         layout["virtio-rng0"])
        counts = bg.read_msi_counts(machine.vm.memory)
        # vectors in the order the guest set the queues up: blk's, the console's rx and tx, rng's
        sent = (*machine.devices["virtio-blk0"].msix.sent[:1], *machine.devices["virtio-console0"].msix.sent[:2],
                *machine.devices["virtio-rng0"].msix.sent[:1])
        # a message sent just before the pause may wait in CPU 1's LAPIC, not yet taken
        assert all(0 <= s - c <= 1 for s, c in zip(sent, counts[:4], strict=True)), (sent, counts)
        assert counts[4:] == (0,) * 4 and counts[1] == 0  # nothing typed: the console's rx never fired
        rounds = bg.read_status(machine.vm.memory).cpu_work[1]
        assert counts[0] >= 2 * rounds - 2 and counts[2] >= len(vcon.lines) - 1 and counts[3] >= rounds // 16 - 1
        assert not bg.check_disk(disk.read_bytes(), rounds)
        assert all(isinstance(machine.devices[d], VirtioPci) for d in ALL)
    finally:
        machine.stop()
        machine.vm.close()


def test_the_same_drivers_pass_on_qemus_pci(kvm: Kvm, tmp_path: Path) -> None:
    """QEMU runs the image until the guest's virtio console says 64 device rounds were done (each
    a blk write and read back, each waiting for its MSI-X interrupt; rng every 16): an event, not
    a time. A driver that failed would have ended the run (exit code 4) before."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is not installed (`make test` installs it)")
    with kvm.create_vm(VmConfig(mem_size=MiB)) as vm:
        tsc_khz = vm.create_vcpu(0).fd.get_tsc_khz()
    disk, vcon, out = tmp_path / "disk.img", tmp_path / "vcon.txt", tmp_path / "com1.txt"
    disk.write_bytes(bytes(MiB))
    proc = subprocess.Popen(
        [qemu, "-enable-kvm", "-cpu", "max,-arch-capabilities", "-m", "64", "-smp", "2", "-display", "none",
         "-monitor", "none", "-serial", f"file:{out}", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
         "-device", "virtio-rng-pci,disable-legacy=on",
         "-device", "virtio-serial-pci,disable-legacy=on,max_ports=1",
         "-chardev", f"file,path={vcon},id=c0", "-device", "virtconsole,chardev=c0",
         "-kernel", str(bg.guest_image()), "-append", f"ws=8 rate=40 cpus=2 tsc_khz={tsc_khz}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90  # a bound for a broken run, not the verdict
        while not (vcon.exists() and "kvmig-vcon: round 64" in vcon.read_text()):
            assert proc.poll() is None, out.read_text() + proc.stderr.read()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    events = [bg.parse_line(line) for line in out.read_text().splitlines()]
    assert not [e for e in events if isinstance(e, (bg.GuestError, bg.Fault))]
    (found,) = [e for e in events if isinstance(e, bg.Devices)]
    assert found.blk and found.console and found.rng  # all three found on QEMU's PCI
