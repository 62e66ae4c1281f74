"""Post-copy: the guest runs on the target before all of its memory is there (QEMU's postcopy-ram).

At the switch the source pauses its guest for good and sends the vCPU and device state with the
bitmap of the pages the target still lacks (`Postcopy`). The target makes those pages missing
(given back to the host, then registered with userfaultfd: `hv.kvm.userfault`), resumes the guest
and fills them from two directions:

- **on demand**: a thread that touches a missing page (a vCPU in KVM_RUN, a device thread) waits
  in the kernel; the target's fetcher sends the page's address on the fetch channel (a connection
  of its own, so an urgent page never waits behind the background stream) and places the page the
  source sends back (`PostcopyFetcher`);
- **in the background**: the source pushes every page still unsent on the main connection, from
  just after the most recent fault first (a guest that faulted there is likely to go on there),
  and sequentially from there (`PostcopySource.push`).

A page is placed once (`hv.kvm.userfault`): whichever copy arrives first wins, the other is a
no-op; both are the same bytes, since the source's memory no longer changes. Pages are decoded by
the C data path into a staging buffer laid out as guest RAM (never into guest RAM itself, which a
running guest owns) and placed from there by UFFDIO_COPY, with the stream format's checksums
checked on the way as for any PAGES.

The end digest (END, by 4 KiB page: `formats.POSTCOPY_DIGEST_BLOCK`) proves the target's memory
is what the source held at the switch plus what the guest wrote since. How: the digest is one
hash per page. The target hashes pre-copy pages as they are placed, and has them all hashed
before the guest runs there (`BlockHashes.current` at the switch); the pages missing at the
switch it hashes from the staging buffer, which holds exactly the bytes that were placed for
them and which the guest never writes. The combination is the digest of "every page as the
target placed it", which the source computes over its paused memory: equal digests mean every
page the guest started from on the target was the source's page at the switch, and what differs
in guest memory now is only what the guest wrote since. That holds if each missing page reached
guest memory only from staging: a page something populated before registration would keep what
it had (UFFDIO_COPY finds it in place, EEXIST), so the target also requires that no copy found
a missing page in place (`placed_elsewhere`); after a `Discard` the protocol takes no more pages.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

import formats
from formats import POSTCOPY_DIGEST_BLOCK, StreamReader, StreamWriter
from hv.kvm.dirty import PAGE_SHIFT, PAGE_SIZE, DirtyBitmap, words_for
from hv.errors import GuestAddressError
from hv.kvm.memory import GuestMemory, MemoryRegion, anonymous_ram
from hv.kvm.userfault import Userfault
from migrate.datapath import PageDecoderC, PageEncoderC, block_hashes
from migrate.errors import MigrationFailed, ProtocolViolation, TransportError
from migrate.protocol import Fetch, Pages
from migrate.state import PRODUCER, registry
from migrate.transport.connection import Connection

log = logging.getLogger(__name__)

PUSH_CHUNK = 256  # pages per background chunk (1 MiB): a fault jumps the push at this grain
PUSH_MESSAGE = 1 << 20  # page payload per background PAGES message: small, so a jump takes soon
FETCH_MAX = 512  # addresses per Fetch
URGENT_NICE = -10  # the fetch threads' (per-thread nice on Linux)
FETCH_AROUND = 16  # pages a fault's answer carries: the faulted one and the unsent ones after it
_REGION = struct.Struct("<QQ")

Missing = dict[int, DirtyBitmap]  # region guest base -> pages the target lacks


# --- the bitmap on the wire -------------------------------------------------------------------------


def encode_missing(missing: Missing) -> bytes:
    """`Postcopy.missing`: per RAM region, in address order, `le64 base ‖ le64 pages ‖ the
    bitmap's le64 words` (bit i: page i of the region)."""
    return b"".join(_REGION.pack(base, bits.npages) + bits.words.astype("<u8").tobytes()
                    for base, bits in sorted(missing.items()))


def decode_missing(data: bytes, memory: GuestMemory) -> Missing:
    """The bitmap a peer sent, checked against this side's RAM: every region once, in order,
    its page count exactly, no bit past its end (a `ProtocolViolation` otherwise)."""
    view, at, out = memoryview(data), 0, {}
    for region in memory.regions:
        if len(view) - at < _REGION.size:
            raise ProtocolViolation(f"missing-page bitmap: ends before the region at {region.guest_base:#x}")
        base, npages = _REGION.unpack_from(view, at)
        at += _REGION.size
        if base != region.guest_base or npages != region.npages:
            raise ProtocolViolation(f"missing-page bitmap: a region of {npages} pages at {base:#x}, this guest "
                                    f"has {region.npages} at {region.guest_base:#x}")
        nbytes = words_for(npages) * 8
        if len(view) - at < nbytes:
            raise ProtocolViolation("missing-page bitmap: truncated")
        words = np.frombuffer(view[at:at + nbytes], dtype="<u8").astype(np.uint64)
        at += nbytes
        if npages % 64 and int(words[-1]) >> (npages % 64):
            raise ProtocolViolation(f"missing-page bitmap: bits past the {npages} pages of {base:#x}")
        out[base] = DirtyBitmap(npages, words)
    if at != len(view):
        raise ProtocolViolation(f"missing-page bitmap: {len(view) - at} bytes past its regions")
    return out


def count_missing(missing: Missing) -> int:
    return sum(bits.count() for bits in missing.values())


def _urgent() -> None:
    """Run this thread ahead of the busy ones (the push, the guest's vCPUs): a fault's round trip
    is what a vCPU waits for. Best effort (a lower nice value needs CAP_SYS_NICE)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), URGENT_NICE)
    except OSError:
        pass


