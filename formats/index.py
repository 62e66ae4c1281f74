"""MEMORY_INDEX: where each page of a snapshot file is, and what each 2 MiB block of its memory
hashes to (SPEC.md section 10), so that a reader can fetch any page without reading the file.

A snapshot's pages are spread over PAGES sections whose run tables sit at the start of each
body; finding one page means reading every section header and run table before it, and trusting
them means hashing every body (the record chain). The index, written once before END, says it
all in one record: every run of every PAGES section with the stream offset of its payload, and
the memory digest's block hashes (which combine into END's digest). A reader finds it from the
end of the file (`index_location`: END is the last 64 bytes, the index's footer the 16 before),
checks its record against the record before it and END against it (`check_tail`), and has
then, without reading a page: every run (its checksum comes with it) and every block's hash.

Pure and sans-IO like the rest of `formats`: bytes in, a checked `MemoryIndex` out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import xxhash

from .digest import DIGEST_BLOCK, block_count, combine_block_hashes
from .errors import (BadMagic, ChecksumError, DigestMismatch, FlagsError, SequenceError, SizeMismatch, TotalsMismatch,
                     TruncatedError, VersionError)
from .layout import MemoryLayout, RamRange
from .pages import BODY_HEADER, RUN, RUN_DTYPE, PageEncoding, PageLimits, check_runs

INDEX_VERSION = 1
INDEX_MAGIC = b"KVMIGIDX"
# version, reserved, block size, RAM ranges, runs, PAGES sections, reserved, data start, previous record
INDEX_HEAD = struct.Struct("<HHIIIIIQQ")
RANGE = struct.Struct("<QQ")
INDEX_FOOTER = struct.Struct("<Q8s")  # the body's own length, then the magic: found from the end
INDEX_RUN_DTYPE = np.dtype({
    "names": ["address", "pages", "encoding", "payload_offset", "payload_len", "digest"],
    "formats": ["<u8", "<u4", "u1", "<u8", "<u4", "<u8"],
    "offsets": [0, 8, 12, 16, 24, 32],
    "itemsize": 40,
})
assert INDEX_HEAD.size == 40 and INDEX_FOOTER.size == 16
SECTION = "memory_index"


@dataclass(frozen=True, eq=False)
class MemoryIndex:
    """A decoded MEMORY_INDEX. `runs` (INDEX_RUN_DTYPE) are the file's page runs in stream order
    (a later run wins over an earlier one for the same page), each with the stream offset of its
    payload; `block_hashes[i]` are RAM range i's digest block hashes; `data_start` is where the
    first PAGES record begins (the index's own offset when there is none) and `previous` where
    the record before the index begins."""

    memory: MemoryLayout
    runs: np.ndarray = field(repr=False)
    block_hashes: tuple[np.ndarray, ...] = field(repr=False)
    pages_sections: int
    data_start: int
    previous: int

    def digest(self) -> int:
        """The memory digest the block hashes make (END's, for a consistent file)."""
        return combine_block_hashes((r.address, r.size, h) for r, h in zip(self.memory.ranges, self.block_hashes,
                                                                            strict=True))

    def totals(self) -> tuple[int, int, int, int]:
        """(pages, zero pages, raw bytes, payload bytes) of the runs: END's page totals."""
        pages = self.runs["pages"].astype(np.int64)
        zero = self.runs["encoding"] == PageEncoding.ZERO
        return (int(pages.sum()), int(pages[zero].sum()), int(pages[~zero].sum()) * 4096,
                int(self.runs["payload_len"].astype(np.int64).sum()))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryIndex):
            return NotImplemented
        return (self.memory == other.memory and np.array_equal(self.runs, other.runs)
                and len(self.block_hashes) == len(other.block_hashes)
                and all(np.array_equal(a, b) for a, b in zip(self.block_hashes, other.block_hashes, strict=True))
                and (self.pages_sections, self.data_start, self.previous)
                == (other.pages_sections, other.data_start, other.previous))


def index_runs(table: np.ndarray) -> np.ndarray:
    """A new INDEX_RUN_DTYPE array of `table`'s fields (any dtype with them), its reserved bytes
    zero: numpy copies a structured array field by field and leaves the bytes between them as
    they happen to be, so bytes meant for a file are made this way."""
    runs = np.zeros(len(table), dtype=INDEX_RUN_DTYPE)
    for name in INDEX_RUN_DTYPE.names or ():
        if name in (table.dtype.names or ()):
            runs[name] = table[name]
    return runs


def encode_memory_index(index: MemoryIndex) -> bytes:
    """The MEMORY_INDEX body of `index`."""
    ranges = index.memory.ranges
    runs = index_runs(index.runs)
    hashes = [np.asarray(h, dtype="<u8") for h in index.block_hashes]
    if len(hashes) != len(ranges) or any(len(h) != block_count(r.size) for r, h in zip(ranges, hashes, strict=True)):
        raise ValueError("one block hash per digest block of each RAM range")
    parts = [INDEX_HEAD.pack(INDEX_VERSION, 0, DIGEST_BLOCK, len(ranges), len(runs), index.pages_sections, 0,
                             index.data_start, index.previous),
             *(RANGE.pack(r.address, r.size) for r in ranges), runs.tobytes(), *(h.tobytes() for h in hashes)]
    length = sum(len(p) for p in parts) + INDEX_FOOTER.size
    return b"".join(parts) + INDEX_FOOTER.pack(length, INDEX_MAGIC)


def decode_memory_index(body: bytes | memoryview, offset: int, limits: PageLimits | None = None) -> MemoryIndex:
    """The index in `body`, the body of the MEMORY_INDEX record at stream offset `offset` (its
    body at offset + 16), every field checked as hostile: the lengths add up exactly, the RAM
    ranges are a valid layout, each run passes the PAGES checks (`check_runs`, unordered: runs of
    different sections may cover the same page) and its payload lies after `data_start` and
    before the index, after the payload before it. A version this reader does not know is a
    `VersionError` (the section is skippable: a reader may then do without it)."""
    limits = limits or PageLimits()
    view = memoryview(body).cast("B")
    at = offset + 16
    if len(view) < INDEX_HEAD.size + INDEX_FOOTER.size:
        raise TruncatedError(SECTION, at, INDEX_HEAD.size + INDEX_FOOTER.size, len(view))
    version, reserved, block, nranges, nruns, sections, reserved2, data_start, previous = INDEX_HEAD.unpack_from(view)
    if version != INDEX_VERSION:
        raise VersionError(version, INDEX_VERSION, section=SECTION, offset=at)
    if reserved or reserved2:
        raise FlagsError(SECTION, at + 2, reserved or reserved2)
    if block != DIGEST_BLOCK:
        raise SizeMismatch(SECTION, at + 4, DIGEST_BLOCK, block, "digest block size")
    length, magic = INDEX_FOOTER.unpack_from(view, len(view) - INDEX_FOOTER.size)
    if magic != INDEX_MAGIC:
        raise BadMagic(INDEX_MAGIC, magic, offset=at + len(view) - 8)
    if length != len(view):
        raise SizeMismatch(SECTION, at + len(view) - INDEX_FOOTER.size, len(view), length, "index length")
    pos = INDEX_HEAD.size
    if len(view) < pos + nranges * RANGE.size + INDEX_FOOTER.size:
        raise TruncatedError(SECTION, at + pos, pos + nranges * RANGE.size + INDEX_FOOTER.size, len(view))
    pairs = [RANGE.unpack_from(view, pos + i * RANGE.size) for i in range(nranges)]
    try:
        memory = MemoryLayout(tuple(RamRange(a, s) for a, s in pairs))
    except ValueError as e:
        raise SizeMismatch(SECTION, at + pos, 0, nranges, f"RAM ranges: {e}") from None
    pos += nranges * RANGE.size
    blocks = sum(block_count(r.size) for r in memory.ranges)
    expected = pos + nruns * INDEX_RUN_DTYPE.itemsize + blocks * 8 + INDEX_FOOTER.size
    if expected != len(view):
        raise SizeMismatch(SECTION, at, expected, len(view), f"body of {nruns} runs and {blocks} block hashes")
    runs = index_runs(np.frombuffer(view, dtype=INDEX_RUN_DTYPE, count=nruns, offset=pos))
    run_at = at + pos
    if runs.tobytes() != bytes(view[pos:pos + runs.nbytes]):
        first = int(np.flatnonzero(np.frombuffer(runs.tobytes(), np.uint8) != np.frombuffer(
            view[pos:pos + runs.nbytes], np.uint8))[0])
        raise FlagsError(SECTION, run_at + first, int(view[pos + first]))
    check_runs(runs, memory, limits, lambda i: run_at + i * INDEX_RUN_DTYPE.itemsize, section=SECTION, ordered=False)
    _check_payloads(runs, sections, data_start, previous, offset, run_at)
    pos += nruns * INDEX_RUN_DTYPE.itemsize
    hashes, hashed = [], np.frombuffer(view, dtype="<u8", count=blocks, offset=pos)
    for r in memory.ranges:
        n = block_count(r.size)
        hashes.append(hashed[:n].astype(np.uint64))
        hashed = hashed[n:]
    return MemoryIndex(memory, runs, tuple(hashes), sections, data_start, previous)


def _check_payloads(runs: np.ndarray, sections: int, data_start: int, previous: int, index_offset: int,
                    run_at: int) -> None:
    """Every data run's payload after `data_start`, before the index, after the one before it;
    ZERO runs name no payload offset; the record before the index is after where data starts
    (the last PAGES section, or a working set after it) when there are PAGES sections."""
    ordered = data_start <= index_offset and previous < index_offset and (data_start <= previous or not sections)
    if not ordered or (len(runs) and not sections):
        raise SequenceError(SECTION, run_at, f"{sections} PAGES sections from {data_start}, the record before at "
                            f"{previous}, the index at {index_offset}: out of order")
    data = runs["encoding"] != PageEncoding.ZERO
    bad = np.flatnonzero(~data & (runs["payload_offset"] != 0))
    if len(bad):
        raise SizeMismatch(SECTION, run_at + int(bad[0]) * INDEX_RUN_DTYPE.itemsize, 0,
                           int(runs["payload_offset"][bad[0]]), "ZERO run's payload offset")
    starts = runs["payload_offset"][data].astype(np.uint64)
    ends = starts + runs["payload_len"][data].astype(np.uint64)
    rows = np.flatnonzero(data)
    floor = np.concatenate(([np.uint64(data_start)], ends[:-1]))
    bad = np.flatnonzero((starts < floor) | (ends > np.uint64(index_offset)))
    if len(bad):
        i = int(rows[bad[0]])
        raise SequenceError(SECTION, run_at + i * INDEX_RUN_DTYPE.itemsize,
                            f"run {i}'s payload [{int(starts[bad[0]])}, {int(ends[bad[0]])}) is not after the one "
                            f"before it, inside [{data_start}, {index_offset})")


def section_runs(head: bytes | memoryview, record_offset: int) -> np.ndarray:
    """The index entries of one PAGES record at stream offset `record_offset` whose body begins
    with `head` (its run count and run table, as the encoder made them: checked already)."""
    count, _ = BODY_HEADER.unpack_from(head)
    table = np.frombuffer(head, dtype=RUN_DTYPE, count=count, offset=BODY_HEADER.size)
    out = index_runs(table)
    lengths = table["payload_len"].astype(np.uint64)
    first = np.uint64(record_offset + 16 + BODY_HEADER.size + count * RUN.size)
    starts = first + np.concatenate(([np.uint64(0)], np.cumsum(lengths)[:-1])) if count else lengths
    out["payload_offset"] = np.where(table["encoding"] == PageEncoding.ZERO, np.uint64(0), starts)
    return out


# --- from the end of a file -------------------------------------------------------------------

END_RECORD_SIZE = 16 + 48
INDEX_TAIL = INDEX_FOOTER.size + END_RECORD_SIZE  # what `index_location` reads


@dataclass(frozen=True)
class IndexLocation:
    offset: int  # of the MEMORY_INDEX record (its 16-byte frame)
    length: int  # of its body


def index_location(tail: bytes | memoryview, file_size: int, max_section: int) -> IndexLocation | None:
    """Where the index of a file of `file_size` bytes is, from its last `INDEX_TAIL` bytes (the
    index's footer, then END's record); None when the file does not end that way (no index, or
    another version's). Nothing here is trusted yet: `check_tail` checks the records."""
    view = memoryview(tail).cast("B")
    if len(view) != INDEX_TAIL or file_size < INDEX_TAIL:
        return None
    length, magic = INDEX_FOOTER.unpack_from(view)
    if magic != INDEX_MAGIC or not INDEX_HEAD.size + INDEX_FOOTER.size <= length <= max_section:
        return None
    offset = file_size - END_RECORD_SIZE - 16 - length
    return IndexLocation(offset, length) if offset >= 0 else None


def record_check(frame: bytes | memoryview, body: bytes | memoryview, seed: int) -> int:
    """The check a record with this 16-byte frame and body must carry after a record whose check
    is `seed` (SPEC.md section 2)."""
    prefix = bytes(frame[:8])
    return xxhash.xxh3_64_intdigest(prefix + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)), seed)


