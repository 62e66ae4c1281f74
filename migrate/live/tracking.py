"""What the source's guest wrote, and when: its dirty log fetched pass by pass, the pages it ever
touched, and the block hashes of its memory kept current (so the digest at the end hashes only
what changed since); the pause, with the last of the log taken in it."""

from __future__ import annotations

import time
from collections.abc import Callable

from formats import DIGEST_BLOCK, POSTCOPY_DIGEST_BLOCK
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import MemoryRegion
from hv.kvm.units import MiB
from hv.vmm.machine import Machine
from migrate import digest, pages
from migrate.stats import Laps, Pause

Dirty = list[tuple[MemoryRegion, DirtyBitmap]]


class DirtyTracker:
    """Dirty logging on from construction, counting from then; the touched map and the block
    hashes (blocks of `POSTCOPY_DIGEST_BLOCK` when post-copy may follow: the target's too) start
    from there."""

    def __init__(self, machine: Machine, *, postcopy: bool) -> None:
        self.machine = machine
        vm = machine.vm
        if not vm.dirty_logging:
            vm.enable_dirty_log()
        for _ in vm.fetch_dirty_logs():  # the log now counts writes from here on
            pass
        self._fetched_at = time.perf_counter()
        self.touched = pages.touched_pages(vm.memory)  # kept up to date from each dirty log
        self.hashes = digest.BlockHashes(vm.memory, self.touched, POSTCOPY_DIGEST_BLOCK if postcopy else DIGEST_BLOCK)
        self.hashes.refresh_soon()  # the digest at the end then hashes only what changed since

    def fetch(self, *, paused: bool = False) -> tuple[Dirty, int, float]:
        """The dirty log since the last fetch, its page count and the rate the guest dirtied at.
        `paused`: no background hashing now (the final copy has the CPUs to itself; the digest
        hashes what is stale once the pages are out)."""
        dirty = list(self.machine.vm.fetch_dirty_logs())
        for region, bitmap in dirty:
            self.touched[region.guest_base] |= bitmap
        self.hashes.invalidate(dirty)
        if not paused:
            self.hashes.refresh_soon()
        now = time.perf_counter()
        count = sum(b.count() for _, b in dirty)
        rate = count * PAGE_SIZE / MiB / max(now - self._fetched_at, 1e-6)
        self._fetched_at = now
        return dirty, count, rate

    def pause_and_take_the_rest(self, pending: Dirty, paused: Callable[[], None]) -> tuple[Laps, Dirty, float]:
        """Pause the guest (`paused()` then starts the final copy's clock) and fetch the dirty
        log, with `pending` (fetched while it ran, not sent yet) folded in; the laps started, the
        pages to send, the dirty rate."""
        laps = Laps()
        self.machine.pause()
        paused()
        laps.lap(Pause.PAUSE)
        final, _, rate = self.fetch(paused=True)
        for (_, merged), (_, earlier) in zip(final, pending, strict=True):
            merged |= earlier
        laps.lap(Pause.DIRTY_LOG)
        return laps, final, rate

    def add_unsent(self, dirty: Dirty, unsent: list[pages.MemoryRun]) -> Dirty:
        """`dirty` and the pages a round broken off for the switch (or never begun) did not send:
        the target lacks both."""
        memory = self.machine.vm.memory
        for run in unsent:
            region, offset = memory.find(run.address, len(run.view))
            bits = next(b for r, b in dirty if r is region)
            bits.set_range(offset // PAGE_SIZE, len(run.view) // PAGE_SIZE)
        return dirty

    def close(self) -> None:
        self.hashes.close()
