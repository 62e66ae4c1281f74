"""What a snapshot expects of the machine it is restored into, and how two layouts differ.

`MemoryLayout` is the guest-physical RAM map (page runs in a stream are validated against it
before any page is handed out). `DeviceLayout` adds the vCPU count and the ordered device list
with each device's placement. `diff` lists *every* difference, so a refused restore says all that
is wrong at once; `check` raises `LayoutMismatch` with that list. Restore validates first: the
layout check runs before any state is applied.

All of these are frozen dataclasses and encode through `SchemaRegistry` like any state type;
their `__post_init__` checks make a decoded layout trustworthy (sorted, aligned, bounded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import LayoutMismatch

PAGE_SIZE = 4096
PAGE_SHIFT = 12
MAX_RAM_RANGES = 64
MAX_ADDRESS = 1 << 52  # x86-64 physical address width ceiling
MAX_DEVICES = 1024
MAX_VCPUS = 4096


@dataclass(frozen=True)
class RamRange:
    address: int  # guest-physical
    size: int  # bytes, a multiple of PAGE_SIZE

    @property
    def end(self) -> int:
        return self.address + self.size

    def __str__(self) -> str:
        return f"[{self.address:#x}, {self.end:#x})"


@dataclass(frozen=True)
class MemoryLayout:
    """Guest RAM ranges, sorted and disjoint, page aligned."""

    ranges: tuple[RamRange, ...]

    def __post_init__(self) -> None:
        if len(self.ranges) > MAX_RAM_RANGES:
            raise ValueError(f"{len(self.ranges)} RAM ranges (at most {MAX_RAM_RANGES})")
        prev_end = 0
        for r in self.ranges:
            if r.address % PAGE_SIZE or r.size % PAGE_SIZE or r.size <= 0:
                raise ValueError(f"RAM range {r} is empty or not page aligned")
            if r.address < prev_end:
                raise ValueError(f"RAM range {r} overlaps or is out of order")
            if r.end > MAX_ADDRESS:
                raise ValueError(f"RAM range {r} beyond {MAX_ADDRESS:#x}")
            prev_end = r.end

    @classmethod
    def of(cls, *ranges: tuple[int, int]) -> MemoryLayout:
        """From (address, size) pairs."""
        return cls(tuple(RamRange(a, s) for a, s in ranges))

    @property
    def total_bytes(self) -> int:
        return sum(r.size for r in self.ranges)

    @property
    def total_pages(self) -> int:
        return self.total_bytes >> PAGE_SHIFT

    def first_outside(self, addresses: np.ndarray, counts: np.ndarray) -> int:
        """Index of the first run (address, page count) not wholly inside one RAM range, not
        page aligned or empty; -1 if all are good. Vectorized: no per-run Python."""
        if len(addresses) == 0:
            return -1
        addresses = addresses.astype(np.uint64, copy=False)
        lengths = counts.astype(np.uint64) << np.uint64(PAGE_SHIFT)
        bad = (addresses & np.uint64(PAGE_SIZE - 1)) != 0
        bad |= counts == 0
        if not self.ranges:
            bad[:] = True
        else:
            starts = np.array([r.address for r in self.ranges], dtype=np.uint64)
            ends = np.array([r.end for r in self.ranges], dtype=np.uint64)
            idx = np.searchsorted(starts, addresses, side="right").astype(np.int64) - 1
            before = idx < 0
            idx[before] = 0
            end = ends[idx]
            inside = ~before & (addresses < end)
            room = np.where(inside, end - np.where(inside, addresses, 0), 0)
            bad |= ~inside | (lengths > room)
        hits = np.flatnonzero(bad)
        return int(hits[0]) if len(hits) else -1


@dataclass(frozen=True)
class IoRange:
    base: int
    size: int

    def __str__(self) -> str:
        return f"{self.base:#x}+{self.size:#x}"


BAR_KINDS = ("io", "mem32", "mem64")


@dataclass(frozen=True)
class PciBar:
    index: int
    kind: str  # one of BAR_KINDS
    address: int  # where firmware placed it
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < 6 or self.kind not in BAR_KINDS:
            raise ValueError(f"BAR {self.index} of kind {self.kind!r}")
        if self.size <= 0 or self.size & (self.size - 1) or self.address % self.size or self.address >= MAX_ADDRESS:
            raise ValueError(f"BAR {self.index}: {self.size:#x} bytes at {self.address:#x}")

    def __str__(self) -> str:
        return f"BAR{self.index} {self.kind} {self.address:#x}+{self.size:#x}"


@dataclass(frozen=True)
class PciEntry:
    """A PCI function's place in the topology, its identity and its BARs."""

    bus: int
    device: int
    function: int
    vendor_id: int
    device_id: int
    class_code: int
    bars: tuple[PciBar, ...] = ()

    def __post_init__(self) -> None:
        if not (0 <= self.bus < 256 and 0 <= self.device < 32 and 0 <= self.function < 8):
            raise ValueError(f"PCI address {self.bus}:{self.device}.{self.function}")
        if not (0 <= self.vendor_id <= 0xFFFF and 0 <= self.device_id <= 0xFFFF and 0 <= self.class_code < 1 << 24):
            raise ValueError(f"PCI ids {self.vendor_id:#x}:{self.device_id:#x} class {self.class_code:#x}")
        if len({b.index for b in self.bars}) != len(self.bars):
            raise ValueError("a BAR listed twice")

    def __str__(self) -> str:
        bars = ", ".join(map(str, self.bars))
        return (f"{self.bus:02x}:{self.device:02x}.{self.function} {self.vendor_id:04x}:{self.device_id:04x} "
                f"class {self.class_code:06x} [{bars}]")


