"""The migration data path in C: the per-byte work of a round, run without the interpreter lock.

`formats` is the specification and the reference; this package does the same work in C, for the
rounds of a live migration, where a Python-side loop or a library call that keeps the GIL stalls
the guest (every vCPU exit is handled in Python). cffi releases the GIL for each call:

- `PageEncoderC` makes the PAGES bodies `formats.PageEncoder` makes, byte for byte;
- `PageDecoderC` checks a body as `formats.PageDecoder` does (the same refusals, the same errors)
  and writes its data runs straight into guest memory; `place_pages` puts it in a stream reader;
- `block_hashes` computes many of the memory digest's block hashes in one call.

tests/migrate/test_datapath.py proves each against the reference, both given the same libzstd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from formats import (
    ChecksumError,
    DecompressionError,
    FormatError,
    MemoryLayout,
    PageLimits,
    PageRangeError,
    PageRun,
    PageSection,
    PageTotals,
    SectionTooLarge,
    SizeMismatch,
    TrailingDataError,
    TruncatedError,
    ZeroRanges,
)
from formats import StreamReader
from formats.digest import DIGEST_BLOCK
from formats.layout import PAGE_SHIFT, PAGE_SIZE, as_bytes_view
from formats.pages import BODY_HEADER, RUN, RUN_DTYPE, PageEncoding
from migrate.datapath._datapath import ffi, lib
from migrate.errors import MigrateError

CData = Any  # a cffi struct, array or pointer: its fields are declared in C (pages.h), not here

if TYPE_CHECKING:
    from hv.kvm.memory import GuestMemory



class DataPathError(MigrateError):
    """The C data path failed; `code` is its KVMIG_E* value."""

    _MEANINGS = {lib.KVMIG_ENOSPACE: "output buffers too small", lib.KVMIG_ECOMPRESS: "zstd error",
                 lib.KVMIG_EINVAL: "invalid parameters"}

    def __init__(self, operation: str, code: int) -> None:
        super().__init__(f"{operation}: {self._MEANINGS.get(code, f'error {code}')}")
        self.operation, self.code = operation, code


class _Zstd:
    """A zstd context (not thread-safe: one per encoder or decoder)."""

    def __init__(self, new: Callable[[], CData], free: Callable[[CData], None], name: str) -> None:
        self.ptr = ffi.gc(new(), free)
        if self.ptr == ffi.NULL:
            raise MemoryError(name)


def _new_cctx() -> _Zstd:
    return _Zstd(lib.kvmig_zstd_cctx_new, lib.kvmig_zstd_cctx_free, "ZSTD_createCCtx")


def _uninitialised(size: int) -> np.ndarray:
    return np.empty(max(size, 1), dtype=np.uint8)  # no zero fill: the C code writes what is read


class _WorkAreas:
    """An encoder's own areas, kept from call to call (first touches of fresh memory are dear:
    ~6 us a page on nested hosts): scratch for one frame, and the tables the C side fills for
    one call (sections, payload pieces, zero runs), grown to the largest call so far."""

    def __init__(self, section_pages: int) -> None:
        self.scratch = _uninitialised(section_pages * PAGE_SIZE)
        self.capacity = 0
        self.sections: CData = ffi.NULL  # kvmig_page_section[capacity]
        self.pieces: CData = ffi.NULL  # kvmig_payload_piece[capacity]
        self.zero_runs = np.empty(0, dtype=np.uint64)

    def fit(self, npages: int) -> None:
        """Room for `npages` pages, each its own run, piece and section (the worst case)."""
        if npages > self.capacity:
            self.capacity = npages
            self.sections = ffi.new("kvmig_page_section[]", npages)
            self.pieces = ffi.new("kvmig_payload_piece[]", npages)
            self.zero_runs = np.empty(2 * npages, dtype=np.uint64)


class PageEncoderC:
    """`formats.PageEncoder` in C, with the same parameters and the same sections. Not
    thread-safe (one zstd context): one encoder per thread, as for the reference."""

    def __init__(self, level: int = 1, section_bytes: int = 4 << 20, min_zero_pages: int = 4,
                 max_runs: int = 4096, limits: PageLimits | None = None, stable: bool = False,
                 zero_ranges: ZeroRanges | None = None, sample_bytes: int = 0) -> None:
        self.limits = limits or PageLimits()
        if not PAGE_SIZE <= section_bytes <= min(self.limits.max_run_bytes, self.limits.max_section_raw):
            raise ValueError(f"section_bytes {section_bytes} outside the decoder's limits")
        self.level, self.stable = level, stable
        self.section_pages = section_bytes >> PAGE_SHIFT
        self.min_zero_pages = min_zero_pages
        self.max_runs = min(max_runs, self.limits.max_runs)
        self.zero_ranges = zero_ranges if zero_ranges is not None else ZeroRanges()
        self.sample_bytes = sample_bytes
        self.frames_judged_raw = 0  # frames sent RAW because their sample did not compress
        self._cctx = _new_cctx()
        self._work = _WorkAreas(self.section_pages)

    def encode(self, address: int, pages: object) -> list[PageSection]:
        """Sections for the memory `pages` (a contiguous, page-multiple buffer) at `address`.
        Each section's parts are its head and its payloads, views of buffers this call made."""
        mem = as_bytes_view(pages)
        size = mem.nbytes
        if address % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError("address and length must be page aligned")
        npages = size >> PAGE_SHIFT
        if npages == 0:
            return []
        work = self._work
        work.fit(npages)
        # what the sections are made of, theirs to keep: heads, and payloads that are not the
        # guest's own bytes (compressed frames; copies of memory that may change)
        heads = _uninitialised(npages * (RUN.size + BODY_HEADER.size) + BODY_HEADER.size)
        payloads = _uninitialised((npages if not self.stable or self.level > 0 else 0) * PAGE_SIZE)
        params = ffi.new("kvmig_page_params *", {
            "address": address, "npages": npages, "level": self.level, "stable": int(self.stable),
            "section_pages": self.section_pages, "min_zero_pages": self.min_zero_pages,
            "max_runs": self.max_runs, "sample_bytes": self.sample_bytes})
        nzero, judged_raw = ffi.new("size_t *"), ffi.new("uint64_t *")
        count = lib.kvmig_encode_pages(
            self._cctx.ptr, ffi.from_buffer("uint8_t[]", mem), params,
            ffi.from_buffer("uint8_t[]", heads), heads.nbytes,
            ffi.from_buffer("uint8_t[]", payloads), payloads.nbytes if payloads.size > 1 else 0,
            ffi.from_buffer("uint8_t[]", work.scratch), work.sections, work.capacity,
            work.pieces, work.capacity,
            ffi.from_buffer("uint64_t[]", work.zero_runs), work.capacity, nzero, judged_raw)
        if count < 0:
            raise DataPathError("kvmig_encode_pages", count)
        self.frames_judged_raw += judged_raw[0]
        for zero_address, zero_size in work.zero_runs[:2 * nzero[0]].reshape(-1, 2).tolist():
            self.zero_ranges.add(zero_address, zero_size)
        sources = (payloads.data, mem.cast("B") if mem.format != "B" or mem.ndim != 1 else mem)
        head_view = heads.data
        sections = []
        for s in work.sections[0:count]:
            pieces = work.pieces[s.first_piece:s.first_piece + s.pieces]
            parts = (head_view[s.head_offset:s.head_offset + s.head_length],
                     *(sources[p.in_guest][p.offset:p.offset + p.length] for p in pieces))
            sections.append(PageSection(parts, s.head_length + s.payload_bytes, s.digest,
                                        PageTotals(s.pages, s.zero_pages, s.raw_bytes, s.payload_bytes)))
        return sections


