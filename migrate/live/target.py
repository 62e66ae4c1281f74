"""The receiving side of a live migration: `receive(conn, kvm)`; `SessionLedger`, what it did with each session.

(`migrate.live.receiver` is the server around it: many connections, one migration at a time.)

One `Target` takes one migration, stage by stage:

1. handshake: HELLO is checked (protocol version, layout, CPUID, page streams, the guest's
   size against what this host offers, the disk this side will open for it; every problem
   listed) and answered with Accept or Reject;
2. build: a blank machine of the source's config, and the extra page streams accepted;
3. transfer: PAGES written into guest memory, RoundDone closing each round across the streams
   (while the block hashes of what the round wrote are refreshed in the background), STATE kept;
4. verify: on COMPLETE the memory digest is checked and the state applied, then Ready;
5. commit: on Commit the guest runs here, even if Resumed is lost.

All the bytes go through one `StreamReader`, so every checksum, range check and total of a
snapshot applies to the wire too; each message may carry only its own sections (HELLO: the
header, CONFIG and LAYOUT; PAGES: pages; STATE: vCPU, VM and device state; COMPLETE: END), and
the state's shape is checked against the layout before any of it is applied. A message out of
order is a `ProtocolViolation`. Any failure before Commit tears the half-built VM down, tells
the source why (`error_code`) and raises.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import formats
from formats import Record, StreamReader
from hv.devices.serial import Serial16550, Terminal
from hv.errors import HvError
from hv.vmm.builder import blank_machine
from hv.kvm.dirty import DirtyBitmap
from hv.kvm.kvm import Kvm
from hv.vmm.machine import Machine, discard
from hv.errors import RamReservationError
from hv.kvm.memory import RamBacking, anonymous_ram
from hv.platform.hostcpu import host_cpu_facts
from migrate import digest, pages
from migrate.datapath import place_pages
from migrate.disks import DiskPolicy, OpenDisk
from migrate.events import Progress, RoundReceived
from migrate.errors import (DiskRefused, IncompatibleError, MigrationFailed, PostcopyFailed, ProtocolViolation,
                            TransportError, error_code)
from formats import POSTCOPY_DIGEST_BLOCK, DIGEST_BLOCK
from migrate.live.postcopy import PostcopyTarget, count_missing, decode_missing, describe_missing, encode_missing, give_back
from migrate.protocol import (PROTOCOL_VERSION, Accept, Cancel, Commit, Complete, Discard, Discarded, Error,
                              Finished, HandOver,
                              Hello, Missing, Outcome, Pages, Postcopy, Protocol, Ready, Reconnect, Reject,
                              RemoteProtocolError, Resumed, Role, RoundDone, S, State)
from migrate.protocol import Message
from migrate.records import EXPECT, Collected
from migrate.state import (GuestCpuid, MachineConfig, apply, cpuid_problems, expected_layout, host_features,
                           registry)
from migrate.live.streams import (MAX_STREAMS, IncomingStream, Joins, RoundGate, accept_fetch_channel, accept_streams,
                             close_streams, listener_joins)
from migrate.transport.connection import Connection
from migrate.transport.listener import Listener

log = logging.getLogger(__name__)

# The sections each message may carry (HELLO: exactly these, once each, in this order).
HELLO_RECORDS = (formats.Header, formats.ConfigRecord, formats.LayoutRecord)
PAGES_RECORDS = (formats.PagesRecord,)
STATE_RECORDS = (formats.VcpuRecord, formats.VmStateRecord, formats.DeviceRecord)
COMPLETE_RECORDS = (formats.EndRecord,)


def host_reservable_memory() -> int:
    """The memory this host can give a guest now (MemAvailable: what the kernel says it can
    hand out without swapping); the default most guest RAM a target takes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class SessionLedger:
    """What this target did with each session it accepted: the record a source in doubt is
    answered from (`Query`), and the fence that keeps the answer true (protocol.py, point 6).

    A session is open from Accept until its exchange ends. Commit and a Query exclude each
    other: `committing` holds the lock while the guest starts, so a Query hears "committed" only
    once the guest is started here, and "not-committed" only for a session that can never be."""

    KEEP = 256  # sessions remembered (a target takes one guest at a time; this is years of retries)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: OrderedDict[bytes, HandOver | None] = OrderedDict()  # None: open, undecided
        self._open: dict[bytes, Connection] = {}
        self._postcopy: set[bytes] = set()  # committed in post-copy, not finished

    def opened(self, session: bytes, conn: Connection) -> None:
        with self._lock:
            self._sessions[session] = None
            self._open[session] = conn
            while len(self._sessions) > self.KEEP:
                self._sessions.popitem(last=False)

    def is_open(self, session: bytes) -> bool:
        with self._lock:
            return session in self._open

    @contextmanager
    def committing(self, session: bytes, *, postcopy: bool = False) -> Iterator[bool]:
        """Yields whether this session may still commit (False: a Query fenced it); the block
        starts the guest, under the lock. If it raises, the session did not commit. A post-copy
        commit is pending until `postcopy_pending(session, False)`."""
        with self._lock:
            if self._sessions.get(session, None) is not None:
                yield False
                return
            try:
                yield True
            except BaseException:
                self._sessions[session] = HandOver.NOT_COMMITTED
                raise
            self._sessions[session] = HandOver.COMMITTED
            if postcopy:
                self._postcopy.add(session)

    def postcopy_finished(self, session: bytes) -> None:
        """A post-copy session holds every page now. Until then it is not "committed" to a source
        asking: that source's copy is still the only one of some pages, and must not stop
        (protocol.py, point 7)."""
        with self._lock:
            self._postcopy.discard(session)

    def closed(self, session: bytes) -> None:
        """The session's exchange ended; undecided means it never committed."""
        with self._lock:
            self._open.pop(session, None)
            if session in self._sessions and self._sessions[session] is None:
                self._sessions[session] = HandOver.NOT_COMMITTED

    def query(self, session: bytes) -> HandOver:
        """The answer to a source in doubt; an open, undecided session is fenced by asking."""
        with self._lock:
            if session not in self._sessions or session in self._postcopy:
                return HandOver.UNKNOWN
            state = self._sessions[session]
            if state is None:
                self._sessions[session] = state = HandOver.NOT_COMMITTED
                conn = self._open.get(session)
                if conn is not None:
                    conn.interrupt()  # its Target stops waiting for a Commit it may no longer take
            return state



