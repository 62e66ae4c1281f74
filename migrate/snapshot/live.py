"""A live snapshot's pages: the guest's memory at the instant of a short pause, read while the
guest runs on.

Before the pause every RAM region is registered for userfaultfd write-protect
(`hv.kvm.write_protect`: a descriptor and a C fault thread each; nothing of that can fail in the
pause). In the pause, with the vCPU and device state captured, `HeldMemory.protect` write-protects
every region in one call each and the guest resumes. From then on the guest's first write to a
page waits while the fault thread copies the page aside; a reader thread here takes memory in
blocks of `GROUP` bytes, in address order, as fast as it copies (the pages it takes are released
at once, so the guest stops faulting there), hashing each block for the memory digest, and hands
the blocks on to be encoded, at most `buffer_bytes` ahead of the encoders. The file written from
them is byte for byte the snapshot a paused guest would have given, END's digest included: it is
the memory of the instant, and a restore checks it as it checks any snapshot.

Only pages the snapshot holds are read (the populated ones, for the digest, of which the encoded
ones are the populated pages or, incremental, the dirty ones): untouched memory is never read or
populated. A failure anywhere closes the registrations, which releases every page still protected:
the guest runs on as if no snapshot had been taken.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from formats import DIGEST_BLOCK, ZeroRanges, block_count, combine_block_hashes, zero_block_hashes
from hv.errors import UserfaultError
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.kvm.write_protect import WriteProtect, WriteProtectStats
from migrate.datapath import block_hashes
from migrate.errors import SnapshotError
from migrate.pages import CHUNK_BYTES, MemoryRun, Touched

GROUP = CHUNK_BYTES  # bytes taken at a time: whole digest blocks, one PAGES section's worth
BUFFER_BYTES = 256 << 20  # taken but not yet encoded, at most (the guest is released that far ahead)
assert GROUP % DIGEST_BLOCK == 0


@dataclass(frozen=True)
class LiveStats:
    """What holding the instant cost: pages the guest wrote before they were read (`saved`: each
    made a vCPU or device thread wait), the most memory held aside for them, and the waits."""

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
            for region in memory.regions:
                self._held[region.guest_base] = WriteProtect(region)
        except UserfaultError as e:
            self.close()
            raise SnapshotError(path, f"guest RAM cannot be write-protected for a live snapshot: {e}") from e

    def protect(self, read: Touched) -> None:
        """The instant (the guest paused): every region protected; `read` says which pages
        will be taken (the ones that may be non-zero)."""
        for region in self.memory.regions:
            self._held[region.guest_base].protect(read[region.guest_base])

    def pages(self, runs: list[MemoryRun], read: Touched, buffer_bytes: int = BUFFER_BYTES) -> LivePages:
        """The instant's copy of `runs` (views of guest RAM, cut where groups end), read in a
        thread of its own; `read` as given to `protect`."""
        self._reader = LivePages(self.memory, self._held, runs, read, buffer_bytes)
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

    def __init__(self, memory: GuestMemory, held: dict[int, WriteProtect], runs: list[MemoryRun],
                 read: Touched, buffer_bytes: int) -> None:
        self.memory = memory
        self._held = held
        self._read = read
        self._hashes = {r.guest_base: zero_block_hashes(r.size) for r in memory.regions}
        self._runs_by_group: dict[tuple[int, int], list[MemoryRun]] = {}
        for run in runs:
            region, offset = memory.find(run.address, len(run.view))
            key = (region.guest_base, offset // GROUP)
            assert (offset + len(run.view) - 1) // GROUP == key[1], "a run crosses a group: cut_at_groups first"
            self._runs_by_group.setdefault(key, []).append(run)
        # a group's runs (views of its copy, which they keep alive), an error, or None: the end
        self._ready: queue.Queue[list[MemoryRun] | BaseException | None] = queue.Queue(max(1, buffer_bytes // GROUP))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._take_all, name="live-snapshot-reader", daemon=True)

    def runs(self) -> Iterator[MemoryRun]:
        self._thread.start()
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

    def digest(self, zero: ZeroRanges | None = None) -> int:
        """The memory digest of the instant (after `runs` was consumed)."""
        return combine_block_hashes((r.guest_base, r.size, self._hashes[r.guest_base]) for r in self.memory.regions)

    def _take_all(self) -> None:
        try:
            for region in self.memory.regions:
                for group in np.flatnonzero(self._read[region.guest_base].groups_with_pages(GROUP // PAGE_SIZE)):
                    if self._stop.is_set():
                        return
                    self._ready.put(self._take(region, int(group) * GROUP))
            self._ready.put(None)
        except BaseException as e:  # handed to the consumer, which raises it
            self._ready.put(e)

    def _take(self, region: MemoryRegion, offset: int) -> list[MemoryRun]:
        data = bytearray(min(GROUP, region.size - offset))
        self._held[region.guest_base].take(offset, data)  # in C, the GIL released
        first = offset // DIGEST_BLOCK
        blocks = np.arange(block_count(len(data)), dtype=np.uint64)
        self._hashes[region.guest_base][first: first + len(blocks)] = block_hashes(data, blocks)
        view = memoryview(data)
        start = region.guest_base + offset
        return [MemoryRun(run.address, view[run.address - start: run.address - start + len(run.view)])
                for run in self._runs_by_group.get((region.guest_base, offset // GROUP), [])]


def cut_at_groups(runs: list[MemoryRun], memory: GuestMemory) -> list[MemoryRun]:
    """`runs` with each one cut where a `GROUP` of its region ends (a run's chunks, from
    `pages.bitmap_runs`, are at most GROUP long but start anywhere)."""
    out = []
    for run in runs:
        region, offset = memory.find(run.address, len(run.view))
        at, end = offset, offset + len(run.view)
        while at < end:
            stop = min(end, (at // GROUP + 1) * GROUP)
            out.append(MemoryRun(region.guest_base + at, run.view[at - offset: stop - offset]))
            at = stop
    return out