def place_pages(reader: StreamReader, memory: GuestMemory) -> None:
    """Have `reader` (its memory layout known) write the data runs of every PAGES section
    straight into the guest RAM `memory`, in C. Only for memory no guest runs on yet."""
    layout = reader.page_memory
    if layout is None:
        raise ValueError("the reader knows no memory layout yet")
    by_base = {r.guest_base: r for r in memory.regions}
    hosts = []
    for ram in layout.ranges:
        region = by_base.get(ram.address)
        if region is None or region.size != ram.size:
            raise ValueError(f"no guest RAM region of {ram.size:#x} bytes at {ram.address:#x}")
        hosts.append(region.view)
    reader.decode_pages_with(PageDecoderC(layout, hosts))


def zstd_decompressor() -> Callable[[memoryview, int], bytes]:
    """A `decompress(frame, size) -> bytes` over this module's libzstd, for the reference decoder
    (`formats.PageDecoder(decompress=...)`): zstd versions differ in which damaged frames they
    call corrupt, so only one library can show the two decoders judge every body alike."""
    dctx = _Zstd(lib.kvmig_zstd_dctx_new, lib.kvmig_zstd_dctx_free, "ZSTD_createDCtx")

    def decompress(frame: memoryview, size: int) -> bytes:
        src = memoryview(frame).cast("B")
        dst = bytearray(size)
        n = lib.kvmig_zstd_decompress(dctx.ptr, ffi.from_buffer("uint8_t[]", src), len(src),
                                      ffi.from_buffer("uint8_t[]", dst), size)
        if n < 0:
            raise ValueError("not one valid zstd frame")
        return bytes(dst[:n])

    return decompress