@dataclass
class Incoming:
    """What the target learned and built; `machine` runs the guest once `receive` returns."""

    machine: Machine | None = None
    config: MachineConfig | None = None
    pages: int = 0
    seconds: float = 0.0
    source: str = ""


class Target:
    """One incoming migration on `conn`; `run()` takes it from HELLO to a running guest."""

    def __init__(self, conn: Connection, kvm: Kvm, *, console: Callable[[bytes], None], timeout: float,
                 disks: DiskPolicy, max_mem: int | None, virtio_console: Callable[[bytes], None] | None,
                 progress: Progress | None, joins: Joins | None, ledger: SessionLedger | None = None,
                 first: Hello | None = None, terminal: Terminal | None = None,
                 postcopy_wait: float | None = 30.0, prepare: Callable[[Machine], None] | None = None,
                 max_vcpus: int | None = None) -> None:
        self.conn, self.kvm, self.timeout, self.joins = conn, kvm, timeout, joins
        self.postcopy_wait = postcopy_wait  # after a lost link in post-copy: how long the source may take to come back
        self.ledger = ledger or SessionLedger()
        self.first = first  # HELLO, when whoever accepted the connection has read it already
        self.terminal = terminal
        self.prepare = prepare  # what the guest's run here needs, acquired before Ready (never after Commit)
        self.console, self.virtio_console = console, virtio_console or console
        self.disks = disks
        self.disk: OpenDisk | None = None  # the guest's disk, opened by this side's policy
        self.max_mem = host_reservable_memory() if max_mem is None else max_mem
        self.max_vcpus = default_max_vcpus(kvm) if max_vcpus is None else max_vcpus
        self.progress = progress or (lambda p: None)
        self.proto = Protocol(Role.TARGET)
        self.reader = StreamReader(registry(), expect=EXPECT)
        self.incoming = Incoming(source=conn.peer)
        self.machine: Machine | None = None
        self.collected = Collected()  # the main connection's records; its sink once the VM exists
        self.gate = RoundGate()
        self.streams: list[IncomingStream] = []
        self.hashes: digest.BlockHashes | None = None
        self.session = b""  # what the extra page streams present, once accepted
        self.postcopy_capable = False  # Hello.postcopy: page-granular hashes, a fetch channel
        self.fetch_conn: Connection | None = None
        self.postcopy: PostcopyTarget | None = None  # from the switch on
        self._held: dict | None = None  # each page's hash as placed before the switch
        self._given_back: dict | None = None  # pages a Discard gave back before the pause
        self.host_cpuid: tuple | None = None  # this host's CPUID features, read as the machine is built
        self._t0 = time.perf_counter()

    def take(self, message: Message) -> Message:
        try:
            self.proto.receive(message)
        except RemoteProtocolError as e:  # out of order: typed, and the source is told why
            raise ProtocolViolation(str(e)) from None
        return message

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

    def run(self) -> Incoming:
        try:
            hello = self.handshake()
            if hello.dry_run:
                self.take(self.conn.receive(self.timeout))  # the source's Cancel
                return self.incoming
            self.build(hello)
            while True:
                try:
                    if self.on(self.take(self.conn.receive(self.timeout))):
                        return self.incoming
                except TransportError as e:
                    if self.postcopy is None or self.incoming.machine is None:
                        raise
                    self.wait_for_the_source(e)  # post-copy after Commit: both sides hold on
        except BaseException as e:
            self.fail(e)
            if self.postcopy is not None and self.incoming.machine is not None:
                raise self.postcopy_stopped(e) from e
            raise
        finally:
            close_streams(self.gate, self.streams)
            if self.fetch_conn is not None:
                self.fetch_conn.close()
            if self.hashes is not None:
                self.hashes.close()
            if self.session:
                self.ledger.closed(self.session)
            if self.disk is not None:
                self.disk.close()  # the device has its own descriptor

    # --- 1. handshake -----------------------------------------------------------------------------

    def handshake(self) -> Hello:
        hello = self.take(self.first if self.first is not None else self.conn.receive(self.timeout))
        if not isinstance(hello, Hello):  # the table takes only HELLO first; a caller's read too
            raise ProtocolViolation(f"expected HELLO, got {type(hello).__name__}")
        records = self.records("HELLO", hello.config + hello.layout, HELLO_RECORDS)
        if [type(r) for r in records] != list(HELLO_RECORDS):
            raise ProtocolViolation(f"HELLO carried {[type(r).__name__ for r in records]}, not the header, "
                                    f"CONFIG and LAYOUT once each")
        self.collected.take(records)
        self.collected.need("CONFIG", "LAYOUT")
        self.incoming.config = self.collected.config
        problems = self.problems(hello)
        log.info("HELLO from %s (%d MiB, %d page streams%s): %s", self.conn.peer, self.collected.config.mem_size >> 20,
                 hello.streams, ", a dry run" if hello.dry_run else "", "; ".join(problems) or "accepted")
        if problems:
            self.tell(Reject(tuple(problems)))
            raise IncompatibleError(problems)
        self.session = secrets.token_bytes(16)
        self.ledger.opened(self.session, self.conn)  # from now on a source in doubt may ask about it
        self.tell(Accept(self.session))
        return hello

    def problems(self, hello: Hello) -> list[str]:
        """Everything that keeps this host from taking the guest HELLO describes (every one)."""
        config = self.collected.config
        problems = []
        if hello.protocol_version != PROTOCOL_VERSION:
            problems.append(f"protocol version {hello.protocol_version}, this side speaks {PROTOCOL_VERSION}")
        if (problem := format_version_problem(hello.format_version)):
            problems.append(problem)
        if config.vcpus > self.max_vcpus:  # each is a thread here, made before the first page comes
            problems.append(f"the guest has {config.vcpus} vCPUs; this target takes at most {self.max_vcpus}")
        if config.mem_size > self.max_mem:
            problems.append(f"the guest has {config.mem_size >> 20} MiB of RAM; this target offers at most "
                            f"{self.max_mem >> 20} MiB")
        try:
            config.vm_config().validate(self.kvm.capabilities)
        except HvError as e:
            problems.append(str(e))
        if problems:
            return problems  # no layout to compare for a guest this host would not build
        problems += [str(d) for d in formats.diff(expected_layout(config), self.collected.layout)]
        cpuid = registry().decode(hello.cpuid, expect=GuestCpuid)
        problems += cpuid_problems(cpuid.entries, self.kvm.guest_cpuid)
        most = MAX_STREAMS if self.joins is not None else 1
        if not 1 <= hello.streams <= most:
            problems.append(f"{hello.streams} page streams: this target takes 1 to {most}")
        if hello.postcopy and self.joins is None:
            problems.append("post-copy needs a fetch channel, and this target takes no second connection")
        if not problems and config.virtio is not None and config.virtio.disk is not None:
            try:  # opened now, before any VM exists; the stream's path is only a name to match
                self.disk = self.disks.open(config.virtio.disk, config.virtio.disk_readonly)
            except DiskRefused as e:
                problems.append(str(e))
        return problems + host_problems(config, self.kvm)

    # --- 2. build ---------------------------------------------------------------------------------

    def build(self, hello: Hello) -> None:
        config = self.collected.config
        virtio = config.virtio.build(self.virtio_console, self.disk) if config.virtio else None
        self.machine = blank_machine(self.kvm, config.vm_config(), self.console, backing=RamBacking.host_filled,
                                     virtio=virtio)
        if self.terminal is not None:  # before the guest resumes here: no byte of it is lost
            self.machine.device("serial0", Serial16550).attach_terminal(self.terminal)
        self.machine.start(paused=True)  # the vCPU threads made and parked now, not in the pause
        if self.prepare is not None:  # the run's threads and context: a failure is a refusal, not a lost guest
            self.prepare(self.machine)
        memory = self.machine.vm.memory
        self.collected.sink = pages.MemorySink(memory)
        place_pages(self.reader, memory)  # checked and written in C; no guest runs here yet
        self.streams = accept_streams(self.joins, hello.streams - 1, self.session, self.machine,
                                      self.collected.layout.memory, self.gate, self.timeout)
        self.postcopy_capable = hello.postcopy
        self.host_cpuid = host_features(self.kvm)  # for the vCPUs' check in the pause: read now
        self.fetch_index = hello.streams
        if hello.postcopy:
            self.fetch_conn = accept_fetch_channel(self.joins, self.session, self.fetch_index, self.timeout)
        nothing = {r.guest_base: DirtyBitmap(r.npages) for r in memory.regions}
        block = POSTCOPY_DIGEST_BLOCK if hello.postcopy else DIGEST_BLOCK  # as the source's END
        self.hashes = digest.BlockHashes(memory, nothing, block)  # fresh memory: all zero

    # --- 3. to 5.: one message at a time ----------------------------------------------------------

    def on(self, message: Message) -> bool:
        """Act on one message of the exchange; True once the guest runs here."""
        match message:
            case Pages(payload=payload) if self.postcopy is not None:  # the background push
                records = self.records("PAGES", payload, (formats.Header, *PAGES_RECORDS), stable=True)
                self.postcopy.take(records, background=True)  # (a Header: the stream of a reconnection)
            case Pages(round=number, payload=payload):  # `stable`: a buffer only we hold
                self.gate.add(number, self.collected.take(self.records("PAGES", payload, PAGES_RECORDS,
                                                                       stable=True)))
                if self.postcopy_capable:  # hashed as they come: the switch waits for little
                    self._invalidate_written()
                    self.hashes.refresh_soon()
            case Discard(missing=missing, pages=count):
                self.discard(missing, count)
            case Postcopy(missing=missing, pages=count):
                self.switch(missing, count)
            case Complete(payload=payload) if self.postcopy is not None:
                self.finish_postcopy(payload)
                return True
            case RoundDone(round=number, pages=count):
                self.round_done(number, count)
            case State(payload=payload):
                self.collected.take(self.records("STATE", payload, STATE_RECORDS))
            case Complete(payload=payload):
                self.verify(payload)
            case Commit():
                self.commit()
                return self.postcopy is None  # post-copy: the pages still come
            case Cancel(reason=reason):
                raise MigrationFailed(f"the source cancelled: {reason}", "on the source")
            case Error(code=code, message=text):
                raise MigrationFailed(f"the source failed: {text}", "on the source", code=code)
        return False

    def _sinks(self) -> list[pages.MemorySink]:
        return [self.collected.sink, *(x.sink for x in self.streams)]

    def _invalidate_written(self) -> None:
        for sink in self._sinks():
            self.hashes.invalidate(sink.take_recent())

    def round_done(self, number: int, count: int) -> None:
        self.gate.round_done(number, count, self.timeout)
        self._invalidate_written()
        self.hashes.refresh_soon()  # hash what this round wrote while the next one arrives
        self.progress(RoundReceived(number, count))  # typed progress events (issue 22)

    def verify(self, payload: bytes) -> None:
        self.collected.take(self.records("COMPLETE", payload, COMPLETE_RECORDS))
        self.reader.finish()
        state = self.collected.state(self.host_cpuid)  # shape and registers checked, before any of it is applied
        self._invalidate_written()
        t0 = time.perf_counter()
        found = self.hashes.digest(2)
        if found != self.collected.end.digest:
            raise formats.DigestMismatch(self.collected.end.digest, found)
        t1 = time.perf_counter()
        apply(self.machine, state)
        self.tell(Ready(digest_us=_us(t1 - t0), apply_us=_us(time.perf_counter() - t1)))

    def _bitmap(self, what: str, missing: bytes, count: int) -> dict:
        bits = decode_missing(missing, self.machine.vm.memory)
        if count_missing(bits) != count:
            raise ProtocolViolation(f"{what} says {count} pages; its bitmap has another count")
        return bits

    def discard(self, missing: bytes, count: int) -> None:
        """Before the pause (the guest still runs on the source): every page held so far hashed
        (no more come before the switch), then the pages the source says changed since given
        back to the host, so the pause has only the last few to free."""
        if not self.postcopy_capable:  # (after it, the table takes no PAGES and no second Discard)
            raise ProtocolViolation("Discard in a migration that did not ask for post-copy")
        bits = self._bitmap("Discard", missing, count)
        self._invalidate_written()
        t0 = time.perf_counter()
        self._held = self.hashes.current(2)
        t1 = time.perf_counter()
        give_back(self.machine.vm.memory, bits)  # nothing reads them from now on (give_back says why)
        self._given_back = bits
        self.tell(Discarded(digest_us=_us(t1 - t0), discard_us=_us(time.perf_counter() - t1)))

    def switch(self, missing: bytes, count: int) -> None:
        """Post-copy's switch: the state applied, every page held so far hashed (the guest has
        not run here), the missing pages registered; then Ready."""
        if not self.postcopy_capable or self.fetch_conn is None:  # (the table refuses it first)
            raise ProtocolViolation("Postcopy in a migration whose HELLO did not ask for post-copy")
        state = self.collected.state(self.host_cpuid)
        memory = self.machine.vm.memory
        bits = self._bitmap("Postcopy", missing, count)
        given_back = self._given_back
        if given_back is not None and any(given_back[b].without(bits[b]).count() for b in bits):
            raise ProtocolViolation("Postcopy leaves out pages its Discard gave back")  # they would read as zero
        t0 = time.perf_counter()
        if self._held is None:  # no Discard before: hashed now, in the pause
            self._invalidate_written()
            self._held = self.hashes.current(2)
        t1 = time.perf_counter()
        apply(self.machine, state)
        self.postcopy = PostcopyTarget(memory, self.collected.layout.memory, bits, given_back)
        self.postcopy.decode_into_staging(self.reader)  # from now on the main stream's pages too
        self.postcopy.start_fetcher(self.fetch_conn)  # waits for the first fault: the guest's resume
        log.debug("post-copy switch: %s missing", describe_missing(count))
        self.tell(Ready(digest_us=_us(t1 - t0), apply_us=_us(time.perf_counter() - t1)))

    def finish_postcopy(self, payload: bytes) -> None:
        """END after the last pushed page: every missing page must be in by now; the page digest
        checked (migrate.live.postcopy says why it proves the memory); then Finished."""
        end = self.records("COMPLETE", payload, COMPLETE_RECORDS)[0]  # (again after a reconnection: not collected)
        pc = self.postcopy
        left = pc.wait_placed(self.timeout)  # fetched pages may still be on the fetch channel's way
        if left:
            raise MigrationFailed(f"post-copy: the source finished with {describe_missing(left)} never sent",
                                  "on the source")
        found = pc.digest(self._held)
        if found != end.digest:
            raise formats.DigestMismatch(end.digest, found)
        if (elsewhere := pc.placed_elsewhere()):  # the digest's argument needs every one placed from staging
            raise MigrationFailed(f"post-copy: {elsewhere} missing pages were found in place, not from what the "
                                  "source sent (something read them before they were registered)", "on the target")
        pc.stop_fetcher()
        p50, p99, blocked = pc.fault_stats()
        self.tell(Finished(fetched=pc.figures.fetched, background=pc.figures.background, fault_p50_us=p50,
                           fault_p99_us=p99, blocked_us=blocked))
        pc.close()
        self.ledger.postcopy_finished(self.session)
        log.info("post-copy finished: %d pages fetched on demand, %d in the background", pc.figures.fetched,
                 pc.figures.background)

    def wait_for_the_source(self, error: TransportError) -> None:
        """The link went after Commit in post-copy: the guest runs on here (a vCPU touching a
        missing page waits in the kernel), and the source may come back, on a new connection
        that opens with Reconnect (migrate.live.receiver hands it over, as a page stream). Answered
        with what is still missing; the fetch channel joins again after it. A reconnection that
        breaks on the way is waited past too. Past `postcopy_wait` the source is taken for gone
        (a TransportError)."""
        self.proto.connection_lost()
        self.postcopy.stop_fetcher()
        self.conn.close()
        log.warning("post-copy: the link to the source went (%s) with %s missing; vCPUs that touch one wait; "
                    "waiting %s for the source to reconnect", error, describe_missing(self.postcopy.still_missing()),
                    "without end" if self.postcopy_wait is None else f"{self.postcopy_wait:.0f} s")
        deadline = None if self.postcopy_wait is None else time.monotonic() + self.postcopy_wait
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if self.joins is None or (left is not None and left <= 0):
                raise TransportError(f"the source did not come back within {self.postcopy_wait:.0f} s: {error}")
            try:
                conn, first = self.joins(60.0 if left is None else left)
            except TransportError:
                continue
            if not (isinstance(first, Reconnect) and first.session == self.session):
                log.warning("%s: not this migration's source coming back (%s)", conn.peer, type(first).__name__)
                conn.close()
                continue
            try:
                self._take_the_source_back(conn, first, left)
                return
            except TransportError as e:
                log.warning("post-copy: the source's reconnection broke off (%s); waiting again", e)
                self.proto.connection_lost()
                self.postcopy.stop_fetcher()
                conn.close()

    def _take_the_source_back(self, conn: Connection, first: Reconnect, left: float | None) -> None:
        self.conn = conn
        self.proto.link_back()
        self.take(first)
        still = self.postcopy.missing_now()
        left = count_missing(still)
        self.tell(Missing(encode_missing(still), left))
        self.reader = self.postcopy.reader()  # the source starts a new stream on the new connection
        if self.fetch_conn is not None:
            self.fetch_conn.close()
        self.fetch_conn = accept_fetch_channel(self.joins, self.session, self.fetch_index,
                                               self.timeout if left is None else min(self.timeout, max(left, 1.0)))
        self.postcopy.start_fetcher(self.fetch_conn)
        self.postcopy.figures.reconnects += 1
        log.warning("post-copy: the source is back (%s); %s still to come", conn.peer,
                    describe_missing(left))

    def commit(self) -> None:
        t0 = time.perf_counter()
        with self.ledger.committing(self.session, postcopy=self.postcopy is not None) as allowed:
            if not allowed:
                raise MigrationFailed("Commit came after the source, in doubt, asked about this session and "
                                      "heard 'not committed'; this copy is discarded", "on the source")
            # Commit made this side the owner: run, even if Resumed is lost. Counted until the
            # vCPU threads are on their way into KVM_RUN: the guest's first instruction here.
            self.machine.resume(wait_running=True)
        try:
            self.tell(Resumed(resume_us=_us(time.perf_counter() - t0)))
        except TransportError:
            log.warning("the source did not hear Resumed; the guest runs here regardless")
        log.info("Commit: the guest runs here now")  # after Resumed went: not in the downtime
        self.incoming.machine = self.machine
        self.incoming.pages = sum(sink.pages for sink in self._sinks())
        self.incoming.seconds = time.perf_counter() - self._t0

    # --- or else ----------------------------------------------------------------------------------

    def postcopy_stopped(self, error: BaseException) -> PostcopyFailed:
        """Post-copy broke off after Commit: the guest here must not run on with holes. Its vCPUs
        are paused (one waiting in the kernel for a page that is not coming stays there: it runs
        no guest instruction either), the pages stay registered, the machine is kept."""
        pc = self.postcopy
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

    def fail(self, error: BaseException) -> None:
        """Tear the half-built VM down and, if the exchange is still open, tell the source why."""
        close_streams(self.gate, self.streams)  # before the memory they write into goes away
        if self.machine is not None and self.incoming.machine is None:
            discard(self.machine)
        live = self.proto.outcome() is Outcome.UNDECIDED or self.proto.state in (S.POSTCOPY, S.POSTCOPY_END)
        if live and not isinstance(error, TransportError):
            try:
                self.tell(Error(error_code(error), f"{type(error).__name__}: {error}"[:1000]))
                self.conn.close_after_telling()  # so the source reads why, rather than a reset link
            except Exception:  # noqa: BLE001 - the link may be gone; the raise after this says why
                log.debug("could not tell the source why", exc_info=True)