def give_back(memory: GuestMemory, missing: Missing) -> None:
    """MADV_DONTNEED over the pages of `missing` (their older copies), in C without the GIL: the
    kernel frees about a page a microsecond here (256 MiB: ~30 ms; a second thread did not help,
    measured). Nothing may read these pages until they are registered: a read would map the zero
    page, which userfaultfd then never reports missing."""
    for region in memory.regions:
        for first, count in missing[region.guest_base].runs().as_tuples():
            memory.zero_pages(region.guest_base + first * PAGE_SIZE, count * PAGE_SIZE)


def _read_since(memory: GuestMemory, given_back: Missing) -> Missing:
    """The pages given back that something mapped again before registration: KVM reads guest
    memory as the vCPU state is applied (descriptor tables, seen on these hosts), which maps
    the zero page; registered so, the guest would read zeros there and never fault (a pure
    post-copy start lost its first pages that way). Costs a read of their pagemap entries."""
    out = {}
    for region in memory.regions:
        bits = given_back[region.guest_base]
        again = DirtyBitmap(region.npages)
        for first, count in bits.runs().as_tuples():
            mapped = np.flatnonzero(region.mapped_pages(first, count))
            if len(mapped):
                again.set_pages(mapped + first)
        out[region.guest_base] = again
    return out


def page_digest(hashes: dict[int, np.ndarray], memory: GuestMemory) -> int:
    return formats.combine_block_hashes((r.guest_base, r.size, hashes[r.guest_base]) for r in memory.regions)


# --- source ---------------------------------------------------------------------------------------


@dataclass
class SourceFigures:
    fetched: int = 0  # pages sent because the target asked
    fetch_requests: int = 0
    around: int = 0  # pages sent with a faulted one (after it) that the push had not sent
    pushed: int = 0  # pages sent by the background push
    push_jumps: int = 0  # times the push moved to just after a fault

    @property
    def sent(self) -> int:
        return self.fetched + self.around + self.pushed