def block_hashes(memory: object, blocks: np.ndarray, block: int = DIGEST_BLOCK) -> np.ndarray:
    """`formats.digest.block_hash(memory, i)` for every block index in `blocks`, in one call
    (a pass over many blocks holds the GIL for none of them). Out-of-range blocks hash as empty."""
    mem = as_bytes_view(memory)
    index = np.ascontiguousarray(blocks, dtype=np.uint64)
    out = np.empty(len(index), dtype=np.uint64)
    if len(index):
        lib.kvmig_block_hashes(ffi.from_buffer("uint8_t[]", mem), mem.nbytes, block,
                               ffi.from_buffer("uint64_t[]", index), len(index), ffi.from_buffer("uint64_t[]", out))
    return out


def zstd_compressor(level: int) -> Callable[[bytes | memoryview], bytes]:
    """A `compress(frame) -> bytes` over this module's libzstd, for the reference encoder
    (`formats.PageEncoder(compress=...)`), so both paths compress with the same library."""
    cctx = _new_cctx()

    def compress(frame: bytes | memoryview) -> bytes:
        src = memoryview(frame).cast("B")
        dst = bytearray(len(src) + (len(src) >> 7) + 1024)  # >= ZSTD_compressBound
        n = lib.kvmig_zstd_compress(cctx.ptr, level, ffi.from_buffer("uint8_t[]", src), len(src),
                                    ffi.from_buffer("uint8_t[]", dst), len(dst))
        if n <= 0:
            raise DataPathError("kvmig_zstd_compress", lib.KVMIG_ECOMPRESS)
        return bytes(dst[:n])

    return compress


