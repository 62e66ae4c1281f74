"""Guest pages in bulk: PAGES section bodies (the memory digest is `formats.digest`).

Body of a PAGES section (little-endian, see SPEC.md):

    u32 run_count, u32 reserved (0)
    run_count x RUN: u64 address, u32 pages, u8 encoding, 3 x u8 reserved,
                     u32 payload_len, u64 xxh3_64 of the run's uncompressed bytes (0 for ZERO)
    payloads, back to back, in run order (exactly; nothing after the last)

The encoder finds zero pages for a whole run at once with numpy (rows of 512 u64 per page,
`.any(axis=1)`, run boundaries from `np.diff`), keeps one zstd compressor for its lifetime and
hashes memoryviews (no copies). The decoder validates the whole run table against the caller's
`MemoryLayout` with numpy before decompressing or handing out anything.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from collections.abc import Callable
from typing import Protocol, cast

import numpy as np
import numpy.typing as npt
import xxhash
import zstandard

from .errors import (
    ChecksumError,
    DecompressionError,
    PageRangeError,
    SectionTooLarge,
    SizeMismatch,
    TrailingDataError,
    TruncatedError,
)
from .digest import ZeroRanges
from .layout import PAGE_SHIFT, PAGE_SIZE, MemoryLayout, as_bytes_view

_xxh3 = xxhash.xxh3_64_intdigest


class PageEncoding(enum.IntEnum):
    INVALID = 0  # a zeroed descriptor means nothing
    ZERO = 1  # no payload: the pages are all zero
    RAW = 2  # payload is the pages as they are
    ZSTD = 3  # payload is one zstd frame with its content size


BODY_HEADER = struct.Struct("<II")
RUN = struct.Struct("<QIB3xIQ")
RUN_DTYPE = np.dtype({
    "names": ["address", "pages", "encoding", "payload_len", "digest"],
    "formats": ["<u8", "<u4", "u1", "<u4", "<u8"],
    "offsets": [0, 8, 12, 16, 20],
    "itemsize": RUN.size,
})
assert RUN_DTYPE.itemsize == RUN.size == 28


@dataclass(frozen=True)
class PageTotals:
    pages: int = 0  # pages covered by runs, zero or not
    zero_pages: int = 0  # pages in ZERO runs
    raw_bytes: int = 0  # uncompressed bytes of RAW and ZSTD runs
    payload_bytes: int = 0  # bytes of payload actually carried

    def __add__(self, other: PageTotals) -> PageTotals:
        return PageTotals(self.pages + other.pages, self.zero_pages + other.zero_pages,
                          self.raw_bytes + other.raw_bytes,
                          self.payload_bytes + other.payload_bytes)


@dataclass(frozen=True)
class PageSection:
    """One encoded PAGES body and what it holds. The body stays in pieces (descriptors, then
    payloads that may be views of guest memory) so a transport can send it with one
    `sendmsg`/`writev` and no copy; `digest` is xxh3-64 of the joined body, computed by the
    encoder (in its own thread, when encoding in parallel)."""

    parts: tuple[bytes | memoryview, ...]
    length: int
    digest: int
    totals: PageTotals

    @property
    def body(self) -> bytes:
        return b"".join(self.parts)


@dataclass(frozen=True)
class PageRun:
    """Pages for the caller to write at `address`; `data` is None for zero pages. `placed`: a
    decoder that writes into the receiver's memory itself already put them there (checked), and
    the caller only accounts for them."""

    address: int
    count: int
    data: memoryview | None
    placed: bool = False

    @property
    def size(self) -> int:
        return self.count << PAGE_SHIFT


@dataclass(frozen=True)
class PageLimits:
    max_runs: int = 1 << 16  # runs per section
    max_run_bytes: int = 16 << 20  # uncompressed bytes of one RAW/ZSTD run
    max_section_raw: int = 64 << 20  # uncompressed bytes of all RAW/ZSTD runs of a section


def page_runs(mv: memoryview, min_zero_pages: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split page-aligned memory into alternating runs: (start page, end page, is_nonzero).

    Zero runs shorter than `min_zero_pages` are folded into their neighbours (a short hole in
    busy memory costs zstd almost nothing, a separate run costs a descriptor and a frame)."""
    n = len(mv) >> PAGE_SHIFT
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=bool)
    # (numpy's stubs say `any` may give a scalar; with an axis it is an array)
    nonzero = cast("npt.NDArray[np.bool_]", np.frombuffer(mv, dtype=np.uint64).reshape(n, PAGE_SIZE // 8).any(axis=1))
    edges = np.flatnonzero(nonzero[1:] != nonzero[:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [n]))
    kinds = nonzero[starts]
    if min_zero_pages > 1 and len(starts) > 1:
        kinds = kinds | ((ends - starts) < min_zero_pages)
        keep = np.concatenate(([True], kinds[1:] != kinds[:-1]))
        starts = starts[keep]
        ends = np.concatenate((starts[1:], [n]))
        kinds = kinds[keep]
    return starts, ends, kinds


def check_runs(table: np.ndarray, memory: MemoryLayout, limits: PageLimits, at: Callable[[int], int], *,
               section: str = "pages", ordered: bool = True) -> np.ndarray:
    """The checks every run descriptor gets wherever it is read (a PAGES run table, a memory
    index), in this order: a valid encoding; wholly inside one RAM range of `memory`, aligned,
    not empty; (`ordered`) after the end of the run before it; a ZERO run without payload or
    digest; a RAW payload of exactly its pages; at most `limits.max_run_bytes` of data. `table`
    has the fields address, pages, encoding, payload_len, digest; `at(i)` is run i's offset for
    the error. Returns each run's data bytes (0 for ZERO runs)."""
    addresses = table["address"].astype(np.uint64)
    counts = table["pages"].astype(np.uint64)
    encodings = table["encoding"]
    lengths = table["payload_len"].astype(np.uint64)
    digests = table["digest"]

    def run_error(i: int, detail: str) -> PageRangeError:
        return PageRangeError(int(addresses[i]), int(counts[i]), detail, section=section, offset=at(i))

    bad = np.flatnonzero((encodings < PageEncoding.ZERO) | (encodings > PageEncoding.ZSTD))
    if len(bad):
        raise run_error(int(bad[0]), f"invalid encoding {int(encodings[bad[0]])}")
    # Addresses first: nothing is decompressed for a section that points outside RAM.
    outside = memory.first_outside(addresses, counts)
    if outside >= 0:
        raise run_error(outside, "outside the memory layout, unaligned or empty")
    sizes = counts << np.uint64(PAGE_SHIFT)
    if ordered and len(table) > 1:
        overlap = np.flatnonzero(addresses[1:] < addresses[:-1] + sizes[:-1])
        if len(overlap):
            raise run_error(int(overlap[0]) + 1, "overlaps or precedes the previous run")
    zero = encodings == PageEncoding.ZERO
    bad = np.flatnonzero(zero & ((lengths != 0) | (digests != 0)))
    if len(bad):
        raise run_error(int(bad[0]), "ZERO run with a payload or digest")
    bad = np.flatnonzero((encodings == PageEncoding.RAW) & (lengths != sizes))
    if len(bad):
        i = int(bad[0])
        raise SizeMismatch(section, at(i), int(sizes[i]), int(lengths[i]), "RAW payload length")
    data_sizes = np.where(zero, np.uint64(0), sizes)
    bad = np.flatnonzero(data_sizes > np.uint64(limits.max_run_bytes))
    if len(bad):
        i = int(bad[0])
        raise SectionTooLarge(section, at(i), int(data_sizes[i]), limits.max_run_bytes)
    return data_sizes


class PageEncoder:
    """Encodes guest memory into PAGES section bodies. Not thread-safe (one zstd context):
    use one encoder per thread."""

    def __init__(self, level: int = 1, section_bytes: int = 4 << 20,
                 min_zero_pages: int = 4, max_runs: int = 4096,
                 limits: PageLimits | None = None, stable: bool = False,
                 zero_ranges: ZeroRanges | None = None,
                 compress: Callable[[bytes | memoryview], bytes] | None = None,
                 sample_bytes: int = 0) -> None:
        """`compress(frame)` makes one zstd frame with its content size (default: python-zstandard
        at `level`); `level` 0 sends every data frame RAW. `sample_bytes` > 0: a longer frame is
        compressed only if its first `sample_bytes` compress by 1/16 or more (SPEC.md §3), so
        memory zstd cannot shrink costs a sample, not a whole compression."""
        self.limits = limits or PageLimits()
        if not PAGE_SIZE <= section_bytes <= min(self.limits.max_run_bytes,
                                                 self.limits.max_section_raw):
            raise ValueError(f"section_bytes {section_bytes} outside the decoder's limits")
        self.level = level
        # Memory that may change while we read it (a running guest's) is copied once per run, and
        # the copy is what gets hashed, compressed and sent: the three then agree. `stable` memory
        # (a paused guest's) is used in place.
        self.stable = stable
        self.section_pages = section_bytes >> PAGE_SHIFT
        self.min_zero_pages = min_zero_pages
        self.max_runs = min(max_runs, self.limits.max_runs)
        if compress is None and level > 0:
            compress = zstandard.ZstdCompressor(level=level, write_content_size=True).compress
        self._compress = compress
        self.sample_bytes = sample_bytes
        self.frames_judged_raw = 0  # frames sent RAW because their sample did not compress
        # the zero runs found, for a digest that need not read them again (may be shared)
        self.zero_ranges = zero_ranges if zero_ranges is not None else ZeroRanges()

    def encode(self, address: int, pages: object) -> list[PageSection]:
        """Sections for the memory `pages` (any contiguous buffer, a multiple of the page size)
        that lives at guest-physical `address`."""
        mv = as_bytes_view(pages)
        if address % PAGE_SIZE or len(mv) % PAGE_SIZE:
            raise ValueError("address and length must be page aligned")
        starts, ends, kinds = page_runs(mv, self.min_zero_pages)
        sections: list[PageSection] = []
        runs: list[bytes] = []
        payloads: list[bytes | memoryview] = []
        raw_pages = pages_total = zero_pages = payload_bytes = 0

        def flush() -> None:
            nonlocal raw_pages, pages_total, zero_pages, payload_bytes
            if runs:
                head = b"".join([BODY_HEADER.pack(len(runs), 0), *runs])
                parts = (head, *payloads)
                h = xxhash.xxh3_64(head)
                for part in payloads:
                    h.update(part)
                sections.append(PageSection(parts, len(head) + payload_bytes, h.intdigest(),
                                            PageTotals(pages_total, zero_pages,
                                                       raw_pages << PAGE_SHIFT, payload_bytes)))
            runs.clear()
            payloads.clear()
            raw_pages = pages_total = zero_pages = payload_bytes = 0

        compress = self._compress
        step = self.section_pages
        for start, end, nonzero in zip(starts.tolist(), ends.tolist(), kinds.tolist()):
            if not nonzero:
                if len(runs) >= self.max_runs:
                    flush()
                count = end - start
                runs.append(RUN.pack(address + (start << PAGE_SHIFT), count,
                                     PageEncoding.ZERO, 0, 0))
                self.zero_ranges.add(address + (start << PAGE_SHIFT), count << PAGE_SHIFT)
                pages_total += count
                zero_pages += count
                continue
            for a in range(start, end, step):  # frames of at most one section's worth
                b = min(a + step, end)
                if raw_pages + (b - a) > step or len(runs) >= self.max_runs:
                    flush()
                raw: bytes | memoryview = mv[a << PAGE_SHIFT:b << PAGE_SHIFT]
                if not self.stable:
                    raw = bytes(raw)
                packed = compress(raw) if compress and self._worth_compressing(compress, raw) else raw
                if len(packed) < len(raw):
                    encoding, payload = PageEncoding.ZSTD, packed
                else:
                    encoding, payload = PageEncoding.RAW, raw
                runs.append(RUN.pack(address + (a << PAGE_SHIFT), b - a, encoding,
                                     len(payload), _xxh3(raw)))
                payloads.append(payload)
                raw_pages += b - a
                pages_total += b - a
                payload_bytes += len(payload)
        flush()
        return sections


    def _worth_compressing(self, compress: Callable[[bytes | memoryview], bytes],
                           frame: bytes | memoryview) -> bool:
        n = self.sample_bytes
        if not n or len(frame) <= n:
            return True
        if 16 * len(compress(frame[:n])) < 15 * n:
            return True
        self.frames_judged_raw += 1
        return False


class PageDecoding(Protocol):
    """What a `StreamReader` needs of a page decoder: the RAM it checks runs against, and
    `decode` with `PageDecoder`'s checks and errors (`migrate.datapath.PageDecoderC` is another)."""

    memory: MemoryLayout

    def decode(self, body: bytes | memoryview, offset: int = 0) -> tuple[list[PageRun], PageTotals]: ...


class PageDecoder:
    """Decodes PAGES bodies, refusing anything outside `memory`. One zstd context per stream."""

    def __init__(self, memory: MemoryLayout, limits: PageLimits | None = None,
                 decompress: Callable[[memoryview, int], bytes] | None = None) -> None:
        """`decompress(frame, size)` decompresses one zstd frame of at most `size` bytes, raising
        `ValueError` for anything but exactly one valid frame (default: python-zstandard)."""
        self.memory = memory
        self.limits = limits or PageLimits()
        if decompress is None:
            dctx = zstandard.ZstdDecompressor()

            def decompress(frame: memoryview, size: int) -> bytes:
                return dctx.decompress(frame, max_output_size=size, allow_extra_data=False)
        self._decompress_frame = decompress

    def check_table(self, body: bytes | memoryview, offset: int = 0) -> tuple[np.ndarray, PageTotals]:
        """Every check of `decode` that needs no payload read: the header, the run table
        (`check_runs`), the section's data and payload sizes. Returns the run table (RUN_DTYPE)
        and the section's totals."""
        lim = self.limits
        if len(body) < BODY_HEADER.size:
            raise TruncatedError("pages", offset, BODY_HEADER.size, len(body))
        count, reserved = BODY_HEADER.unpack_from(body)
        if reserved:
            raise SizeMismatch("pages", offset + 4, 0, reserved, "reserved field")
        if count > lim.max_runs:
            raise SectionTooLarge("pages", offset, count, lim.max_runs)
        table_end = BODY_HEADER.size + count * RUN.size
        if table_end > len(body):
            raise TruncatedError("pages", offset, table_end, len(body))
        table = np.frombuffer(body, dtype=RUN_DTYPE, count=count, offset=BODY_HEADER.size)
        data_sizes = check_runs(table, self.memory, lim, lambda i: offset + BODY_HEADER.size + i * RUN.size)
        raw_total = int(data_sizes.sum()) if count else 0
        if raw_total > lim.max_section_raw:
            raise SectionTooLarge("pages", offset, raw_total, lim.max_section_raw)
        counts = table["pages"].astype(np.uint64)
        zero = table["encoding"] == PageEncoding.ZERO
        payload_total = int(table["payload_len"].astype(np.int64).sum()) if count else 0
        if table_end + payload_total > len(body):
            raise TruncatedError("pages", offset, table_end + payload_total, len(body))
        if table_end + payload_total < len(body):
            raise TrailingDataError("pages", offset + table_end + payload_total,
                                    len(body) - table_end - payload_total)
        zero_pages = int(counts[zero].sum()) if count else 0
        return table, PageTotals(int(counts.sum()) if count else 0, zero_pages, raw_total, payload_total)

    def decode(self, body: bytes | memoryview, offset: int = 0) -> tuple[list[PageRun], PageTotals]:
        """All runs of one section, every check done before returning any. `offset` is the
        body's position in the stream, for error reports."""
        table, totals = self.check_table(body, offset)
        addresses = table["address"]
        counts = table["pages"].astype(np.uint64)
        encodings = table["encoding"]
        lengths = table["payload_len"].astype(np.int64)
        digests = table["digest"]
        table_end = BODY_HEADER.size + len(table) * RUN.size

        view = memoryview(body)
        runs: list[PageRun] = []
        pos = table_end
        decompress = self._decompress_frame
        for i, (addr, n, enc, length, digest) in enumerate(zip(
                addresses.tolist(), counts.tolist(), encodings.tolist(), lengths.tolist(),
                digests.tolist())):
            if enc == PageEncoding.ZERO:
                runs.append(PageRun(addr, n, None))
                continue
            payload = view[pos:pos + length]
            size = n << PAGE_SHIFT
            if enc == PageEncoding.ZSTD:
                data = memoryview(self._decompress(decompress, payload, size, offset + pos))
            else:
                data = payload
            found = _xxh3(data)
            if found != digest:
                raise ChecksumError(f"pages run {i} @{addr:#x}", offset + pos, digest, found)
            runs.append(PageRun(addr, n, data))
            pos += length
        return runs, totals

    @staticmethod
    def _decompress(decompress: Callable[[memoryview, int], bytes], payload: memoryview, size: int, offset: int) -> bytes:
        try:
            # The frame's declared size is checked before decompressing: python-zstandard
            # allocates what the frame header declares, whatever max_output_size says.
            declared = zstandard.frame_content_size(payload)
            if declared != size:
                raise SizeMismatch("pages", offset, size, declared,
                                   "zstd frame content size")
            out = decompress(payload, size)
        except (zstandard.ZstdError, ValueError) as exc:
            raise DecompressionError("pages", offset, str(exc)[:200]) from None
        if len(out) != size:
            raise SizeMismatch("pages", offset, size, len(out), "decompressed size")
        return out
