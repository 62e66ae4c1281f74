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
class DevicePlacement:
    """Where a device sits: what a migration target must reproduce exactly."""

    device_id: str
    kind: str  # the device model's declared KIND (its identity on the wire)
    pio: tuple[tuple[int, int], ...] = ()  # (base port, length)
    mmio: tuple[tuple[int, int], ...] = ()  # (guest address, length)
    irqs: tuple[int, ...] = ()



VIRTIO_TRANSPORTS = ("mmio",)  # how a virtio device meets the guest (branch `pci` adds "pci")


class VirtioDeviceSpec(Protocol):
    """A virtio device of a declared kind, not built yet (arcbox's VirtioDeviceConfig): what
    `Machine.add_virtio_device` takes. The kinds are `builder.VIRTIO_KINDS`."""

    @property
    def device_id(self) -> str: ...

    @property
    def kind(self) -> str: ...  # the model's declared KIND, known before it is built

    def build(self, memory: GuestMemory) -> VirtioMmio: ...


def place_virtio_device(layout: tuple[DevicePlacement, ...], device_id: str, kind: str,
                        transport: str = "mmio") -> DevicePlacement:
    """Where a virtio device goes on a machine whose devices are `layout`: the next free 4 KiB
    window from 0xD0000000 and the next free IRQ. Plain data, no KVM: a migration target computes
    a whole layout with it (`builder.virtio_layout`) before building anything."""
    if transport not in VIRTIO_TRANSPORTS:
        raise ConfigError("transport", transport, f"not one of {VIRTIO_TRANSPORTS}")
    alloc = SystemAllocator.x86()
    for placed in layout:
        for irq in placed.irqs:
            alloc.irqs.reserve(irq, placed.device_id)
        for base, size in placed.mmio:
            alloc.mmio.reserve(base, size, placed.device_id)
    window = alloc.mmio.allocate(MMIO_WINDOW, device_id, align=MMIO_WINDOW)
    return DevicePlacement(device_id, kind, (), ((window.base, window.size),), (alloc.irqs.allocate(device_id),))