TSC_TOLERANCE = 250e-6  # a rate within 250 ppm is the same clock (QEMU's tsc-frequency tolerance)


def host_problems(config: MachineConfig, kvm: Kvm) -> list[str]:
    """What this host lacks to run the guest CONFIG describes, checked before any page moves
    (a dry run answers with these too): guest RAM it can reserve, the guest's TSC rate. (The
    disk is the disk policy's: `migrate.disks`.)"""
    problems = []  # (more RAM than the target offers at all is `Target.problems`' `max_mem`)
    try:
        anonymous_ram(config.mem_size, huge_pages=False).close()  # reserved, never touched
    except RamReservationError as e:
        problems.append(str(e))
    if config.tsc_khz and not kvm.capabilities.tsc_control:
        here = kvm.vcpu_tsc_khz
        if here and abs(here - config.tsc_khz) > config.tsc_khz * TSC_TOLERANCE:
            cpus = host_cpu_facts().frequency_fact()  # what the operator weighs next: this host's CPUs
            problems.append(f"the guest's TSC runs at {config.tsc_khz} kHz, this host's at {here} kHz ({cpus}), "
                            "and its KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL)")
    return problems


def format_version_problem(version: object) -> str:
    """Why a HELLO's `format_version` ("major.minor" of the stream format) is not one this side
    reads; "" if it is. (The stream's own header says it again, and is checked as it is read.)"""
    major, dot, minor = str(version).partition(".")
    if not all(part.isascii() and part.isdigit() and len(part) < 6 for part in (major, minor)) or not dot:
        return f"format version {str(version)[:40]!r} is not MAJOR.MINOR"
    if int(major) not in formats.SUPPORTED_MAJORS:
        return (f"format version {int(major)}.{int(minor)}: this side reads "
                f"{', '.join(f'{m}.x' for m in formats.SUPPORTED_MAJORS)}")
    return ""


