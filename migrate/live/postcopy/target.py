"""Post-copy's target half, for a migration whose HELLO asked for post-copy: the fetch channel,
`Discard` before the pause, the switch (`Postcopy`: the state applied, the missing pages
registered, then Ready), the background push placed, the finish (every page in, the page digest
checked, then Finished), and after a lost link the wait for the source to come back. `Target`
hands it these messages; the rest of the exchange is the target's own."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

import formats
from hv.errors import HvError
from hv.kvm.dirty import DirtyBitmap
from hv.vmm.machine import Machine, discard
from migrate import digest
from migrate.errors import MigrationFailed, PostcopyFailed, ProtocolViolation, TransportError
from migrate.live.link import TargetLink
from migrate.live.postcopy.missing import count_missing, decode_missing, describe_missing, encode_missing, give_back
from migrate.live.postcopy.place import PostcopyTarget
from migrate.live.streams import Joins, accept_fetch_channel
from migrate.protocol import Discarded, Finished, Missing, Ready, Reconnect
from migrate.records import Collected
from migrate.state import apply
from migrate.transport.connection import Connection

log = logging.getLogger(__name__)

PAGES_RECORDS = (formats.PagesRecord,)
COMPLETE_RECORDS = (formats.EndRecord,)


def us(seconds: float) -> int:
    return round(seconds * 1e6)


class TargetPostcopy:
    """The target's post-copy over `link`, from the build on (the fetch channel accepted then);
    `placer` from the switch on. `wait`: after a lost link, how long the source may take to come
    back (None: for as long as it takes)."""

    def __init__(self, link: TargetLink, machine: Machine, collected: Collected, layout: formats.MemoryLayout,
                 hashes: digest.BlockHashes, invalidate_written: Callable[[], None], *, joins: Joins,
                 session: bytes, fetch_index: int, host_cpuid: tuple | None, wait: float | None) -> None:
        self.link, self.machine, self.collected, self.hashes = link, machine, collected, hashes
        self.layout = layout  # (HELLO's memory layout, as the machine was built)
        self.invalidate_written = invalidate_written
        self.joins, self.session, self.fetch_index = joins, session, fetch_index
        self.host_cpuid, self.wait = host_cpuid, wait
        self.fetch_conn = accept_fetch_channel(joins, session, fetch_index, link.timeout)
        self.placer: PostcopyTarget | None = None  # from the switch on
        self._held: dict[int, np.ndarray] | None = None  # each page's hash as placed before the switch
        self._given_back: dict[int, DirtyBitmap] | None = None  # pages a Discard gave back before the pause

    def _placer(self) -> PostcopyTarget:
        if self.placer is None:  # (the protocol's table takes these only after the switch)
            raise ProtocolViolation("post-copy pages before the switch")
        return self.placer

    def _bitmap(self, what: str, missing: bytes, count: int) -> dict[int, DirtyBitmap]:
        bits = decode_missing(missing, self.machine.vm.memory)
        if count_missing(bits) != count:
            raise ProtocolViolation(f"{what} says {count} pages; its bitmap has another count")
        return bits

    def discard(self, missing: bytes, count: int) -> None:
        """Before the pause (the guest still runs on the source): every page held so far hashed
        (no more come before the switch), then the pages the source says changed since given
        back to the host, so the pause has only the last few to free."""
        bits = self._bitmap("Discard", missing, count)
        self.invalidate_written()
        t0 = time.perf_counter()
        self._held = self.hashes.current(2)
        t1 = time.perf_counter()
        give_back(self.machine.vm.memory, bits)  # nothing reads them from now on (give_back says why)
        self._given_back = bits
        self.link.tell(Discarded(digest_us=us(t1 - t0), discard_us=us(time.perf_counter() - t1)))

    def switch(self, missing: bytes, count: int) -> None:
        """Post-copy's switch: the state applied, every page held so far hashed (the guest has
        not run here), the missing pages registered; then Ready."""
        state = self.collected.state(self.host_cpuid)
        memory = self.machine.vm.memory
        bits = self._bitmap("Postcopy", missing, count)
        given_back = self._given_back
        if given_back is not None and any(given_back[b].without(bits[b]).count() for b in bits):
            raise ProtocolViolation("Postcopy leaves out pages its Discard gave back")  # they would read as zero
        t0 = time.perf_counter()
        if self._held is None:  # no Discard before: hashed now, in the pause
            self.invalidate_written()
            self._held = self.hashes.current(2)
        t1 = time.perf_counter()
        apply(self.machine, state)
        self.placer = PostcopyTarget(memory, self.layout, bits, given_back)
        self.placer.decode_into_staging(self.link.reader)  # from now on the main stream's pages too
        self.placer.start_fetcher(self.fetch_conn)  # waits for the first fault: the guest's resume
        log.debug("post-copy switch: %s missing", describe_missing(count))
        self.link.tell(Ready(digest_us=us(t1 - t0), apply_us=us(time.perf_counter() - t1)))

    def pages(self, payload: bytes | memoryview) -> None:
        """The background push (a Header first: the stream of a reconnection)."""
        records = self.link.records("PAGES", payload, (formats.Header, *PAGES_RECORDS), stable=True)
        self._placer().take(records, background=True)

    def finish(self, payload: bytes) -> None:
        """END after the last pushed page: every missing page must be in by now; the page digest
        checked (`migrate.live.postcopy` says why it proves the memory); then Finished."""
        end = self.link.records("COMPLETE", payload, COMPLETE_RECORDS)[0]  # (again after a reconnection: not collected)
        pc = self._placer()
        left = pc.wait_placed(self.link.timeout)  # fetched pages may still be on the fetch channel's way
        if left:
            raise MigrationFailed(f"post-copy: the source finished with {describe_missing(left)} never sent",
                                  "on the source")
        found = pc.digest(self._held or {})
        if not isinstance(end, formats.EndRecord):  # (COMPLETE_RECORDS admits nothing else)
            raise ProtocolViolation(f"COMPLETE carried a {type(end).__name__}")
        if found != end.digest:
            raise formats.DigestMismatch(end.digest, found)
        if (elsewhere := pc.placed_elsewhere()):  # the digest's argument needs every one placed from staging
            raise MigrationFailed(f"post-copy: {elsewhere} missing pages were found in place, not from what the "
                                  "source sent (something read them before they were registered)", "on the target")
        pc.stop_fetcher()
        p50, p99, blocked = pc.fault_stats()
        self.link.tell(Finished(fetched=pc.figures.fetched, background=pc.figures.background, fault_p50_us=p50,
                                fault_p99_us=p99, blocked_us=blocked))
        pc.close()
        log.info("post-copy finished: %d pages fetched on demand, %d in the background", pc.figures.fetched,
                 pc.figures.background)

    def wait_for_the_source(self, error: TransportError) -> None:
        """The link went after Commit in post-copy: the guest runs on here (a vCPU touching a
        missing page waits in the kernel), and the source may come back, on a new connection
        that opens with Reconnect (`migrate.live.receiver` hands it over, as a page stream).
        Answered with what is still missing; the fetch channel joins again after it. A
        reconnection that breaks on the way is waited past too. Past `wait` the source is taken
        for gone (a TransportError)."""
        pc, link = self._placer(), self.link
        link.proto.connection_lost()
        pc.stop_fetcher()
        link.conn.close()
        log.warning("post-copy: the link to the source went (%s) with %s missing; vCPUs that touch one wait; "
                    "waiting %s for the source to reconnect", error, describe_missing(pc.still_missing()),
                    "without end" if self.wait is None else f"{self.wait:.0f} s")
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TransportError(f"the source did not come back within {self.wait:.0f} s: {error}")
            try:
                conn, first = self.joins(60.0 if left is None else left)
            except TransportError:
                continue
            if not (isinstance(first, Reconnect) and first.session == self.session):
                log.warning("%s: not this migration's source coming back (%s)", conn.peer, type(first).__name__)
                conn.close()
                continue
            try:
                self._take_the_source_back(conn, first)
                return
            except TransportError as e:
                log.warning("post-copy: the source's reconnection broke off (%s); waiting again", e)
                link.proto.connection_lost()
                pc.stop_fetcher()
                conn.close()

    def _take_the_source_back(self, conn: Connection, first: Reconnect) -> None:
        pc, link = self._placer(), self.link
        link.conn = conn
        link.proto.link_back()
        link.take(first)
        still = pc.missing_now()
        count = count_missing(still)
        link.tell(Missing(encode_missing(still), count))
        link.reader = pc.reader()  # the source starts a new stream on the new connection
        self.fetch_conn.close()
        # the source opens it right after Missing: as long as any message may take (a shadowed
        # name once made this the missing page count in seconds: 1 s with one page left)
        self.fetch_conn = accept_fetch_channel(self.joins, self.session, self.fetch_index, link.timeout)
        pc.start_fetcher(self.fetch_conn)
        pc.figures.reconnects += 1
        log.warning("post-copy: the source is back (%s); %s still to come", conn.peer, describe_missing(count))

    def stopped(self, error: BaseException) -> PostcopyFailed:
        """Post-copy broke off after Commit: the guest here must not run on with holes. Its vCPUs
        are paused (one waiting in the kernel for a page that is not coming stays there: it runs
        no guest instruction either), the pages stay registered, the machine is kept."""
        pc = self._placer()
        pc.stop_fetcher()
        try:
            self.machine.pause(timeout=1.0)
        except HvError as e:
            log.info("post-copy stopped: %s (vCPUs waiting for a missing page stay blocked)", e)
        missing = pc.still_missing()
        log.error("post-copy stopped after the switch: %s; the guest is paused here with %s still at the source",
                  error, describe_missing(missing))
        machine = self.machine

        def give_up() -> None:
            pc.close()
            discard(machine)

        return PostcopyFailed(f"post-copy stopped after the switch: {error}", missing, machine, give_up)

    def close(self) -> None:
        self.fetch_conn.close()
