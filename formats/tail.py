"""A file's tail read from its end (SPEC.md sections 10 and 11): the MEMORY_INDEX, the
WORKING_SET before it if there is one, and END, each record checked against the one before it,
reading only them and the frame of the record before them. `read(offset, length)` is the
caller's (a `pread`): nothing here touches a file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .index import INDEX_TAIL, MemoryIndex, check_tail, index_location, previous_record
from .errors import SequenceError
from .stream import FLAG_SKIPPABLE, FRAME, HEADER, SectionKind
from .workingset import WorkingSet, check_working_set, working_set_previous

Read = Callable[[int, int], bytes]
# What the record before the working set and the index may be ((kind, flags)): the last PAGES
# section, or in a file without, the last state record
WORKING_SET = (SectionKind.WORKING_SET, FLAG_SKIPPABLE)
AFTER_STATE = tuple((kind, 0) for kind in (SectionKind.CONFIG, SectionKind.LAYOUT, SectionKind.VCPU,
                                           SectionKind.VM_STATE, SectionKind.DEVICE))
AFTER_PAGES = ((SectionKind.PAGES, 0),)


@dataclass(frozen=True)
class Tail:
    index: MemoryIndex
    end: tuple[int, ...]  # END's pages, zero pages, raw bytes, payload bytes, sections, digest
    index_offset: int
    working_set: WorkingSet | None
    cut: int  # where the tail's records begin (the working set's, or the index's): what a rewrite replaces

    @property
    def records(self) -> int:
        """Records from `cut` to END, END excluded."""
        return 1 + (self.working_set is not None)

    @property
    def before(self) -> int:
        """Offset of the record before the tail: its check seeds the first record of the tail."""
        return self.working_set.previous if self.working_set is not None else self.index.previous


def _frame_at(read: Read, offset: int, limit: int) -> bytes:
    """The 16-byte frame an unchecked offset names (one out of bounds reads the first record's:
    the check it seeds then fails)."""
    return read(offset if HEADER.size <= offset <= limit - FRAME.size else HEADER.size, FRAME.size)


def read_tail(read: Read, size: int, max_section: int) -> Tail | None:
    """The checked tail of a file of `size` bytes; None if it has no index (a 2.0 file, one
    written without, or a footer so damaged it is not found: a reader of the whole file then
    meets the damage in the record chain)."""
    if size < HEADER.size + INDEX_TAIL:
        return None
    tail = read(size - INDEX_TAIL, INDEX_TAIL)
    where = index_location(tail, size, max_section)
    if where is None or where.offset < HEADER.size:
        return None
    record = read(where.offset, FRAME.size + where.length)
    before = _frame_at(read, previous_record(record), where.offset)
    kind, _, length, _ = FRAME.unpack(before)
    index, end = check_tail(before, record, tail[INDEX_TAIL - 64:], index_offset=where.offset,
                            index_kind=SectionKind.MEMORY_INDEX, end_kind=SectionKind.END, skippable=FLAG_SKIPPABLE,
                            after=(WORKING_SET, *AFTER_PAGES, *AFTER_STATE))
    if kind != SectionKind.WORKING_SET:
        if (kind, 0) not in (AFTER_PAGES if index.pages_sections else AFTER_STATE):
            raise SequenceError("memory_index", where.offset, f"a record of kind {kind} before the index")
        return Tail(index, end, where.offset, None, where.offset)
    at = index.previous
    ws_record = before + read(at + FRAME.size, length)
    ws = check_working_set(_frame_at(read, working_set_previous(ws_record), at), ws_record, offset=at,
                           kind=SectionKind.WORKING_SET, skippable=FLAG_SKIPPABLE,
                           after=AFTER_PAGES if index.pages_sections else AFTER_STATE, memory=index.memory)
    return Tail(index, end, where.offset, ws, at)
