"""A lazy restore's unit of loading: one 2 MiB block of guest memory (the memory digest's block),
its bytes assembled from the snapshot's files as the page table says and checked, by a reader of
the thread that loads it (`migrate.snapshot.lazy` places them).

A block's pages come from the runs that own them (a run is read whole, with one pread, and
decompressed once: the reader keeps the last two, since a 4 MiB run spans up to three blocks),
zero where no run has data. The block is then checked by its hash from the head's MEMORY_INDEX;
a run's own checksum is checked only when the block fails (to name the file at fault: a damaged
page that a newer file overrides harms nothing) or when there are no block hashes (a file of
format 2.0).
"""

from __future__ import annotations

import os

import numpy as np

import formats
from formats import DIGEST_BLOCK, PageEncoding
from hv.kvm.dirty import PAGE_SIZE
from hv.kvm.memory import anonymous_ram
from migrate.datapath import RunDecoder
from migrate.snapshot.pagetable import PageTable


class BadRun(Exception):
    """A run failed its check: which one (in the page table), and why."""

    def __init__(self, run: int, error: formats.FormatError) -> None:
        super().__init__(str(error))
        self.run, self.error = run, error


def _buffer(size: int) -> np.ndarray:
    """Bytes for a reader, in huge pages where the host has them: a first touch of 2 MiB at once
    costs what one of a 4 KiB page does, which is most of what a buffer costs on nested hosts."""
    return np.frombuffer(anonymous_ram(-(-size // PAGE_SIZE) * PAGE_SIZE, huge_pages=True), dtype=np.uint8)


class BlockReader:
    """One thread's means to read blocks of `table`: a zstd context, buffers for a run's payload
    and bytes, the two runs it read last. `verify` False skips the block hashes and a `.mem`'s
    blocks (the memory digest's checks); a PAGES run's own checksum is the format's, which
    every reader of one checks."""

    def __init__(self, table: PageTable, verify: bool = True) -> None:
        self.table, self.verify = table, verify
        runs = table.runs
        data = runs["encoding"] != PageEncoding.ZERO
        zstd = runs["encoding"] == PageEncoding.ZSTD
        largest = int(runs["pages"][data].max()) * PAGE_SIZE if data.any() else PAGE_SIZE
        self.decoder = RunDecoder()
        self.payload = _buffer(int(runs["length"][zstd].max()) if zstd.any() else 1)
        self.decoded = [_buffer(largest), _buffer(largest)]
        self.held = [-1, -1]  # the run each of `decoded` holds
        self.recent = 1  # the one used last
        self.image = _buffer(DIGEST_BLOCK)

    def warm(self) -> None:
        """Touch the buffers once, so that a fault does not pay their first touch."""
        for buffer in (self.payload, *self.decoded, self.image):
            buffer.fill(0)

    def data_pages(self, first_page: int, pages: int) -> np.ndarray:
        """bool per page of the block from `first_page`: it is data (else zero)."""
        owners = self.table.owner[first_page:first_page + pages]
        data = owners >= 0
        data[data] = self.table.runs["encoding"][owners[data]] != PageEncoding.ZERO
        return data

    def assemble(self, block: int) -> memoryview:
        """The block's bytes as the snapshot holds them, checked (`formats.ChecksumError` for a
        block that fails its hash with runs that pass theirs; `BadRun` for a run that fails)."""
        table, runs = self.table, self.table.runs
        address, first_page, pages = table.block_span(block)
        owners = table.owner[first_page:first_page + pages]
        ids = np.unique(owners[owners >= 0])
        ids = ids[runs["encoding"][ids] != PageEncoding.ZERO]
        expected = None if table.block_hashes is None or not self.verify else int(table.block_hashes[block])
        check_runs = expected is None
        if len(ids) == 1 and bool((owners == ids[0]).all()):  # every page from one run: a slice of it, no copy
            skip = (address - int(runs["address"][ids[0]])) // PAGE_SIZE
            image = self._run(int(ids[0]), check_runs)[skip * PAGE_SIZE:(skip + pages) * PAGE_SIZE]
        else:
            out = self.image[:pages * PAGE_SIZE]
            out.fill(0)
            for rid in ids.tolist():
                decoded = np.frombuffer(self._run(rid, check_runs), dtype=np.uint8)
                mine = np.flatnonzero(owners == rid)
                skip = (address - int(runs["address"][rid])) // PAGE_SIZE  # the run's page at the block's start
                for part in np.split(mine, np.flatnonzero(np.diff(mine) != 1) + 1):
                    a, b = int(part[0]), int(part[-1]) + 1
                    out[a * PAGE_SIZE:b * PAGE_SIZE] = decoded[(a + skip) * PAGE_SIZE:(b + skip) * PAGE_SIZE]
            image = out.data
        if expected is not None and (found := RunDecoder.digest(image)) != expected:
            for rid in ids.tolist():  # which file: the first run that fails its own check
                self._run(rid, True)
            raise formats.ChecksumError(f"memory block @{address:#x}", block * DIGEST_BLOCK, expected, found)
        return image

    def _run(self, rid: int, check: bool) -> memoryview:
        """Run `rid`'s bytes, read (and decompressed) into the buffer used less recently, kept
        for the next block; with `check`, its checksum checked."""
        run = self.table.runs[rid]
        source = self.table.sources[int(run["source"])]
        size, offset = int(run["pages"]) * PAGE_SIZE, int(run["offset"])
        try:
            if rid in self.held:
                self.recent = self.held.index(rid)
                out = self.decoded[self.recent].data[:size]
            else:
                slot = 1 - self.recent
                self.held[slot] = -1
                out = self.decoded[slot].data[:size]
                if run["encoding"] == PageEncoding.ZSTD:
                    frame = self.payload.data[:int(run["length"])]
                    _read(source.fd, frame, offset)
                    self.decoder.decompress(frame, out, offset)
                else:
                    _read(source.fd, out, offset)
                self.held[slot], self.recent = rid, slot
            check = check and bool(run["checked"]) and (self.verify or not source.found.startswith("mem"))
            if check and (found := RunDecoder.digest(out)) != int(run["digest"]):
                raise formats.ChecksumError(f"pages run @{int(run['address']):#x}", offset, int(run["digest"]), found)
        except formats.FormatError as e:
            raise BadRun(rid, e) from e
        return out


def _read(fd: int, into: memoryview, offset: int) -> None:
    """Fill `into` from the file at `offset` (a file that ends first is a `TruncatedError`)."""
    done = 0
    while done < len(into):
        n = os.preadv(fd, [into[done:]], offset + done)
        if n <= 0:
            raise formats.TruncatedError("pages", offset, len(into), done)
        done += n
