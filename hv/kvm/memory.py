"""Guest RAM: mmap-backed regions, zero-copy views, and the VMM's own dirty bitmap.

A `MemoryRegion` is one host mapping that backs one KVM memory slot. `GuestMemory` finds the
region for a guest physical address and gives out memoryviews into it; writes made through it
(by device models, loaders) are marked in the region's VMM dirty bitmap, because KVM's dirty log
only sees writes made by the guest.
"""

from __future__ import annotations

import functools
import mmap
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NewType

import numpy as np

from hv.binding.ffi import ffi, lib
from hv.errors import GuestAddressError, RamMoveError, RamReservationError, SlotOverlapError
from hv.kvm.dirty import PAGE_SHIFT, PAGE_SIZE, DirtyBitmap

_PAGEMAP_PRESENT = np.uint64(1 << 63)
_PAGEMAP_SWAPPED = np.uint64(1 << 62)
_PAGEMAP_PFN = np.uint64((1 << 55) - 1)
_PAGEMAP_UFFD_WP = np.uint64(1 << 57)  # the page is write-protected by userfaultfd (Linux 5.13)


def _read_pagemap(host_address: int, npages: int) -> np.ndarray:
    entries = np.empty(npages, dtype=np.uint64)
    with open("/proc/self/pagemap", "rb", buffering=0) as f:
        f.seek((host_address >> PAGE_SHIFT) * 8)
        got = f.readinto(memoryview(entries).cast("B"))
    if got != npages * 8:
        raise OSError(f"/proc/self/pagemap returned {got} of {npages * 8} bytes")
    return entries


HUGE_PAGE_SIZE = 2 << 20
MADV_POPULATE_WRITE = lib.MADV_POPULATE_WRITE  # Python's mmap module does not name it
_POPULATE_WRITE_WORKS = [True]


def _probe_read_pfn(size: int, huge: bool) -> int:
    """The PFN a read fault maps into fresh anonymous memory (0 when PFNs are hidden from us)."""
    probe = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf = ffi.from_buffer(probe)
        base = int(ffi.cast("uintptr_t", buf))
        del buf
        offset = -base % HUGE_PAGE_SIZE if huge else 0
        if huge:
            probe.madvise(mmap.MADV_HUGEPAGE)
        _ = probe[offset]  # a read fault maps the (huge) zero page
        entry = _read_pagemap(base + offset, 1)[0]
        return int(entry & _PAGEMAP_PFN) if entry & _PAGEMAP_PRESENT else 0
    finally:
        probe.close()


@functools.cache
def _zero_page_pfns() -> tuple[int, int]:
    """PFNs of the kernel's shared zero pages: (4 KiB zero page, first PFN of the huge zero page).

    Reads of untouched anonymous memory map one of them; such pages are still untouched. A PFN is 0
    when we cannot see it (not root, THP off): callers then count such pages as touched.
    """
    small = _probe_read_pfn(PAGE_SIZE, huge=False)
    huge = _probe_read_pfn(2 * HUGE_PAGE_SIZE, huge=True) if hasattr(mmap, "MADV_HUGEPAGE") else 0
    return small, (huge if huge != small else 0)


def anonymous_ram(size: int, *, huge_pages: bool = True) -> mmap.mmap:
    """Private anonymous memory for guest RAM. MAP_NORESERVE: a 4 GiB guest that touches
    100 MiB costs 100 MiB.

    `huge_pages` (as QEMU does) makes the *guest's* first touch of memory about 4x cheaper
    (measured here: 200 MiB filled in 0.27 s instead of 1.1 s); KVM still tracks dirty memory per
    4 KiB page while logging is on. Memory the *host* fills first (a restore, an incoming
    migration) is better without: host-side first writes measured 0.66 s for 256 MiB with huge
    pages, 0.19 s without.
    """
    try:
        ram = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | lib.MAP_NORESERVE)
    except OSError as e:  # more than the address space or the overcommit policy allows
        raise RamReservationError(size, e.errno or 0) from e
    advice = "MADV_HUGEPAGE" if huge_pages else "MADV_NOHUGEPAGE"
    if hasattr(mmap, advice):
        ram.madvise(getattr(mmap, advice))
    return ram


