"""virtio-pci (modern) on a real KVM machine: the builder puts a device on PCI when asked, the
test plays the driver (capabilities found by walking the list, common configuration, queues,
MSI-X), a tiny guest takes the interrupts (each report is one it took) and writes a queue's
notification itself, which KVM turns into the worker's eventfd signal (ioeventfd, no exit)."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pcitools import FLAG, PciDriver, interrupt_counter, start_counting
from test_virtio import BUFFERS, blk_request, kick, wait_used
from tinyguest import multiboot_elf, wait_for

from hv.devices.pci import VirtioPciBlk, VirtioPciConsole, VirtioPciRng
from hv.devices.pci import virtio_pci as vp
from hv.devices.pci.root import PciAddress
from hv.devices.virtio import VirtioBlk
from hv.devices.virtio.blk import VIRTIO_BLK_S_OK
from hv.devices.virtio.mmio import STATUS_NEEDS_RESET
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, multiboot_machine, standard_layout
from hv.vmm.machine import Machine

MiB = 1 << 20


@pytest.fixture
def machines(kvm: Kvm, write_image, tmp_path: Path) -> Iterator:
    made: list[Machine] = []
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))

    def make(code: bytes, **virtio) -> Machine:
        cfg = VmConfig(mem_size=64 * MiB)
        made.append(multiboot_machine(kvm, write_image(multiboot_elf(code)), "", cfg, virtio=VirtioConfig(**virtio)))
        return made[-1]

    make.disk = disk  # type: ignore[attr-defined]
    yield make
    for m in made:
        m.stop()
        m.vm.close()


def _address(machine: Machine, device_id: str) -> PciAddress:
    return PciAddress(*machine.placements[device_id].pci.address)


def test_the_builder_puts_the_devices_asked_for_on_pci(machines) -> None:
    machine = machines(b"\xf3\x90\xeb\xfc", disk=machines.disk, console_out=lambda b: None, rng=True,
                       pci=("virtio-blk0", "virtio-rng0"))
    assert isinstance(machine.devices["virtio-blk0"], VirtioPciBlk)
    assert isinstance(machine.devices["virtio-blk0"], VirtioBlk)  # the same device model
    assert isinstance(machine.devices["virtio-rng0"], VirtioPciRng)
    assert machine.devices["virtio-console0"].KIND == "virtio-mmio-console"
    assert machine.device_layout() == standard_layout(("virtio-blk0", "virtio-console0", "virtio-rng0"),
                                                      ("virtio-blk0", "virtio-rng0"))
    drv = PciDriver(machine, _address(machine, "virtio-blk0"))
    assert drv.config(0, 4) == 0x1042_1AF4 and drv.config(0x08, 1) == 1  # modern: 0x1040 + 2, rev 1
    assert drv.find_capabilities() == {vp.CFG_COMMON: (0, vp.COMMON, vp.COMMON_SIZE),
                                       vp.CFG_NOTIFY: (0, vp.NOTIFY, vp.NOTIFY_SIZE),
                                       vp.CFG_ISR: (0, vp.ISR, vp.ISR_SIZE),
                                       vp.CFG_DEVICE: (0, vp.DEVICE, vp.DEVICE_SIZE),
                                       vp.CFG_PCI: (0, 0, 0)}
    drv.start([0x40, 0x41])
    assert drv.r(vp.NUM_QUEUES, 2) == 1 and drv.r(vp.DEVICE_FEATURE, 4) != 0
    assert drv.r(vp.DEVICE, 8) == MiB // 512  # virtio-blk's capacity, in the device configuration
    drv.w(vp.CONFIG_MSIX_VECTOR, 2, 7)  # past the table: the device answers NO_VECTOR
    assert drv.r(vp.CONFIG_MSIX_VECTOR, 2) == 0xFFFF


def test_a_guest_notification_reaches_the_worker_and_msix_the_guest(machines) -> None:
    layout = {p.device_id: p for p in standard_layout(("virtio-rng0",), ("virtio-rng0",))}
    bar0 = layout["virtio-rng0"].pci.bars[0][2]
    machine = machines(interrupt_counter([0x40, 0x41], notify=bar0 + vp.NOTIFY), rng=True, pci=("virtio-rng0",))
    reports = start_counting(machine)
    drv = PciDriver(machine, _address(machine, "virtio-rng0"))
    drv.start([0x40, 0x41])
    drv.init(1, vectors=[0], config_vector=1)
    q = drv.queues[0]
    mem = machine.vm.memory
    mem.write(BUFFERS, bytes(64))
    head = q.add([(BUFFERS, 64, True)])
    exits = machine.stats[0].mmio_exits
    mem.write(FLAG, struct.pack("<I", 1))  # the guest writes queue 0's notification now
    assert wait_used(q, 1) == [(head, 64)]
    wait_for(lambda: reports.writes)
    assert [v for _, _, v in reports.writes] == [0x40]  # queue 0's vector, once
    assert mem.read(BUFFERS, 64) != bytes(64)
    assert machine.stats[0].mmio_exits == exits  # the notification was KVM's (ioeventfd), no exit
    rng = machine.devices["virtio-rng0"]
    assert rng.msix.sent == [1, 0] and drv.r(vp.ISR, 1) == 0  # MSI-X: the ISR is not used


def test_blk_and_console_round_trip_with_a_vector_per_queue(machines) -> None:
    machine = machines(interrupt_counter([0x40, 0x41, 0x42]), disk=machines.disk,
                       console_out=(out := bytearray()).extend, pci=("virtio-blk0", "virtio-console0"))
    reports = start_counting(machine)
    blk = PciDriver(machine, _address(machine, "virtio-blk0"))
    blk.start([0x40])
    blk.init(1, vectors=[0])
    data = os.urandom(2 * 512)
    head, status = blk_request(blk.queues[0], 1, 3, data, BUFFERS)
    kick(machine.devices["virtio-blk0"], 0)
    assert wait_used(blk.queues[0], 1) == [(head, 1)]
    mem = machine.vm.memory
    assert mem.read(status, 1)[0] == VIRTIO_BLK_S_OK and machines.disk.read_bytes()[3 * 512 : 5 * 512] == data
    head, status = blk_request(blk.queues[0], 0, 3, len(data), BUFFERS + 0x1_0000)
    blk.w(vp.NOTIFY, 2, 0)  # a notification that comes as an exit (the host's write) is processed inline
    assert blk.queues[0].take_used() == [(head, len(data) + 1)]
    assert mem.read(BUFFERS + 0x1_0000 + 4096, len(data)) == data

    console = PciDriver(machine, _address(machine, "virtio-console0"))
    console.start([0x41, 0x42])
    console.init(2, vectors=[0, 1], rings=0x30_0000)  # receiveq on entry 0, transmitq on entry 1
    mem.write(BUFFERS + 0x2_0000, b"hello over pci\n")
    head = console.queues[1].add([(BUFFERS + 0x2_0000, 15, False)])
    kick(machine.devices["virtio-console0"], 1)
    assert wait_used(console.queues[1], 1) == [(head, 0)]
    wait_for(lambda: bytes(out) == b"hello over pci\n")
    machine.devices["virtio-console0"].feed(b"typed")
    rx = console.queues[0].add([(BUFFERS + 0x3_0000, 64, True)])
    kick(machine.devices["virtio-console0"], 0)
    assert wait_used(console.queues[0], 1) == [(rx, 5)] and mem.read(BUFFERS + 0x3_0000, 5) == b"typed"
    # each queue's buffers signalled its own vector: blk's two requests, the console's tx then rx
    # (two messages on one vector that arrive before the guest takes the first are one interrupt,
    # as on any LAPIC: blk's may be counted once)
    wait_for(lambda: {v for _, _, v in reports.writes} == {0x40, 0x41, 0x42})
    seen = sorted(v for _, _, v in reports.writes)
    assert seen in ([0x40, 0x41, 0x42], [0x40, 0x40, 0x41, 0x42]), seen
    assert machine.devices["virtio-blk0"].msix.sent == [2, 0]  # both requests sent their message
    assert machine.devices["virtio-console0"].msix.sent == [1, 1, 0]


def test_a_bad_queue_is_needs_reset_through_the_config_vector(machines) -> None:
    machine = machines(interrupt_counter([0x40, 0x43]), rng=True, pci=("virtio-rng0",))
    reports = start_counting(machine)
    drv = PciDriver(machine, _address(machine, "virtio-rng0"))
    drv.start([0x40, 0x43])
    drv.init(1, vectors=[0], config_vector=1)
    drv.queues[0].add([(0xF000_0000, 64, True)])  # outside RAM
    kick(machine.devices["virtio-rng0"], 0)
    wait_for(lambda: reports.writes)
    assert [v for _, _, v in reports.writes] == [0x43] and drv.r(vp.DEVICE_STATUS, 1) & STATUS_NEEDS_RESET
    drv.w(vp.DEVICE_STATUS, 1, 0)  # reset: the vectors go back to none, the MSI-X table stays
    assert drv.r(vp.DEVICE_STATUS, 1) == 0 and drv.r(vp.CONFIG_MSIX_VECTOR, 2) == 0xFFFF
    assert machine.devices["virtio-rng0"].msix.read_table(8, 4) == 0x40


def test_hv_run_chooses_the_transport_per_device(tmp_path: Path) -> None:
    from hv.errors import ConfigError
    from hv.vmm import cli

    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    parse = lambda *a: cli._virtio(cli.build_parser().parse_args(["run", *a]), print)  # noqa: E731
    config = parse("--disk", f"{disk},ro,transport=pci", "--virtio-console", "--rng", "pci")
    assert config.pci == ("virtio-blk0", "virtio-rng0") and config.disk_readonly and config.rng
    assert config.console_out is print
    assert parse("--disk", str(disk), "--rng").pci == ()
    assert parse("--virtio-console", "pci").pci == ("virtio-console0",)
    for bad in (f"{disk},transport=isa", f"{disk},rw"):
        with pytest.raises(ConfigError):
            parse("--disk", bad)


def test_the_configuration_access_window_reaches_the_bars(machines) -> None:
    """VIRTIO_PCI_CAP_PCI_CFG: bar, offset and length written, then pci_cfg_data read or written
    is that access to the BAR (virtio 1.x, 4.1.4.9), with decoding off even."""
    machine = machines(b"\xf3\x90\xeb\xfc", rng=True, pci=("virtio-rng0",))
    drv = PciDriver(machine, _address(machine, "virtio-rng0"))
    cap = next(at for at in range(0x40, 0x100, 4) if drv.config(at, 1) == vp.CAP_ID_VENDOR and drv.config(at + 3, 1) == vp.CFG_PCI)
    drv.config(cap + 4, 1, 0)  # BAR 0
    drv.config(cap + 8, 4, vp.NUM_QUEUES)
    drv.config(cap + 12, 4, 2)
    assert drv.config(cap + 16, 2) == 1  # rng has one queue
    drv.config(cap + 8, 4, vp.DEVICE_STATUS)
    drv.config(cap + 12, 4, 1)
    drv.config(cap + 16, 1, 1)  # ACKNOWLEDGE, written through the window
    assert machine.devices["virtio-rng0"].save().transport.status == 1
    drv.config(cap + 12, 4, 3)  # not 1, 2 or 4 bytes: the window does nothing
    assert drv.config(cap + 16, 4) == 1  # what the data field last held
