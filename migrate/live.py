"""Live migration by iterative pre-copy: `send` on the source, `receive` on the target.

The exchange is `migrate.protocol` (a two-phase hand-over; the never-two-copies argument is
there); the bytes are one kvmigrate stream (formats/SPEC.md) cut into protocol messages: HELLO
carries its header, CONFIG and LAYOUT; PAGES carry page sections; STATE the vCPU, VM and device
sections; COMPLETE the END section with the memory digest. The target feeds all of it through one
`StreamReader`, so every checksum, range check and total of a snapshot applies to the wire too.

Source, round by round while the guest runs: round 0 sends every touched page; each later round
fetches the dirty log (KVM's and the VMM's) and sends what changed. When what is left can go in
the downtime target at the measured bandwidth, the guest is paused and the rest goes (stop and
copy). Pages are encoded on worker threads while the main thread sends (`streams`). When the
guest dirties faster than the link carries, auto-converge throttles its vCPUs in growing steps.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import formats
from formats import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    ConfigRecord,
    DeviceRecord,
    EndRecord,
    LayoutRecord,
    PagesRecord,
    StreamReader,
    StreamWriter,
    VcpuRecord,
    VmStateRecord,
)
from hv.errors import HvError
from hv.kvm import state as hv_state
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.kvm import Kvm
from hv.kvm.memory import MemoryRegion, RamBacking
from hv.vmm.builder import blank_machine
from hv.vmm.machine import Machine, RunState
from migrate import pages
from migrate.errors import (
    IncompatibleError,
    MigrateError,
    MigrationFailed,
    TransportError,
)
from migrate.protocol import (
    PROTOCOL_VERSION,
    Accept,
    Cancel,
    Channel,
    Commit,
    Complete,
    Error,
    ErrorCode,
    Hello,
    Outcome,
    Pages,
    Protocol,
    Ready,
    Reject,
    Resumed,
    Role,
    RoundDone,
    State,
)
from migrate.snapshots import EXPECT
from migrate.state import (
    PRODUCER,
    MachineState,
    apply,
    capture,
    cpuid_problems,
    expected_layout,
    machine_config,
    machine_layout,
    registry,
)
from migrate.transport import Connection, Listener, Tls, connect

log = logging.getLogger(__name__)

Progress = Callable[[dict[str, Any]], None]
MESSAGE_BYTES = 8 << 20  # page payload per PAGES message
MiB = 1 << 20


@dataclass(frozen=True)
class GuestCpuid:
    """The CPUID the guest sees, sent in HELLO so the target can refuse before any page moves."""

    entries: tuple[hv_state.CpuidEntry, ...]


registry().register(GuestCpuid, "migrate.GuestCpuid", version=1)


@dataclass(frozen=True)
class MigrationOptions:
    downtime_ms: float = 300.0  # stop and copy once the rest fits in this
    bandwidth_mib_s: float = 0.0  # cap on what we send (0: as fast as the link goes)
    streams: int = 1  # page streams (connections), as QEMU's multifd channels
    threads: int = 2  # page-encoding threads (at least `streams`)
    auto_converge: bool = True
    throttle_initial: float = 0.2  # QEMU's cpu-throttle-initial / -increment, as fractions
    throttle_step: float = 0.1
    throttle_max: float = 0.99
    max_rounds: int = 30
    max_seconds: float = 120.0
    finish_anyway: bool = False  # at max rounds/time: stop and copy regardless (longer downtime)
    level: int = 1  # zstd level
    dry_run: bool = False
    timeout: float = 30.0  # longest wait for any one answer from the target
    key: bytes = b""
    tls: Tls | None = None  # mutual TLS (certificates checked against a private CA)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationOptions:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown migration options: {sorted(unknown)}")
        values = dict(d)
        if isinstance(values.get("key"), str):
            values["key"] = bytes.fromhex(values["key"])
        if isinstance(values.get("tls"), dict):
            values["tls"] = Tls(**values["tls"])
        return cls(**values)


@dataclass
class RoundStats:
    round: int
    pages: int
    raw_bytes: int
    sent_bytes: int
    seconds: float
    dirty_rate_mib_s: float  # how fast the guest dirtied memory during this round
    bandwidth_mib_s: float  # what the link carried during this round
    throttle: float


@dataclass
class MigrationStats:
    outcome: str = "failed"  # completed, rejected, cancelled, failed, in-doubt, dry-run
    reason: str = ""
    problems: list[str] = field(default_factory=list)
    total_seconds: float = 0.0
    setup_seconds: float = 0.0
    downtime_ms: float = 0.0
    rounds: list[RoundStats] = field(default_factory=list)
    pages_sent: int = 0
    zero_pages: int = 0
    raw_bytes: int = 0
    sent_bytes: int = 0
    throttle_max: float = 0.0
    sent_bytes_pages: int = 0  # wire bytes of page messages (for the compression ratio)

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.sent_bytes_pages if self.sent_bytes_pages else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compression_ratio"] = round(self.compression_ratio, 3)
        return d


class Cancelled(MigrateError):
    pass


class _NotConverging(MigrateError):
    pass


# --- source --------------------------------------------------------------------------------------


class _ExtraStream:
    """One extra page stream of the source: its own connection and stream writer, and a thread
    that sends what the main thread queues (so the streams send in parallel)."""

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

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(10)
        self.conn.close()


class _Sender:
    def __init__(self, machine: Machine, conn: Connection, options: MigrationOptions,
                 progress: Progress | None, cancel: threading.Event, address: str | None = None) -> None:
        self.machine, self.conn, self.options = machine, conn, options
        self.address = address
        self.progress = progress or (lambda p: None)
        self.cancel = cancel
        self.proto = Protocol(Role.SOURCE)
        self.writer = StreamWriter(registry(), producer=PRODUCER)
        self.stats = MigrationStats()
        self.pool = pages.PageEncoderPool(options.level, max(options.threads, options.streams))
        self.extra: list[_ExtraStream] = []
        self._sent_at_start = 0.0
        self._fetched_at = 0.0
        self._bytes_at_start = 0
        self._touched: pages.Touched = {}
        self._hashes: pages.BlockHashes | None = None
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="block-hashes")
        self._hashing: Future | None = None

    def message(self, message: Any) -> None:
        self.proto.send(message)
        self.conn.send(message)

    def pages_message(self, round_number: int, parts: list[bytes | memoryview]) -> None:
        if self.conn.has_message():  # the target does not speak during a round unless it gives up
            self.answer()
        self.proto.send(Pages(round_number, b""))  # the protocol tracks the kind, not the bytes
        self.conn.send_pages(round_number, parts)

    def answer(self) -> Any:
        message = self.conn.receive(self.options.timeout)
        self.proto.receive(message)
        if isinstance(message, Error):  # the target gave up and says why
            raise MigrationFailed(f"the target failed: {message.code.name}: {message.message}",
                                  "here", code=message.code)
        return message

    def _pace(self) -> None:
        limit = self.options.bandwidth_mib_s * MiB
        if limit:
            ahead = (self.bytes_sent - self._bytes_at_start) / limit - (time.perf_counter() - self._sent_at_start)
            if ahead > 0:
                time.sleep(ahead)

    @property
    def bytes_sent(self) -> int:
        return self.conn.bytes_sent + sum(x.conn.bytes_sent for x in self.extra)

    def open_extra_streams(self, session: bytes) -> None:
        """Streams 1..N-1: connect, authenticate, join the exchange, send the stream header."""
        o = self.options
        for index in range(1, o.streams):
            conn = connect(self.address, o.key, o.timeout, o.tls)
            stream = _ExtraStream(conn)
            self.extra.append(stream)
            conn.send(Channel(session, index))
            conn.send_pages(0, [stream.writer.header()])

    def _dispatch(self, stream: int, round_number: int, parts: list[bytes | memoryview]) -> None:
        if stream == 0:
            self.pages_message(round_number, parts)
            return
        extra = self.extra[stream - 1]
        if extra.error is not None:
            raise TransportError(f"page stream {stream}: {extra.error}")
        extra.queue.put((round_number, parts))

    def send_pages(self, round_number: int, runs: Iterable[pages.MemoryRun]) -> tuple[int, int, int]:
        """Encode and send `runs`, message by message across the streams; returns (pages, raw
        bytes, bytes on the wire) once every stream has sent its share."""
        parts: list[bytes | memoryview] = []
        size = npages = raw = 0
        wire0 = self.bytes_sent
        streams = 1 + len(self.extra)
        stream = round_number % streams
        writer = self.writer if stream == 0 else self.extra[stream - 1].writer
        for section in self.pool.encode(runs):
            if self.cancel.is_set():
                raise Cancelled("cancelled by the user")
            parts.extend(writer.pages_parts(section))  # framed by the stream that carries it
            size += section.length + 24
            npages += section.totals.pages
            raw += section.totals.raw_bytes
            self.stats.zero_pages += section.totals.zero_pages
            if size >= MESSAGE_BYTES:
                self._dispatch(stream, round_number, parts)
                parts, size = [], 0
                self._pace()
                stream = (stream + 1) % streams
                writer = self.writer if stream == 0 else self.extra[stream - 1].writer
        if parts:
            self._dispatch(stream, round_number, parts)
        for extra in self.extra:  # the round's bandwidth counts only what has left
            extra.queue.join()
            if extra.error is not None:
                raise TransportError(f"page stream: {extra.error}")
        self.message(RoundDone(round_number, npages))
        return npages, raw, self.bytes_sent - wire0

    def run(self) -> MigrationStats:
        t0 = time.perf_counter()
        machine, vm, o = self.machine, self.machine.vm, self.options
        config = machine_config(machine)
        cpuid = GuestCpuid(machine.vcpus[0].cpuid)
        self.message(Hello(PROTOCOL_VERSION, f"{FORMAT_MAJOR}.{FORMAT_MINOR}", PRODUCER,
                           self.writer.header() + self.writer.config(config),
                           self.writer.layout(machine_layout(machine)), registry().encode(cpuid),
                           o.dry_run, o.streams))
        reply = self.answer()
        if isinstance(reply, Reject):
            self.stats.outcome, self.stats.problems = "rejected", list(reply.problems)
            self.stats.reason = "the target refused the guest"
            return self.stats
        if o.dry_run:
            self.message(Cancel("dry run: compatibility checked, nothing sent"))
            self.stats.outcome, self.stats.reason = "dry-run", "the target would accept this guest"
            return self.stats
        if o.streams > 1:
            self.open_extra_streams(reply.session)
        self.stats.setup_seconds = time.perf_counter() - t0
        self._sent_at_start, self._bytes_at_start = time.perf_counter(), self.bytes_sent

        if not vm.dirty_logging:
            vm.enable_dirty_log()
        for _ in vm.fetch_dirty_logs():  # the log now counts writes from here on
            pass
        self._fetched_at = time.perf_counter()
        self._touched = pages.touched_pages(vm.memory)  # kept up to date from each dirty log
        self._hashes = pages.BlockHashes(vm.memory, self._touched)
        self._rehash()
        self._round(0, pages.populated_runs(vm.memory, self._touched), 0.0)
        while True:
            if self.cancel.is_set():
                raise Cancelled("cancelled by the user")
            dirty, dirty_pages, dirty_rate = self._fetch()
            bandwidth = max((r.bandwidth_mib_s for r in self.stats.rounds[-3:]), default=0.0)
            st = self.stats
            ratio = max(st.sent_bytes_pages / st.raw_bytes if st.raw_bytes else 1.0, 0.05)
            remaining_mib = dirty_pages * PAGE_SIZE * ratio / MiB
            budget_mib = bandwidth * o.downtime_ms / 1000
            # Stop and copy once the rest fits the downtime target, unless one more round is
            # likely to cut it a lot (it is still shrinking fast and would not fit a quarter of
            # the budget): a round costs the guest nothing, downtime costs it everything.
            shrinking = dirty_pages < 0.5 * self.stats.rounds[-1].pages
            if remaining_mib <= budget_mib and (remaining_mib <= budget_mib / 4 or not shrinking):
                break
            elapsed = time.perf_counter() - t0
            if len(self.stats.rounds) >= o.max_rounds or elapsed >= o.max_seconds:
                if o.finish_anyway:
                    break
                raise _NotConverging(
                    f"not converged after {len(self.stats.rounds)} rounds / {elapsed:.1f} s: "
                    f"{dirty_pages} pages dirty, about {remaining_mib / max(bandwidth, 1e-9) * 1000:.0f} ms "
                    f"to send at {bandwidth:.0f} MiB/s, downtime target {o.downtime_ms:.0f} ms")
            self._round(len(self.stats.rounds), pages.dirty_runs(dirty)[0], dirty_rate)
            self._converge(self.stats.rounds[-1])
        return self._stop_and_copy(dirty, t0)

    def _fetch(self) -> tuple[list[tuple[MemoryRegion, DirtyBitmap]], int, float]:
        """The dirty log since the last fetch, its page count and the rate the guest dirtied at."""
        dirty = list(self.machine.vm.fetch_dirty_logs())
        for region, bitmap in dirty:
            self._touched[region.guest_base] |= bitmap
        if self._hashes is not None:
            self._hashes.invalidate(dirty)
            self._rehash()
        now = time.perf_counter()
        count = sum(b.count() for _, b in dirty)
        rate = count * PAGE_SIZE / MiB / max(now - self._fetched_at, 1e-6)
        self._fetched_at = now
        return dirty, count, rate

    def _rehash(self) -> None:
        """Re-hash changed blocks in the background, one pass at a time (the digest at the end
        then hashes only what changed since)."""
        if self._hashing is None or self._hashing.done():
            self._hashing = self._hasher.submit(self._hashes.refresh, 1)

    def _round(self, number: int, runs: list[pages.MemoryRun], dirty_rate: float) -> None:
        t = time.perf_counter()
        npages, raw, wire = self.send_pages(number, runs)
        seconds = max(time.perf_counter() - t, 1e-6)
        stat = RoundStats(number, npages, raw, wire, seconds, dirty_rate, wire / MiB / seconds,
                          self.machine.throttle)
        self.stats.rounds.append(stat)
        self.stats.pages_sent += npages
        self.stats.raw_bytes += raw
        self.stats.sent_bytes_pages += wire
        self.progress({"stage": "round", **dataclasses.asdict(stat)})

    def _converge(self, last: RoundStats) -> None:
        o = self.options
        if not o.auto_converge or last.round < 2:
            return
        if last.dirty_rate_mib_s > 0.5 * last.bandwidth_mib_s:  # dirtying outpaces sending
            current = self.machine.throttle
            step = o.throttle_initial if current == 0 else min(o.throttle_max, current + o.throttle_step)
            if step != current:
                self.machine.set_throttle(step)
                self.stats.throttle_max = max(self.stats.throttle_max, step)
                self.progress({"stage": "throttle", "throttle": step})

    def _stop_and_copy(self, pending: list[tuple[MemoryRegion, DirtyBitmap]], t0: float) -> MigrationStats:
        machine = self.machine
        paused_at = time.perf_counter()
        machine.pause()
        self.progress({"stage": "stop-and-copy"})
        final, _, rate = self._fetch()
        for (_, merged), (_, earlier) in zip(final, pending, strict=True):
            merged |= earlier  # fetched while running but not sent yet
        self._round(len(self.stats.rounds), pages.dirty_runs(final)[0], rate)
        state = capture(machine, machine_config(machine))
        body = [self.writer.vcpu(v) for v in state.vcpus] + [self.writer.vm_state(state.vm)]
        body += [self.writer.device(entry, s) for entry, s in state.devices]
        self.message(State(b"".join(body)))
        if self._hashing is not None:
            self._hashing.result()  # a background pass may still be running: let it finish
        self.message(Complete(self.writer.end(self._hashes.digest(self.options.threads))))
        self.answer()  # Ready: the target holds a verified copy, built and paused
        self.message(Commit())
        # From here the target may be running the guest: never resume on our own (protocol.py).
        self.answer()  # Resumed
        self.stats.downtime_ms = (time.perf_counter() - paused_at) * 1000
        self.stats.outcome, self.stats.reason = "completed", "the target runs the guest"
        self.stats.total_seconds = time.perf_counter() - t0
        self.stats.sent_bytes = self.bytes_sent
        return self.stats


def send(machine: Machine, target: str | Connection, options: MigrationOptions | None = None, *,
         progress: Progress | None = None, cancel: threading.Event | None = None) -> MigrationStats:
    """Migrate a running (or paused) machine to `target` (HOST:PORT or a connection).

    Returns the stats; `outcome` says where the guest is. Anything that fails before the target
    acknowledged the hand-over leaves the guest running here, as it was (throttle off, dirty
    logging off); after Commit with no answer the guest is kept paused here (in doubt) and
    `MigrationFailed` says so."""
    o = options or MigrationOptions()
    t0 = time.perf_counter()
    if machine.state not in (RunState.RUNNING, RunState.PAUSED):
        raise MigrationFailed(f"the machine is {machine.state.value}", "where it was")
    was_running = machine.state is RunState.RUNNING
    conn = target if isinstance(target, Connection) else connect(target, o.key, o.timeout, o.tls)
    if o.streams > 1 and isinstance(target, Connection):
        raise MigrationFailed("several streams need an address to connect to", "where it was")
    sender = _Sender(machine, conn, o, progress, cancel or threading.Event(),
                     address=None if isinstance(target, Connection) else target)
    try:
        stats = sender.run()
    except (Exception, KeyboardInterrupt) as e:
        stats = sender.stats
        stats.total_seconds = time.perf_counter() - t0
        stats.sent_bytes = sender.bytes_sent
        stats.reason = f"{type(e).__name__}: {e}"
        code = (ErrorCode.CANCELLED if isinstance(e, Cancelled | KeyboardInterrupt) else
                ErrorCode.TIMEOUT if isinstance(e, _NotConverging) else ErrorCode.INTERNAL)
        outcome = _source_fallback(sender, e, code)
        stats.outcome = {Outcome.SOURCE_RESUME: "cancelled" if code is ErrorCode.CANCELLED else "failed",
                         Outcome.SOURCE_HOLD: "in-doubt"}.get(outcome, "failed")
        if outcome is Outcome.SOURCE_RESUME:
            _restore_source(machine, was_running)
        log.warning("migration to %s: %s (%s)", conn.peer, stats.outcome, stats.reason)
        if outcome is Outcome.SOURCE_HOLD:
            raise MigrationFailed(stats.reason, "paused here: the target may have it (in doubt); "
                                  "ask the target before resuming") from e
        return stats
    finally:
        sender.pool.close()
        sender._hasher.shutdown(wait=True)
        for extra in sender.extra:
            extra.close()
        conn.close()
    machine.set_throttle(0)
    if stats.outcome == "completed":
        machine.stop()  # the target runs the guest now
    return stats


def _source_fallback(sender: _Sender, error: BaseException, code: ErrorCode) -> Outcome:
    proto = sender.proto
    if isinstance(error, TransportError):
        proto.connection_lost()
    elif proto.outcome() is Outcome.UNDECIDED:
        message = (Cancel(str(error)) if code is ErrorCode.CANCELLED else Error(code, str(error)[:1000]))
        try:
            sender.message(message)
        except Exception:
            proto.connection_lost()
    if proto.outcome() is Outcome.UNDECIDED:
        proto.connection_lost()
    return proto.outcome()


def _restore_source(machine: Machine, was_running: bool) -> None:
    machine.set_throttle(0)
    if machine.vm.dirty_logging:
        machine.vm.disable_dirty_log()
    if was_running and machine.state is RunState.PAUSED:
        machine.resume()


# --- target -------------------------------------------------------------------------------------

MAX_STREAMS = 16


class _RoundGate:
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


class _IncomingStream:
    """An extra page stream on the target: its own stream reader, writing into guest memory."""

    def __init__(self, conn: Connection, machine: Machine, memory: formats.MemoryLayout, gate: _RoundGate) -> None:
        self.conn, self.gate = conn, gate
        self.reader = StreamReader(registry(), memory=memory)
        self.sink = pages.MemorySink(machine.vm.memory)
        self.thread = threading.Thread(target=self._run, name="page-stream-in", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.gate.closed:
                message = self.conn.receive(None)
                if not isinstance(message, Pages):
                    raise TransportError(f"a page stream carried {type(message).__name__}")
                self.gate.wait_turn(message.round)
                if self.gate.closed:
                    return
                count = 0
                for record in self.reader.feed(message.payload, stable=True):
                    if isinstance(record, PagesRecord):
                        self.sink.apply(record.runs)
                        count += record.totals.pages
                self.gate.add(message.round, count)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread through the gate
            self.gate.fail(e)

    def close(self) -> None:
        self.conn.close()
        self.thread.join(10)


def _accept_streams(listener: Listener | None, count: int, session: bytes, machine: Machine,
                    memory: formats.MemoryLayout, gate: _RoundGate, timeout: float) -> list[_IncomingStream]:
    if count and listener is None:
        raise TransportError("the source wants several page streams; this target has no listener for them")
    streams, seen = [], set()
    try:
        for _ in range(count):
            conn = listener.accept(timeout)
            try:
                hello = conn.receive(timeout)
                if (not isinstance(hello, Channel) or hello.session != session or hello.index in seen
                        or not 1 <= hello.index <= count):
                    raise TransportError(f"{conn.peer} is not one of this migration's page streams")
            except BaseException:
                conn.close()
                raise
            seen.add(hello.index)
            streams.append(_IncomingStream(conn, machine, memory, gate))
    except BaseException:
        gate.close()
        for stream in streams:
            stream.close()
        raise
    return streams


@dataclass
class Incoming:
    """What the target learned and built; `machine` runs the guest once `receive` returns."""

    machine: Machine | None = None
    config: Any = None
    pages: int = 0
    seconds: float = 0.0
    source: str = ""


def receive(conn: Connection, kvm: Kvm, *, console: Callable[[bytes], None] = lambda b: None,
            timeout: float = 60.0, disk: str | None = None,
            virtio_console: Callable[[bytes], None] | None = None, progress: Progress | None = None,
            listener: Listener | None = None) -> Incoming:
    """Take one incoming migration on `conn`: check, build, fill, verify, and on Commit run the
    guest. Any failure before Commit tears the half-built VM down and raises. `disk` puts the
    virtio disk at another path than the source's (the default: shared storage). `listener`
    accepts the extra page streams a source may open."""
    progress = progress or (lambda p: None)
    proto = Protocol(Role.TARGET)
    reader = StreamReader(registry(), expect=EXPECT)
    incoming = Incoming(source=conn.peer)
    t0 = time.perf_counter()
    loaded: dict[str, Any] = {"vcpus": [], "devices": []}

    def take(message: Any) -> Any:
        proto.receive(message)
        return message

    def tell(message: Any) -> None:
        proto.send(message)
        conn.send(message)

    machine: Machine | None = None
    gate, streams = _RoundGate(), []
    hasher = ThreadPoolExecutor(1, thread_name_prefix="block-hashes")
    try:
        hello = take(conn.receive(timeout))
        if not isinstance(hello, Hello):
            raise TransportError(f"expected HELLO, got {type(hello).__name__}")
        problems = []
        if hello.protocol_version != PROTOCOL_VERSION:
            problems.append(f"protocol version {hello.protocol_version}, this side speaks {PROTOCOL_VERSION}")
        records = reader.feed(hello.config + hello.layout)
        config = next(r.config for r in records if isinstance(r, ConfigRecord))
        layout = next(r.layout for r in records if isinstance(r, LayoutRecord))
        incoming.config = config
        vm_config = config.vm_config()
        problems += [str(d) for d in formats.diff(expected_layout(config), layout)]
        cpuid = registry().decode(hello.cpuid, expect=GuestCpuid)
        problems += cpuid_problems(cpuid.entries, kvm.guest_cpuid)
        if not 1 <= hello.streams <= (MAX_STREAMS if listener is not None else 1):
            problems.append(f"{hello.streams} page streams: this target takes 1 to "
                            f"{MAX_STREAMS if listener is not None else 1}")
        if problems:
            tell(Reject(tuple(problems)))
            raise IncompatibleError(problems)
        session = secrets.token_bytes(16)
        tell(Accept(session))
        if hello.dry_run:
            take(conn.receive(timeout))  # the source's Cancel
            return incoming
        virtio = config.virtio.build(virtio_console or console, disk) if config.virtio else None
        machine = blank_machine(kvm, vm_config, console, backing=RamBacking.host_filled, virtio=virtio)
        sink = pages.MemorySink(machine.vm.memory)
        streams = _accept_streams(listener, hello.streams - 1, session, machine, layout.memory, gate, timeout)
        sinks = [sink, *(x.sink for x in streams)]
        nothing = {r.guest_base: DirtyBitmap(r.npages) for r in machine.vm.memory.regions}
        hashes = pages.BlockHashes(machine.vm.memory, nothing)  # fresh memory: all zero
        hashing: Future | None = None
        while True:
            message = take(conn.receive(timeout))
            match message:
                case Pages(round=number, payload=payload):
                    count = 0
                    for record in reader.feed(payload, stable=True):  # a buffer only we hold
                        if isinstance(record, PagesRecord):
                            sink.apply(record.runs)
                            count += record.totals.pages
                    gate.add(number, count)
                case RoundDone(round=number, pages=count):
                    gate.round_done(number, count, timeout)
                    for written in sinks:  # hash what this round wrote while the next one arrives
                        hashes.invalidate(written.take_recent())
                    if hashing is None or hashing.done():
                        hashing = hasher.submit(hashes.refresh, 1)
                    progress({"stage": "round", "round": number, "pages": count})
                case State(payload=payload):
                    for record in reader.feed(payload):
                        match record:
                            case VcpuRecord(state=s):
                                loaded["vcpus"].append(s)
                            case VmStateRecord(state=s):
                                loaded["vm"] = s
                            case DeviceRecord(entry=entry, state=s):
                                loaded["devices"].append((entry, s))
                case Complete(payload=payload):
                    end = next(r for r in reader.feed(payload) if isinstance(r, EndRecord))
                    reader.finish()
                    if hashing is not None:
                        hashing.result()
                    for written in sinks:
                        hashes.invalidate(written.take_recent())
                    found = hashes.digest(2)
                    if found != end.digest:
                        raise formats.DigestMismatch(end.digest, found)
                    apply(machine, MachineState(config, layout, tuple(loaded["vcpus"]), loaded["vm"],
                                                tuple(loaded["devices"])))
                    tell(Ready())
                case Commit():
                    machine.start()  # Commit made this side the owner: run, even if Resumed is lost
                    try:
                        tell(Resumed())
                    except TransportError:
                        log.warning("the source did not hear Resumed; the guest runs here regardless")
                    incoming.machine = machine
                    incoming.pages = sink.pages + sum(x.sink.pages for x in streams)
                    incoming.seconds = time.perf_counter() - t0
                    return incoming
                case Cancel(reason=reason):
                    raise MigrationFailed(f"the source cancelled: {reason}", "on the source")
                case Error(code=code, message=text):
                    raise MigrationFailed(f"the source failed: {text}", "on the source", code=code)
    except BaseException as e:
        _close_streams(gate, streams)  # before the memory they write into goes away
        if machine is not None and incoming.machine is None:
            machine.stop()
            machine.vm.close()
        if proto.outcome() is Outcome.UNDECIDED and not isinstance(e, TransportError):
            code = (ErrorCode.DIGEST_MISMATCH if isinstance(e, formats.DigestMismatch) else
                    ErrorCode.INCOMPATIBLE if isinstance(e, formats.LayoutMismatch) else
                    ErrorCode.BAD_STREAM if isinstance(e, formats.FormatError) else
                    ErrorCode.RESTORE_FAILED if isinstance(e, HvError) else ErrorCode.INTERNAL)
            try:
                tell(Error(code, f"{type(e).__name__}: {e}"[:1000]))
                conn.close_after_telling()  # so the source reads why, rather than a reset link
            except Exception:  # noqa: BLE001 - the link may be gone; the raise below says why
                log.debug("could not tell the source why", exc_info=True)
        raise
    finally:
        _close_streams(gate, streams)
        hasher.shutdown(wait=True)


def _close_streams(gate: _RoundGate, streams: list[_IncomingStream]) -> None:
    gate.close()
    for stream in streams:
        stream.close()


def listen_and_receive(listener: Listener, kvm: Kvm, *, accept_timeout: float | None = None,
                       **kwargs: Any) -> Incoming:
    conn = listener.accept(accept_timeout)
    try:
        return receive(conn, kvm, listener=listener, **kwargs)
    finally:
        conn.close()
