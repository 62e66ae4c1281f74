"""Address buses that route port I/O and MMIO exits to device models.

Devices are sans-IO (as vm-superio's): `read(offset, size) -> int` and `write(offset, size, value)`,
with `offset` relative to the start of the range they were given. The bus knows ranges, not
devices' insides.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol

from hv.errors import HvError


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusConflictError(HvError):
    def __init__(self, bus: str, base: int, length: int, other: str) -> None:
        self.bus, self.base, self.length, self.other = bus, base, length, other
        super().__init__(f"{bus} range [{base:#x}, {base + length:#x}) overlaps {other}")


@dataclass(frozen=True)
class BusRange:
    base: int
    length: int
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """Non-overlapping ranges, each with one device; lookups by binary search."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._entries: list[tuple[BusRange, BusDevice]] = []
        self._lock = threading.Lock()
        self.unhandled = 0  # accesses that hit no device (reads return all-ones)

    def insert(self, base: int, length: int, device: BusDevice, name: str) -> BusRange:
        rng = BusRange(base, length, name)
        with self._lock:
            for other, _ in self._entries:
                if other.base < rng.end and rng.base < other.end:
                    raise BusConflictError(self.name, base, length, f"{other.name} at {other.base:#x}")
            i = bisect.bisect(self._bases, base)
            self._bases.insert(i, base)
            self._entries.insert(i, (rng, device))
        return rng

    def remove(self, base: int) -> BusRange:
        """Take the range at `base` off the bus (a PCI BAR the guest moved or stopped decoding)."""
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                raise KeyError(f"{self.name}: no range at {base:#x}")
            del self._bases[i]
            rng, _ = self._entries.pop(i)
        return rng

    def ranges(self) -> list[BusRange]:
        return [r for r, _ in self._entries]

    def find(self, address: int) -> tuple[BusRange, BusDevice] | None:
        i = bisect.bisect(self._bases, address) - 1
        if i >= 0:
            rng, dev = self._entries[i]
            if address < rng.end:
                return rng, dev
        return None

    def read(self, address: int, size: int) -> int:
        hit = self.find(address)
        if hit is None:
            self.unhandled += 1
            return (1 << (8 * size)) - 1
        rng, dev = hit
        return dev.read(address - rng.base, size)

    def write(self, address: int, size: int, value: int) -> None:
        hit = self.find(address)
        if hit is None:
            self.unhandled += 1
            return
        rng, dev = hit
        dev.write(address - rng.base, size, value)
