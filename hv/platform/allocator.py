"""The system allocator: hands out MMIO ranges, port ranges and IRQs so devices never overlap.

Devices ask for what they need; the machine builder never writes an address by hand. The
allocations are recorded, so the layout can be listed and compared (a migration target must
reproduce it exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

from hv.errors import HvError


class AllocationError(HvError):
    def __init__(self, space: str, request: str, detail: str) -> None:
        self.space, self.request = space, request
        super().__init__(f"{space}: cannot allocate {request}: {detail}")


@dataclass(frozen=True)
class Range:
    base: int
    size: int
    owner: str

    @property
    def end(self) -> int:
        return self.base + self.size


class AddressAllocator:
    """First-fit allocation in [start, end), with fixed reservations (e.g. legacy ISA ports)."""

    def __init__(self, space: str, start: int, end: int) -> None:
        self.space, self.start, self.end = space, start, end
        self._ranges: list[Range] = []

    @property
    def ranges(self) -> tuple[Range, ...]:
        return tuple(self._ranges)

    def _place(self, rng: Range) -> Range:
        for other in self._ranges:
            if rng.base < other.end and other.base < rng.end:
                raise AllocationError(self.space, f"{rng.owner} [{rng.base:#x}, {rng.end:#x})",
                                      f"overlaps {other.owner} [{other.base:#x}, {other.end:#x})")
        self._ranges.append(rng)
        self._ranges.sort(key=lambda r: r.base)
        return rng

    def reserve(self, base: int, size: int, owner: str) -> Range:
        """Claim a fixed range (architectural addresses such as COM1 or the IOAPIC)."""
        if size <= 0 or base < self.start or base + size > self.end:
            raise AllocationError(self.space, f"{owner} [{base:#x}, {base + size:#x})",
                                  f"outside [{self.start:#x}, {self.end:#x})")
        return self._place(Range(base, size, owner))

    def allocate(self, size: int, owner: str, align: int = 1, start: int | None = None) -> Range:
        """The lowest free, `align`-aligned range of `size` (at or above `start`, if given: a
        window inside the space, as PCI's I/O ports from 0xC000)."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise AllocationError(self.space, f"{size:#x} bytes for {owner}", "bad size or alignment")
        candidate = _align_up(max(self.start, start or 0), align)
        for other in self._ranges:
            if candidate + size <= other.base:
                break
            candidate = max(candidate, _align_up(other.end, align))
        if candidate + size > self.end:
            raise AllocationError(self.space, f"{size:#x} bytes for {owner}", "space exhausted")
        return self._place(Range(candidate, size, owner))

    def free(self, rng: Range) -> None:
        self._ranges.remove(rng)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class IrqAllocator:
    """GSIs for devices: legacy ISA lines are reserved by name, the rest are handed out in order."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last
        self._owners: dict[int, str] = {}

    def reserve(self, irq: int, owner: str) -> int:
        if irq in self._owners:
            raise AllocationError("IRQ", f"{irq} for {owner}", f"taken by {self._owners[irq]}")
        self._owners[irq] = owner
        return irq

    def allocate(self, owner: str) -> int:
        for irq in range(self.first, self.last + 1):
            if irq not in self._owners:
                return self.reserve(irq, owner)
        raise AllocationError("IRQ", f"a line for {owner}", f"{self.first}-{self.last} all taken")


# x86 layout the allocator serves: MMIO for devices inside the 32-bit hole, below the IOAPIC.
DEVICE_MMIO_START = 0xD000_0000
DEVICE_MMIO_END = 0xFEC0_0000  # IOAPIC
PORT_SPACE_END = 0x1_0000
# The IOAPIC has 24 pins: 0-15 are the ISA lines (timer, keyboard, COMs...); 16-23 are free for
# virtio devices, and ISA lines 5, 9-11 too when nothing legacy uses them.
DEVICE_IRQS = (5, 23)


@dataclass
class SystemAllocator:
    mmio: AddressAllocator
    pio: AddressAllocator
    irqs: IrqAllocator

    @classmethod
    def x86(cls) -> SystemAllocator:
        alloc = cls(
            mmio=AddressAllocator("MMIO", DEVICE_MMIO_START, DEVICE_MMIO_END),
            pio=AddressAllocator("port I/O", 0x0, PORT_SPACE_END),
            irqs=IrqAllocator(*DEVICE_IRQS),
        )
        # Legacy devices at their architectural places, taken before anything is handed out.
        for base, size, owner in ((0x20, 2, "pic-master"), (0xA0, 2, "pic-slave"), (0x40, 4, "pit"),
                                  (0x61, 1, "speaker"), (0x70, 2, "rtc"), (0xCF8, 8, "pci-config")):
            alloc.pio.reserve(base, size, owner)
        for irq, owner in ((0, "pit"), (1, "keyboard"), (2, "cascade"), (8, "rtc"), (12, "mouse"),
                           (13, "fpu"), (14, "ide0"), (15, "ide1")):
            alloc.irqs.reserve(irq, owner)
        return alloc
