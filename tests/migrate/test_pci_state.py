"""PCI through snapshots and live migration (the test driving the devices; the guest's own drivers
busy on PCI: test_busy_devices.py): the topology is part of the layout a target checks
before it builds a VM (another topology is refused, no VM created), and the bridge's and every
function's state (configuration space, MSI-X table and pending bits, virtio-pci registers, queues)
arrives whole: the driver's setup holds on the other side, a vector left pending is sent there
when the driver unmasks it, and the device keeps serving its queue."""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "hv"))  # the PCI driver and tiny guests there
from pcitools import PciDriver  # noqa: E402
from test_virtio import BUFFERS, kick, wait_used  # noqa: E402

import formats  # noqa: E402
from formats import DeviceEntry, DeviceLayout, MemoryLayout, PciBar, PciEntry
from hv.devices.pci.root import PciAddress
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, builtin_machine
from hv.vmm.machine import Machine
from hv.vmm.pci import register_pci_device
from migrate import MigrationOptions, ReceiveOptions, listen_and_receive, send
from migrate.snapshot.snapshots import restore, snapshot
from migrate.state import registry
from migrate.transport.listener import Listener

MiB = 1 << 20
ON_PCI = ("virtio-blk0", "virtio-rng0")
PCI_IDS = ("pci-root", *ON_PCI)


def _machine(kvm: Kvm, disk: Path, console: bg.GuestConsole) -> Machine:
    disk.write_bytes(bytes(MiB))
    # one vCPU: the guest's own drivers (on CPU 1) stay out, the test is the devices' only driver
    # (the guest-driven case: tests/migrate/test_busy_devices.py's pci runs)
    return builtin_machine(kvm, bg.GuestParams(ws_mib=16, rate_mib_s=40), VmConfig(mem_size=64 * MiB, vcpus=1),
                           console, virtio=VirtioConfig(disk, False, None, True, pci=ON_PCI))


def _drive(machine: Machine) -> PciDriver:
    """The rng set up as a driver would (MSI-X on, its queue on entry 0), one request served,
    then vector 0 masked and fired: pending in the PBA. The blk's decoding and MSI-X are on."""
    rng = PciDriver(machine, PciAddress(*machine.placements["virtio-rng0"].pci.address))
    # guest vectors its IDT has (the MSI-X block, 0x28-0x2F, which it counts): a vector past its
    # IDT killed the guest (exit 3) a moment later, and the migration raced its end
    rng.start([0x2C, 0x2D])
    rng.init(1, vectors=[0], config_vector=1, rings=0x80_0000)
    head = rng.queues[0].add([(BUFFERS + 0x80_0000, 32, True)])
    kick(machine.devices["virtio-rng0"], 0)
    assert wait_used(rng.queues[0], 1) == [(head, 32)]
    machine.mmio_bus.write(rng.bar1 + 12, 4, 1)  # mask entry 0
    assert machine.devices["virtio-rng0"].msix.fire(0)
    assert machine.mmio_bus.read(rng.bar1 + 0x800, 8) == 1
    blk = PciDriver(machine, PciAddress(*machine.placements["virtio-blk0"].pci.address))
    blk.start([0x2E, 0x2F])
    assert machine.stop_reason is None, machine.stop_reason
    return rng


def _check_arrived(source_states: dict[str, object], target: Machine, rng: PciDriver) -> None:
    for device_id in PCI_IDS:
        assert target.devices[device_id].save() == source_states[device_id], device_id
    moved = PciDriver(target, rng.address, rng.bar0, rng.bar1, [replace(q, mem=target.vm.memory) for q in rng.queues])
    assert target.mmio_bus.read(rng.bar1 + 0x800, 8) == 1  # still pending
    sent = target.devices["virtio-rng0"].msix.sent[0]
    target.mmio_bus.write(rng.bar1 + 12, 4, 0)  # unmask: sent on this side
    assert target.devices["virtio-rng0"].msix.sent[0] == sent + 1
    assert target.mmio_bus.read(rng.bar1 + 0x800, 8) == 0
    head = moved.queues[0].add([(BUFFERS + 0x81_0000, 16, True)])  # the queue carries on
    kick(target.devices["virtio-rng0"], 0)
    assert wait_used(moved.queues[0], 1)[-1] == (head, 16)


def test_a_snapshot_carries_the_pci_state_and_a_pending_vector(kvm: Kvm, tmp_path: Path) -> None:
    console = bg.GuestConsole()
    machine = _machine(kvm, tmp_path / "disk.img", console)
    try:
        machine.start()
        console.wait_pass(1, timeout=30)
        rng = _drive(machine)
        snapshot(machine, tmp_path / "pci.snap")
        machine.pause()
        states = {d: machine.devices[d].save() for d in PCI_IDS}
    finally:
        machine.stop()
        machine.vm.close()
    target = restore(tmp_path / "pci.snap", kvm, disk_dir=tmp_path)
    try:
        target.resume()
        _check_arrived(states, target, rng)
        target.pause()  # the working set read whole, not while the guest writes it
        assert bg.check_memory(target.vm.memory).ok
    finally:
        target.stop()
        target.vm.close()


