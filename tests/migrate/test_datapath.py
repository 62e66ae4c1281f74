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

from formats import MemoryLayout, PageDecoder, PageEncoder, ZeroRanges
from formats.layout import PAGE_SIZE, RamRange
from migrate.datapath import PageEncoderC, zstd_compressor

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
       max_runs=st.sampled_from([1, 2, 3, 4096]), page_address=st.integers(0, 2**30))
def test_c_encoder_makes_the_reference_bytes(spans, level, stable, section_pages, min_zero, max_runs,
                                             page_address) -> None:
    mem = _memory(spans)
    address = page_address * PAGE_SIZE
    params = dict(section_bytes=section_pages * PAGE_SIZE, min_zero_pages=min_zero, max_runs=max_runs,
                  stable=stable)
    zero_c, zero_ref = ZeroRanges(), ZeroRanges()
    c = PageEncoderC(level=level, zero_ranges=zero_c, **params).encode(address, memoryview(mem))
    ref = _reference(level, zero_ranges=zero_ref, **params).encode(address, memoryview(mem))
    _assert_same(c, ref)
    assert zero_c._ranges == zero_ref._ranges


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
