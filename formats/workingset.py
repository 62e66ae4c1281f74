"""WORKING_SET: the pages a restored guest touched first, in the order it touched them (SPEC.md
section 11), so that a later lazy restore loads them before the rest (as REAP does).

A lazy restore that records writes it into its snapshot file, between the last PAGES section and
the MEMORY_INDEX: the file's tail (from there) is written anew, the index and END re-chained
after it (`formats.stream.StreamWriter.continuing`). Like the index it names the record before
it (`previous`), so that a reader from the end of the file checks its record too.

Pure and sans-IO: bytes in, a checked `WorkingSet` out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from .errors import FlagsError, PageRangeError, SizeMismatch, TruncatedError, VersionError
from .index import chained, check_before
from .layout import PAGE_SIZE, MemoryLayout

WORKING_SET_VERSION = 1
# version, reserved, page count, the recording's window (ms), reserved, previous record
WORKING_SET_HEAD = struct.Struct("<HHIIIQ")
assert WORKING_SET_HEAD.size == 24
SECTION = "working_set"


@dataclass(frozen=True, eq=False)
class WorkingSet:
    """Guest-physical page addresses in the order a guest first touched them (each once), over
    the first `window_ms` of its run; `previous` is where the record before this one begins."""

    pages: np.ndarray = field(repr=False)  # uint64
    window_ms: int
    previous: int

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WorkingSet):
            return NotImplemented
        return np.array_equal(self.pages, other.pages) and (self.window_ms, self.previous) == (
            other.window_ms, other.previous)


def encode_working_set(ws: WorkingSet) -> bytes:
    pages = np.asarray(ws.pages, dtype="<u8")
    return WORKING_SET_HEAD.pack(WORKING_SET_VERSION, 0, len(pages), ws.window_ms, 0, ws.previous) + pages.tobytes()


def decode_working_set(body: bytes | memoryview, offset: int, memory: MemoryLayout) -> WorkingSet:
    """The working set in `body` (the record at stream offset `offset`), checked as hostile: the
    length exact, every address a page inside `memory`, none twice, the record before it before
    it. A version this reader does not know is a `VersionError` (the section is skippable)."""
    view = memoryview(body).cast("B")
    at = offset + 16
    if len(view) < WORKING_SET_HEAD.size:
        raise TruncatedError(SECTION, at, WORKING_SET_HEAD.size, len(view))
    version, reserved, count, window_ms, reserved2, previous = WORKING_SET_HEAD.unpack_from(view)
    if version != WORKING_SET_VERSION:
        raise VersionError(version, WORKING_SET_VERSION, section=SECTION, offset=at)
    if reserved or reserved2:
        raise FlagsError(SECTION, at + 2, reserved or reserved2)
    if len(view) != WORKING_SET_HEAD.size + 8 * count:
        raise SizeMismatch(SECTION, at, WORKING_SET_HEAD.size + 8 * count, len(view), f"body of {count} pages")
    if not previous < offset:
        raise SizeMismatch(SECTION, at + 16, offset - 1, previous, "offset of the record before")
    pages = np.frombuffer(view, dtype="<u8", count=count, offset=WORKING_SET_HEAD.size).astype(np.uint64)
    bad = memory.first_outside(pages, np.ones(count, dtype=np.uint64))
    if bad >= 0:
        raise PageRangeError(int(pages[bad]), 1, "outside the memory layout or unaligned", section=SECTION,
                             offset=at + WORKING_SET_HEAD.size + 8 * bad)
    if len(np.unique(pages)) != count:
        first = int(np.flatnonzero(np.unique(pages, return_counts=True)[1] > 1)[0])
        raise PageRangeError(int(np.unique(pages)[first]), 1, "named twice", section=SECTION, offset=at)
    return WorkingSet(pages, window_ms, previous)


def page_addresses(pages: np.ndarray) -> np.ndarray:
    """Addresses as a working set keeps them: page-aligned, each once, in first-seen order."""
    aligned = np.asarray(pages, dtype=np.uint64) & ~np.uint64(PAGE_SIZE - 1)
    _, first = np.unique(aligned, return_index=True)
    return aligned[np.sort(first)]


def working_set_previous(record: bytes | memoryview) -> int:
    """The offset the (not yet checked) WORKING_SET record names for the record before it."""
    if len(record) < 16 + WORKING_SET_HEAD.size:
        return -1
    return int(WORKING_SET_HEAD.unpack_from(record, 16)[-1])


def check_working_set(previous_frame: bytes, record: bytes | memoryview, *, offset: int, kind: int, skippable: int,
                      after: tuple[tuple[int, int], ...], memory: MemoryLayout) -> WorkingSet:
    """The WORKING_SET record at `offset` checked against the frame of the record before it (as
    `formats.index.check_tail` checks the index), which must be one of `after` ((kind, flags)),
    then decoded."""
    _, before = chained(previous_frame, record, offset=offset, kind=kind, flags=skippable, section=SECTION)
    ws = decode_working_set(memoryview(record)[16:], offset, memory)
    check_before(ws.previous, before, offset, after, SECTION)
    return ws