def test_a_live_migration_carries_the_pci_state(kvm: Kvm, tmp_path: Path) -> None:
    disk, console = tmp_path / "disk.img", bg.GuestConsole()
    machine = _machine(kvm, disk, console)
    listener = Listener("127.0.0.1:0", b"")
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(
        incoming=listen_and_receive(listener, kvm, ReceiveOptions(console=bg.GuestConsole(), disk=str(disk)),
                                    accept_timeout=20)))
    try:
        machine.start()
        console.wait_pass(1, timeout=30)
        rng = _drive(machine)
        states = {d: machine.devices[d].save() for d in PCI_IDS}  # idle from here: what must arrive
        thread.start()
        stats = send(machine, listener.address, MigrationOptions())
        thread.join(60)
        assert stats.outcome == "completed", stats.reason
        target = result["incoming"].machine
        try:
            _check_arrived(states, target, rng)
            target.pause()
            assert bg.check_memory(target.vm.memory).ok
        finally:
            target.stop()
            target.vm.close()
    finally:
        listener.close()
        machine.stop()
        machine.vm.close()


def test_another_topology_is_refused_before_any_vm(kvm: Kvm, tmp_path: Path) -> None:
    """The source put its rng at 00:01.0 and its disk at 00:02.0, the other way round from what
    this VMM builds for the same devices: the layout check names the topology changes and no VM
    is created."""
    from test_snapshot import kvm_vm_fds

    from hv.devices.pci import VirtioPciBlk, VirtioPciRng

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=4), VmConfig(mem_size=64 * MiB), bg.GuestConsole())
    try:
        assert register_pci_device(machine, VirtioPciRng(machine.vm.memory), "virtio-rng0") == PciAddress(0, 1, 0)
        assert register_pci_device(machine, VirtioPciBlk(machine.vm.memory, disk), "virtio-blk0") == PciAddress(0, 2, 0)
        snapshot(machine, tmp_path / "snap")
    finally:
        machine.stop()
        machine.vm.close()
    before = kvm_vm_fds()
    with pytest.raises(formats.LayoutMismatch) as e:
        restore(tmp_path / "snap", kvm, disk_dir=tmp_path)
    assert kvm_vm_fds() == before
    changed = {(d.device_id, d.field) for d in e.value.differences if isinstance(d, formats.DeviceChanged)}
    assert {("virtio-rng0", "pci"), ("virtio-blk0", "pci")} <= changed, e.value.differences


def _entry(device: int = 1, bar_address: int = 0xE010_0000) -> DeviceEntry:
    return DeviceEntry("virtio-rng0", "virtio-pci-rng", (), (formats.IoRange(bar_address, 0x4000),), (6,), 1,
                       PciEntry(0, device, 0, 0x1AF4, 0x1044, 0xFF00, (PciBar(0, "mem32", bar_address, 0x4000),)))


def test_the_layout_compares_pci_topology() -> None:
    memory = MemoryLayout.of((0, 64 * MiB))
    expected = DeviceLayout(memory, 1, (_entry(),))
    assert formats.diff(expected, DeviceLayout(memory, 1, (_entry(),))) == []
    found = DeviceLayout(memory, 1, (_entry(device=2),))
    (change,) = formats.diff(expected, found)
    assert change.field == "pci" and "00:02.0 1af4:1044" in str(change)
    reg = registry()
    wire = reg.to_wire(expected)
    assert reg.from_wire(wire) == expected  # through the schema, as LAYOUT travels


@pytest.mark.parametrize("bad", [dict(device=32), dict(vendor_id=0x1_0000), dict(bars=(PciBar(0, "mem32", 0, 0x4000),) * 2)])
def test_a_pci_entry_out_of_range_is_refused(bad: dict) -> None:
    fields = dict(bus=0, device=1, function=0, vendor_id=0x1AF4, device_id=0x1044, class_code=0xFF00, bars=())
    with pytest.raises(ValueError):
        PciEntry(**{**fields, **bad})
    with pytest.raises(ValueError):
        PciBar(0, "mem32", 0x1000, 0x3000)  # not a power of two


def test_pci_entries_decode_defensively() -> None:
    reg = registry()
    wire = reg.to_wire(DeviceLayout(MemoryLayout.of((0, 64 * MiB)), 1, (_entry(),)))

    def spoil(node):  # a vendor id past 16 bits, wherever the wire holds it
        if isinstance(node, dict):
            return {k: (0x1_0000 if k == "vendor_id" else spoil(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [spoil(v) for v in node]
        return node

    with pytest.raises(formats.SchemaError):
        reg.from_wire(spoil(wire))
