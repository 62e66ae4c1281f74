"""A lazy restore's page table: for each guest page, the run of the chain's files that holds it,
built and checked before the guest runs, without reading a page.

Each file of the chain (base first) is read up to its first PAGES section (header, CONFIG,
LAYOUT, vCPU, VM and device state: every record of it checked as a restore checks it). Its runs
then come from one of three places:

- its MEMORY_INDEX (format 2.1; `formats.index`): found from the end of the file, its record
  checked against the record before it and END's against it, END's page totals and digest
  against its runs and block hashes; a few KiB to read, whatever the memory size;
- a file without one (format 2.0, or written with `index=False`) has its run tables read: every
  record's body hashed for the record chain, the payloads skipped (nothing decompressed), so it
  costs a read of the file (no decompression, no copy), and its block hashes are unknown;
- a mappable file's `.mem` gives one RAW run per 2 MiB block holding data, checked by that
  block's hash from the index (a `.mem` of a file without an index is hashed here: a read of
  its data extents).

A page belongs to the newest file that has a run over it (a later run of one file to the later
run); a page in no file is zero. Runs of every file are one table (`LAZY_RUN_DTYPE`), and
`owner` maps every page to its run (-1: zero). The unit of loading is the memory digest's 2 MiB
block: each block's hash (the head's index) is checked when the block is loaded, and a block
with no data in any file must hash as zeros, which is checked here, before the guest runs.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import formats
from formats import (DIGEST_BLOCK, MemoryLayout, PageDecoder, PageEncoding, PageRun, PageTotals, SectionKind,
                     StreamReader, WorkingSet, zero_block_hashes)
from formats.index import section_runs
from formats.stream import FRAME, HEADER, StreamLimits
from formats.tail import Tail, read_tail
from hv.kvm.dirty import PAGE_SIZE
from migrate.datapath import block_hashes
from migrate.errors import SnapshotError
from migrate.records import EXPECT, Collected
from migrate.snapshot.files import MAX_CHAIN, READ_CHUNK, open_memory_file, open_snapshot
from migrate.state import MachineConfig, registry

PAGES_PER_BLOCK = DIGEST_BLOCK // PAGE_SIZE

# One run of the table: where its pages are (`source`: a file of `PageTable.sources`, `offset`
# and `length` of its payload there) and what its bytes hash to (`checked`: `digest` is known).
LAZY_RUN_DTYPE = np.dtype([("address", "<u8"), ("pages", "<u4"), ("encoding", "u1"), ("source", "<u2"),
                           ("offset", "<u8"), ("length", "<u4"), ("digest", "<u8"), ("checked", "?")])


@dataclass
class PageSource:
    """A file pages are read from (a snapshot, or a mappable one's `.mem`), open for `pread`."""

    path: Path
    fd: int
    # how its runs were found: "index", "read" (its run tables), "mem" (a .mem, by the index's block
    # hashes), "mem-hashed" (a .mem hashed here)
    found: str


@dataclass
class FileHead:
    """A snapshot file read up to its page data: its state records, checked."""

    path: Path
    config: MachineConfig
    collected: Collected
    data_start: int  # offset of the first record after the state (PAGES, WORKING_SET, MEMORY_INDEX or END)
    sections: int  # records before it
    size: int


@dataclass
class PageTable:
    memory: MemoryLayout
    sources: list[PageSource]
    runs: np.ndarray  # LAZY_RUN_DTYPE
    owner: np.ndarray  # int32 per page of `memory` (ranges back to back): its run, -1 (zero)
    block_hashes: np.ndarray | None  # uint64 per block (ranges back to back), the head's; None: unknown
    head: FileHead
    tail: Tail | None  # the head's index, working set and END; None: it has no index
    seconds: float  # to build it
    first_page: np.ndarray = field(init=False)  # of each range, in `owner`
    first_block: np.ndarray = field(init=False)  # of each range
    has_data: np.ndarray = field(init=False)  # bool per block: some page of it is data

    def __post_init__(self) -> None:
        pages = [r.size // PAGE_SIZE for r in self.memory.ranges]
        blocks = [formats.block_count(r.size) for r in self.memory.ranges]
        self.first_page = np.concatenate(([0], np.cumsum(pages)[:-1])).astype(np.int64)
        self.first_block = np.concatenate(([0], np.cumsum(blocks)[:-1])).astype(np.int64)
        data = self.data_pages()
        self.has_data = np.concatenate([_pad_blocks(data[p:p + n]).any(axis=1)
                                        for p, n in zip(self.first_page.tolist(), pages, strict=True)])

    @property
    def blocks(self) -> int:
        return len(self.has_data)

    def data_pages(self) -> np.ndarray:
        """bool per page: it is data (its run is not ZERO)."""
        data = self.owner >= 0
        data[data] = self.runs["encoding"][self.owner[data]] != PageEncoding.ZERO
        return data

    def block_span(self, block: int) -> tuple[int, int, int]:
        """(guest address, first page in `owner`, pages) of a block."""
        r = int(np.searchsorted(self.first_block, block, side="right")) - 1
        ram = self.memory.ranges[r]
        i = block - int(self.first_block[r])
        pages = min(PAGES_PER_BLOCK, ram.size // PAGE_SIZE - i * PAGES_PER_BLOCK)
        return ram.address + i * DIGEST_BLOCK, int(self.first_page[r]) + i * PAGES_PER_BLOCK, pages

    def block_of(self, address: int) -> int:
        return int(self.blocks_of(np.array([address], dtype=np.uint64))[0])

    def blocks_of(self, addresses: np.ndarray) -> np.ndarray:
        """The block of each guest address (all inside the RAM)."""
        starts = np.array([r.address for r in self.memory.ranges], dtype=np.uint64)
        r = np.searchsorted(starts, addresses, side="right") - 1
        return self.first_block[r] + ((addresses - starts[r]) // np.uint64(DIGEST_BLOCK)).astype(np.int64)

    @property
    def working_set(self) -> WorkingSet | None:
        return None if self.tail is None else self.tail.working_set

    def recorded_blocks(self) -> np.ndarray:
        """The blocks of the head's working set that hold data, in the order it names them."""
        ws = self.working_set
        if ws is None or not len(ws.pages):
            return np.zeros(0, dtype=np.int64)
        blocks = self.blocks_of(ws.pages)
        _, first = np.unique(blocks, return_index=True)
        ordered = blocks[np.sort(first)]
        return ordered[self.has_data[ordered]]

    def load_order(self) -> np.ndarray:
        """The blocks with data, in file order: by the first payload (file of the chain, then
        offset in it) any page of theirs is read from."""
        data = self.data_pages()
        key = np.full(len(self.owner), np.iinfo(np.int64).max, dtype=np.int64)
        runs = self.runs[self.owner[data]]
        key[data] = (runs["source"].astype(np.int64) << 44) | runs["offset"].astype(np.int64)
        keys = np.concatenate([_pad_blocks(key[p:p + r.size // PAGE_SIZE], np.iinfo(np.int64).max).min(axis=1)
                               for p, r in zip(self.first_page.tolist(), self.memory.ranges, strict=True)])
        blocks = np.flatnonzero(self.has_data)
        return blocks[np.argsort(keys[blocks], kind="stable")]

    def close(self) -> None:
        for source in self.sources:
            if source.fd >= 0:
                os.close(source.fd)
                source.fd = -1


def _pad_blocks(per_page: np.ndarray, fill: object = False) -> np.ndarray:
    """A per-page array as rows of a block's pages, the last row padded with `fill`."""
    rows = -(-len(per_page) // PAGES_PER_BLOCK)
    out = np.full(rows * PAGES_PER_BLOCK, fill, dtype=per_page.dtype)
    out[:len(per_page)] = per_page
    return out.reshape(rows, PAGES_PER_BLOCK)


# --- reading a file up to its pages ------------------------------------------------------------


def read_head(path: Path, config: MachineConfig, expected: formats.DeviceLayout) -> FileHead:
    """`path`'s records before its page data, fed to a checking reader one by one (the chain,
    versions, schemas, the layout against `expected`); stops at the first PAGES, WORKING_SET,
    MEMORY_INDEX or END record, unread."""
    reader = StreamReader(registry(), expected_layout=expected, expect=EXPECT, index=True)
    collected = Collected()
    stop = (SectionKind.PAGES, SectionKind.WORKING_SET, SectionKind.MEMORY_INDEX, SectionKind.END)
    with open_snapshot(path) as f:
        size = os.fstat(f.fileno()).st_size
        collected.take(reader.feed(f.read(HEADER.size)))
        at, sections = HEADER.size, 0
        while True:
            frame = f.read(FRAME.size)
            if len(frame) < FRAME.size:
                reader.feed(frame)
                reader.finish()  # a TruncatedError: the file ends before its END
            kind, _, length, _ = FRAME.unpack(frame)
            if kind in stop:
                break
            collected.take(reader.feed(frame))  # a length past the limit is refused here, before reading it
            left = length
            while left:
                chunk = f.read(min(left, READ_CHUNK))
                if not chunk:
                    reader.finish()
                left -= len(chunk)
                collected.take(reader.feed(chunk))
            at += FRAME.size + length
            sections += 1
    collected.need("CONFIG", "LAYOUT", "VCPU", "VM_STATE")
    return FileHead(path, config, collected, at, sections, size)


def read_index(f: int, head: FileHead) -> Tail | None:
    """The file's tail (MEMORY_INDEX, WORKING_SET, END), checked (`formats.read_tail`) and
    matched with its head (where its data starts, how many records it has, its RAM); None if
    the file has no index."""
    tail = read_tail(lambda offset, length: os.pread(f, length, offset), head.size, StreamLimits().max_section)
    if tail is None or tail.cut < head.data_start:
        return None
    index, end = tail.index, tail.end
    expected = head.sections + index.pages_sections + tail.records
    if index.data_start != head.data_start or end[4] != expected:
        raise formats.SequenceError("memory_index", tail.index_offset, f"the index says data starts at "
                                    f"{index.data_start} and END {end[4]} records; the file's data starts at "
                                    f"{head.data_start} and it has {expected}")
    if index.memory != head.collected.described()[1].memory:
        raise formats.LayoutMismatch([formats.MemoryDifference(head.collected.described()[1].memory, index.memory)])
    return tail


class _TablesOnly(PageDecoder):
    """A page decoder that checks each PAGES body's run table and sizes and keeps its index
    entries, reading no payload (the record chain still hashes every body)."""

    def __init__(self, memory: MemoryLayout) -> None:
        super().__init__(memory)
        self.entries: list[np.ndarray] = []

    def decode(self, body: bytes | memoryview, offset: int = 0) -> tuple[list[PageRun], PageTotals]:
        _, totals = self.check_table(body, offset)
        self.entries.append(section_runs(body, offset - FRAME.size))
        return [], totals


def read_run_tables(path: Path, head: FileHead, expected: formats.DeviceLayout) -> np.ndarray:
    """The index entries of a file without a MEMORY_INDEX, from its run tables: the whole file
    read through a checking reader (chain, totals; no payload decompressed)."""
    reader = StreamReader(registry(), expected_layout=expected, expect=EXPECT)
    tables = _TablesOnly(expected.memory)
    reader.decode_pages_with(tables)
    with open_snapshot(path) as f:
        while chunk := f.read(READ_CHUNK):
            reader.feed(chunk)
    reader.finish()
    return np.concatenate(tables.entries) if tables.entries else np.zeros(0, dtype=formats.INDEX_RUN_DTYPE)


# --- the runs of one file ----------------------------------------------------------------------


def _runs(entries: np.ndarray, source: int) -> np.ndarray:
    out = np.zeros(len(entries), dtype=LAZY_RUN_DTYPE)
    for name in ("address", "pages", "encoding", "digest"):
        out[name] = entries[name]
    out["offset"], out["length"] = entries["payload_offset"], entries["payload_len"]
    out["source"], out["checked"] = source, entries["encoding"] != PageEncoding.ZERO
    return out


def memory_file_runs(memory: MemoryLayout, hashes: np.ndarray, source: int) -> np.ndarray:
    """A mappable file's `.mem` as runs: one RAW run per block whose hash is not the zero
    block's, at the block's place in the file (RAM ranges back to back), checked by that hash."""
    blocks = np.flatnonzero(hashes != np.concatenate([zero_block_hashes(r.size) for r in memory.ranges]))
    out = np.zeros(len(blocks), dtype=LAZY_RUN_DTYPE)
    at = b0 = 0
    for ram in memory.ranges:
        n = formats.block_count(ram.size)
        mine = (blocks >= b0) & (blocks < b0 + n)
        i = (blocks[mine] - b0).astype(np.uint64)
        out["address"][mine] = ram.address + i * np.uint64(DIGEST_BLOCK)
        out["offset"][mine] = at + i * np.uint64(DIGEST_BLOCK)
        out["pages"][mine] = np.minimum(PAGES_PER_BLOCK, ram.size // PAGE_SIZE - i * np.uint64(PAGES_PER_BLOCK))
        at, b0 = at + ram.size, b0 + n
    out["length"] = out["pages"].astype(np.uint32) * PAGE_SIZE
    out["encoding"], out["source"], out["checked"] = PageEncoding.RAW, source, True
    out["digest"] = hashes[blocks]
    return out


def hash_memory_file(fd: int, memory: MemoryLayout) -> np.ndarray:
    """Block hashes of a `.mem` written without an index: its data extents read (mapped, in C),
    its holes hashed as zeros without reading them. Costs a read of what the guest had touched."""
    hashes, at = [], 0
    for ram in memory.ranges:
        out = zero_block_hashes(ram.size)
        data = np.zeros(len(out), dtype=bool)
        pos = at
        while pos < at + ram.size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            if start >= at + ram.size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), at + ram.size)
            data[(start - at) // DIGEST_BLOCK:-(-(end - at) // DIGEST_BLOCK)] = True
            pos = end
        blocks = np.flatnonzero(data)
        if len(blocks):
            with mmap.mmap(fd, ram.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=at) as mapped:
                out[blocks] = block_hashes(memoryview(mapped), blocks)
        hashes.append(out)
        at += ram.size
    return np.concatenate(hashes)


# --- the table ---------------------------------------------------------------------------------


def build_table(chain: list[tuple[Path, MachineConfig]], expected: formats.DeviceLayout) -> PageTable:
    """The page table of a chain (base first, the head last), every file's head and index
    checked; the files stay open (`PageTable.close`)."""
    if len(chain) > MAX_CHAIN:
        raise SnapshotError(chain[-1][0], f"an incremental chain longer than {MAX_CHAIN}")
    t0 = time.perf_counter()
    memory = expected.memory
    sources: list[PageSource] = []
    runs: list[np.ndarray] = []
    hashes: np.ndarray | None = None
    try:
        for path, config in chain:
            head = read_head(path, config, expected)
            hashes = None
            f = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            sources.append(PageSource(path, f, "read"))
            tail = read_index(f, head)
            if tail is not None:
                index = tail.index
                hashes = np.concatenate(index.block_hashes)
                sources[-1].found = "index"
                runs.append(_runs(index.runs, len(sources) - 1))
            else:
                runs.append(_runs(read_run_tables(path, head, expected), len(sources) - 1))
            if config.memory_file is not None:
                mem = open_memory_file(path, config.memory_file)
                sources.append(PageSource(path.parent / config.memory_file.path, mem, "mem"))
                if hashes is None:  # no index: hashed here, checked against END's digest
                    hashes = hash_memory_file(mem, memory)
                    sources[-1].found = "mem-hashed"
                    declared = _end_digest(path, expected)
                    if declared != (digest := formats.combine_block_hashes(_per_range(memory, hashes))):
                        raise formats.DigestMismatch(declared, digest)
                runs.append(memory_file_runs(memory, hashes, len(sources) - 1))
        table = PageTable(memory, sources, np.concatenate(runs), _owners(memory, runs), hashes, head, tail,
                          time.perf_counter() - t0)
        _check_zero_blocks(table)
    except BaseException:
        for source in sources:
            os.close(source.fd)
        raise
    table.seconds = time.perf_counter() - t0
    return table


def _per_range(memory: MemoryLayout, hashes: np.ndarray) -> list[tuple[int, int, np.ndarray]]:
    out, at = [], 0
    for ram in memory.ranges:
        n = formats.block_count(ram.size)
        out.append((ram.address, ram.size, hashes[at:at + n]))
        at += n
    return out


def _end_digest(path: Path, expected: formats.DeviceLayout) -> int:
    """END's digest of a file without an index (its records from the data on: few, no pages)."""
    reader = StreamReader(registry(), expected_layout=expected, expect=EXPECT)
    with open_snapshot(path) as f:
        while chunk := f.read(READ_CHUNK):
            reader.feed(chunk)
    reader.finish()
    assert reader.end is not None  # (finish() said the stream is whole)
    return reader.end.digest


def _owners(memory: MemoryLayout, runs: list[np.ndarray]) -> np.ndarray:
    """Each page's run: the files in order, a later file's run over an earlier one's; within a
    file, a later run over an earlier one (written run by run only where runs overlap)."""
    starts = np.array([r.address for r in memory.ranges], dtype=np.uint64)
    firsts = np.concatenate(([0], np.cumsum([r.size // PAGE_SIZE for r in memory.ranges])[:-1])).astype(np.int64)
    owner = np.full(memory.total_pages, -1, dtype=np.int32)
    base = 0
    for file_runs in runs:
        if not len(file_runs):
            continue
        addresses = file_runs["address"].astype(np.uint64)
        r = np.searchsorted(starts, addresses, side="right") - 1  # (every run lies in one range: checked)
        first = firsts[r] + ((addresses - starts[r]) // np.uint64(PAGE_SIZE)).astype(np.int64)
        counts = file_runs["pages"].astype(np.int64)
        ids = np.arange(base, base + len(file_runs), dtype=np.int32)
        pages = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
        ordered = np.argsort(first, kind="stable")
        if np.all(first[ordered][1:] >= (first + counts)[ordered][:-1]):  # no page twice: one write
            owner[pages] = np.repeat(ids, counts)
        else:
            newest = np.full(len(owner), -1, dtype=np.int32)
            np.maximum.at(newest, pages, np.repeat(ids, counts))
            owner[newest >= 0] = newest[newest >= 0]
        base += len(file_runs)
    return owner


def _check_zero_blocks(table: PageTable) -> None:
    """Blocks no file holds data for are zero: the head's block hashes must say so."""
    if table.block_hashes is None:
        return
    zero = np.concatenate([zero_block_hashes(r.size) for r in table.memory.ranges])
    bad = np.flatnonzero(~table.has_data & (table.block_hashes != zero))
    if len(bad):
        address, _, pages = table.block_span(int(bad[0]))
        raise SnapshotError(table.head.path, f"{len(bad)} blocks have no page in any file of the chain but do not "
                                             f"hash as zeros, the first {pages} pages at {address:#x}")
