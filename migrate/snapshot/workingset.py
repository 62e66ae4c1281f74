"""A recorded working set written into its snapshot file (formats/SPEC.md section 11).

The set goes between the file's last PAGES section and its MEMORY_INDEX, so everything from
there on is written anew: the WORKING_SET record, the index (naming it as the record before it),
END (one record more). The file is replaced whole, as a snapshot is written: a copy up to that
point (`copy_file_range`: the kernel copies, or shares the blocks where the filesystem can),
the new tail, fsync, then a rename over the old name. A reader that has the old file open keeps
reading the old one; a crash leaves the old file as it was.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import numpy as np

from formats import (DIGEST_BLOCK, SectionKind, StreamWriter, WorkingSet, encode_memory_index, encode_working_set,
                     page_addresses)
from formats.stream import END_BODY, FRAME, StreamLimits
from formats.tail import read_tail
from migrate.errors import SnapshotError
from migrate.records import Collected
from migrate.snapshot.files import open_snapshot

log = logging.getLogger(__name__)


def store_working_set(path: Path, pages: np.ndarray, window_ms: int) -> int:
    """Write `pages` (guest addresses, first touch first) as `path`'s working set, replacing any
    it had; returns the file's new size. `SnapshotError` for a file without an index (format 2.0
    or written without one), which has nowhere to keep it."""
    with open_snapshot(path) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        tail = read_tail(lambda offset, length: os.pread(fd, length, offset), size, StreamLimits().max_section)
        if tail is None:
            raise SnapshotError(path, "has no MEMORY_INDEX (format 2.0, or written without one): no place for a "
                                      "working set; take the snapshot again")
        seed = FRAME.unpack(os.pread(fd, FRAME.size, tail.before))[3]
        writer = StreamWriter.continuing(seed, tail.cut)
        ws = WorkingSet(page_addresses(pages), window_ms, tail.before)
        pages_, zero, raw, payload, sections, digest = tail.end
        new_tail = b"".join([
            writer.section(SectionKind.WORKING_SET, encode_working_set(ws), skippable=True),
            writer.section(SectionKind.MEMORY_INDEX, encode_memory_index(dataclasses.replace(
                tail.index, previous=tail.cut)), skippable=True),
            writer.section(SectionKind.END, END_BODY.pack(pages_, zero, raw, payload,
                                                          sections - tail.records + 2, digest)),
        ])
        tmp = path.with_name(f".{path.name}.working-set.tmp")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, os.fstat(fd).st_mode & 0o7777)
        try:
            copied = 0
            while copied < tail.cut:
                n = os.copy_file_range(fd, out, tail.cut - copied, copied, copied)
                if n <= 0:
                    raise SnapshotError(path, f"ended at byte {copied} while being copied")
                copied += n
            os.pwrite(out, new_tail, tail.cut)
            os.fsync(out)
        except BaseException:
            os.close(out)
            tmp.unlink(missing_ok=True)
            raise
        os.close(out)
    os.replace(tmp, path)
    log.info("%s: working set of %d pages (%d ms) stored", path, len(ws.pages), window_ms)
    return tail.cut + len(new_tail)


def describe_tail(loaded: Collected) -> dict[str, object]:
    """What `migrate inspect` says of a file's MEMORY_INDEX and WORKING_SET."""
    out: dict[str, object] = {}
    if loaded.index is not None:
        index = loaded.index
        out["memory_index"] = {"runs": len(index.runs), "pages_sections": index.pages_sections,
                               "blocks": sum(len(h) for h in index.block_hashes)}
    if loaded.working_set is not None:
        ws = loaded.working_set
        blocks = np.unique(ws.pages // np.uint64(DIGEST_BLOCK))
        out["working_set"] = {"pages": len(ws.pages), "blocks": len(blocks), "window_ms": ws.window_ms,
                              "first": [hex(int(a)) for a in ws.pages[:8]]}
    return out
