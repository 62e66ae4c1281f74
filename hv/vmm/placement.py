"""Where a machine's devices are (`DevicePlacement`), and where the next virtio device goes:
plain data and a pure function, so a migration target computes a layout without KVM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from hv.devices.virtio import MMIO_WINDOW, VirtioMmio
from hv.errors import ConfigError
from hv.kvm.memory import GuestMemory
from hv.platform.allocator import SystemAllocator


@dataclass(frozen=True)
class PciPlacement:
    """A PCI function's place in the topology and identity, and its BARs as firmware placed them."""

    address: tuple[int, int, int]  # bus, device, function
    vendor_id: int
    device_id: int
    class_code: int
    bars: tuple[tuple[int, str, int, int], ...] = ()  # (index, kind, address, size)


@dataclass(frozen=True)
class DevicePlacement:
    """Where a device sits: what a migration target must reproduce exactly."""

    device_id: str
    kind: str  # the device model's declared KIND (its identity on the wire)
    pio: tuple[tuple[int, int], ...] = ()  # (base port, length)
    mmio: tuple[tuple[int, int], ...] = ()  # (guest address, length)
    irqs: tuple[int, ...] = ()
    pci: PciPlacement | None = None  # a PCI function's topology (hv.vmm.pci places those)


# how a virtio device meets the guest: a virtio-mmio window (placed here), or a PCI function
# (placed by `hv.vmm.pci.register_pci_device`)
VIRTIO_TRANSPORTS = ("mmio", "pci")


class VirtioDeviceSpec(Protocol):
    """A virtio device of a declared kind, not built yet (arcbox's VirtioDeviceConfig): what
    `Machine.add_virtio_device` takes. The kinds are `builder.VIRTIO_KINDS`."""

    @property
    def device_id(self) -> str: ...

    @property
    def kind(self) -> str: ...  # the model's declared KIND, known before it is built

    def build(self, memory: GuestMemory, transport: str = "mmio") -> VirtioMmio: ...


def place_virtio_device(layout: tuple[DevicePlacement, ...], device_id: str, kind: str,
                        transport: str = "mmio") -> DevicePlacement:
    """Where a virtio device goes on a machine whose devices are `layout`: the next free 4 KiB
    window from 0xD0000000 and the next free IRQ. Plain data, no KVM: a migration target computes
    a whole layout with it (`builder.virtio_layout`) before building anything."""
    if transport != "mmio":
        raise ConfigError("transport", transport, "placed here: mmio (a PCI function is placed by hv.vmm.pci)")
    alloc = SystemAllocator.x86()
    for placed in layout:
        for irq in placed.irqs:
            alloc.irqs.reserve(irq, placed.device_id)
        for base, size in placed.mmio:
            alloc.mmio.reserve(base, size, placed.device_id)
    window = alloc.mmio.allocate(MMIO_WINDOW, device_id, align=MMIO_WINDOW)
    return DevicePlacement(device_id, kind, (), ((window.base, window.size),), (alloc.irqs.allocate(device_id),))
