"""Guest memory to page sections and back: what snapshots and live migration both move.

The source side picks *which* memory (populated pages for a full copy, a dirty log for a later
round), splits it into section-sized chunks and encodes them on worker threads (in C,
`migrate.datapath`, the GIL released per chunk), in order, a bounded number ahead. The sink side
writes decoded runs into guest memory (or only accounts for runs a C decoder placed itself); zero
runs give pages back to the host instead of writing zeros. No per-page Python: runs
come from whole bitmaps, chunks are sliced memoryviews.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from formats import PageRun, PageSection, ZeroRanges
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import GuestMemory, MemoryRegion
from migrate.datapath import PageEncoderC

CHUNK_BYTES = 4 << 20  # one PAGES section's worth of raw memory
SAMPLE_BYTES = 16 << 10  # a frame is compressed only if this much of it shrinks (SPEC §3)


@dataclass(frozen=True)
class MemoryRun:
    """Consecutive guest pages to send: a zero-copy view of them and where they live."""

    address: int
    view: memoryview


def bitmap_runs(region: MemoryRegion, bitmap: DirtyBitmap, chunk: int = CHUNK_BYTES) -> list[MemoryRun]:
    """The pages set in `bitmap` as views into `region`, cut into chunks of at most `chunk` bytes."""
    runs = bitmap.runs()
    out = []
    step = chunk // PAGE_SIZE
    for start, count in runs.as_tuples():  # per run, not per page
        for first in range(start, start + count, step):
            n = min(step, start + count - first)
            out.append(MemoryRun(region.guest_base + first * PAGE_SIZE,
                                 region.view[first * PAGE_SIZE:(first + n) * PAGE_SIZE]))
    return out


def populated_runs(memory: GuestMemory, touched: Touched | None = None) -> list[MemoryRun]:
    """Every page the guest (or the VMM) ever touched; the rest is zero and needs no sending.
    `touched` if the caller already read it (`touched_pages`), so the page tables are read once."""
    touched = touched or touched_pages(memory)
    return [run for region in memory.regions for run in bitmap_runs(region, touched[region.guest_base])]


def dirty_runs(dirty: Iterable[tuple[MemoryRegion, DirtyBitmap]]) -> tuple[list[MemoryRun], int]:
    """Runs for a round's dirty log, and how many pages that is."""
    runs, pages = [], 0
    for region, bitmap in dirty:
        runs.extend(bitmap_runs(region, bitmap))
        pages += bitmap.count()
    return runs, pages


def in_background() -> None:
    """The calling thread runs from now on at the lowest priority, nice 19 (a Linux thread's own):
    work done while the guest runs, which must keep a vCPU or a device thread waiting as little as
    can be (a live snapshot's encoders and reader). Measured on hot256-max, 5 runs each, 2026-12-08:
    the guest's longest echo wait 15.1-15.6 ms with them at nice 10, 13.2 at nice 19, 11.6 under
    SCHED_IDLE; not SCHED_IDLE, which could starve the snapshot for good behind busy vCPUs."""
    os.setpriority(os.PRIO_PROCESS, 0, 19)


class PageEncoderPool:
    """Encodes runs into PAGES sections on `workers` threads, yielding them in run order."""

    def __init__(self, level: int = 1, workers: int = 2, ahead: int = 4, *, stable: bool = False,
                 background: bool = False) -> None:
        """`stable`: the memory does not change while encoded (a paused guest); otherwise each
        run is copied first so its checksum, payload and bytes sent agree. `zero_ranges`
        collects the zero runs every encoder found (only meaningful for stable memory).
        `background`: the workers run in the background (`in_background`), when the guest runs
        meanwhile and must come first."""
        self.level, self.workers, self.ahead = level, max(1, workers), max(1, ahead)
        self.stable, self.background = stable, background
        self.zero_ranges = ZeroRanges()
        self._local = threading.local()
        self._encoders: list[PageEncoderC] = []
        self._encoders_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="page-encoder")

    def _encode(self, run: MemoryRun) -> list[PageSection]:
        encoder = getattr(self._local, "encoder", None)
        if encoder is None:
            if self.background:
                in_background()
            # in C, the GIL released for the whole run: the guest's exits are handled meanwhile
            encoder = self._local.encoder = PageEncoderC(
                level=self.level, section_bytes=CHUNK_BYTES, stable=self.stable,
                zero_ranges=self.zero_ranges, sample_bytes=SAMPLE_BYTES)
            with self._encoders_lock:
                self._encoders.append(encoder)
        return encoder.encode(run.address, run.view)

    def warm(self) -> None:
        """Start every worker thread and give each its encoder now, so that the first run it
        encodes (at a pause, say) pays for neither."""
        ready = threading.Barrier(self.workers)
        for future in [self._pool.submit(self._warm_one, ready) for _ in range(self.workers)]:
            future.result()

    def _warm_one(self, ready: threading.Barrier) -> None:
        self._encode(MemoryRun(0, memoryview(b"")))
        ready.wait(5.0)  # holds this thread until every worker has taken one task

    @property
    def frames_judged_raw(self) -> int:
        """Frames sent RAW, uncompressed, because a sample of them did not compress."""
        with self._encoders_lock:
            return sum(e.frames_judged_raw for e in self._encoders)

    def encode(self, runs: Iterable[MemoryRun]) -> Iterator[PageSection]:
        pending: collections.deque[Future[list[PageSection]]] = collections.deque()
        for run in runs:
            pending.append(self._pool.submit(self._encode, run))
            if len(pending) >= self.workers * self.ahead:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> PageEncoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Touched = dict[int, DirtyBitmap]  # region guest base -> pages that may be non-zero


def touched_pages(memory: GuestMemory) -> Touched:
    """What the page tables say was ever touched, region by region (a starting point to keep
    up to date from dirty logs, so the digest at stop-and-copy needs no page-table read)."""
    return {r.guest_base: r.populated_pages() for r in memory.regions}


class MemorySink:
    """Writes decoded page runs into guest memory (the stream decoder has range-checked them; a
    decoder that placed its runs itself leaves only their accounting to the sink),
    and keeps `touched`: the pages it wrote data to (for the digest, without a page-table read)."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.pages = 0
        self.touched: Touched = {r.guest_base: DirtyBitmap(r.npages) for r in memory.regions}
        self._recent: Touched = {r.guest_base: DirtyBitmap(r.npages) for r in memory.regions}
        self._lock = threading.Lock()  # `take_recent` runs on another thread than `apply`

    def take_recent(self) -> list[tuple[MemoryRegion, DirtyBitmap]]:
        """The pages written (data or zeros) since the last call."""
        with self._lock:
            recent = self._recent
            self._recent = {r.guest_base: DirtyBitmap(r.npages) for r in self.memory.regions}
        return [(r, recent[r.guest_base]) for r in self.memory.regions]

    def apply(self, runs: Iterable[PageRun]) -> None:
        for run in runs:  # per run: a section carries at most a few thousand
            length = run.count * PAGE_SIZE
            region, offset = self.memory.find(run.address, length)
            if run.data is not None:
                region.prefault(offset, length)
                region.view[offset: offset + length] = run.data
            elif not run.placed:  # placed runs are in already (migrate.datapath.PageDecoderC)
                self.memory.zero_pages(run.address, length)
            with self._lock:
                if run.data is not None or run.placed:
                    self.touched[region.guest_base].set_range(offset // PAGE_SIZE, run.count)
                self._recent[region.guest_base].set_range(offset // PAGE_SIZE, run.count)
            self.pages += run.count
