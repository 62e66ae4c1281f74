"""Post-copy's source pages: the paused guest's memory served on demand (the fetch channel, a
thread of its own) and pushed in the background, from just after the latest fault first."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from formats import StreamWriter
from hv.kvm.dirty import PAGE_SHIFT, PAGE_SIZE
from hv.errors import GuestAddressError
from hv.kvm.memory import GuestMemory, MemoryRegion
from migrate.datapath import PageEncoderC
from migrate.errors import ProtocolViolation, TransportError
from migrate.protocol import Fetch
from migrate.state import PRODUCER, registry
from migrate.live.postcopy.missing import FETCH_AROUND, FETCH_MAX, Missing, urgent
from migrate.transport.connection import Connection

log = logging.getLogger(__name__)

PUSH_CHUNK = 256  # pages per background chunk (1 MiB): a fault jumps the push at this grain
PUSH_MESSAGE = 1 << 20  # page payload per background PAGES message: small, so a jump takes soon


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
        urgent()
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
        runs: list[tuple[MemoryRegion, int, int]] = []
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


