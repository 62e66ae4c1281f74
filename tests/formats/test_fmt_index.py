"""MEMORY_INDEX and WORKING_SET (format 2.1): the index round-trips, it describes exactly the
PAGES sections before it (every payload where it says), it is found and checked from the end of
a file alone, and any damage to it, to END or to the frame before it is refused; a 2.0 reader
skips it. A working set written into a file's tail is read back by both readers, replaced by a
second one, and refused when damaged."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
from fmt_strategies import LAYOUT, RAM, make_registry, page_images
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from formats import (
    FLAG_SKIPPABLE,
    INDEX_TAIL,
    DigestMismatch,
    FormatError,
    MemoryIndex,
    MemoryIndexRecord,
    PageDecoder,
    PageEncoder,
    PageEncoding,
    SectionKind,
    SequenceError,
    SkippedRecord,
    StreamReader,
    StreamWriter,
    WorkingSet,
    WorkingSetRecord,
    combine_block_hashes,
    decode_memory_index,
    decode_working_set,
    encode_memory_index,
    encode_working_set,
    index_location,
    memory_block_hashes,
    page_addresses,
)
from formats.tail import read_tail

REG = make_registry()
MAX_SECTION = 64 << 20


def indexed_stream(mem: bytes | bytearray, *, section_bytes: int = 16 << 10,
                   damage_runs: bool = False, damage_hashes: bool = False) -> tuple[bytes, bytes]:
    """A stream of `mem` at address 0 with a MEMORY_INDEX before END, and RAM's whole image;
    `damage_*`: an index framed as a good record but not of these sections, or not of END's
    digest."""
    image = bytes(mem) + bytes(RAM.ranges[0].size - len(mem))
    blocks = memory_block_hashes([(RAM.ranges[0].address, image), (RAM.ranges[1].address, bytes(RAM.ranges[1].size))])
    sections = PageEncoder(level=1, section_bytes=section_bytes, min_zero_pages=2).encode(0, mem)
    w = StreamWriter(REG, producer="tests", index=True)
    out = [w.header(), w.layout(LAYOUT), *(w.pages(s) for s in sections)]
    index_at = w.position
    record = w.memory_index(RAM, [h for _, _, h in blocks])
    if damage_runs or damage_hashes:
        good = decode_memory_index(record[16:], index_at)
        runs, hashes = good.runs.copy(), [h.copy() for h in good.block_hashes]
        if damage_runs:
            runs["digest"][0] ^= 1
        if damage_hashes:
            hashes[1][0] ^= 1
        bad = MemoryIndex(good.memory, runs, tuple(hashes), good.pages_sections, good.data_start, good.previous)
        w = StreamWriter(REG, producer="tests", index=True)  # the same stream again, up to the index
        out = [w.header(), w.layout(LAYOUT), *(w.pages(s) for s in sections)]
        record = w.section(SectionKind.MEMORY_INDEX, encode_memory_index(bad), skippable=True)
    out += [record, w.end(combine_block_hashes(blocks))]
    return b"".join(out), image


def from_tail(data: bytes) -> MemoryIndex | None:
    """What a lazy reader does: the index from the end of the file alone (None: none found)."""
    tail = read_tail(lambda offset, length: data[offset:offset + length], len(data), MAX_SECTION)
    return None if tail is None else tail.index


@settings(max_examples=60, deadline=None)
@given(page_images(max_pages=64), st.sampled_from([4096, 3 * 4096, 16 << 10]))
def test_the_index_says_where_every_page_is(mem: bytearray, section_bytes: int) -> None:
    data, image = indexed_stream(mem, section_bytes=section_bytes)
    records = StreamReader(REG, memory=RAM, index=True).feed(data)
    index = next(r.index for r in records if isinstance(r, MemoryIndexRecord))
    assert from_tail(data) == index
    body = encode_memory_index(index)
    assert decode_memory_index(body, len(data) - 64 - 16 - len(body)) == index
    assert index.digest() == struct.unpack_from("<Q", data, len(data) - 8)[0]  # END's
    # every run read by its entry alone, from the file's bytes, rebuilds the memory
    decode = PageDecoder(RAM)._decompress_frame
    rebuilt = bytearray(len(image))
    for run in index.runs:
        size = int(run["pages"]) * 4096
        at, length, address = int(run["payload_offset"]), int(run["payload_len"]), int(run["address"])
        if run["encoding"] == PageEncoding.ZSTD:
            rebuilt[address:address + size] = decode(memoryview(data)[at:at + length], size)
        elif run["encoding"] == PageEncoding.RAW:
            rebuilt[address:address + size] = data[at:at + length]
    assert rebuilt == image[:len(rebuilt)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_damage_to_the_tail_is_refused(data: st.DataObject) -> None:
    """A flipped bit in the frame before the index, the index or END: a lazy reader refuses it
    (or finds no index, and the whole file's reader refuses it). (The last PAGES body between
    them it does not read: its payloads are checked as they are loaded.)"""
    stream, _ = indexed_stream(np.random.default_rng(7).bytes(5 * 4096) + bytes(3 * 4096))
    index = from_tail(stream)
    assert index is not None
    index_at = len(stream) - 64 - 16 - len(encode_memory_index(index))
    at = data.draw(st.integers(index.previous, index.previous + 15) | st.integers(index_at, len(stream) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(stream)
    damaged[at] ^= 1 << bit
    try:
        found = from_tail(bytes(damaged))
    except FormatError:
        return
    assert found is None
    with pytest.raises(FormatError):
        StreamReader(REG, memory=RAM, index=True).feed(bytes(damaged))


def test_an_index_of_other_sections_or_other_hashes_is_refused() -> None:
    mem = np.random.default_rng(1).bytes(6 * 4096)
    with pytest.raises(SequenceError, match="does not describe"):
        StreamReader(REG, memory=RAM, index=True).feed(indexed_stream(mem, damage_runs=True)[0])
    damaged, _ = indexed_stream(mem, damage_hashes=True)
    with pytest.raises(DigestMismatch):
        StreamReader(REG, memory=RAM, index=True).feed(damaged)
    with pytest.raises(DigestMismatch):
        from_tail(damaged)


def test_a_reader_without_the_index_skips_it() -> None:
    data, _ = indexed_stream(np.random.default_rng(2).bytes(4 * 4096))
    reader = StreamReader(REG, memory=RAM)
    skipped = [r for r in reader.feed(data) if isinstance(r, SkippedRecord)]
    reader.finish()
    assert [r.kind for r in skipped] == [SectionKind.MEMORY_INDEX]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_hostile_index_body_is_only_ever_a_format_error(data: st.DataObject) -> None:
    stream, _ = indexed_stream(np.random.default_rng(3).bytes(9 * 4096))
    where = index_location(stream[-INDEX_TAIL:], len(stream), MAX_SECTION)
    assert where is not None
    body = bytearray(stream[where.offset + 16:where.offset + 16 + where.length])
    for _ in range(data.draw(st.integers(1, 4))):
        body[data.draw(st.integers(0, len(body) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        body = body[:data.draw(st.integers(0, len(body)))]
    try:
        index = decode_memory_index(bytes(body), where.offset)
    except FormatError:
        return
    # what decodes holds together: runs inside RAM, payloads in order before the index
    data_runs = index.runs[index.runs["encoding"] != PageEncoding.ZERO]
    assert RAM.first_outside(index.runs["address"], index.runs["pages"]) == -1
    ends = data_runs["payload_offset"] + data_runs["payload_len"]
    assert np.all(data_runs["payload_offset"][1:] >= ends[:-1]) and (not len(ends) or ends[-1] <= where.offset)


def with_working_set(stream: bytes, pages: np.ndarray, window_ms: int = 100) -> bytes:
    """`stream` with its tail written anew around a WORKING_SET, as a recording restore does."""
    tail = read_tail(lambda offset, length: stream[offset:offset + length], len(stream), MAX_SECTION)
    assert tail is not None
    seed = struct.unpack_from("<Q", stream, tail.before + 8)[0]
    w = StreamWriter.continuing(seed, tail.cut)
    end = tail.end
    return stream[:tail.cut] + b"".join([
        w.section(SectionKind.WORKING_SET, encode_working_set(WorkingSet(pages, window_ms, tail.before)),
                  skippable=True),
        w.section(SectionKind.MEMORY_INDEX, encode_memory_index(dataclasses.replace(tail.index, previous=tail.cut)),
                  skippable=True),
        w.section(SectionKind.END, struct.pack("<QQQQQQ", *end[:4], end[4] - tail.records + 2, end[5]))])


@settings(max_examples=60, deadline=None)
@given(page_images(max_pages=32), st.lists(st.integers(0, 255), max_size=40, unique=True), st.data())
def test_a_working_set_rides_in_the_tail_and_any_damage_to_it_is_refused(mem: bytearray, pages: list[int],
                                                                        data: st.DataObject) -> None:
    stream, _ = indexed_stream(mem)
    addresses = page_addresses(np.array([p * 4096 for p in pages], dtype=np.uint64))
    once = with_working_set(stream, addresses)
    twice = with_working_set(once, addresses[::-1])  # a second recording replaces the first
    for written, expected in ((once, addresses), (twice, addresses[::-1])):
        reader = StreamReader(REG, memory=RAM, index=True)
        records = reader.feed(written)
        reader.finish()
        found = [r.working_set for r in records if isinstance(r, WorkingSetRecord)]
        tail = read_tail(lambda offset, length, b=written: b[offset:offset + length], len(written), MAX_SECTION)
        assert tail is not None and tail.working_set == found[0] and np.array_equal(found[0].pages, expected)
        original = from_tail(stream)
        assert original is not None and dataclasses.replace(tail.index, previous=original.previous) == original
    ws_at = len(stream) - 64 - 16 - len(encode_memory_index(original))  # where the original index was
    at = data.draw(st.integers(ws_at, ws_at + 16 + 24 + 8 * len(addresses) - 1))
    damaged = bytearray(once)
    damaged[at] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(FormatError):
        read_tail(lambda offset, length: bytes(damaged[offset:offset + length]), len(damaged), MAX_SECTION)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_a_hostile_working_set_body_is_only_ever_a_format_error(body: bytes, offset: int) -> None:
    try:
        ws = decode_working_set(body, offset, RAM)
    except FormatError:
        return
    assert RAM.first_outside(ws.pages, np.ones(len(ws.pages), dtype=np.uint64)) == -1
    assert len(np.unique(ws.pages)) == len(ws.pages) and ws.previous < offset
