"""Extra page streams (QEMU's multifd channels) and the round gate that keeps them in order.

A source may open streams 1..N-1 beside the main connection (stream 0): each joins the exchange
with `Channel(session, index)` and then carries only PAGES, each tagged with its round, while
RoundDone on the main connection says how many pages a round had. On the source an
`OutgoingStream` sends what the main thread queues, on its own thread, so the streams send in
parallel; on the target an `IncomingStream` reads and applies pages on its own thread, and the
`RoundGate` holds round r's pages back until every page of the rounds before it is in.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import formats
from formats import StreamReader, StreamWriter
from hv.vmm.machine import Machine
from migrate.datapath import place_pages
from migrate.errors import TransportError
from migrate.pages import MemorySink
from migrate.protocol import Channel, Pages, Reconnect
from migrate.records import Collected
from migrate.state import PRODUCER, registry
from migrate.transport.connection import Connection
from migrate.transport.listener import Listener

MAX_STREAMS = 16  # page streams a target takes at the most (the main connection included)

# --- source ---------------------------------------------------------------------------------------


class OutgoingStream:
    """One extra page stream of the source: its own connection and stream writer, and a thread
    that sends what the main thread queues."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.writer = StreamWriter(registry(), producer=PRODUCER)
        self.queue: queue.Queue[tuple[int, list[bytes | memoryview]] | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._send_loop, name="page-stream", daemon=True)
        self.thread.start()

    def _send_loop(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is None:
                    return
                if self.error is None:
                    self.conn.send_pages(*item)
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e
            finally:
                self.queue.task_done()

    def wait_sent(self, timeout: float | None) -> bool:
        """Wait until everything queued has been sent (or failed); False if `timeout` passed."""
        with self.queue.all_tasks_done:
            return self.queue.all_tasks_done.wait_for(lambda: not self.queue.unfinished_tasks, timeout)

    def close(self) -> None:
        self.conn.interrupt()  # a send blocked on a silent target returns now, not at its timeout
        try:
            self.queue.put(None, timeout=10)  # the interrupted thread drains what is queued at once
        except queue.Full:
            pass  # it is stuck elsewhere; a daemon, it ends with the process
        self.thread.join(10)
        self.conn.close()


# --- target ---------------------------------------------------------------------------------------


class RoundGate:
    """The target's barrier across page streams: a stream applies round r's pages only once
    every page of the rounds before it is in (RoundDone on the main connection counts them), so
    a page re-sent in a later round can never be overwritten by its older copy."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.allowed = 0
        self.applied: dict[int, int] = {}
        self.error: BaseException | None = None
        self.closed = False

    def wait_turn(self, round_number: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: round_number <= self.allowed or self.closed or self.error)

    def add(self, round_number: int, count: int) -> None:
        with self.cond:
            self.applied[round_number] = self.applied.get(round_number, 0) + count
            self.cond.notify_all()

    def round_done(self, round_number: int, count: int, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.applied.get(round_number, 0) >= count or self.error, timeout)
            if self.error is not None:
                raise TransportError(f"a page stream failed: {self.error}")
            got = self.applied.get(round_number, 0)
            if got != count:
                raise TransportError(f"round {round_number}: {got} of {count} pages arrived")
            self.allowed = round_number + 1
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self.cond:
            if not self.closed and self.error is None:
                self.error = error
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class IncomingStream:
    """An extra page stream on the target: its own stream reader, writing into guest memory."""

    def __init__(self, conn: Connection, machine: Machine, memory: formats.MemoryLayout, gate: RoundGate) -> None:
        self.conn, self.gate = conn, gate
        self.reader = StreamReader(registry(), memory=memory)
        place_pages(self.reader, machine.vm.memory)  # checked and written in C, as the main stream's
        self.sink = MemorySink(machine.vm.memory)
        self.thread = threading.Thread(target=self._run, name="page-stream-in", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        collected = Collected(self.sink)
        try:
            while not self.gate.closed:
                message = self.conn.receive(None)
                if not isinstance(message, Pages):
                    raise TransportError(f"a page stream carried {type(message).__name__}")
                self.gate.wait_turn(message.round)
                if self.gate.closed:
                    return
                self.gate.add(message.round, collected.take(self.reader.feed(message.payload, stable=True)))
        except BaseException as e:  # noqa: BLE001 - handed to the main thread through the gate
            self.gate.fail(e)

    def close(self) -> None:
        self.conn.close()
        self.thread.join(10)


# the next connection that opened with Channel (or, in post-copy, Reconnect) for this migration
Joins = Callable[[float], tuple[Connection, Channel | Reconnect]]


def listener_joins(listener: Listener) -> Joins:
    """Joins taken straight from a listener: each connection must open with Channel."""

    def next_join(timeout: float) -> tuple[Connection, Channel | Reconnect]:
        conn = listener.accept(timeout)
        try:
            hello = conn.receive(timeout)
        except BaseException:
            conn.close()
            raise
        if not isinstance(hello, (Channel, Reconnect)):
            conn.close()
            raise TransportError(f"{conn.peer} is not one of this migration's page streams")
        return conn, hello

    return next_join


def accept_streams(joins: Joins | None, count: int, session: bytes, machine: Machine,
                   memory: formats.MemoryLayout, gate: RoundGate, timeout: float) -> list[IncomingStream]:
    """The source's `count` extra streams, each checked to be one of this migration's."""
    if joins is None:
        if count:
            raise TransportError("the source wants several page streams; this target has no listener for them")
        return []
    streams: list[IncomingStream] = []
    seen: set[int] = set()
    try:
        for _ in range(count):
            conn, hello = joins(timeout)
            if not isinstance(hello, Channel) or hello.session != session or hello.index in seen or not 1 <= hello.index <= count:
                conn.close()
                raise TransportError(f"{conn.peer} is not one of this migration's page streams")
            seen.add(hello.index)
            streams.append(IncomingStream(conn, machine, memory, gate))
    except BaseException:
        close_streams(gate, streams)
        raise
    return streams


def accept_fetch_channel(joins: Joins | None, session: bytes, index: int, timeout: float) -> Connection:
    """Post-copy's fetch channel: the join after the page streams, `Channel(session, index)`."""
    if joins is None:
        raise TransportError("post-copy needs a fetch channel; this target has no listener for it")
    conn, hello = joins(timeout)
    if not isinstance(hello, Channel) or hello.session != session or hello.index != index:
        conn.close()
        raise TransportError(f"{conn.peer} is not this migration's fetch channel")
    return conn


def close_streams(gate: RoundGate, streams: list[IncomingStream]) -> None:
    gate.close()
    for stream in streams:
        stream.close()
