"""Each side's end of the exchange: the messages it sends and takes (checked against the protocol's
table), and, on the source, the pages sent across the streams at the paced rate, the final copy's
one deadline, and the hand-over with its downtime accounting.

`Source` and post-copy's source half (`migrate.live.postcopy.source`) talk through one
`SourceLink`; `Target` and post-copy's target half through one `TargetLink`. A reconnection in
post-copy gives the same link a new connection (`SourceLink.connect_again`, `TargetLink.conn`),
so whoever holds the link carries on over it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from formats import Record, StreamReader, StreamWriter
from hv.kvm.units import MiB
from migrate import pages
from migrate.errors import Cancelled, MigrationFailed, ProtocolViolation, TransportError, error_code
from migrate.live.streams import OutgoingStream
from migrate.options import MigrationOptions
from migrate.protocol import (Applied, Cancel, Channel, Commit, Error, ErrorCode, Message, Outcome, Pages, Protocol,
                              Ready, RemoteProtocolError, Resumed, Role, RoundDone, S)
from migrate.records import EXPECT
from migrate.state import PRODUCER, registry
from migrate.stats import Laps, MigrationProgress, MigrationStats, Pause
from migrate.transport.connection import Connection, connect

log = logging.getLogger(__name__)

MESSAGE_BYTES = 8 << 20  # page payload per PAGES message
M = TypeVar("M", bound=Message)


class SourceLink:
    """The source's end: the main connection, the extra page streams, post-copy's fetch channel;
    the exchange's state; the stream writer; what was sent, and from when it is paced."""

    def __init__(self, conn: Connection, address: str | None, options: MigrationOptions, cancel: threading.Event,
                 stats: MigrationStats, live: MigrationProgress) -> None:
        self.conn, self.address, self.options, self.cancel = conn, address, options, cancel
        self.stats, self.live = stats, live  # the hand-over's figures go to `stats`, the pages' to `live`
        self.proto = Protocol(Role.SOURCE)
        self.writer = StreamWriter(registry(), producer=PRODUCER)
        self.extra: list[OutgoingStream] = []
        self.fetch_conn: Connection | None = None  # post-copy's fetch channel (opened at the handshake)
        self.session = b""  # the target's name for this exchange (its Accept), for a Query if in doubt
        self.deadline: float | None = None  # the final copy's: every wait once the guest is paused
        self.final_copy_limit_ms = 0.0
        self.sent_at_start = 0.0  # pacing (`pace`) counts from here ...
        self.bytes_at_start = 0  # ... and from this many bytes sent
        self.round_acks = False  # the target agreed to answer a live round's RoundDone with Applied
        self.applied = -1  # the last round the target said is in its RAM

    def wait_limit(self) -> float | None:
        """How long the next wait may take: the final copy's time left (None before it)."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TransportError(f"the target did not keep up: the final copy's {self.final_copy_limit_ms:.0f} ms "
                                 "are spent")
        return left

    # --- messages ---------------------------------------------------------------------------------

    def message(self, message: Message) -> None:
        limit = self.wait_limit()  # first: a Commit the deadline stops is one that never left
        self.proto.send(message)
        self.conn.send(message, timeout=limit)

    def pages_message(self, round_number: int, parts: list[bytes | memoryview]) -> None:
        if self.conn.has_message():  # the target does not speak during a round unless it gives up
            self.answer()
        limit = self.wait_limit()
        self.proto.send(Pages(round_number, b""))  # the protocol tracks the kind, not the bytes
        self.conn.send_pages(round_number, parts, timeout=limit)

    def answer(self) -> Message:
        """The target's next message (its frame capped by kind, its body decoded within a budget,
        its texts cut: `migrate.transport`), which must be one the exchange allows now; waited
        for no longer than the final copy's deadline allows."""
        left = self.wait_limit()
        message = self.conn.receive(self.options.timeout if left is None else min(left, self.options.timeout))
        try:
            self.proto.receive(message)
        except RemoteProtocolError as e:  # out of order: typed; the target is told why
            raise ProtocolViolation(str(e)) from None
        if isinstance(message, Error):  # the target gave up and says why
            raise MigrationFailed(f"the target failed: {message.code.name}: {message.message}",
                                  "here", code=message.code)
        if isinstance(message, Applied):
            self.applied = max(self.applied, message.round)
        return message

    def answer_of(self, kind: type[M]) -> M:
        """`answer()` where the protocol's table admits one kind of message only (it has refused
        any other already: this says so to the type checker, and holds if the table changes)."""
        message = self.answer()
        while isinstance(message, Applied) and kind is not Applied:  # a late one: read past it
            message = self.answer()
        if not isinstance(message, kind):
            raise ProtocolViolation(f"expected {kind.__name__}, got {type(message).__name__}")
        return message

    @property
    def bytes_sent(self) -> int:
        fetch = self.fetch_conn.bytes_sent if self.fetch_conn is not None else 0
        return self.conn.bytes_sent + sum(x.conn.bytes_sent for x in self.extra) + fetch

    # --- the connections --------------------------------------------------------------------------

    def _address(self) -> str:
        if self.address is None:  # (`send` refuses streams and post-copy without an address)
            raise TransportError("no address to connect to: the migration was given a connection")
        return self.address

    def open_extra_streams(self, session: bytes) -> None:
        """Streams 1..N-1: connect, authenticate, join the exchange, send the stream header."""
        o = self.options
        for index in range(1, o.streams):
            conn = connect(self._address(), o.key, o.timeout, o.tls)
            stream = OutgoingStream(conn)
            self.extra.append(stream)
            conn.send(Channel(session, index))
            conn.send_pages(0, [stream.writer.header()])

    def open_fetch_channel(self, session: bytes) -> None:
        """Post-copy's fetch channel: the join after the page streams (index `streams`)."""
        o = self.options
        self.fetch_conn = connect(self._address(), o.key, o.timeout, o.tls)
        self.fetch_conn.send(Channel(session, o.streams))

    def connect_again(self, timeout: float) -> None:
        """A new main connection after a lost one (post-copy); the exchange picks up on it."""
        o = self.options
        self.conn = connect(self._address(), o.key, timeout, o.tls)
        self.proto.link_back()

    def new_stream(self, round_number: int) -> None:
        """A new stream on a new connection: its header, in a PAGES message."""
        self.writer = StreamWriter(registry(), producer=PRODUCER)
        self.pages_message(round_number, [self.writer.header()])

    # --- pages across the streams -----------------------------------------------------------------

    def start_pacing(self) -> None:
        """`--bandwidth` counts from now (the rounds; then again from the pause: neither a debt of
        the rounds, a sleep in the pause, nor their credit, a burst the forecast did not count)."""
        self.sent_at_start, self.bytes_at_start = time.perf_counter(), self.bytes_sent

    def pace(self) -> None:
        limit = self.options.bandwidth_mib_s * MiB
        if limit:
            ahead = (self.bytes_sent - self.bytes_at_start) / limit - (time.perf_counter() - self.sent_at_start)
            if ahead > 0:
                time.sleep(ahead)

    def _writer(self, stream: int) -> StreamWriter:
        return self.writer if stream == 0 else self.extra[stream - 1].writer

    def _dispatch(self, stream: int, round_number: int, parts: list[bytes | memoryview]) -> None:
        if stream == 0:
            self.pages_message(round_number, parts)
            return
        extra = self.extra[stream - 1]
        if extra.error is not None:
            raise TransportError(f"page stream {stream}: {extra.error}")
        extra.queue.put((round_number, parts))

    def send_pages(self, round_number: int, runs: Iterable[pages.MemoryRun], pool: pages.PageEncoderPool, *,
                   stop: Callable[[], bool] | None = None,
                   report: Callable[[float, int, int], None] | None = None) -> tuple[int, int, int]:
        """Encode and send `runs`, message by message across the streams; returns (pages, raw
        bytes, bytes on the wire) once every stream has sent its share. After each message,
        `stop()` may break the round off (the post-copy switch) and `report(started, raw, wire)`
        hears how it goes (neither in the pause)."""
        parts: list[bytes | memoryview] = []
        size = npages = raw = 0
        wire0 = self.bytes_sent
        streams = 1 + len(self.extra)
        stream = round_number % streams
        t0 = time.perf_counter()
        for section in pool.encode(runs):
            if self.cancel.is_set():
                raise Cancelled("cancelled by the user")
            self.live.round_pages_done += section.totals.pages
            self.live.pages_done += section.totals.pages
            self.live.bytes_done += section.totals.raw_bytes
            parts.extend(self._writer(stream).pages_parts(section))  # framed by the stream that carries it
            size += section.length + 24
            npages += section.totals.pages
            raw += section.totals.raw_bytes
            self.stats.zero_pages += section.totals.zero_pages
            if size >= MESSAGE_BYTES:
                self._dispatch(stream, round_number, parts)
                parts, size = [], 0
                if stop is not None and stop():
                    break  # post-copy now: the rest of this round is missing on the target
                self.pace()
                stream = (stream + 1) % streams
                if report is not None:  # no progress lines in the downtime
                    report(t0, raw, self.bytes_sent - wire0)
        if parts:
            self._dispatch(stream, round_number, parts)
        for extra in self.extra:  # the round's bandwidth counts only what has left
            if not extra.wait_sent(self.wait_limit()):
                raise TransportError(f"page stream to {extra.conn.peer}: not taken within the final copy's "
                                     f"{self.final_copy_limit_ms:.0f} ms")
            if extra.error is not None:
                raise TransportError(f"page stream: {extra.error}")
        # a live round asks to be acknowledged (`caught_up`); the final one does not: the pause
        # waits for Ready, which says more
        self.message(RoundDone(round_number, npages, ack=self.round_acks and self.deadline is None))
        return npages, raw, self.bytes_sent - wire0

    def caught_up(self, round_number: int, within_s: float) -> bool:
        """Wait (the guest still running) until the target says round `round_number` is in its
        RAM, for at most `within_s`; False if it did not say so in time, or cannot (no
        round_acks). The pause that follows then holds only the target's work for the pause."""
        if not self.round_acks:
            return False
        until = time.monotonic() + within_s
        while self.applied < round_number:
            left = until - time.monotonic()
            if left <= 0 or not self.conn.wait_readable(left):
                return False
            self.answer()
        return True

    # --- the pause and the hand-over --------------------------------------------------------------

    def limit_final_copy(self, budget_ms: float) -> None:
        """Every wait from the pause on shares one deadline: twice `budget_ms` plus the margin."""
        self.final_copy_limit_ms = 2 * budget_ms + self.options.final_copy_margin_ms
        self.stats.final_copy_limit_ms = self.final_copy_limit_ms

    def paused(self) -> None:
        """The guest was paused just now: the final copy's deadline runs from here, and its pages
        are paced from here, at the cap the forecast assumed."""
        self.deadline = time.monotonic() + self.final_copy_limit_ms / 1000
        self.start_pacing()

    def hand_over(self, laps: Laps) -> None:
        """Ready, Commit, Resumed: the end of the pause, whose phases (the target's own steps
        taken out of the waits they were in) become the downtime's."""
        ready = self.answer_of(Ready)  # the target holds its copy, built and paused
        waited = laps.lap(Pause.TARGET_VERIFY)
        log.info("the target holds its copy (%.1f ms after the pause); committing", sum(laps.phases.values()))
        self.message(Commit())
        # From here the target may be running the guest: never resume on our own (protocol.py).
        resumed = self.answer_of(Resumed)
        committed = laps.lap(Pause.TARGET_RESUME)
        self.deadline = None
        self.stats.downtime_ms = sum(laps.phases.values())
        self.stats.downtime_phases_ms = with_target_phases(laps.phases, ready, resumed, waited, committed)
        self.stats.downtime_target_ms = self.options.downtime_ms
        self.stats.downtime_copy_ms = round(sum(laps.phases.get(k, 0.0) for k in (Pause.DIRTY_LOG, Pause.LAST_ROUND,
                                                                                  Pause.DIGEST)), 3)

    # --- the end, either way ----------------------------------------------------------------------

    def fall_back(self, error: BaseException, code: ErrorCode) -> Outcome:
        """Tell the target why (if the exchange is still open) and say what to do with the guest."""
        proto = self.proto
        if isinstance(error, TransportError):
            proto.connection_lost()
        elif proto.outcome() is Outcome.UNDECIDED:
            message = (Cancel(str(error)) if code is ErrorCode.CANCELLED else Error(code, str(error)[:1000]))
            try:
                self.message(message)
            except Exception:
                proto.connection_lost()
        if proto.outcome() is Outcome.UNDECIDED:
            proto.connection_lost()
        return proto.outcome()

    def close_streams(self) -> None:
        for extra in self.extra:
            extra.close()

    def close(self) -> None:
        if self.fetch_conn is not None:
            self.fetch_conn.close()
        self.conn.close()


