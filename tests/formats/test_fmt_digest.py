"""The memory digest: its definition (SPEC.md), its pieces, and the zero blocks it may skip; and the
disk digest, built the same way over a disk image's 1 MiB blocks."""

from __future__ import annotations

import struct

import numpy as np
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from formats import (
    DIGEST_BLOCK,
    DISK_DIGEST_BLOCK,
    PageEncoder,
    ZeroRanges,
    block_count,
    block_hash,
    combine_block_hashes,
    combine_disk_digest,
    disk_block_digests,
    memory_digest,
    zero_block_hashes,
)


def test_memory_digest_is_address_ordered_and_position_sensitive() -> None:
    a, b = b"\x01" * 4096, b"\x02" * 4096
    assert memory_digest([(0, a), (8192, b)]) == memory_digest([(8192, b), (0, a)])
    assert memory_digest([(0, a), (8192, b)]) != memory_digest([(0, b), (8192, a)])
    assert memory_digest([(0, a)]) != memory_digest([(4096, a)])


def _as_spec_says(ranges: list[tuple[int, bytes]]) -> int:
    """SPEC.md's words, written out: le64 address, le64 length, le64 hash of each 2 MiB block."""
    h = xxhash.xxh3_64()
    for address, mem in sorted(ranges):
        h.update(struct.pack("<QQ", address, len(mem)))
        for at in range(0, len(mem), DIGEST_BLOCK):
            h.update(struct.pack("<Q", xxhash.xxh3_64_intdigest(mem[at:at + DIGEST_BLOCK])))
    return h.intdigest()


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 5 * DIGEST_BLOCK // 4096), min_size=1, max_size=3),
       marks=st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), max_size=8),
       workers=st.sampled_from([1, 3]))
def test_the_digest_is_the_spec_and_its_pieces_compose_it(sizes, marks, workers) -> None:
    ranges, address = [], 0x10_0000
    for pages in sizes:
        mem = bytearray(pages * 4096)
        for at, value in marks:
            mem[at % len(mem)] = value
        ranges.append((address, bytes(mem)))
        address += len(mem) + 4096
    expected = _as_spec_says(ranges)
    assert memory_digest(ranges, workers=workers) == expected
    pieces = []
    for address, mem in ranges:
        hashes = zero_block_hashes(len(mem))
        assert len(hashes) == block_count(len(mem))
        for i in range(len(hashes)):
            if any(mem[i * DIGEST_BLOCK:(i + 1) * DIGEST_BLOCK]):
                hashes[i] = block_hash(memoryview(mem), i)
        pieces.append((address, len(mem), hashes))
    assert combine_block_hashes(pieces) == expected


@settings(max_examples=40, deadline=None)
@given(layout=st.lists(st.sampled_from(["zero", "data"]), min_size=1, max_size=12),
       data=st.binary(min_size=1, max_size=64))
def test_digest_with_the_encoders_zero_ranges_equals_reading_everything(layout, data) -> None:
    chunk = DIGEST_BLOCK // 2  # zero runs that cover whole blocks and runs that split them
    mem = bytearray(chunk * len(layout))
    for i, kind in enumerate(layout):
        if kind == "data":
            mem[i * chunk + 100: i * chunk + 100 + len(data)] = data
    zero = ZeroRanges()
    PageEncoder(stable=True, zero_ranges=zero).encode(0x10_0000, memoryview(mem))
    assert memory_digest([(0x10_0000, mem)], known_zero=zero) == memory_digest([(0x10_0000, mem)])


def test_a_wrongly_claimed_zero_block_changes_the_digest() -> None:
    mem = bytearray(2 * DIGEST_BLOCK)
    mem[DIGEST_BLOCK + 7] = 1
    claims_all_zero = lambda address, length: np.ones(block_count(length), dtype=bool)  # noqa: E731
    assert memory_digest([(0, mem)], known_zero=claims_all_zero) != memory_digest([(0, mem)])


def _disk_digest(data: bytes) -> bytes:
    """The disk digest as SPEC.md words it, from every byte (no block skipped)."""
    blocks = [data[i:i + DISK_DIGEST_BLOCK] for i in range(0, len(data), DISK_DIGEST_BLOCK)]
    return xxhash.xxh3_128_digest(struct.pack("<Q", len(data)) + b"".join(map(xxhash.xxh3_128_digest, blocks)))


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 3 * DISK_DIGEST_BLOCK + 5), data=st.data())
def test_the_disk_digest_is_its_definition_with_holes_unread(size: int, data: st.DataObject) -> None:
    image = bytearray(size)
    count = -(-size // DISK_DIGEST_BLOCK)
    written = data.draw(st.sets(st.integers(0, max(count - 1, 0)), max_size=count)) if count else set()
    for index in written:  # a few bytes in some blocks; the others stay holes
        length = min(DISK_DIGEST_BLOCK, size - index * DISK_DIGEST_BLOCK)
        at = index * DISK_DIGEST_BLOCK + data.draw(st.integers(0, length - 1))
        image[at] = data.draw(st.integers(1, 255))
    given_blocks = [(i, bytes(image[i * DISK_DIGEST_BLOCK:(i + 1) * DISK_DIGEST_BLOCK])) for i in sorted(written)]
    digest = combine_disk_digest(size, disk_block_digests(size, given_blocks))
    assert digest == _disk_digest(bytes(image))
    assert digest != combine_disk_digest(size + 1, disk_block_digests(size + 1, []))  # the size counts too
    if written:
        assert digest != combine_disk_digest(size, disk_block_digests(size, []))  # each byte counts


@pytest.mark.parametrize("blocks", [[(-1, DISK_DIGEST_BLOCK)], [(2, DISK_DIGEST_BLOCK)], [(1, 10)], [(0, 5)],
                                    [(1, DISK_DIGEST_BLOCK // 2), (0, DISK_DIGEST_BLOCK)]])
def test_a_block_that_is_not_the_next_of_the_disk_is_refused(blocks: list[tuple[int, int]]) -> None:
    size = DISK_DIGEST_BLOCK * 3 // 2  # blocks 0 (whole) and 1 (half), in that order
    with pytest.raises(ValueError):
        list(disk_block_digests(size, [(index, bytes(length)) for index, length in blocks]))


@pytest.mark.parametrize("indices", [[-1], [2], [1, 0], [0, 0]])
def test_block_digests_out_of_the_disk_or_of_order_are_refused(indices: list[int]) -> None:
    with pytest.raises(ValueError):
        combine_disk_digest(DISK_DIGEST_BLOCK * 3 // 2, [(index, bytes(16)) for index in indices])
    combine_disk_digest(DISK_DIGEST_BLOCK * 3 // 2, [(0, bytes(16)), (1, bytes(16))])  # in order, in the disk


def test_the_disk_digest_of_a_huge_hostile_size_costs_no_memory() -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        digest = combine_disk_digest(1 << 42, [])  # 4 TiB of holes: 4 Mi zero block digests hashed
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and len(digest) == 16
