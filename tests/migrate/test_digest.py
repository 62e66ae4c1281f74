"""Block hashes kept current round by round give the same digest as hashing all memory."""

from __future__ import annotations

import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from hv.kvm.dirty import DirtyBitmap
from hv.kvm.memory import GuestMemory, MemoryRegion
from migrate import digest, pages

MiB = 1 << 20
PAGES = 16 * MiB // 4096


def _memory() -> tuple[GuestMemory, MemoryRegion]:
    memory = GuestMemory()
    region = MemoryRegion(0, 16 * MiB, slot=-1)
    memory.insert(region)
    return memory, region


@settings(max_examples=30, deadline=None)
@given(rounds=st.lists(st.lists(st.tuples(st.integers(0, PAGES - 1), st.binary(min_size=1, max_size=64)),
                                max_size=20), min_size=1, max_size=5), background=st.booleans())
def test_refreshed_block_hashes_give_the_full_digest(rounds, background) -> None:
    memory, region = _memory()
    hashes = digest.BlockHashes(memory, pages.touched_pages(memory))
    for writes in rounds:  # each round: the guest writes, the dirty log says where, a refresh runs
        dirty = DirtyBitmap(region.npages)
        for page, data in writes:
            region.view[page * 4096: page * 4096 + len(data)] = data
            dirty.set_range(page, 1)
        hashes.invalidate([(region, dirty)])
        if background:
            hashes.refresh_soon()  # as the migration runs it: a pass on its own thread
        else:
            hashes.refresh()
    try:
        assert hashes.digest() == digest.digest(memory)
    finally:
        hashes.close()


def test_a_block_written_while_it_is_hashed_is_hashed_again() -> None:
    memory, region = _memory()
    hashes = digest.BlockHashes(memory, pages.touched_pages(memory))
    stop = threading.Event()
    page = 3 * 512 + 7  # in block 3

    def guest() -> None:  # writes and logs, over and over, while refreshes run
        value = 0
        while not stop.is_set():
            value = (value + 1) % 256
            region.view[page * 4096] = value
            dirty = DirtyBitmap(region.npages)
            dirty.set_range(page, 1)
            hashes.invalidate([(region, dirty)])

    writer = threading.Thread(target=guest)
    writer.start()
    for _ in range(200):
        hashes.refresh()
    stop.set()
    writer.join()
    # the guest is "paused": the digest must match memory as it is now
    assert hashes.digest() == digest.digest(memory)


def test_without_invalidation_a_change_goes_unseen() -> None:
    """The cache trusts what it is told: this is why every dirty log reaches it."""
    memory, region = _memory()
    hashes = digest.BlockHashes(memory, pages.touched_pages(memory))
    hashes.refresh()
    region.view[100] = 1
    assert hashes.digest() != digest.digest(memory)
