"""PAGES bodies: bit-exact round trips, zero detection, and hostile run tables / payloads."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
import zstandard
from fmt_strategies import (
    LAYOUT,
    RAM,
    apply_pages,
    build_stream,
    make_registry,
    page_images,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import (
    ChecksumError,
    DecompressionError,
    FormatError,
    MemoryLayout,
    PageDecoder,
    PageEncoder,
    PageEncoding,
    PageRangeError,
    PagesRecord,
    SectionKind,
    SectionTooLarge,
    SizeMismatch,
    StreamReader,
    StreamWriter,
    TrailingDataError,
    page_runs,
)
from formats.pages import BODY_HEADER, RUN

REG = make_registry()


@settings(max_examples=120, deadline=None)
@given(page_images(), st.sampled_from([4096, 3 * 4096, 64 << 10]), st.integers(1, 5))
def test_random_memory_round_trips_bit_exact(mem: bytearray, section_bytes: int,
                                             min_zero: int) -> None:
    enc = PageEncoder(section_bytes=section_bytes, min_zero_pages=min_zero)
    dec = PageDecoder(RAM)
    out = bytearray(len(mem))
    total = 0
    for section in enc.encode(0, mem):
        runs, totals = dec.decode(section.body)
        assert totals == section.totals
        for run in runs:
            assert run.data is None or len(run.data) == run.size <= section_bytes
            out[run.address:run.address + run.size] = (
                bytes(run.size) if run.data is None else run.data)
        total += totals.pages
    assert out == mem and total == len(mem) // 4096


def test_zero_memory_is_one_zero_run_without_payload() -> None:
    sections = PageEncoder().encode(1 << 32, bytes(1 << 20))
    assert len(sections) == 1
    t = sections[0].totals
    assert (t.pages, t.zero_pages, t.raw_bytes, t.payload_bytes) == (256, 256, 0, 0)
    runs, _ = PageDecoder(RAM).decode(sections[0].body)
    assert [(r.address, r.count, r.data) for r in runs] == [(1 << 32, 256, None)]


def test_runs_are_found_in_bulk() -> None:
    mem = bytearray(10 * 4096)
    mem[2 * 4096] = 1
    mem[3 * 4096 + 100] = 1
    mem[9 * 4096 + 4095] = 1
    starts, ends, kinds = page_runs(memoryview(mem))
    assert list(zip(starts, ends, kinds)) == [(0, 2, False), (2, 4, True), (4, 9, False),
                                              (9, 10, True)]
    starts, ends, kinds = page_runs(memoryview(mem), min_zero_pages=6)
    assert list(zip(starts, ends, kinds)) == [(0, 10, True)]


def test_incompressible_pages_are_sent_raw() -> None:
    mem = np.random.default_rng(1).bytes(8 * 4096)
    (section,) = PageEncoder().encode(0, mem)
    assert section.totals.payload_bytes == len(mem)
    assert section.body[BODY_HEADER.size + 12] == PageEncoding.RAW


def _body(*runs: tuple[int, int, int, bytes, int | None], reserved: int = 0) -> bytes:
    table = b"".join(RUN.pack(a, n, e, len(p), xxhash.xxh3_64_intdigest(p) if d is None else d)
                     for a, n, e, p, d in runs)
    return BODY_HEADER.pack(len(runs), reserved) + table + b"".join(p for *_, p, _ in runs)


PAGE = b"\x5a" * 4096


@pytest.mark.parametrize("body, error", [
    (_body((0, 1, PageEncoding.RAW, PAGE, None), (1 << 20, 1, PageEncoding.RAW, PAGE, None)),
     PageRangeError),  # second run outside RAM: nothing from the first is returned
    (_body(((1 << 20) - 4096, 2, PageEncoding.ZERO, b"", 0)), PageRangeError),  # straddles the end
    (_body((12, 1, PageEncoding.RAW, PAGE, None)), PageRangeError),  # unaligned
    (_body((0, 0, PageEncoding.ZERO, b"", 0)), PageRangeError),  # empty
    (_body((8192, 1, PageEncoding.ZERO, b"", 0), (4096, 1, PageEncoding.ZERO, b"", 0)),
     PageRangeError),  # out of order
    (_body((0, 2, PageEncoding.ZERO, b"", 0), (4096, 1, PageEncoding.ZERO, b"", 0)),
     PageRangeError),  # overlapping
    (_body((0, 1, PageEncoding.INVALID, b"", 0)), PageRangeError),
    (_body((0, 1, 9, b"", 0)), PageRangeError),
    (_body((0, 1, PageEncoding.ZERO, b"x", 0)), PageRangeError),  # zero run with payload
    (_body((0, 1, PageEncoding.RAW, PAGE[:100], None)), SizeMismatch),
    (_body((0, 1, PageEncoding.RAW, PAGE, 1234)), ChecksumError),
    (_body((0, 1, PageEncoding.RAW, PAGE, None)) + b"junk", TrailingDataError),
    (_body((0, 1, PageEncoding.RAW, PAGE, None))[:-1], FormatError),
    (_body((0, 1, PageEncoding.RAW, PAGE, None), reserved=1), SizeMismatch),
    (BODY_HEADER.pack(1 << 20, 0), SectionTooLarge),  # more runs than the limit
    (BODY_HEADER.pack(5, 0), FormatError),  # run table missing
    (b"\x01", FormatError),
    (_body((0, 1, PageEncoding.ZSTD, b"\x28\xb5\x2f\xfd garbage", 0)), FormatError),
    (_body((0, 1, PageEncoding.ZSTD, zstandard.ZstdCompressor().compress(PAGE) + b"x", None)),
     DecompressionError),  # bytes after the frame
    (_body((0, 1, PageEncoding.ZSTD, zstandard.ZstdCompressor().compress(PAGE[:-1]), None)),
     SizeMismatch),
])
def test_hostile_bodies_are_refused(body: bytes, error: type) -> None:
    with pytest.raises(error):
        PageDecoder(RAM).decode(body)


def test_decompression_bomb_is_refused_before_decompressing() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(256 << 20))  # 256 MiB, ~8 KiB
    with pytest.raises(SizeMismatch) as err:
        PageDecoder(RAM).decode(_body((0, 1, PageEncoding.ZSTD, bomb, 0)))
    assert err.value.found == 256 << 20 and err.value.expected == 4096
    # Without a declared content size, the frame cannot say how big it is: refused too.
    hidden = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
    with pytest.raises(SizeMismatch):
        PageDecoder(RAM).decode(_body((0, 1, PageEncoding.ZSTD, hidden, 0)))
    # A run declaring more than the per-run cap is refused from its descriptor alone.
    big = MemoryLayout.of((0, 1 << 30))
    with pytest.raises(SectionTooLarge):
        PageDecoder(big).decode(_body((0, 1 << 16, PageEncoding.ZSTD, bomb, 0)))


def test_page_outside_the_layout_is_refused_before_any_page_is_yielded() -> None:
    mem = bytearray(64 * 4096)
    mem[::4096] = b"\x01" * 64
    good = build_stream(REG, mem)
    w = StreamWriter(REG)
    stream = [w.header(), w.layout(LAYOUT)]
    stream.append(w.section(SectionKind.PAGES, _body((0, 1, PageEncoding.RAW, PAGE, None),
                                                     (2 << 20, 1, PageEncoding.RAW, PAGE, None))))
    reader = StreamReader(REG, expected_layout=LAYOUT)
    records = []
    with pytest.raises(PageRangeError) as err:
        for chunk in stream:
            records += reader.feed(chunk)
    assert err.value.address == 2 << 20 and err.value.count == 1
    assert not any(isinstance(r, PagesRecord) for r in records)
    # and the same memory, properly placed, is accepted
    reader = StreamReader(REG, expected_layout=LAYOUT)
    assert apply_pages(reader.feed(good), len(mem)) == mem
