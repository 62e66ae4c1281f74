"""The memory digest: its definition (SPEC.md), its pieces, and the zero blocks it may skip."""

from __future__ import annotations

import struct

import numpy as np
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import (
    DIGEST_BLOCK,
    PageEncoder,
    ZeroRanges,
    block_count,
    block_hash,
    combine_block_hashes,
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
