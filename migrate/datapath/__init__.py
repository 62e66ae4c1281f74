"""The migration data path in C: the per-byte work of a round, run without the interpreter lock.

`formats` is the specification and the reference; this package does the same work in C, for the
rounds of a live migration, where a Python-side loop or a library call that keeps the GIL stalls
the guest (every vCPU exit is handled in Python). `PageEncoderC` makes the same PAGES bodies as
`formats.PageEncoder`, byte for byte (tests/migrate/test_datapath.py). cffi releases the GIL for
the whole call: one call per run of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from formats import PageLimits, PageSection, PageTotals, ZeroRanges
from formats.layout import PAGE_SHIFT, PAGE_SIZE
from migrate.datapath._datapath import ffi, lib  # type: ignore[import-not-found]

_RUN_SIZE, _BODY_HEADER = 28, 8


class DataPathError(RuntimeError):
    """The C data path failed; `code` is its KVMIG_E* value."""

    _MEANINGS = {lib.KVMIG_ENOSPACE: "output buffers too small", lib.KVMIG_ECOMPRESS: "zstd error",
                 lib.KVMIG_EINVAL: "invalid parameters"}

    def __init__(self, operation: str, code: int) -> None:
        super().__init__(f"{operation}: {self._MEANINGS.get(code, f'error {code}')}")
        self.operation, self.code = operation, code


class _Cctx:
    """One zstd compression context (not thread-safe: one per encoder)."""

    def __init__(self) -> None:
        self.ptr = ffi.gc(lib.kvmig_zstd_cctx_new(), lib.kvmig_zstd_cctx_free)
        if self.ptr == ffi.NULL:
            raise MemoryError("ZSTD_createCCtx")


def _uninitialised(size: int) -> np.ndarray:
    return np.empty(max(size, 1), dtype=np.uint8)  # no zero fill: the C code writes what is read


@dataclass(frozen=True)
class EncodeBuffers:
    """The C encoder's output areas, sized for the worst case of `npages` (every page its own
    run and section); untouched parts of them cost nothing (np.empty does not fill)."""

    heads: np.ndarray
    payloads: np.ndarray
    scratch: np.ndarray
    sections: object  # kvmig_page_section[]
    zero_runs: np.ndarray

    @classmethod
    def for_pages(cls, npages: int, section_pages: int) -> EncodeBuffers:
        return cls(heads=_uninitialised(npages * (_RUN_SIZE + _BODY_HEADER) + _BODY_HEADER),
                   payloads=_uninitialised(npages * PAGE_SIZE),
                   scratch=_uninitialised(min(npages, section_pages) * PAGE_SIZE),
                   sections=ffi.new("kvmig_page_section[]", max(npages, 1)),
                   zero_runs=np.empty(2 * max(npages, 1), dtype=np.uint64))


class PageEncoderC:
    """`formats.PageEncoder` in C, with the same parameters and the same sections. Not
    thread-safe (one zstd context): one encoder per thread, as for the reference."""

    def __init__(self, level: int = 1, section_bytes: int = 4 << 20, min_zero_pages: int = 4,
                 max_runs: int = 4096, limits: PageLimits | None = None, stable: bool = False,
                 zero_ranges: ZeroRanges | None = None) -> None:
        self.limits = limits or PageLimits()
        if not PAGE_SIZE <= section_bytes <= min(self.limits.max_run_bytes, self.limits.max_section_raw):
            raise ValueError(f"section_bytes {section_bytes} outside the decoder's limits")
        self.level, self.stable = level, stable
        self.section_pages = section_bytes >> PAGE_SHIFT
        self.min_zero_pages = min_zero_pages
        self.max_runs = min(max_runs, self.limits.max_runs)
        self.zero_ranges = zero_ranges if zero_ranges is not None else ZeroRanges()
        self._cctx = _Cctx()

    def encode(self, address: int, pages: object) -> list[PageSection]:
        """Sections for the memory `pages` (a contiguous, page-multiple buffer) at `address`.
        Each section's parts are its head and its payloads, views of buffers this call made."""
        mem = memoryview(pages)  # type: ignore[arg-type]
        if not mem.contiguous:
            raise ValueError("pages must be a contiguous buffer")
        size = mem.nbytes
        if address % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError("address and length must be page aligned")
        npages = size >> PAGE_SHIFT
        if npages == 0:
            return []
        out = EncodeBuffers.for_pages(npages, self.section_pages)
        params = ffi.new("kvmig_page_params *", {
            "address": address, "npages": npages, "level": self.level, "stable": int(self.stable),
            "section_pages": self.section_pages, "min_zero_pages": self.min_zero_pages,
            "max_runs": self.max_runs})
        nzero = ffi.new("size_t *")
        count = lib.kvmig_encode_pages(
            self._cctx.ptr, ffi.from_buffer("uint8_t[]", mem), params,
            ffi.from_buffer("uint8_t[]", out.heads), out.heads.nbytes,
            ffi.from_buffer("uint8_t[]", out.payloads), out.payloads.nbytes,
            ffi.from_buffer("uint8_t[]", out.scratch), out.sections, len(out.sections),
            ffi.from_buffer("uint64_t[]", out.zero_runs), len(out.zero_runs) // 2, nzero)
        if count < 0:
            raise DataPathError("kvmig_encode_pages", count)
        for zero_address, zero_size in out.zero_runs[:2 * nzero[0]].reshape(-1, 2).tolist():
            self.zero_ranges.add(zero_address, zero_size)
        heads, payloads = memoryview(out.heads), memoryview(out.payloads)
        sections = []
        for s in out.sections[0:count]:
            parts = (heads[s.head_offset:s.head_offset + s.head_length],
                     payloads[s.payload_offset:s.payload_offset + s.payload_length])
            sections.append(PageSection(parts, s.head_length + s.payload_length, s.digest,
                                        PageTotals(s.pages, s.zero_pages, s.raw_bytes, s.payload_bytes)))
        return sections


def zstd_compressor(level: int):
    """A `compress(frame) -> bytes` over this module's libzstd, for the reference encoder
    (`formats.PageEncoder(compress=...)`), so both paths compress with the same library."""
    cctx = _Cctx()

    def compress(frame: bytes | memoryview) -> bytes:
        src = memoryview(frame).cast("B")
        dst = bytearray(len(src) + (len(src) >> 7) + 1024)  # >= ZSTD_compressBound
        n = lib.kvmig_zstd_compress(cctx.ptr, level, ffi.from_buffer("uint8_t[]", src), len(src),
                                    ffi.from_buffer("uint8_t[]", dst), len(dst))
        if n <= 0:
            raise DataPathError("kvmig_zstd_compress", lib.KVMIG_ECOMPRESS)
        return bytes(dst[:n])

    return compress
