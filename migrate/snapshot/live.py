"""A live snapshot's pages: the guest's memory at the instant of a short pause, read while the
guest runs on.

Before the pause every RAM region is registered for userfaultfd write-protect
(`hv.kvm.write_protect`: a descriptor, a C fault thread and a pool of buffers faulted in, each;
nothing of that can fail or cost much in the pause). In the pause, with the vCPU and device state
captured, `HeldMemory.protect` write-protects every region in one call each and the guest
resumes. What costs time in proportion to RAM stays out of the pause: the pages populated at the
instant are found after it, as those the kernel's pagemap still shows protected or that were
kept aside since (a page populated only after the instant was zero at it: a write there did not
wait, and is not read). Where the pagemap does not show protection (before Linux 5.13) they are
read in the pause instead.

From then on the guest's first write to a 2 MiB block waits while the fault thread copies the
block aside and releases it; a reader thread here takes memory in groups of `GROUP` bytes, in
address order, as fast as it copies (the blocks it takes are released at once, so the guest stops
faulting there), hashing each block for the memory digest, and hands the groups on to be encoded,
at most `buffer_bytes` ahead of the encoders. The reader (once the sweep below is done) and the
encoders run in the background (`pages.in_background`: nice 19), on CPU time the guest leaves; the
fault thread does not: a guest waiting on it waits for nothing else. The file written from them is the one a paused guest would have given, END's
digest included: the memory of the instant, which a restore checks as it checks any snapshot.

Only pages the snapshot holds are read (of those, the encoded ones are all of them or,
incremental, the dirty ones): untouched memory is never read or populated. Nothing may discard
guest RAM (MADV_DONTNEED) while a live snapshot runs: a page given back loses its protection and
its contents at once. A failure anywhere closes the registrations, which releases every page still
protected: the guest runs on as if no snapshot had been taken.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from formats import DIGEST_BLOCK, ZeroRanges, block_count, zero_block_hashes
from hv.errors import UserfaultError
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.kvm.write_protect import WriteProtect, WriteProtectStats, pagemap_shows_protection
from migrate.datapath import block_hashes
from migrate.errors import SnapshotError
from migrate.pages import CHUNK_BYTES, MemoryRun, Touched, in_background

GROUP = CHUNK_BYTES  # bytes taken at a time: whole digest blocks, one PAGES section's worth
BUFFER_BYTES = 256 << 20  # taken but not yet encoded, at most (the guest is released that far ahead)
POOL_BYTES = 256 << 20  # at most, per region: buffers faulted in before the pause for blocks written first
SWEEP_PAGES = (16 << 20) // PAGE_SIZE  # found and released at a time, right after the pause
FIRST_SWEEP_PAGES = (2 << 20) // PAGE_SIZE  # ... but the first part: one block
SWEEP_BYTES = 4 << 30  # kept aside by the sweep at most; the rest is kept as it is written
assert GROUP % DIGEST_BLOCK == 0


@dataclass(frozen=True)
class LiveStats:
    """What holding the instant cost: pages kept aside (`saved`: by the sweep after the pause, or
    as a write waited for its block), the most memory they held at once, the writes that waited
    for the fault thread (`faults`) and how long."""

    faults: int
    saved: int
    taken: int
    saved_peak_bytes: int
    fault_mean_us: float
    fault_max_us: float

    @classmethod
    def of(cls, stats: list[WriteProtectStats]) -> LiveStats:
        count = sum(s.latency_count for s in stats)
        return cls(faults=sum(s.faults for s in stats), saved=sum(s.saved for s in stats),
                   taken=sum(s.taken for s in stats), saved_peak_bytes=sum(s.saved_peak_bytes for s in stats),
                   fault_mean_us=sum(s.latency_sum_ns for s in stats) / count / 1000 if count else 0.0,
                   fault_max_us=max((s.latency_max_ns for s in stats), default=0) / 1000)


class HeldMemory:
    """Guest RAM under write-protect registrations, protected by `protect` (in the pause), read
    by `pages`, released by `close` (whatever happened)."""

    def __init__(self, memory: GuestMemory, path: object) -> None:
        foreign = [r for r in memory.regions if not r.anonymous]
        if foreign:
            raise SnapshotError(path, f"a live snapshot needs anonymous guest RAM; {foreign[0]} maps a file "
                                      "(a restore with --share-mem): take a paused snapshot")
        self.memory = memory
        self._held: dict[int, WriteProtect] = {}
        self._reader: LivePages | None = None
        try:
            for region in memory.regions:  # a pool for what may be written before it is read
                pool = min(POOL_BYTES, region.populated_pages().count() * PAGE_SIZE)
                self._held[region.guest_base] = WriteProtect(region, pool)
        except UserfaultError as e:
            self.close()
            raise SnapshotError(path, f"guest RAM cannot be write-protected for a live snapshot: {e}") from e

    @property
    def reads_touched_after(self) -> bool:
        """The pages populated at the instant can be found after it, as those still protected
        or kept aside (the kernel's pagemap shows protection): not read in the pause."""
        return pagemap_shows_protection()

    def protect(self, read: Touched | None) -> None:
        """The instant (the guest paused): every region protected; `read` says which pages
        will be taken (the ones that may be non-zero), None: found after the pause."""
        for region in self.memory.regions:
            self._held[region.guest_base].protect(read[region.guest_base] if read is not None else None)

    def pages(self, encode: Touched | None, read: Touched | None, buffer_bytes: int = BUFFER_BYTES) -> LivePages:
        """The instant's copy of the pages to store, `encode` of them (None: every one read),
        read in a thread of its own; `read` as given to `protect`."""
        self._reader = LivePages(self.memory, self._held, encode, read, buffer_bytes)
        return self._reader

    def stats(self) -> LiveStats:
        return LiveStats.of([held.stats() for held in self._held.values()])

    def close(self) -> None:
        """Release every page still protected and unregister (the guest runs on unhindered)."""
        if self._reader is not None:
            self._reader.stop()
        errors = []
        for held in self._held.values():
            try:
                held.close()
            except UserfaultError as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> HeldMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LivePages:
    """`runs()` yields the pages to store, as views of copies made at the instant (stable, in
    address order); `digest()` then is the instant's memory digest."""

    stable = True  # what it yields never changes: encoders need not copy it
    background = True  # the guest runs meanwhile: the encoders take only the CPU it leaves

    def __init__(self, memory: GuestMemory, held: dict[int, WriteProtect], encode: Touched | None,
                 read: Touched | None, buffer_bytes: int) -> None:
        self.memory = memory
        self._held = held
        self._encode, self._read = encode, read
        self._hashes = {r.guest_base: zero_block_hashes(r.size) for r in memory.regions}
        # a group's runs (views of its copy, which they keep alive), an error, or None: the end
        self._ready: queue.Queue[list[MemoryRun] | BaseException | None] = queue.Queue(max(1, buffer_bytes // GROUP))
        self._stop = threading.Event()
        # started now, in the pause: what the guest writes in ways that do not wait for the fault
        # thread must be released as soon as it runs again (see kvmig_wp_sweep)
        self._thread = threading.Thread(target=self._take_all, name="live-snapshot-reader", daemon=True)
        self._thread.start()

    def runs(self) -> Iterator[MemoryRun]:
        try:
            while (item := self._ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield from item
        finally:
            self.stop()

    def stop(self) -> None:
        """End the reader thread, if it runs (the pages it did not take stay protected until
        the registrations are closed)."""
        self._stop.set()
        while self._thread.is_alive():  # a reader blocked on a full queue sees the stop
            try:
                self._ready.get(timeout=0.05)
            except queue.Empty:
                pass

    def block_hashes(self, zero: ZeroRanges | None = None) -> list[tuple[int, int, np.ndarray]]:
        """The memory digest's block hashes of the instant, per region (after `runs` was consumed):
        the digest is their combination, a MEMORY_INDEX carries them."""
        return [(r.guest_base, r.size, self._hashes[r.guest_base]) for r in self.memory.regions]

    def _take_all(self) -> None:
        try:
            read = self._find_and_sweep()
            in_background()
            encode = self._encode if self._encode is not None else read
            for region in self.memory.regions:
                base = region.guest_base
                for group in np.flatnonzero(read[base].groups_with_pages(GROUP // PAGE_SIZE)):
                    if self._stop.is_set():
                        return
                    self._ready.put(self._take(region, int(group) * GROUP, encode[base]))
            self._ready.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            self._ready.put(e)

    def _find_and_sweep(self) -> Touched:
        """At the vCPUs' priority, right after the pause, a part at a time (`_sweep_parts`): the
        pages populated at the instant, unless `protect` was told them (those still protected,
        and those kept aside since), each part then kept aside and released at once, as far as
        `SWEEP_BYTES` allows. Returns those pages."""
        read = {}
        for region in self.memory.regions:
            held = self._held[region.guest_base]
            known = self._read[region.guest_base] if self._read is not None else None
            protected = np.zeros(region.npages, dtype=bool)
            for first, count in _sweep_parts(region.npages):
                if known is None:
                    part = region.write_protected_pages(first, count)
                    protected[first: first + count] = part
                    held.narrow(first, part)
                held.sweep(first, count, SWEEP_BYTES)
            if known is None:
                known = DirtyBitmap.from_bools(protected)
                known |= held.kept_aside()  # read after the narrowing: none missed
            read[region.guest_base] = known
        return read

    def _take(self, region: MemoryRegion, offset: int, encode: DirtyBitmap) -> list[MemoryRun]:
        """One group as it was at the instant, hashed; its pages to store as views of the copy."""
        data = bytearray(min(GROUP, region.size - offset))
        self._held[region.guest_base].take(offset, data)  # in C, the GIL released
        first = offset // DIGEST_BLOCK
        blocks = np.arange(block_count(len(data)), dtype=np.uint64)
        self._hashes[region.guest_base][first: first + len(blocks)] = block_hashes(data, blocks)
        view, start = memoryview(data), region.guest_base + offset
        return [MemoryRun(start + page * PAGE_SIZE, view[page * PAGE_SIZE: (page + count) * PAGE_SIZE])
                for page, count in _page_runs(encode, offset // PAGE_SIZE, len(data) // PAGE_SIZE)]


def _sweep_parts(npages: int) -> list[tuple[int, int]]:
    """(first page, pages) of a region's sweep, in address order: one block first, so that the
    bottom of RAM, where a guest kernel's own data and stacks usually are, is released within a
    block's copy of the resume; then `SWEEP_PAGES` at a time."""
    parts, first = [], 0
    while first < npages:
        count = min(FIRST_SWEEP_PAGES if first == 0 else SWEEP_PAGES, npages - first)
        parts.append((first, count))
        first += count
    return parts


def _page_runs(bitmap: DirtyBitmap, first: int, count: int) -> list[tuple[int, int]]:
    """Runs (offset from `first`, length) of the pages set in [first, first + count) of
    `bitmap`; `first` a multiple of 64 (a group's first page)."""
    words = bitmap.words[first // 64: (first + count + 63) // 64]
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:count].astype(np.int8)
    edges = np.diff(np.concatenate(([0], bits, [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))
