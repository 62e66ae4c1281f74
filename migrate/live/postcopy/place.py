"""Post-copy's target pages: the missing pages registered with userfaultfd, staged and placed as
they come; the fetcher that asks the source for the pages a thread faulted on."""

from __future__ import annotations

import logging
import mmap
import select
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

import formats
from formats import POSTCOPY_DIGEST_BLOCK, StreamReader
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import GuestMemory, anonymous_ram
from hv.kvm.userfault import Userfault
from migrate.datapath import PageDecoderC, block_hashes
from migrate.errors import ProtocolViolation
from migrate.protocol import Fetch, Pages
from migrate.live.postcopy.missing import FETCH_MAX, Missing, count_missing, give_back, page_digest, read_since, urgent
from migrate.state import registry
from migrate.transport.connection import Connection

log = logging.getLogger(__name__)


@dataclass
class TargetFigures:
    fetched: int = 0  # pages asked for because a thread faulted on them
    fetch_requests: int = 0
    background: int = 0  # pages placed by the background push
    duplicates: int = 0  # pages that came both ways (the second was a no-op)
    reconnects: int = 0
    first_fault_s: float = 0.0
    done_s: float = 0.0
    blocked_ns: dict[int, int] = field(default_factory=dict)  # per vCPU thread id


class PostcopyTarget:
    """The target's side of post-copy over `machine`'s RAM: the missing pages registered with
    userfaultfd, staged and placed as they come; the fetcher that asks for faulted pages.

    Built at the switch, before Ready (the guest has not run here yet): the missing pages are given
    back to the host (they hold older copies from pre-copy; `given_back`: those a `Discard` before
    the pause gave back already) and registered. Every other page not in place (never
    written: zero) is staged as zero once the fetcher starts, so a first touch of it is served by
    the C fault thread without a round trip (a touch before that is fetched: the source sends a
    zero page)."""

    def __init__(self, memory: GuestMemory, layout: formats.MemoryLayout, missing: Missing,
                 given_back: Missing | None = None) -> None:
        self.memory, self.layout, self.missing = memory, layout, missing
        self.total = count_missing(missing)
        self.figures = TargetFigures()
        self._staging = [anonymous_ram(r.size, huge_pages=False) for r in memory.regions]
        self._uffd: dict[int, Userfault] = {}
        self._holes: dict[int, DirtyBitmap] = {}  # pages not missing: in place, or never written (zero)
        self._t0 = time.monotonic()
        try:
            rest = missing if given_back is None else {b: m.without(given_back[b]) for b, m in missing.items()}
            give_back(memory, rest)
            if given_back is not None:
                give_back(memory, read_since(memory, given_back))
            for region, staging in zip(memory.regions, self._staging, strict=True):
                self._uffd[region.guest_base] = Userfault(region, staging=staging)
                self._holes[region.guest_base] = missing[region.guest_base].complement()
        except BaseException:
            self.close()
            raise
        self._asked: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fetch_error: BaseException | None = None

    def reader(self) -> StreamReader:
        """A stream reader whose pages go to the staging buffer (one per connection)."""
        reader = StreamReader(registry(), memory=self.layout)
        self.decode_into_staging(reader)
        return reader

    def decode_into_staging(self, reader: StreamReader) -> None:
        reader.decode_pages_with(PageDecoderC(self.layout, self._staging, shared=True))  # push and fetches at once

    def _region(self, address: int) -> Userfault:
        region, _ = self.memory.find(address)
        return self._uffd[region.guest_base]

    def take(self, records: list, *, background: bool) -> int:
        """Stage the pages of PAGES records decoded into staging (waiters get them now), and
        place them: a fetch's answer carries pages nobody faulted on yet (those after the fault),
        which the push then leaves out, so only placing them here gets them in (a pure post-copy
        start, where the first faults meet nothing sent, ended with them never placed). Returns
        the pages."""
        n = 0
        for record in records:
            if isinstance(record, formats.Header):  # a fetch channel's first bytes
                continue
            if not isinstance(record, formats.PagesRecord):
                raise ProtocolViolation(f"post-copy PAGES carried a {type(record).__name__}")
            for run in record.runs:
                uffd, length = self._region(run.address), run.count * PAGE_SIZE
                if run.placed:  # its bytes are in staging
                    uffd.stage_range(run.address, length)
                else:
                    uffd.stage_zero(run.address, length)
                if background:
                    self.figures.background += uffd.place_staged(run.address, length)
                else:
                    self._place_missing(uffd, run.address, run.count)
                n += run.count
        return n

    def _place_missing(self, uffd: Userfault, address: int, count: int) -> None:
        """Place the missing pages of a fetch's answer (at most FETCH_AROUND: a loop per answer,
        not per page of memory); the rest of it are pages held here already, left alone."""
        region, offset = self.memory.find(address, count * PAGE_SIZE)
        first = offset // PAGE_SIZE
        words = self.missing[region.guest_base].words
        w0, w1 = first >> 6, (first + count - 1) >> 6
        bits = np.unpackbits(words[w0:w1 + 1].view(np.uint8), bitorder="little")[first - w0 * 64:][:count]
        for start, n in DirtyBitmap.from_pages(count, np.flatnonzero(bits)).runs().as_tuples():
            uffd.place_staged(address + start * PAGE_SIZE, n * PAGE_SIZE)

    # --- the fetcher ---

    def start_fetcher(self, conn: Connection | None) -> None:
        if conn is None:  # (the table admits no switch unless HELLO asked for post-copy: its channel)
            raise ProtocolViolation("post-copy without a fetch channel")
        self._stop.clear()
        self._asked.clear()  # asked on a channel that may have gone: asked again
        self.fetch_error = None
        self._thread = threading.Thread(target=self._fetch_loop, args=(conn,), name="postcopy-fetcher", daemon=True)
        self._thread.start()

    def _fetch_loop(self, conn: Connection) -> None:
        """One thread: faults out as Fetch, pages in as they come back (one reader and one writer
        of the connection, so TLS is safe too). Whatever ends it is kept for the main loop
        (`fetch_error`): no exception leaves this thread."""
        try:
            urgent()
            for base, holes in self._holes.items():  # after the resume: not in the downtime
                uffd = self._uffd[base]
                for first, count in holes.runs().as_tuples():
                    uffd.stage_zero(base + first * PAGE_SIZE, count * PAGE_SIZE)
            self._holes.clear()
            reader = self.reader()
            notify = {u.notify_fd: u for u in self._uffd.values()}
            sock = conn.sock
            watched: list[socket.socket | int] = [sock, *notify]
            while not self._stop.is_set():
                pending = getattr(sock, "pending", lambda: 0)()
                ready = [sock] if pending else select.select(watched, [], [], 0.5)[0]
                for fd in ready:
                    if isinstance(fd, int):  # a userfaultfd: a thread faulted
                        self._ask(conn, notify[fd])
                        continue
                    message = conn.receive(None)
                    if not isinstance(message, Pages):
                        raise ProtocolViolation(f"the fetch channel carried {type(message).__name__}")
                    self.take(reader.feed(message.payload, stable=True), background=False)
        except BaseException as e:  # noqa: BLE001 - read by the main loop
            if not self._stop.is_set():
                self.fetch_error = e
                log.info("post-copy fetcher: %s", e)

    def _ask(self, conn: Connection, uffd: Userfault) -> None:
        faults = uffd.take_faults(FETCH_MAX)
        new = [f.address for f in faults if f.address not in self._asked]
        if not new:
            return
        if not self.figures.fetched:
            self.figures.first_fault_s = time.monotonic() - self._t0
        self._asked.update(new)
        self.figures.fetched += len(new)
        self.figures.fetch_requests += 1
        conn.send(Fetch(np.array(new, dtype="<u8").tobytes()))

    # --- the end ---

    def still_missing(self) -> int:
        """Pages of the switch's bitmap not placed yet."""
        return count_missing(self.missing_now())

    def placed_elsewhere(self) -> int:
        """Missing pages a copy found in place already (EEXIST): populated outside this layer
        before registration, so the guest sees them as they were, not as staged. The layer
        never copies over a page it placed itself, so any is a fault of the switch."""
        return sum(uffd.stats().eexist for uffd in self._uffd.values())

    def wait_placed(self, timeout: float) -> int:
        """Wait until every page of the switch's bitmap is in, or `timeout` passed; the pages
        still missing. (The source ends its push when every page has left on one channel or the
        other; the fetch channel's last answers may arrive after the main one's END.)"""
        deadline = time.monotonic() + timeout
        while (left := self.still_missing()) and time.monotonic() < deadline and self.fetch_error is None:
            time.sleep(0.002)
        return left

    def missing_now(self) -> Missing:
        return {r.guest_base: self.missing[r.guest_base] & self._uffd[r.guest_base].missing_pages()
                for r in self.memory.regions}

    def digest(self, held: dict[int, np.ndarray]) -> int:
        """The post-copy digest: `held` (each page's hash as placed before the switch) with the
        missing pages' hashes taken from the staging buffer they were placed from."""
        hashes = {}
        for region, staging in zip(self.memory.regions, self._staging, strict=True):
            pages = self.missing[region.guest_base].pages()
            hashes[region.guest_base] = held[region.guest_base].copy()
            hashes[region.guest_base][pages] = block_hashes(staging, pages, POSTCOPY_DIGEST_BLOCK)
        return page_digest(hashes, self.memory)

    def fault_stats(self) -> tuple[int, int, int]:
        """(latency p50 µs, p99 µs, vCPU threads' blocked time µs) over every region."""
        p50 = p99 = blocked = 0
        for uffd in self._uffd.values():
            latency = uffd.stats().latency
            p50, p99 = max(p50, latency.p50_ns // 1000), max(p99, latency.p99_ns // 1000)
            blocked += sum(t.blocked_ns for t in uffd.blocktime().values()) // 1000
        return p50, p99, blocked

    def stop_fetcher(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def close(self) -> None:
        """Unregister (every page is in: nothing reads as a hole) and drop the staging buffers."""
        self.stop_fetcher()
        for uffd in self._uffd.values():
            uffd.close()
        self._uffd.clear()
        for staging in self._staging:  # (decoders may still hold views of it: freed, not closed)
            staging.madvise(mmap.MADV_DONTNEED)
        self._staging = []


