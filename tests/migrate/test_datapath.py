"""The C data path against the reference: `PageEncoderC` makes the PAGES bodies
`formats.PageEncoder` makes, byte for byte, for any memory and any parameters.

Both are given the same zstd (the system's libzstd, through `zstd_compressor`): python-zstandard
bundles a zstd of its own, whose frames may differ from another version's, so only with one
library can every byte be compared — framing, runs, zero folding, RAW/ZSTD choice and digests."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import (
    DecompressionError,
    FormatError,
    MemoryLayout,
    PageDecoder,
    PageEncoder,
    PageLimits,
    PageRangeError,
    ZeroRanges,
)
from formats.layout import PAGE_SIZE, RamRange
from formats.digest import DIGEST_BLOCK, block_hash
from migrate.datapath import PageDecoderC, PageEncoderC, block_hashes, zstd_compressor, zstd_decompressor

_compressors: dict[int, object] = {}


def _reference(level: int, **kwargs) -> PageEncoder:
    if level > 0 and level not in _compressors:
        _compressors[level] = zstd_compressor(level)
    return PageEncoder(level=level, compress=_compressors.get(level), **kwargs)


def _page(kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "zero":
        return bytes(PAGE_SIZE)
    if kind == "random":
        return rng.bytes(PAGE_SIZE)
    if kind == "one-byte":  # the classic migration-test page: zeros and one counter byte
        page = bytearray(PAGE_SIZE)
        page[seed % PAGE_SIZE] = 1 + seed % 255
        return bytes(page)
    return (rng.bytes(16) * (PAGE_SIZE // 16))  # compressible


pages_strategy = st.lists(st.tuples(st.sampled_from(["zero", "random", "one-byte", "pattern"]),
                                    st.integers(1, 40), st.integers(0, 2**31)),
                          min_size=1, max_size=12)


def _memory(spans) -> bytearray:
    return bytearray(b"".join(_page(kind, seed + i) for kind, count, seed in spans for i in range(count)))


def _assert_same(c_sections, ref_sections) -> None:
    assert len(c_sections) == len(ref_sections)
    for c, ref in zip(c_sections, ref_sections, strict=True):
        assert b"".join(bytes(p) for p in c.parts) == ref.body
        assert (c.length, c.digest, c.totals) == (ref.length, ref.digest, ref.totals)


@settings(max_examples=150, deadline=None)
@given(spans=pages_strategy, level=st.sampled_from([0, 1, 3]), stable=st.booleans(),
       section_pages=st.sampled_from([1, 2, 3, 8, 64]), min_zero=st.sampled_from([1, 2, 4, 7]),
       max_runs=st.sampled_from([1, 2, 3, 4096]), page_address=st.integers(0, 2**30),
       sample_bytes=st.sampled_from([0, 512, 4096, 6000, 16384]))
def test_c_encoder_makes_the_reference_bytes(spans, level, stable, section_pages, min_zero, max_runs,
                                             page_address, sample_bytes) -> None:
    mem = _memory(spans)
    address = page_address * PAGE_SIZE
    params = dict(section_bytes=section_pages * PAGE_SIZE, min_zero_pages=min_zero, max_runs=max_runs,
                  stable=stable, sample_bytes=sample_bytes)
    zero_c, zero_ref = ZeroRanges(), ZeroRanges()
    c_encoder = PageEncoderC(level=level, zero_ranges=zero_c, **params)
    ref_encoder = _reference(level, zero_ranges=zero_ref, **params)
    _assert_same(c_encoder.encode(address, memoryview(mem)), ref_encoder.encode(address, memoryview(mem)))
    assert zero_c._ranges == zero_ref._ranges
    assert c_encoder.frames_judged_raw == ref_encoder.frames_judged_raw


def test_a_sample_that_does_not_compress_spares_the_frame_compression() -> None:
    noise, text = np.random.default_rng(7).bytes(64 * PAGE_SIZE), b"page of text " * (64 * PAGE_SIZE // 13 + 1)
    encoder = PageEncoderC(sample_bytes=16384, section_bytes=32 * PAGE_SIZE, stable=True)
    sections = encoder.encode(0, noise + text[:64 * PAGE_SIZE])
    kinds = [int(k) for s in sections for k in _descriptors(s).encoding]
    assert kinds == [2, 2, 3, 3] and encoder.frames_judged_raw == 2  # noise RAW unjudged, text compressed


def test_large_frames_of_every_kind_match_and_decode(tmp_path) -> None:
    """Frames of the default 4 MiB, random and compressible, decode to the memory they came from."""
    mem = bytearray(os.urandom(5 << 20)) + bytearray(3 << 20) + bytearray(b"kvmigrate" * ((6 << 20) // 9 + 1))[:6 << 20]
    c = PageEncoderC(stable=True).encode(1 << 32, mem)
    _assert_same(c, _reference(1, stable=True).encode(1 << 32, mem))
    decoder = PageDecoder(MemoryLayout((RamRange(1 << 32, len(mem)),)))
    got = bytearray(len(mem))
    for section in c:
        runs, totals = decoder.decode(b"".join(bytes(p) for p in section.parts))
        assert totals == section.totals
        for run in runs:
            if run.data is not None:
                got[run.address - (1 << 32):run.address - (1 << 32) + run.size] = run.data
    assert got == mem
    kinds = {r.encoding for s in c for r in _descriptors(s)}
    assert kinds == {1, 2, 3}  # ZERO, RAW and ZSTD all exercised


def _descriptors(section):
    head = bytes(section.parts[0])
    table = np.frombuffer(head, dtype=np.dtype([("address", "<u8"), ("pages", "<u4"), ("encoding", "u1"),
                                                ("pad", "V3"), ("payload_len", "<u4"), ("digest", "<u8")]),
                          offset=8)
    return table.view(np.recarray)


def test_c_and_python_zstd_frames_decode_alike() -> None:
    """Whatever zstd each library writes, the default reference (python-zstandard) and the C path
    decode to the same pages: interchangeable on the wire."""
    mem = _memory([("pattern", 30, 1), ("zero", 10, 0), ("random", 5, 2), ("one-byte", 20, 3)])
    layout = MemoryLayout((RamRange(0, len(mem)),))
    for sections in (PageEncoderC().encode(0, mem), PageEncoder().encode(0, mem)):
        got = bytearray(len(mem))
        for section in sections:
            runs, _ = PageDecoder(layout).decode(b"".join(bytes(p) for p in section.parts))
            for run in runs:
                if run.data is not None:
                    got[run.address:run.address + run.size] = run.data
        assert got == mem


def test_unaligned_or_empty_input() -> None:
    with pytest.raises(ValueError):
        PageEncoderC().encode(100, bytes(PAGE_SIZE))
    with pytest.raises(ValueError):
        PageEncoderC().encode(0, bytes(100))
    with pytest.raises(ValueError):
        PageEncoderC(section_bytes=100)
    assert PageEncoderC().encode(0, b"") == PageEncoder().encode(0, b"")


# --- the decoder: the same verdict as the reference on any body, hostile ones included ---------

BASE = 0x10_0000
_decompress = zstd_decompressor()
LAYOUT = MemoryLayout((RamRange(BASE, 48 * PAGE_SIZE), RamRange(BASE + 64 * PAGE_SIZE, 16 * PAGE_SIZE)))


def _verdict_reference(body: bytes, limits, prefill: bytes):
    """The reference's verdict, with the C side's libzstd: zstd versions differ in which damaged
    frames they call corrupt (seen: a flipped bit 1.5.7 refuses and 1.5.4 decodes to the right
    page), so the comparison is of the two decoders, not of two libraries."""
    hosts = [bytearray(prefill[:r.size]) for r in LAYOUT.ranges]
    try:
        runs, totals = PageDecoder(LAYOUT, limits, decompress=_decompress).decode(body, offset=1000)
    except FormatError as e:
        return _error_facts(e), None
    for run in runs:
        (i, r), = [(i, r) for i, r in enumerate(LAYOUT.ranges) if r.address <= run.address < r.end]
        at = run.address - r.address
        hosts[i][at:at + run.size] = bytes(run.size) if run.data is None else run.data
    return totals, hosts


def _verdict_c(body: bytes, limits, prefill: bytes):
    hosts = [bytearray(prefill[:r.size]) for r in LAYOUT.ranges]
    try:
        table, totals = PageDecoderC(LAYOUT, hosts, limits, populate=False).apply(body, offset=1000)
    except FormatError as e:
        return _error_facts(e), None
    for row in table[table["encoding"] == 1]:  # ZERO runs are the caller's to apply
        (i, r), = [(i, r) for i, r in enumerate(LAYOUT.ranges) if r.address <= int(row["address"]) < r.end]
        at = int(row["address"]) - r.address
        hosts[i][at:at + int(row["pages"]) * PAGE_SIZE] = bytes(int(row["pages"]) * PAGE_SIZE)
    return totals, hosts


def _error_facts(e: FormatError):
    # zstd's own words differ between the two libraries; the kind of error and where do not
    return (type(e).__name__, e.offset) if isinstance(e, DecompressionError) else (type(e).__name__, str(e))


def _valid_body(spans, first_page: int, compressor) -> bytes:
    mem = _memory(spans)[:40 * PAGE_SIZE]
    encoder = PageEncoder(section_bytes=64 * PAGE_SIZE, min_zero_pages=2, compress=compressor)
    return encoder.encode(BASE + first_page * PAGE_SIZE, mem)[0].body


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6), st.just(0)),
    st.tuples(st.just("append"), st.integers(1, 64), st.just(0)),
    st.tuples(st.just("field"), st.integers(0, 10**6), st.sampled_from([0, 1, 3, 4, 0xFF, 2**31, 2**32 - 1])),
    st.tuples(st.just("swap"), st.integers(0, 10**6), st.just(0)),  # two neighbours out of order
    st.tuples(st.just("grow"), st.integers(0, 10**6), st.integers(1, 3)),  # a run over its neighbour
    st.tuples(st.just("none"), st.just(0), st.just(0)),
)


def _mutate(body: bytes, mutation) -> bytes:
    what, at, value = mutation
    data = bytearray(body)
    if what == "flip":
        data[at % len(data)] ^= value
    elif what == "truncate":
        data = data[:at % len(data)]
    elif what == "append":
        data += bytes(at)
    elif what in ("swap", "grow"):
        runs = int.from_bytes(data[:4], "little")
        if runs >= 2 and len(data) >= 8 + 28 * runs:
            i = at % (runs - 1)
            a, b = 8 + 28 * i, 8 + 28 * (i + 1)
            if what == "swap":
                data[a:b], data[b:b + 28] = data[b:b + 28], data[a:b]
            else:
                pages = int.from_bytes(data[a + 8:a + 12], "little") + value
                data[a + 8:a + 12] = pages.to_bytes(4, "little")
    elif what == "field":  # a u32 of the header or run table set to a telling value
        table_end = min(len(data), 8 + 28 * int.from_bytes(data[:4], "little"))
        pos = (at % max(1, table_end // 4)) * 4
        data[pos:pos + 4] = value.to_bytes(4, "little")
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(spans=pages_strategy, first_page=st.sampled_from([0, 8, 30, 60, 64, 70]),
       mutation=mutations, zstd_of=st.sampled_from(["python", "c"]),
       limits=st.sampled_from([PageLimits(), PageLimits(max_runs=2), PageLimits(max_run_bytes=8 * PAGE_SIZE),
                               PageLimits(max_section_raw=12 * PAGE_SIZE)]))
def test_c_decoder_gives_the_reference_verdict(spans, first_page, mutation, zstd_of, limits) -> None:
    compressor = None if zstd_of == "python" else _compressors.setdefault(1, zstd_compressor(1))
    body = _mutate(_valid_body(spans, first_page, compressor), mutation)
    prefill = bytes(range(256)) * (48 * PAGE_SIZE // 256)
    assert _verdict_c(body, limits, prefill) == _verdict_reference(body, limits, prefill)


def test_c_decoder_refuses_before_writing_when_the_table_is_wrong() -> None:
    body = bytearray(_valid_body([("random", 4, 1)], 0, None))
    body[8 + 8:8 + 12] = (10**6).to_bytes(4, "little")  # the run claims a million pages
    host = bytearray(48 * PAGE_SIZE)
    with pytest.raises(PageRangeError):
        PageDecoderC(LAYOUT, [host, bytearray(16 * PAGE_SIZE)], populate=False).apply(bytes(body))
    assert not any(host)


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 9 << 20), picks=st.lists(st.integers(0, 5), max_size=8), seed=st.integers(0, 2**31))
def test_block_hashes_in_c_are_the_digest_definitions(size, picks, seed) -> None:
    mem = np.random.default_rng(seed).bytes(size)
    blocks = np.array([p % -(-size // DIGEST_BLOCK) for p in picks], dtype=np.uint64)
    assert block_hashes(mem, blocks).tolist() == [block_hash(memoryview(mem), int(b)) for b in blocks]


class _Region:
    def __init__(self, guest_base: int, size: int) -> None:
        self.guest_base, self.size, self.view = guest_base, size, memoryview(bytearray(size))


class _Memory:
    def __init__(self, layout: MemoryLayout) -> None:
        self.regions = [_Region(r.address, r.size) for r in layout.ranges]


def test_a_stream_reader_places_pages_in_c_and_refuses_what_it_refused() -> None:
    from formats import PagesRecord, StreamReader, StreamWriter
    from formats.schema import SchemaRegistry
    from migrate.datapath import place_pages

    mem = _memory([("random", 8, 1), ("zero", 5, 0), ("pattern", 20, 2), ("one-byte", 3, 3), ("zero", 12, 0)])
    assert len(mem) == 48 * PAGE_SIZE
    layout = MemoryLayout((RamRange(BASE, 48 * PAGE_SIZE), RamRange(BASE + 64 * PAGE_SIZE, 16 * PAGE_SIZE)))
    writer = StreamWriter(SchemaRegistry())
    stream = [writer.header(), *(writer.pages(s) for s in PageEncoderC().encode(BASE, mem[:48 * PAGE_SIZE]))]
    memory = _Memory(layout)
    memory.regions[0].view[:] = b"\xee" * (48 * PAGE_SIZE)  # the ZERO runs are the caller's to clear
    reader = StreamReader(SchemaRegistry(), memory=layout)
    place_pages(reader, memory)
    records = reader.feed(b"".join(stream))
    runs = [run for r in records if isinstance(r, PagesRecord) for run in r.runs]
    assert {run.placed for run in runs if run.data is None} == {True, False}  # data placed, ZERO not
    for run in runs:
        if not run.placed:
            memory.regions[0].view[run.address - BASE:run.address - BASE + run.size] = bytes(run.size)
    assert bytes(memory.regions[0].view) == bytes(mem[:48 * PAGE_SIZE])
    damaged = bytearray(b"".join(stream))
    damaged[-100] ^= 0x40  # in the last section's payload
    reader = StreamReader(SchemaRegistry(), memory=layout)
    place_pages(reader, _Memory(layout))
    with pytest.raises(FormatError):
        reader.feed(bytes(damaged))
    with pytest.raises(ValueError, match="no guest RAM region"):
        place_pages(StreamReader(SchemaRegistry(), memory=MemoryLayout((RamRange(0, PAGE_SIZE),))), memory)


def test_two_decoders_of_the_same_pages_into_one_buffer() -> None:
    """Post-copy's staging buffer is filled by two decoders at once (the push and the fetch
    channel may carry the same page). Shared, each decompresses and checks in a buffer of its own
    and no checksum ever fails. Decompressing in place (`shared=False`), one decoder reads what
    the other's zstd wrote past its position or reads back as its window: on the host this was
    written on, every run of this test then saw checksums fail (the post-copy test's rare
    `ChecksumError ... run 0`). Not asserted here, being a race: a quiet core may miss it."""
    shared = True
    import threading

    npages = 256
    rng = np.random.default_rng(7)
    # compressible but irregular (8-byte words from a small vocabulary): zstd copies short
    # matches, at varied offsets, all through the frame
    vocabulary = np.frombuffer(rng.bytes(8 * 16), dtype=np.uint64)
    memory = bytearray(vocabulary[rng.integers(0, 16, npages * PAGE_SIZE // 8)].tobytes())
    layout = MemoryLayout((RamRange(0, npages * PAGE_SIZE),))
    sections = PageEncoderC(level=1, stable=True).encode(0, memoryview(memory))
    bodies = [b"".join(bytes(p) for p in s.parts) for s in sections]
    host = bytearray(npages * PAGE_SIZE)
    failures: list[FormatError] = []
    start = threading.Barrier(2)

    def decode() -> None:
        decoder = PageDecoderC(layout, [host], populate=False, shared=shared)
        start.wait()
        for _ in range(150):
            for body in bodies:
                try:
                    decoder.apply(body)
                except FormatError as e:
                    failures.append(e)

    threads = [threading.Thread(target=decode) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == [] and host == memory