@dataclass(frozen=True)
class DeviceEntry:
    """One device's identity and placement, and the version of its saved state; a PCI
    function's topology too (`pci`)."""

    device_id: str
    kind: str
    pio: tuple[IoRange, ...] = ()
    mmio: tuple[IoRange, ...] = ()
    irqs: tuple[int, ...] = ()
    state_version: int = 1
    pci: PciEntry | None = None


@dataclass(frozen=True)
class DeviceLayout:
    memory: MemoryLayout
    vcpus: int
    devices: tuple[DeviceEntry, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.vcpus <= MAX_VCPUS:
            raise ValueError(f"vcpus {self.vcpus} outside 1..{MAX_VCPUS}")
        if len(self.devices) > MAX_DEVICES:
            raise ValueError(f"{len(self.devices)} devices (at most {MAX_DEVICES})")
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate device ids")


# --- differences -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryDifference:
    expected: MemoryLayout
    found: MemoryLayout

    def __str__(self) -> str:
        def fmt(m: MemoryLayout) -> str:
            return ", ".join(map(str, m.ranges)) + f" ({m.total_bytes >> 20} MiB)"
        return f"memory: expected {fmt(self.expected)}, found {fmt(self.found)}"


@dataclass(frozen=True)
class VcpuCountDifference:
    expected: int
    found: int

    def __str__(self) -> str:
        return f"vCPU count: expected {self.expected}, found {self.found}"


@dataclass(frozen=True)
class MissingDevice:
    device_id: str
    kind: str

    def __str__(self) -> str:
        return f"device {self.device_id!r} ({self.kind}) expected but missing"


@dataclass(frozen=True)
class ExtraDevice:
    device_id: str
    kind: str

    def __str__(self) -> str:
        return f"device {self.device_id!r} ({self.kind}) found but not expected"


@dataclass(frozen=True)
class DeviceChanged:
    device_id: str
    field: str  # kind, pio, mmio, irqs, state_version, pci
    expected: object
    found: object

    def __str__(self) -> str:
        def fmt(v: object) -> str:
            if isinstance(v, tuple):
                return "(" + ", ".join(map(str, v)) + ")"
            return str(v)
        return (f"device {self.device_id!r} {self.field}: expected {fmt(self.expected)}, "
                f"found {fmt(self.found)}")


@dataclass(frozen=True)
class DeviceOrderDifference:
    expected: tuple[str, ...]
    found: tuple[str, ...]

    def __str__(self) -> str:
        return f"device order: expected {list(self.expected)}, found {list(self.found)}"


Difference = (MemoryDifference | VcpuCountDifference | MissingDevice | ExtraDevice
              | DeviceChanged | DeviceOrderDifference)

_COMPARED = ("kind", "pio", "mmio", "irqs", "state_version", "pci")


def diff(expected: DeviceLayout, found: DeviceLayout) -> list[Difference]:
    """Every difference between two layouts, in a stable order."""
    out: list[Difference] = []
    if expected.memory != found.memory:
        out.append(MemoryDifference(expected.memory, found.memory))
    if expected.vcpus != found.vcpus:
        out.append(VcpuCountDifference(expected.vcpus, found.vcpus))
    exp = {d.device_id: d for d in expected.devices}
    fnd = {d.device_id: d for d in found.devices}
    for d in expected.devices:
        if d.device_id not in fnd:
            out.append(MissingDevice(d.device_id, d.kind))
            continue
        other = fnd[d.device_id]
        for name in _COMPARED:
            a, b = getattr(d, name), getattr(other, name)
            if a != b:
                out.append(DeviceChanged(d.device_id, name, a, b))
    out.extend(ExtraDevice(d.device_id, d.kind) for d in found.devices if d.device_id not in exp)
    common_e = tuple(d.device_id for d in expected.devices if d.device_id in fnd)
    common_f = tuple(d.device_id for d in found.devices if d.device_id in exp)
    if common_e != common_f:
        out.append(DeviceOrderDifference(common_e, common_f))
    return out


def check(expected: DeviceLayout, found: DeviceLayout) -> None:
    """Raise `LayoutMismatch` listing every difference, if there is any."""
    differences = diff(expected, found)
    if differences:
        raise LayoutMismatch(differences)


def as_bytes_view(memory: object) -> memoryview:
    """`memory` (any contiguous buffer) as a flat view of bytes, without a copy."""
    # `object`, not `Buffer`: numpy's stubs do not declare ndarray a Buffer, and guest memory
    # comes as ndarrays, mmaps and cffi buffers alike; memoryview() refuses a non-buffer itself.
    mv = memoryview(memory)  # type: ignore[arg-type]
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    if not mv.contiguous:
        raise ValueError("memory must be a contiguous buffer")
    return mv
