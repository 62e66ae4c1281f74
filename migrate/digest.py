"""The memory digest of guest RAM, computed the cheap way (`formats.digest` defines it).

Blocks of anonymous RAM with no touched page are zero and are not read (`known_zero_blocks`): what
the caller sent or received says which pages were touched, or else the kernel's page tables do.
A live migration keeps block hashes current round by round (`BlockHashes`), so that its pause
hashes only what the last round changed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from formats import (DIGEST_BLOCK, EndRecord, KnownZero, ZeroRanges, block_count,
                     combine_block_hashes, memory_block_hashes, memory_digest, verify_digest, zero_block_hashes)
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import GuestMemory, MemoryRegion
from migrate.datapath import block_hashes
from migrate.pages import Touched


def blocks_with_pages(region: MemoryRegion, pages: DirtyBitmap, block: int = DIGEST_BLOCK) -> np.ndarray:
    """One bool per digest block (of `block` bytes) of `region`: does it hold any page set in
    `pages`. Costs the dirty words, not the region's pages (it runs in the pause, on both sides)."""
    blocks = pages.groups_with_pages(block // PAGE_SIZE)
    assert len(blocks) == block_count(region.npages * PAGE_SIZE, block)
    return blocks


def known_zero_blocks(memory: GuestMemory, touched: Touched | None = None,
                      zero: ZeroRanges | None = None) -> KnownZero:
    """For memory_digest: blocks of anonymous RAM with no touched page are zero, and not read.
    `touched` is what the caller already knows (pages it sent or received); without it, the
    kernel's page tables say (/proc/self/pagemap), which costs a read of them. `zero`: ranges
    the encoders found zero, when memory has not changed since."""
    cache: dict[int, np.ndarray] = {}

    def known_zero(address: int, length: int) -> np.ndarray:
        region, offset = memory.find(address, length)
        if not region.anonymous:
            return np.zeros(block_count(length), dtype=bool)
        if region.guest_base not in cache:
            pages = touched[region.guest_base] if touched else region.populated_pages()
            cache[region.guest_base] = ~blocks_with_pages(region, pages)
        first = offset // DIGEST_BLOCK
        known = cache[region.guest_base][first: first + block_count(length)]
        return known | zero(address, length) if zero is not None else known

    return known_zero


def _ranges(memory: GuestMemory) -> list[tuple[int, memoryview]]:
    return [(r.guest_base, r.view) for r in memory.regions]


def digest(memory: GuestMemory, workers: int = 2, touched: Touched | None = None,
           zero: ZeroRanges | None = None) -> int:
    """`formats.memory_digest` of all RAM, not reading blocks known to be untouched or zero."""
    return memory_digest(_ranges(memory), known_zero=known_zero_blocks(memory, touched, zero),
                         workers=workers)


def block_hashes_of(memory: GuestMemory, workers: int = 2,
                    zero: ZeroRanges | None = None) -> list[tuple[int, int, np.ndarray]]:
    """`digest`'s pieces: (address, length, block hashes) per RAM region, what a snapshot's
    MEMORY_INDEX carries; `formats.combine_block_hashes` of them is the digest."""
    return memory_block_hashes(_ranges(memory), known_zero=known_zero_blocks(memory, None, zero), workers=workers)


def verify(end: EndRecord, memory: GuestMemory, touched: Touched | None = None, workers: int = 2) -> None:
    """`DigestMismatch` unless `memory` is what the stream's sender had (END's digest)."""
    verify_digest(end, _ranges(memory), known_zero=known_zero_blocks(memory, touched), workers=workers)


def dirty_blocks(dirty: Iterable[tuple[MemoryRegion, DirtyBitmap]]) -> int:
    """How many digest blocks hold a page set in `dirty` (numpy over the bitmaps)."""
    return sum(int(blocks_with_pages(region, pages).sum()) for region, pages in dirty)


class BlockHashes:
    """The memory digest's 2 MiB block hashes, kept current round by round.

    A migration's digest is taken while the guest is paused; hashing all touched memory then
    costs downtime. Instead each side hashes blocks in the background as rounds go, and a block
    is re-hashed whenever pages in it change (the source learns that from the dirty log, the
    target from what it writes). At the end only the blocks changed since their last hash are
    hashed in the pause. A block changing while it is being hashed gets a new generation, and the
    stale hash is not kept: `refresh` only records a hash if the block's generation did not move.
    Each hash is `formats.block_hash` (computed in C, `migrate.datapath.block_hashes`), and the
    digest `formats.combine_block_hashes` of them.
    `refresh_soon` runs a pass on a thread of its own; `close` waits for it and ends the thread.
    """

    def __init__(self, memory: GuestMemory, touched: Touched, block: int = DIGEST_BLOCK) -> None:
        self.memory = memory
        self.block = block  # DIGEST_BLOCK; POSTCOPY_DIGEST_BLOCK for the post-copy digest
        self.block_ms = 0.0  # what hashing one block cost on one thread, as last measured
        self._background: ThreadPoolExecutor | None = None
        self._pass: Future[int] | None = None
        self._lock = threading.Lock()
        self._hashes: dict[int, np.ndarray] = {}
        self._stale: dict[int, np.ndarray] = {}
        self._generation: dict[int, np.ndarray] = {}
        for region in memory.regions:
            n = block_count(region.size, block)
            self._hashes[region.guest_base] = zero_block_hashes(region.size, block)
            self._stale[region.guest_base] = (blocks_with_pages(region, touched[region.guest_base], block)
                                              if region.anonymous else np.ones(n, dtype=bool))
            self._generation[region.guest_base] = np.zeros(n, dtype=np.uint64)

    def invalidate(self, changed: Iterable[tuple[MemoryRegion, DirtyBitmap]]) -> None:
        """Pages in `changed` may differ from what their blocks were hashed over."""
        with self._lock:
            for region, pages in changed:
                blocks = blocks_with_pages(region, pages, self.block)
                self._stale[region.guest_base] |= blocks
                self._generation[region.guest_base][blocks] += np.uint64(1)

    def refresh(self, workers: int = 1) -> int:
        """Hash every stale block; returns how many were hashed. One C call per region and
        worker (the GIL released throughout), the bookkeeping in numpy: no per-block Python."""
        todo = []
        with self._lock:
            for region in self.memory.regions:
                blocks = np.flatnonzero(self._stale[region.guest_base]).astype(np.uint64)
                if len(blocks):
                    todo.append((region, blocks, self._generation[region.guest_base][blocks].copy()))
        started = time.perf_counter()
        for region, blocks, generations in todo:
            parts = np.array_split(blocks, max(1, min(workers, len(blocks) // 4)))
            if len(parts) > 1:
                with ThreadPoolExecutor(len(parts)) as pool:
                    values = np.concatenate(list(pool.map(lambda b: block_hashes(region.view, b, self.block),
                                                          parts)))
            else:
                values = block_hashes(region.view, blocks, self.block)
            with self._lock:
                base = region.guest_base
                kept = self._generation[base][blocks] == generations  # unchanged while hashed
                self._hashes[base][blocks[kept]] = values[kept]
                self._stale[base][blocks[kept]] = False
        hashed = sum(len(blocks) for _, blocks, _ in todo)
        if hashed >= 4:  # a few blocks say little of the rate
            self.block_ms = (time.perf_counter() - started) * 1000 * max(1, workers) / hashed
        return hashed

    def refresh_soon(self) -> None:
        """Hash the stale blocks in the background, one pass at a time (a pass already running
        leaves what went stale since for the next one)."""
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="block-hashes")
        if self._pass is None or self._pass.done():
            self._pass = self._background.submit(self.refresh, 1)

    def close(self) -> None:
        if self._background is not None:
            self._background.shutdown(wait=True)

    def current(self, workers: int = 2) -> dict[int, np.ndarray]:
        """Every block's hash now, by region base (memory must not change meanwhile: a paused
        guest, or a target whose guest has not run yet)."""
        if self._pass is not None:
            self._pass.result()  # a background pass may still be running: let it finish
        while self.refresh(workers):
            pass  # a block invalidated during a refresh is hashed by the next one
        with self._lock:
            return {base: hashes.copy() for base, hashes in self._hashes.items()}

    def digest(self, workers: int = 2) -> int:
        """The memory digest now (memory must not change meanwhile: a paused guest)."""
        hashes = self.current(workers)
        return combine_block_hashes((r.guest_base, r.size, hashes[r.guest_base]) for r in self.memory.regions)