OVERCOMMIT = 4  # a target takes at most this many vCPUs per host CPU unless told otherwise


def default_max_vcpus(kvm: Kvm) -> int:
    """The most vCPUs (threads) a stream may make this target create unless `--max-vcpus` says:
    `OVERCOMMIT` per host CPU (KVM's recommended count, or the CPUs online), never past KVM's
    own limit (which `VmConfig.validate` also checks)."""
    caps = kvm.capabilities
    return min(caps.max_vcpus, OVERCOMMIT * max(caps.recommended_vcpus, os.cpu_count() or 1))


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def receive(conn: Connection, kvm: Kvm, *, console: Callable[[bytes], None] = lambda b: None,
            timeout: float = 60.0, disk: str | None = None, disk_dir: str | None = None,
            max_mem: int | None = None, virtio_console: Callable[[bytes], None] | None = None,
            progress: Progress | None = None, listener: Listener | None = None, joins: Joins | None = None,
            ledger: SessionLedger | None = None, first: Hello | None = None,
            terminal: Terminal | None = None, postcopy_wait: float | None = 30.0,
            prepare: Callable[[Machine], None] | None = None, max_vcpus: int | None = None) -> Incoming:
    """Take one incoming migration on `conn`: check, build, fill, verify, and on Commit run the
    guest. Any failure before Commit tears the half-built VM down and raises. A guest with a
    disk gets `disk` (this host's file for it), or the file of the stream's disk's name in
    `disk_dir`; with neither it is refused (`migrate.disks`). `max_mem`: the most guest RAM this
    target takes (default: what the host can reserve now). The extra page streams a source may
    open come from `joins` (or are accepted on `listener`); `ledger` records the session for a
    source in doubt to ask about (`migrate.live.receiver` shares one); `first` is HELLO if the caller
    read it already; `terminal`, where the guest's COM1 meets this host (attached before the
    guest resumes here); `postcopy_wait`, after a lost link in post-copy, how long the source may
    take to reconnect (None: for as long as it takes) before the guest is paused here for good;
    `prepare(machine)`, whatever the guest's run here will need, acquired as the machine is built
    (before Ready: its failure is a refusal, and nothing that can fail is left for after Commit);
    `max_vcpus`, the most vCPUs a guest may have here (default: `default_max_vcpus`)."""
    if joins is None and listener is not None:
        joins = listener_joins(listener)
    return Target(conn, kvm, console=console, timeout=timeout, disks=DiskPolicy.of(disk, disk_dir),
                  max_mem=max_mem, virtio_console=virtio_console, progress=progress, joins=joins,
                  ledger=ledger, first=first, terminal=terminal, postcopy_wait=postcopy_wait,
                  prepare=prepare, max_vcpus=max_vcpus).run()