def previous_record(index_record: bytes | memoryview) -> int:
    """The offset the (not yet checked) index record names for the record before it: where to
    read the frame whose check seeds the index's (`check_tail`)."""
    if len(index_record) < 16 + INDEX_HEAD.size:
        return -1
    return int(INDEX_HEAD.unpack_from(index_record, 16)[-1])


def chained(previous_frame: bytes, record: bytes | memoryview, *, offset: int, kind: int, flags: int,
            section: str) -> tuple[int, tuple[int, int, int]]:
    """`record` (frame and body, at stream offset `offset`) checked as the record after the one
    whose frame is `previous_frame` (its check seeds this one's), and of `kind` and `flags`:
    its check, and the previous frame's (kind, flags, length) for the caller to place it."""
    frame = bytes(record[:16])
    found_kind, found_flags, length, check = struct.unpack("<HHIQ", frame)
    if found_kind != kind or length != len(record) - 16:
        raise SequenceError(section, offset, f"a record of kind {found_kind}, {length} bytes, where it should be")
    if found_flags != flags:
        raise FlagsError(section, offset + 2, found_flags)
    prev_kind, prev_flags, prev_length, prev_check = struct.unpack("<HHIQ", previous_frame)
    found = record_check(frame, memoryview(record)[16:], prev_check)
    if found != check:
        raise ChecksumError(section, offset, check, found)
    return check, (prev_kind, prev_flags, prev_length)


