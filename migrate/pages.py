"""Guest memory to page sections and back: what snapshots and live migration both move.

The source side picks *which* memory (populated pages for a full copy, a dirty log for a later
round), splits it into section-sized chunks and encodes them on worker threads (zstd and xxhash
release the GIL), in order, a bounded number ahead. The sink side writes decoded runs into guest
memory; zero runs give pages back to the host instead of writing zeros. No per-page Python: runs
come from whole bitmaps, chunks are sliced memoryviews.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash

from formats import (
    DIGEST_BLOCK,
    EndRecord,
    PageEncoder,
    PageRun,
    PageSection,
    ZeroRanges,
    combine_block_hashes,
    memory_digest,
    verify_digest,
    zero_block_hash,
)
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import GuestMemory, MemoryRegion

CHUNK_BYTES = 4 << 20  # one PAGES section's worth of raw memory


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


class PageEncoderPool:
    """Encodes runs into PAGES sections on `workers` threads, yielding them in run order."""

    def __init__(self, level: int = 1, workers: int = 2, ahead: int = 4, *, stable: bool = False) -> None:
        """`stable`: the memory does not change while encoded (a paused guest); otherwise each
        run is copied first so its checksum, payload and bytes sent agree. `zero_ranges`
        collects the zero runs every encoder found (only meaningful for stable memory)."""
        self.level, self.workers, self.ahead = level, max(1, workers), max(1, ahead)
        self.stable = stable
        self.zero_ranges = ZeroRanges()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="page-encoder")

    def _encode(self, run: MemoryRun) -> list[PageSection]:
        encoder = getattr(self._local, "encoder", None)
        if encoder is None:
            encoder = self._local.encoder = PageEncoder(level=self.level, section_bytes=CHUNK_BYTES,
                                                        stable=self.stable, zero_ranges=self.zero_ranges)
        return encoder.encode(run.address, run.view)

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


def blocks_with_pages(region: MemoryRegion, pages: DirtyBitmap) -> np.ndarray:
    """One bool per digest block of `region`: does it hold any page set in `pages`."""
    bits = np.unpackbits(pages.words.view(np.uint8), bitorder="little")[: region.npages]
    per_block = DIGEST_BLOCK // PAGE_SIZE
    padded = np.zeros(-(-region.npages // per_block) * per_block, dtype=bool)
    padded[: region.npages] = bits.astype(bool)
    return padded.reshape(-1, per_block).any(axis=1)


def _known_zero_blocks(memory: GuestMemory, touched: Touched | None = None,
                       zero: ZeroRanges | None = None):
    """For memory_digest: blocks of anonymous RAM with no touched page are zero, and not read.
    `touched` is what the caller already knows (pages it sent or received); without it, the
    kernel's page tables say (/proc/self/pagemap), which costs a read of them."""
    cache: dict[int, np.ndarray] = {}

    def known_zero(address: int, length: int) -> np.ndarray:
        region, offset = memory.find(address, length)
        if not region.anonymous:
            return np.zeros(-(-length // DIGEST_BLOCK), dtype=bool)
        if region.guest_base not in cache:
            pages = touched[region.guest_base] if touched else region.populated_pages()
            cache[region.guest_base] = ~blocks_with_pages(region, pages)
        first = offset // DIGEST_BLOCK
        known = cache[region.guest_base][first: first + -(-length // DIGEST_BLOCK)]
        return known | zero(address, length) if zero is not None else known

    return known_zero


def digest(memory: GuestMemory, workers: int = 2, touched: Touched | None = None,
           zero: ZeroRanges | None = None) -> int:
    """`formats.memory_digest` of all RAM, not reading blocks known to be untouched, or known
    to be zero (`zero`: what the encoders found, when memory has not changed since)."""
    return memory_digest(((r.guest_base, r.view) for r in memory.regions),
                         known_zero=_known_zero_blocks(memory, touched, zero), workers=workers)


def verify(end: EndRecord, memory: GuestMemory, touched: Touched | None = None, workers: int = 2) -> None:
    """`DigestMismatch` unless `memory` is what the stream's sender had (END's digest)."""
    verify_digest(end, ((r.guest_base, r.view) for r in memory.regions),
                  known_zero=_known_zero_blocks(memory, touched),
                  workers=workers)


def touched_pages(memory: GuestMemory) -> Touched:
    """What the page tables say was ever touched, region by region (a starting point to keep
    up to date from dirty logs, so the digest at stop-and-copy needs no page-table read)."""
    return {r.guest_base: r.populated_pages() for r in memory.regions}


class BlockHashes:
    """The memory digest's 2 MiB block hashes, kept current round by round.

    A migration's digest is taken while the guest is paused; hashing all touched memory then
    costs downtime. Instead each side hashes blocks in the background as rounds go, and a block
    is re-hashed whenever pages in it change (the source learns that from the dirty log, the
    target from what it writes). At the end only the blocks changed since their last hash are
    hashed in the pause. A block changing while it is being hashed gets a new generation, and the
    stale hash is not kept: `refresh` only records a hash if the block's generation did not move.
    """

    def __init__(self, memory: GuestMemory, touched: Touched) -> None:
        self.memory = memory
        self._lock = threading.Lock()
        self._hashes: dict[int, np.ndarray] = {}
        self._stale: dict[int, np.ndarray] = {}
        self._generation: dict[int, np.ndarray] = {}
        for region in memory.regions:
            n = -(-region.size // DIGEST_BLOCK)
            hashes = np.empty(n, dtype="<u8")
            hashes[:] = zero_block_hash(DIGEST_BLOCK)
            if region.size % DIGEST_BLOCK:
                hashes[-1] = zero_block_hash(region.size % DIGEST_BLOCK)
            self._hashes[region.guest_base] = hashes
            self._stale[region.guest_base] = (blocks_with_pages(region, touched[region.guest_base])
                                              if region.anonymous else np.ones(n, dtype=bool))
            self._generation[region.guest_base] = np.zeros(n, dtype=np.uint64)

    def invalidate(self, changed: Iterable[tuple[MemoryRegion, DirtyBitmap]]) -> None:
        """Pages in `changed` may differ from what their blocks were hashed over."""
        with self._lock:
            for region, pages in changed:
                blocks = blocks_with_pages(region, pages)
                self._stale[region.guest_base] |= blocks
                self._generation[region.guest_base][blocks] += np.uint64(1)

    def refresh(self, workers: int = 1) -> int:
        """Hash every stale block; returns how many were hashed."""
        todo = []
        with self._lock:
            for region in self.memory.regions:
                base = region.guest_base
                for block in np.flatnonzero(self._stale[base]).tolist():
                    todo.append((region, block, int(self._generation[base][block])))

        def hash_block(item: tuple[MemoryRegion, int, int]) -> int:
            region, block, _ = item
            return xxhash.xxh3_64_intdigest(region.view[block * DIGEST_BLOCK:(block + 1) * DIGEST_BLOCK])

        if workers > 1 and len(todo) > 4:
            with ThreadPoolExecutor(workers) as pool:
                results = list(pool.map(hash_block, todo))
        else:
            results = [hash_block(item) for item in todo]
        with self._lock:
            for (region, block, generation), value in zip(todo, results, strict=True):
                base = region.guest_base
                if int(self._generation[base][block]) == generation:  # unchanged while hashed
                    self._hashes[base][block] = value
                    self._stale[base][block] = False
        return len(todo)

    def digest(self, workers: int = 2) -> int:
        """The memory digest now (memory must not change meanwhile: a paused guest)."""
        while self.refresh(workers):
            pass  # a block invalidated during a refresh is hashed by the next one
        with self._lock:
            return combine_block_hashes((r.guest_base, r.size, self._hashes[r.guest_base].copy())
                                        for r in self.memory.regions)


class MemorySink:
    """Writes decoded page runs into guest memory (the stream decoder has range-checked them),
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
            if run.data is None:
                self.memory.zero_pages(run.address, length)
            else:
                region.prefault(offset, length)
                region.view[offset: offset + length] = run.data
            with self._lock:
                if run.data is not None:
                    self.touched[region.guest_base].set_range(offset // PAGE_SIZE, run.count)
                self._recent[region.guest_base].set_range(offset // PAGE_SIZE, run.count)
            self.pages += run.count
