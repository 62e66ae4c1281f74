"""A machine's PCI: the host bridge on its buses, and `register_pci_device`, the one way a
function joins bus 0 (crosvm's `LinuxArch::register_pci_device`: machine and device in, the
function's `PciAddress` out).

Placement is policy, and plain data: the ECAM window at a fixed address (1 MiB: bus 0), memory
BARs from the system allocator's device MMIO space above it (aligned to their size; the
virtio-mmio windows below, where the built-in guest scans for them, stay apart), I/O BARs from the PCI port window 0xC000-0xFFFF, the INTx
line from the allocator's IOAPIC lines (written to Interrupt Line, as firmware does), MSI-X
vectors on GSIs from 24. Firmware leaves the Command register at 0: a driver enables decoding.
`pci_layout` computes the same placements without KVM, so a migration target can check a
source's topology before it builds anything.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from hv.devices.pci.config import INTERRUPT_LINE, Bar, BarKind, PciIdentity
from hv.devices.pci.virtio_pci import VirtioPci, VirtioPciBlk, VirtioPciConsole, VirtioPciNet, VirtioPciRng
from hv.devices.pci.root import CONFIG_ADDRESS_PORT, CONFIG_PORTS, ECAM_BUS_SIZE, PciAddress, PciFunction, PciRoot
from hv.devices.serial import COM1_IRQ
from hv.errors import ConfigError
from hv.kvm.vm import FIRST_MSI_GSI, Vm
from hv.platform.allocator import DEVICE_MMIO_END, DEVICE_MMIO_START, SystemAllocator
from hv.persist import Device
from hv.vmm.placement import DevicePlacement, PciPlacement

if TYPE_CHECKING:
    from hv.vmm.machine import Machine

ROOT_ID = "pci-root"
ECAM_BASE = 0xE000_0000
ECAM_SIZE = ECAM_BUS_SIZE  # bus 0 only
IO_WINDOW = (0xC000, 0x1_0000)
MMIO_WINDOW = (ECAM_BASE + ECAM_SIZE, DEVICE_MMIO_END)  # above ECAM: apart from virtio-mmio's slots


class PciDevice(PciFunction, Device, Protocol):
    """A function the machine can wire: its shape is known before it exists (`pci_shape`); a
    `Device` as everything the machine holds and saves by id."""

    KIND: ClassVar[str]

    @classmethod
    def pci_shape(cls) -> tuple[PciIdentity, tuple[Bar, ...], int]:
        """(identity, BARs, MSI-X vectors) of every function of this class."""
        ...

    def connect_pci(self, vm: Vm, msi_gsi_base: int, intx_line: int) -> None: ...


@dataclass
class _Placer:
    """The allocation policy, shared by the machine and by `pci_layout` so both agree."""

    alloc: SystemAllocator
    next_gsi: int = FIRST_MSI_GSI
    next_device: int = 1

    @classmethod
    def after(cls, placements: Iterable[DevicePlacement]) -> _Placer:
        """An allocator with what the machine already has taken (COM1's line, virtio-mmio
        windows and lines) and the ECAM window reserved."""
        alloc = SystemAllocator.x86()
        alloc.irqs.reserve(COM1_IRQ, "serial0")
        for p in placements:
            for base, size in p.mmio:
                if DEVICE_MMIO_START <= base < DEVICE_MMIO_END:
                    alloc.mmio.reserve(base, size, p.device_id)
            for irq in p.irqs:
                if irq != COM1_IRQ:
                    alloc.irqs.reserve(irq, p.device_id)
        alloc.mmio.reserve(ECAM_BASE, ECAM_SIZE, ROOT_ID)
        return cls(alloc)

    def place(self, device_id: str, kind: str, shape: tuple[PciIdentity, tuple[Bar, ...], int]
              ) -> tuple[DevicePlacement, int]:
        """The function's placement and the first of its MSI GSIs."""
        identity, bars, vectors = shape
        placed = []
        for bar in bars:
            if bar.kind is BarKind.IO:
                rng = self.alloc.pio.allocate(bar.size, f"{device_id} BAR{bar.index}", align=bar.size,
                                              start=IO_WINDOW[0])
            else:
                rng = self.alloc.mmio.allocate(bar.size, f"{device_id} BAR{bar.index}", align=max(bar.size, 0x1000),
                                               start=MMIO_WINDOW[0])
            placed.append((bar.index, bar.kind.value, rng.base, bar.size))
        irqs = (self.alloc.irqs.allocate(device_id),) if identity.interrupt_pin else ()
        gsi = self.next_gsi
        self.next_gsi += vectors
        address = (0, self.next_device, 0)
        self.next_device += 1
        pci = PciPlacement(address, identity.vendor_id, identity.device_id, identity.class_code, tuple(placed))
        pio = tuple((b, s) for _, k, b, s in placed if k == BarKind.IO.value)
        mmio = tuple((b, s) for _, k, b, s in placed if k != BarKind.IO.value)
        return DevicePlacement(device_id, kind, pio, mmio, irqs, pci), gsi