@functools.cache
def pages_movable() -> RamMoveError | None:
    """Whether this kernel moves a file's private pages into another mapping without unmapping
    the first (what `MemoryRegion.take_pages` does: MREMAP_DONTUNMAP, any private mapping since
    Linux 5.13): tried once on a page of a memfd. None if it does, else the error it gave."""
    fd = os.memfd_create("kvmigrate-probe", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, PAGE_SIZE)
        source = mmap.mmap(fd, PAGE_SIZE, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    target = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        with ffi.from_buffer(target) as into, ffi.from_buffer(source) as out_of:
            failed = lib.kvmig_move_mapping(into, out_of, PAGE_SIZE)
        return RamMoveError(0, PAGE_SIZE, -failed) if failed else None
    finally:
        source.close()
        target.close()


@dataclass(frozen=True)
class RamBacking:
    """A caller's mapping for a RAM region. `anonymous` says it is private anonymous memory (its
    untouched pages read as zero and `populated_pages` can find them), not a file's pages: a
    restore that decoded a snapshot into fresh memory hands that memory over this way."""

    mapping: mmap.mmap
    anonymous: bool = False

    @classmethod
    def host_filled(cls, _guest_base: int, size: int) -> RamBacking:
        """A `MemoryBacking` for RAM the host fills before the guest runs (see `anonymous_ram`)."""
        return cls(anonymous_ram(size, huge_pages=False), anonymous=True)


GuestAddress = NewType("GuestAddress", int)
"""A guest physical address (as opposed to a host virtual address or an offset)."""


@dataclass(frozen=True)
class MemoryRange:
    guest_base: int
    size: int

    @property
    def end(self) -> int:
        return self.guest_base + self.size

    def overlaps(self, other: MemoryRange) -> bool:
        return self.guest_base < other.end and other.guest_base < self.end


class MemoryRegion:
    """One anonymous (or file-backed, private) mapping of guest RAM."""

    def __init__(
        self,
        guest_base: int,
        size: int,
        *,
        slot: int,
        readonly: bool = False,
        backing: mmap.mmap | RamBacking | None = None,
    ) -> None:
        anonymous = backing is None
        if isinstance(backing, RamBacking):
            backing, anonymous = backing.mapping, backing.anonymous
        if guest_base % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise GuestAddressError(guest_base, size, "is not a whole number of pages")
        self.range = MemoryRange(guest_base, size)
        self.slot = slot
        self.readonly = readonly
        self._map = backing or anonymous_ram(size)
        self._cbuf = ffi.from_buffer(self._map)
        self.host_address = int(ffi.cast("uintptr_t", self._cbuf))
        self.view = memoryview(self._map)
        self.vmm_dirty = DirtyBitmap(size >> PAGE_SHIFT)
        # bitmaps C threads set atomically (virtio-net's engine), ORed into every take
        self.native_dirty: list[np.ndarray] = []
        self._dirty_lock = threading.Lock()
        self._vmm_wrote = False
        self.log_dirty = False
        self.anonymous = anonymous

    @property
    def guest_base(self) -> int:
        return self.range.guest_base

    @property
    def size(self) -> int:
        return self.range.size

    @property
    def npages(self) -> int:
        return self.size >> PAGE_SHIFT

    def mark_dirty(self, offset: int, length: int) -> None:
        """Record a VMM write of [offset, offset+length) into this region."""
        if length <= 0:
            return
        first = offset >> PAGE_SHIFT
        last = (offset + length - 1) >> PAGE_SHIFT
        with self._dirty_lock:
            self.vmm_dirty.set_range(first, last - first + 1)
            self._vmm_wrote = True

    def take_vmm_dirty(self) -> DirtyBitmap | None:
        """The VMM dirty bitmap since the last call, cleared atomically; None if the VMM wrote
        nothing since (so a fetch costs no pass over a whole bitmap for it)."""
        with self._dirty_lock:
            if not self._vmm_wrote and not self.native_dirty:
                return None
            taken, self.vmm_dirty, self._vmm_wrote = self.vmm_dirty, DirtyBitmap(self.npages), False
            # a C engine's bitmap (virtio-net) is taken whole at every fetch: it says nothing of
            # whether it wrote, so a machine with one pays a pass over its bitmap per fetch
            for words in self.native_dirty:
                lib.kvmig_bitmap_take_or(ffi.from_buffer("uint64_t[]", taken.words),
                                         ffi.from_buffer("uint64_t[]", words), len(words))
        return taken

    def populated_pages(self) -> DirtyBitmap:
        """Pages that were ever touched (resident or swapped out), from /proc/self/pagemap.

        An anonymous page never written reads as zero and needs no reading to know it: this is how
        a 4 GiB guest that used 100 MiB costs 100 MiB to save. Pages only read map the shared zero
        page and count as untouched. Only valid for anonymous memory;
        a file-backed region reports every page (their contents come from the file).
        """
        if not self.anonymous:
            bitmap = DirtyBitmap(self.npages)
            bitmap.set_range(0, self.npages)
            return bitmap
        entries = _read_pagemap(self.host_address, self.npages)
        touched = (entries & (_PAGEMAP_PRESENT | _PAGEMAP_SWAPPED)) != 0
        small_zero, huge_zero = _zero_page_pfns()
        pfns = entries & _PAGEMAP_PFN
        if small_zero:  # a page only ever read maps the shared zero page: still untouched
            touched &= pfns != np.uint64(small_zero)
        if huge_zero:  # ... or, in a huge-page region, one of the huge zero page's 512 frames
            touched &= (pfns - np.uint64(huge_zero)) >= np.uint64(HUGE_PAGE_SIZE // PAGE_SIZE)
        return DirtyBitmap.from_bools(touched)

    def write_protected_pages(self, first: int, count: int) -> np.ndarray:
        """One bool per page of [first, first + count): does userfaultfd write-protect it now
        (`hv.kvm.write_protect`). Reads only that part of /proc/self/pagemap."""
        entries = _read_pagemap(self.host_address + first * PAGE_SIZE, count)
        return (entries & _PAGEMAP_UFFD_WP) != 0

    def mapped_pages(self, first: int, count: int) -> np.ndarray:
        """One bool per page of [first, first + count): is anything mapped there (the shared
        zero page a read maps included). Reads only that part of /proc/self/pagemap."""
        entries = _read_pagemap(self.host_address + first * PAGE_SIZE, count)
        return (entries & (_PAGEMAP_PRESENT | _PAGEMAP_SWAPPED)) != 0

    def prefault(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) resident and writable in one call before the host fills
        it (MADV_POPULATE_WRITE, Linux 5.14): one kernel walk instead of a fault per page, which
        on nested hosts is what a restore or an incoming migration spends its time on."""
        if self.anonymous and _POPULATE_WRITE_WORKS[0]:
            try:
                self._map.madvise(MADV_POPULATE_WRITE, offset, length)
            except OSError:
                _POPULATE_WRITE_WORKS[0] = False  # an older kernel: plain faults it is

    @property
    def mapping(self) -> mmap.mmap:
        """The host mapping behind the region (to hand to a VM as its backing)."""
        return self._map

    def take_pages(self, source: MemoryRegion) -> None:
        """Make `source`'s pages (a region of the same size, in no VM: a restore's staging memory,
        anonymous or a file's) this region's, in place and without a copy: its host address, and
        so a VM's memory slot over it, stays (registering a slot costs a grace period of the
        kernel's, milliseconds; moving page tables does not). `source` is left mapped and empty.
        Only for a region no vCPU has run on: KVM drops what it had mapped of the old pages, but
        a guest that ran would lose what it wrote."""
        if source.size != self.size:
            raise GuestAddressError(self.guest_base, self.size, f"cannot take {source.size} bytes of pages")
        failed = lib.kvmig_move_mapping(ffi.cast("void *", self.host_address), ffi.cast("void *", source.host_address),
                                        self.size)
        if failed:
            raise RamMoveError(self.guest_base, self.size, -failed)
        self.anonymous = source.anonymous

    def pages_array(self) -> np.ndarray:
        """The region as a (pages, 4096) uint8 array: zero-copy."""
        return np.frombuffer(self.view, dtype=np.uint8).reshape(self.npages, PAGE_SIZE)

    def close(self) -> None:
        self.view.release()
        self._cbuf = None
        try:
            self._map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when that view does

    def __repr__(self) -> str:
        ro = ", ro" if self.readonly else ""
        return f"MemoryRegion(slot={self.slot}, [{self.guest_base:#x}, {self.range.end:#x}){ro})"


class GuestMemory:
    """The guest's physical memory map: non-overlapping regions, sorted by address."""

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._regions)

    def check_free(self, guest_base: int, size: int) -> None:
        wanted = MemoryRange(guest_base, size)
        for r in self._regions:
            if r.range.overlaps(wanted):
                raise SlotOverlapError(guest_base, size, r.slot, r.guest_base, r.size)

    def insert(self, region: MemoryRegion) -> None:
        self.check_free(region.guest_base, region.size)
        self._regions.append(region)
        self._regions.sort(key=lambda r: r.guest_base)

    def remove(self, region: MemoryRegion) -> None:
        self._regions.remove(region)

    def find(self, address: int, length: int = 1) -> tuple[MemoryRegion, int]:
        """The region containing all of [address, address+length), and the offset into it."""
        if length < 0 or address < 0:
            raise GuestAddressError(address, max(length, 0), "is not a valid range")
        for r in self._regions:
            if r.guest_base <= address < r.range.end:
                if address + length > r.range.end:
                    raise GuestAddressError(address, length, f"runs past the end of {r}")
                return r, address - r.guest_base
        raise GuestAddressError(address, length)

    def view(self, address: int, length: int) -> memoryview:
        """Zero-copy view of guest memory. Writes through it are NOT dirty-tracked by the VMM:
        use `write`, or call `mark_dirty` after writing."""
        region, offset = self.find(address, length)
        return region.view[offset : offset + length]

    # read and write copy in C without the interpreter lock: a device thread touching a page that
    # is still missing (post-copy) then waits in the kernel without holding up the page fetcher.

    def read(self, address: int, length: int) -> bytes:
        region, offset = self.find(address, length)
        out = bytearray(length)
        if length:
            lib.kvmig_memcopy(ffi.from_buffer(out), ffi.cast("void *", region.host_address + offset), length)
        return bytes(out)

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        region, offset = self.find(address, len(data))
        if len(data):
            lib.kvmig_memcopy(ffi.cast("void *", region.host_address + offset), ffi.from_buffer(data), len(data))
        region.mark_dirty(offset, len(data))

    def fill(self, address: int, length: int, byte: int = 0) -> None:
        region, offset = self.find(address, length)
        region.pages_array().reshape(-1)[offset : offset + length] = byte
        region.mark_dirty(offset, length)

    def mark_dirty(self, address: int, length: int) -> None:
        region, offset = self.find(address, length)
        region.mark_dirty(offset, length)

    def zero_pages(self, address: int, length: int) -> None:
        """Make whole pages read as zero. Anonymous RAM gives them back to the host
        (MADV_DONTNEED: untouched pages cost nothing, touched ones are freed); file-backed RAM,
        whose dropped pages would read the file again, is overwritten."""
        if address % PAGE_SIZE or length % PAGE_SIZE:
            raise GuestAddressError(address, length, "is not a whole number of pages")
        region, offset = self.find(address, length)
        if region.anonymous:  # in C, the GIL released: callers may free parts of a range at once
            ret = lib.kvmig_discard(ffi.cast("void *", region.host_address + offset), length)
            if ret < 0:
                raise OSError(-ret, f"MADV_DONTNEED of {length} bytes at guest {address:#x}")
        else:
            region.view[offset : offset + length] = bytes(length)
        region.mark_dirty(offset, length)

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def host_address(self, address: int) -> int:
        region, offset = self.find(address)
        return region.host_address + offset

    def dump_all(self) -> Iterator[tuple[int, memoryview]]:
        """(guest base, zero-copy view) for every region, in address order."""
        for r in self._regions:
            yield r.guest_base, r.view