def check_before(previous: int, frame: tuple[int, int, int], offset: int, allowed: tuple[tuple[int, int], ...],
                 section: str) -> None:
    """The record at `previous` (its frame's kind, flags, length) ends at `offset`, and is one of
    `allowed` (kind, flags)."""
    kind, flags, length = frame
    if previous + 16 + length != offset or (kind, flags) not in allowed:
        raise SequenceError(section, offset, f"the record before it, at {previous}, of kind {kind}, {length} bytes, "
                            f"does not end where it begins or is not of a kind that may be there")


def check_tail(previous_frame: bytes, index_record: bytes | memoryview, end_record: bytes, *, index_offset: int,
               index_kind: int, end_kind: int, skippable: int,
               after: tuple[tuple[int, int], ...]) -> tuple[MemoryIndex, tuple[int, ...]]:
    """The index record (frame and body) at `index_offset`, checked against the frame of the
    record before it (`previous_frame`: its check seeds the index's) and END's record against
    the index's check, without reading anything else of the stream; then the index decoded.
    The record before must be one of `after` ((kind, flags)) and end where the index begins.
    Returns the index and END's six
    fields (pages, zero pages, raw bytes, payload bytes, sections, digest), END's page totals
    and digest checked against the index's runs and block hashes. A flipped byte in any of the
    three frames, the index or END is a `ChecksumError`."""
    _, before = chained(previous_frame, index_record, offset=index_offset, kind=index_kind, flags=skippable,
                        section=SECTION)
    end_at = index_offset + len(index_record)
    if len(end_record) != END_RECORD_SIZE:
        raise TruncatedError("end", end_at, END_RECORD_SIZE, len(end_record))
    chained(bytes(index_record[:16]), end_record, offset=end_at, kind=end_kind, flags=0, section="end")
    index = decode_memory_index(memoryview(index_record)[16:], index_offset)
    check_before(index.previous, before, index_offset, after, SECTION)
    end = struct.unpack("<QQQQQQ", end_record[16:])
    for name, declared, counted in zip(("pages", "zero_pages", "raw_bytes", "payload_bytes"), end, index.totals(),
                                       strict=False):
        if declared != counted:
            raise TotalsMismatch(name, declared, counted, offset=end_at + 16)
    if index.digest() != end[5]:
        raise DigestMismatch(end[5], index.digest())
    return index, end