def root_placement() -> DevicePlacement:
    return DevicePlacement(ROOT_ID, PciRoot.KIND, ((CONFIG_ADDRESS_PORT, CONFIG_PORTS),), ((ECAM_BASE, ECAM_SIZE),))


def pci_layout(existing: Sequence[DevicePlacement], functions: Sequence[tuple[str, type[Any]]]
               ) -> tuple[DevicePlacement, ...]:
    """The placements `register_pci_device` gives `functions` ((device id, class), in order) on a
    machine that has the devices `existing`: the root's, then each function's. No KVM needed."""
    if not functions:
        return ()
    placer = _Placer.after(existing)
    return (root_placement(), *(placer.place(d, cls.KIND, cls.pci_shape())[0] for d, cls in functions))


# The virtio devices a builder may put on PCI, by device id (their kinds: virtio-pci-*).
VIRTIO_PCI_CLASSES: dict[str, type[VirtioPci]] = {
    "virtio-blk0": VirtioPciBlk, "virtio-console0": VirtioPciConsole, "virtio-rng0": VirtioPciRng,
    "virtio-net0": VirtioPciNet,
}


def virtio_pci_layout(existing: Sequence[DevicePlacement], device_ids: Sequence[str]) -> tuple[DevicePlacement, ...]:
    """`pci_layout` for the builder's virtio devices on PCI, in the builder's order."""
    return pci_layout(existing, [(d, VIRTIO_PCI_CLASSES[d]) for d in VIRTIO_PCI_CLASSES if d in device_ids])


class _MachineBarWindows:
    """Decoded BARs on the machine's buses."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def map(self, name: str, kind: BarKind, base: int, size: int, device: Any) -> None:
        bus = self.machine.io_bus if kind is BarKind.IO else self.machine.mmio_bus
        bus.insert(base, size, device, name)

    def unmap(self, name: str, kind: BarKind, base: int) -> None:
        bus = self.machine.io_bus if kind is BarKind.IO else self.machine.mmio_bus
        bus.remove(base)


@dataclass
class _PciHost:
    root: PciRoot
    placer: _Placer


_hosts: weakref.WeakKeyDictionary[Machine, _PciHost] = weakref.WeakKeyDictionary()


def pci_root(machine: Machine) -> PciRoot:
    """The machine's host bridge, made (and put on its buses) on first use."""
    return _host(machine).root


def _host(machine: Machine) -> _PciHost:
    host = _hosts.get(machine)
    if host is None:
        placer = _Placer.after(machine.placements.values())
        root = PciRoot(_MachineBarWindows(machine), MMIO_WINDOW, IO_WINDOW)
        p = root_placement()
        machine.add_device(ROOT_ID, root, pio=p.pio[0])
        machine.mmio_bus.insert(ECAM_BASE, ECAM_SIZE, root.ecam, f"{ROOT_ID} ECAM")
        machine.placements[ROOT_ID] = p
        host = _hosts[machine] = _PciHost(root, placer)
    return host


def register_pci_device(machine: Machine, device: PciDevice, device_id: str | None = None) -> PciAddress:
    """Put `device` on the machine's bus 0: BARs placed (firmware's addresses in its BARs), its
    INTx line in Interrupt Line, its MSI-X vectors on GSIs of their own, wired to KVM; recorded
    in the machine's devices (saved and restored by id) and layout (with its PCI placement)."""
    host = _host(machine)
    device_id = device_id or f"pci-{device.KIND}-{len(host.root.functions)}"
    placement, gsi = host.placer.place(device_id, device.KIND, device.pci_shape())
    assert placement.pci is not None
    for index, _, base, _ in placement.pci.bars:
        device.config.set_bar_address(index, base)
    if placement.irqs:
        device.config.data[INTERRUPT_LINE] = placement.irqs[0]
    device.connect_pci(machine.vm, gsi, placement.irqs[0] if placement.irqs else -1)
    machine.add_device(device_id, device)
    machine.placements[device_id] = placement
    address = host.root.add(device, device_id)
    if address != PciAddress(*placement.pci.address):  # only a root shared outside this module can do that
        raise ConfigError("pci", device_id, f"the bus gave {address}, its placement says {placement.pci.address}")
    return address


def pci_firmware(machine: Machine) -> tuple[bytes, tuple[bytes, ...]]:
    """(DSDT devices, extra tables) describing the machine's PCI to ACPI: the PCI root and MCFG;
    nothing for a machine without PCI."""
    from hv.platform.pci_acpi import PciHostBridge, mcfg, pci_root_device

    host = _hosts.get(machine)
    if host is None:
        return b"", ()
    intx = tuple((address.device, machine.placements[name].irqs[0])
                 for address, name in sorted(host.root.names.items()) if machine.placements[name].irqs)
    bridge = PciHostBridge(ECAM_BASE, 0, IO_WINDOW, MMIO_WINDOW, intx)
    return pci_root_device(bridge), (mcfg(bridge),)