class PageDecoderC:
    """`formats.PageDecoder` in C, writing each data run straight into guest memory.

    `hosts` are writable buffers, one per RAM range of `memory`, holding that range's bytes. A
    body is refused with the error the reference raises for it (same type and facts), the whole
    run table checked before any payload is read; a run failing its checksum after earlier runs
    were written leaves those written, so only memory no guest runs on yet may be given (a
    migration target's before it starts, a restore's staging RAM). ZERO runs are not written:
    the caller gives those pages back to the host, from the run table `apply` returns.

    `shared`: other decoders write the same hosts at the same time (post-copy's staging, filled
    by the push and the fetch channel, which may both carry a page): each compressed run is
    then decompressed and checked in this decoder's own buffer and copied in whole, so no
    decoder reads bytes another is half-way through writing (pages.c says why that matters)."""

    def __init__(self, memory: MemoryLayout, hosts: Sequence[object], limits: PageLimits | None = None, *,
                 populate: bool = True, shared: bool = False) -> None:
        if len(hosts) != len(memory.ranges):
            raise ValueError(f"{len(hosts)} host buffers for {len(memory.ranges)} RAM ranges")
        self.memory, self.limits = memory, limits or PageLimits()
        views = [as_bytes_view(h) for h in hosts]
        for r, v in zip(memory.ranges, views, strict=True):
            if v.readonly or v.nbytes != r.size:
                raise ValueError(f"host buffer for {r.address:#x}: {v.nbytes} bytes, writable {not v.readonly}; "
                                 f"the range has {r.size}")
        self._views = views  # kept alive: the C side holds pointers into them
        self._ranges = ffi.new("kvmig_ram_range[]", [
            {"address": r.address, "size": r.size, "host": ffi.from_buffer("uint8_t[]", v, require_writable=True)}
            for r, v in zip(memory.ranges, views, strict=True)])
        self._limits = ffi.new("kvmig_page_limits *", {
            "max_runs": self.limits.max_runs, "max_run_bytes": self.limits.max_run_bytes,
            "max_section_raw": self.limits.max_section_raw})
        self._populate = int(populate)
        # a run's size at most; untouched pages of it cost nothing
        self._scratch = _uninitialised(self.limits.max_run_bytes) if shared else None
        self._scratch_ptr = ffi.from_buffer("uint8_t[]", self._scratch) if shared else ffi.NULL
        self._dctx = _Zstd(lib.kvmig_zstd_dctx_new, lib.kvmig_zstd_dctx_free, "ZSTD_createDCtx")

    def apply(self, body: bytes | memoryview, offset: int = 0) -> tuple[np.ndarray, PageTotals]:
        """Check `body` and write its data runs; its run table (RUN_DTYPE) and totals.
        `offset` is the body's position in the stream, for error reports."""
        totals = ffi.new("kvmig_page_totals *")
        err = ffi.new("kvmig_decode_error *")
        count = lib.kvmig_decode_pages(self._dctx.ptr, ffi.from_buffer("uint8_t[]", body), len(body),
                                       self._ranges, len(self.memory.ranges), self._limits,
                                       self._populate, self._scratch_ptr,
                                       0 if self._scratch is None else self._scratch.nbytes, totals, err)
        if count < 0:
            raise self._error(body, offset, err)
        table = np.frombuffer(body, dtype=RUN_DTYPE, count=count, offset=BODY_HEADER.size)
        return table, PageTotals(totals.pages, totals.zero_pages, totals.raw_bytes, totals.payload_bytes)

    def decode(self, body: bytes | memoryview, offset: int = 0) -> tuple[list[PageRun], PageTotals]:
        """As `formats.PageDecoder.decode`, for a `StreamReader` (`decode_pages_with`): the data
        runs come back `placed` (already in guest memory), the ZERO runs for the caller to apply."""
        table, totals = self.apply(body, offset)
        runs = [PageRun(address, pages, None, placed=encoding != PageEncoding.ZERO)
                for address, pages, encoding in zip(table["address"].tolist(), table["pages"].tolist(),
                                                    table["encoding"].tolist())]
        return runs, totals

    def _error(self, body: bytes | memoryview, offset: int, err: CData) -> FormatError:
        """The reference decoder's error for the check that refused the body."""
        at = offset + err.offset
        run_at = offset + BODY_HEADER.size + err.run * RUN.size
        if err.run >= 0:
            address, pages, encoding, _, digest = RUN.unpack_from(body, BODY_HEADER.size + err.run * RUN.size)
        code = err.code
        if code == lib.KVMIG_DEC_TRUNCATED:
            return TruncatedError("pages", at, err.expected, err.found)
        if code == lib.KVMIG_DEC_RESERVED:
            return SizeMismatch("pages", at, 0, err.found, "reserved field")
        if code in (lib.KVMIG_DEC_TOO_MANY_RUNS, lib.KVMIG_DEC_SECTION_TOO_LARGE):
            return SectionTooLarge("pages", at, err.found, err.expected)
        range_details = {lib.KVMIG_DEC_ENCODING: f"invalid encoding {err.found}",
                         lib.KVMIG_DEC_OUTSIDE: "outside the memory layout, unaligned or empty",
                         lib.KVMIG_DEC_OVERLAP: "overlaps or precedes the previous run",
                         lib.KVMIG_DEC_ZERO_PAYLOAD: "ZERO run with a payload or digest"}
        if code in range_details:
            return PageRangeError(address, pages, range_details[code], section="pages", offset=run_at)
        if code == lib.KVMIG_DEC_RAW_LENGTH:
            return SizeMismatch("pages", run_at, err.expected, err.found, "RAW payload length")
        if code == lib.KVMIG_DEC_RUN_TOO_LARGE:
            return SectionTooLarge("pages", run_at, err.found, err.expected)
        if code == lib.KVMIG_DEC_TRAILING:
            return TrailingDataError("pages", at, err.found)
        if code == lib.KVMIG_DEC_ZSTD:
            return DecompressionError("pages", at, "not one valid zstd frame")
        if code == lib.KVMIG_DEC_FRAME_SIZE:
            found = -1 if err.found == 2**64 - 1 else err.found
            return SizeMismatch("pages", at, err.expected, found, "zstd frame content size")
        if code == lib.KVMIG_DEC_DECOMPRESSED_SIZE:
            return SizeMismatch("pages", at, err.expected, err.found, "decompressed size")
        if code == lib.KVMIG_DEC_CHECKSUM:
            return ChecksumError(f"pages run {err.run} @{address:#x}", at, err.expected, err.found)
        raise DataPathError("kvmig_decode_pages", code)


class RunDecoder:
    """One page run's payload to its bytes, checked (a lazy restore fetches runs one by one, by
    their MEMORY_INDEX entry): a ZSTD frame decompressed into `out`, which must come out exactly
    `out`'s size; the xxh3-64 of the bytes returned for the caller to compare with the run's
    digest. In C, the GIL released per call. One zstd context: one decoder per thread."""

    def __init__(self) -> None:
        self._dctx = _Zstd(lib.kvmig_zstd_dctx_new, lib.kvmig_zstd_dctx_free, "ZSTD_createDCtx")

    def decompress(self, frame: memoryview, out: memoryview, offset: int) -> None:
        """`frame` (one zstd frame, at stream offset `offset`) into `out`, filling it exactly."""
        n = lib.kvmig_zstd_decompress(self._dctx.ptr, ffi.from_buffer("uint8_t[]", frame), len(frame),
                                      ffi.from_buffer("uint8_t[]", out, require_writable=True), len(out))
        if n < 0:
            raise DecompressionError("pages", offset, "not one valid zstd frame of the run's size")
        if n != len(out):
            raise SizeMismatch("pages", offset, len(out), n, "decompressed size")

    @staticmethod
    def digest(data: memoryview) -> int:
        return int(lib.kvmig_xxh3(ffi.from_buffer("uint8_t[]", data), len(data)))