class PostcopySource:
    """The source after the switch: its paused guest's memory is served to the target, on demand
    (`start_fetch_server`: on the fetch channel, a thread of its own) and in the background (`push`)."""

    def __init__(self, memory: GuestMemory, missing: Missing, level: int) -> None:
        self.memory, self.level = memory, level
        self.figures = SourceFigures()
        self._lock = threading.Lock()
        self._unsent = {r.guest_base: missing[r.guest_base].as_bools() for r in memory.regions}
        self._cursor = {base: 0 for base in self._unsent}
        self._jump: tuple[int, int] | None = None  # (region base, page) just after the latest fault
        self._stop = threading.Event()
        self._fetch_thread: threading.Thread | None = None
        self.fetch_error: BaseException | None = None

    def reset_missing(self, missing: Missing) -> None:
        """After a reconnect: what the target says it still lacks is what is unsent now."""
        with self._lock:
            for r in self.memory.regions:
                self._unsent[r.guest_base] = missing[r.guest_base].as_bools()
                self._cursor[r.guest_base] = 0

    # --- on demand ---

    def start_fetch_server(self, conn: Connection) -> None:
        self._stop.clear()
        self.fetch_error = None
        self._fetch_thread = threading.Thread(target=self._serve_fetches, args=(conn,), name="postcopy-fetch",
                                              daemon=True)
        self._fetch_thread.start()

    def _serve_fetches(self, conn: Connection) -> None:
        _urgent()
        writer = StreamWriter(registry(), producer=PRODUCER)
        encoder = PageEncoderC(0, stable=True)  # a fault waits: raw, straight from the paused memory
        try:
            conn.send_pages(0, [writer.header()])
            while not self._stop.is_set():
                message = conn.receive(None)
                if not isinstance(message, Fetch):
                    raise ProtocolViolation(f"the fetch channel carried {type(message).__name__}")
                parts = []
                for region, first, count in self._fetched_runs(message.addresses):
                    address = region.guest_base + first * PAGE_SIZE
                    for section in encoder.encode(address, region.view[first * PAGE_SIZE:(first + count) * PAGE_SIZE]):
                        parts.extend(writer.pages_parts(section))
                conn.send_pages(0, parts)
        except TransportError as e:
            if not self._stop.is_set():
                self.fetch_error = e
                log.info("post-copy fetch channel: %s", e)
        except BaseException as e:  # noqa: BLE001 - read by the push loop
            self.fetch_error = e
            log.warning("post-copy fetch channel failed: %s", e)

    def _fetched_runs(self, raw: bytes) -> list[tuple[MemoryRegion, int, int]]:
        """The runs to answer a Fetch with: each page asked for and the pages after it, FETCH_AROUND
        in all (a guest that faulted on a page is likely to touch the next ones: they come in the
        same answer rather than a fault each, also when the push has taken them and they are on
        their way behind other pages; the target places a page once). Taken from the push."""
        if len(raw) % 8 or not raw or len(raw) > FETCH_MAX * 8:
            raise ProtocolViolation(f"a Fetch of {len(raw)} bytes (1 to {FETCH_MAX} le64 addresses)")
        runs = []
        with self._lock:
            for address in sorted(set(np.frombuffer(raw, dtype="<u8").tolist())):
                try:
                    region, offset = self.memory.find(address, PAGE_SIZE)
                except GuestAddressError:
                    raise ProtocolViolation(f"a Fetch of {address:#x}, outside guest RAM") from None
                if address % PAGE_SIZE:
                    raise ProtocolViolation(f"a Fetch of the unaligned address {address:#x}")
                unsent, page = self._unsent[region.guest_base], offset >> PAGE_SHIFT
                if runs and runs[-1][0] is region and runs[-1][1] + runs[-1][2] > page:
                    continue  # inside the run the page before it asked for
                count = min(FETCH_AROUND, region.npages - page)  # sent or not: a pushed page may still
                self.figures.around += int(unsent[page + 1:page + count].sum())  # be on its way
                unsent[page:page + count] = False
                runs.append((region, page, count))
                self.figures.fetched += 1
            self._jump = (runs[-1][0].guest_base, runs[-1][1] + runs[-1][2])
            self.figures.fetch_requests += 1
        return runs

    # --- background ---

    def _next_chunk(self) -> tuple[MemoryRegion, int, int] | None:
        """The next run of unsent pages (at most PUSH_CHUNK), taken: from just after the latest
        fault if there was one since, else from the cursor; None once everything went."""
        with self._lock:
            regions = list(self.memory.regions)
            if self._jump is not None:
                base, page = self._jump
                self._jump = None
                self._cursor[base] = page
                self.figures.push_jumps += 1
                regions.sort(key=lambda r: r.guest_base != base)  # the faulted region first
            for region in regions:
                base = region.guest_base
                unsent = self._unsent[base]
                for start in (self._cursor[base], 0):
                    hits = np.flatnonzero(unsent[start:start + 4 * PUSH_CHUNK])
                    if not len(hits):
                        hits = np.flatnonzero(unsent[start:])
                    if len(hits):
                        first = start + int(hits[0])
                        window = unsent[first:min(first + PUSH_CHUNK, region.npages)]
                        count = len(window) if window.all() else int(np.argmin(window))
                        unsent[first:first + count] = False
                        self._cursor[base] = first + count
                        self.figures.pushed += count
                        return region, first, count
        return None

    def push(self, send: Callable[[list[bytes | memoryview]], None], encoder: PageEncoderC, writer: StreamWriter) -> None:
        """Send every unsent page through `send(parts)` (a PAGES message each ~PUSH_MESSAGE)."""
        parts: list[bytes | memoryview] = []
        size = 0
        while (chunk := self._next_chunk()) is not None:
            if self.fetch_error is not None and not isinstance(self.fetch_error, TransportError):
                raise self.fetch_error
            region, first, count = chunk
            address = region.guest_base + first * PAGE_SIZE
            for section in encoder.encode(address, region.view[first * PAGE_SIZE:(first + count) * PAGE_SIZE]):
                parts.extend(writer.pages_parts(section))
                size += section.length
            if size >= PUSH_MESSAGE:
                send(parts)
                parts, size = [], 0
        if parts:
            send(parts)

    def close(self) -> None:
        self._stop.set()


# --- target ---------------------------------------------------------------------------------------


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
                give_back(memory, _read_since(memory, given_back))
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
            _urgent()
            for base, holes in self._holes.items():  # after the resume: not in the downtime
                uffd = self._uffd[base]
                for first, count in holes.runs().as_tuples():
                    uffd.stage_zero(base + first * PAGE_SIZE, count * PAGE_SIZE)
            self._holes.clear()
            reader = self.reader()
            notify = {u.notify_fd: u for u in self._uffd.values()}
            sock = conn.sock
            while not self._stop.is_set():
                pending = getattr(sock, "pending", lambda: 0)()
                ready = [sock] if pending else select.select([sock, *notify], [], [], 0.5)[0]
                for fd in ready:
                    if fd is sock:
                        message = conn.receive(None)
                        if not isinstance(message, Pages):
                            raise ProtocolViolation(f"the fetch channel carried {type(message).__name__}")
                        self.take(reader.feed(message.payload, stable=True), background=False)
                    else:
                        self._ask(conn, notify[fd])
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


def describe_missing(count: int) -> str:
    return f"{count} pages ({count * PAGE_SIZE / (1 << 20):.1f} MiB)"