def with_target_phases(phases: dict[str, float], ready: Ready, resumed: Resumed, waited_ms: float,
                       committed_ms: float) -> dict[str, float]:
    """The source's laps with the target's own steps (from Ready and Resumed) taken out of the
    waits they happened in; what is left of a wait is the link's ("link")."""
    target = {Pause.TARGET_DIGEST: ready.digest_us / 1000, Pause.TARGET_APPLY: ready.apply_us / 1000,
              Pause.TARGET_RESUME: resumed.resume_us / 1000}
    out = {k: round(v, 3) for k, v in phases.items() if k not in (Pause.TARGET_VERIFY, Pause.TARGET_RESUME)}
    out |= {k: round(v, 3) for k, v in target.items()}
    out[Pause.LINK] = round(max(0.0, waited_ms + committed_ms - sum(target.values())), 3)
    return out


class TargetLink:
    """The target's end: the connection from the source (a new one after a reconnection in
    post-copy), the exchange's state, and the one `StreamReader` every byte goes through, so every
    checksum, range check and total of a snapshot applies to the wire too."""

    def __init__(self, conn: Connection, timeout: float) -> None:
        self.conn, self.timeout = conn, timeout
        self.proto = Protocol(Role.TARGET)
        self.reader = StreamReader(registry(), expect=EXPECT)

    def take(self, message: Message) -> Message:
        try:
            self.proto.receive(message)
        except RemoteProtocolError as e:  # out of order: typed, and the source is told why
            raise ProtocolViolation(str(e)) from None
        return message

    def next(self) -> Message:
        """The source's next message, allowed by the exchange now."""
        return self.take(self.conn.receive(self.timeout))

    def records(self, what: str, payload: bytes | memoryview, allowed: tuple[type, ...], *,
                stable: bool = False) -> list[Record]:
        """The records `payload` (a `what` message's) holds, each of a type that message may carry."""
        records = self.reader.feed(payload, stable=stable)
        for record in records:
            if not isinstance(record, allowed):
                raise ProtocolViolation(f"{what} carried a {type(record).__name__}")
        return records

    def tell(self, message: Message) -> None:
        self.proto.send(message)
        self.conn.send(message)

    def tell_why(self, error: BaseException) -> None:
        """If the exchange is still open (post-copy's too), tell the source why this side gave up."""
        proto = self.proto
        live = proto.outcome() is Outcome.UNDECIDED or proto.state in (S.POSTCOPY, S.POSTCOPY_END)
        if live and not isinstance(error, TransportError):
            try:
                self.tell(Error(error_code(error), f"{type(error).__name__}: {error}"[:1000]))
                self.conn.close_after_telling()  # so the source reads why, rather than a reset link
            except Exception:  # noqa: BLE001 - the link may be gone; the raise after this says why
                log.debug("could not tell the source why", exc_info=True)
