"""The receiving side of a live migration: `receive(conn, kvm, options)`.

(`migrate.live.receiver` is the server around it: many connections, one migration at a time;
`migrate.live.ledger` what it did with each session.)

One `Target` takes one migration, stage by stage:

1. handshake: HELLO is checked (protocol version, layout, CPUID, page streams, the guest's
   size against what this host offers, the disk this side will open for it; every problem
   listed) and answered with Accept or Reject;
2. build: a blank machine of the source's config, and the extra page streams accepted;
3. transfer: PAGES written into guest memory, RoundDone closing each round across the streams
   (while the block hashes of what the round wrote are refreshed in the background), STATE kept;
4. verify: on COMPLETE the memory digest is checked and the state applied, then Ready;
5. commit: on Commit the guest runs here, even if Resumed is lost.

The messages come over a `TargetLink` (`migrate.live.link`); a migration that asked for
post-copy has its half (`migrate.live.postcopy.target`) take Discard, the switch and the rest.
All the bytes go through one `StreamReader`, so every checksum, range check and total of a
snapshot applies to the wire too; each message may carry only its own sections (HELLO: the
header, CONFIG and LAYOUT; PAGES: pages; STATE: vCPU, VM and device state; COMPLETE: END), and
the state's shape is checked against the layout before any of it is applied. A message out of
order is a `ProtocolViolation`. Any failure before Commit tears the half-built VM down, tells
the source why (`error_code`) and raises.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import formats
from formats import DIGEST_BLOCK, POSTCOPY_DIGEST_BLOCK, DeviceLayout
from hv.devices.serial import Serial16550
from hv.errors import HvError
from hv.kvm.dirty import DirtyBitmap
from hv.kvm.kvm import Kvm
from hv.kvm.memory import RamBacking
from hv.vmm.builder import blank_machine
from hv.vmm.machine import Machine, discard
from migrate import digest, pages
from migrate.datapath import place_pages
from migrate.disks import DiskPolicy, OpenDisk
from migrate.errors import DiskRefused, IncompatibleError, MigrationFailed, ProtocolViolation, TransportError
from migrate.events import RoundReceived
from migrate.live.admission import default_max_vcpus, format_version_problem, host_problems, host_reservable_memory
from migrate.live.ledger import SessionLedger
from migrate.live.link import TargetLink
from migrate.live.postcopy.target import COMPLETE_RECORDS, PAGES_RECORDS, TargetPostcopy, us
from migrate.live.streams import (MAX_STREAMS, IncomingStream, Joins, RoundGate, accept_streams, close_streams,
                                  listener_joins)
from migrate.options import ReceiveOptions
from migrate.protocol import (PROTOCOL_VERSION, Accept, Applied, Cancel, Commit, Complete, Discard, Error, Hello,
                              Message, Pages, Postcopy, Ready, Reject, Resumed, RoundDone, State)
from migrate.records import Collected
from migrate.state import GuestCpuid, MachineConfig, apply, cpuid_problems, expected_layout, host_features, registry
from migrate.transport.connection import Connection
from migrate.transport.listener import Listener

log = logging.getLogger(__name__)

# The sections each message may carry (HELLO: exactly these, once each, in this order).
HELLO_RECORDS = (formats.Header, formats.ConfigRecord, formats.LayoutRecord)
STATE_RECORDS = (formats.VcpuRecord, formats.VmStateRecord, formats.DeviceRecord)


@dataclass
class Incoming:
    """What the target learned and built; `machine` runs the guest once `receive` returns."""

    machine: Machine | None = None
    config: MachineConfig | None = None
    pages: int = 0
    seconds: float = 0.0
    source: str = ""


class Target:
    """One incoming migration on `conn`; `run()` takes it from HELLO to a running guest. `joins`
    hands over the connections that join it (page streams, the fetch channel, a reconnection);
    `ledger` records its session; `first` is HELLO if whoever accepted `conn` read it already."""

    def __init__(self, conn: Connection, kvm: Kvm, options: ReceiveOptions, *, joins: Joins | None = None,
                 ledger: SessionLedger | None = None, first: Hello | None = None) -> None:
        self.kvm, self.options, self.joins = kvm, options, joins
        self.timeout = options.timeout
        self.link = TargetLink(conn, options.timeout)
        self.ledger = ledger or SessionLedger()
        self.first = first
        self.disks = DiskPolicy.of(options.disk, options.disk_dir)
        self.disk: OpenDisk | None = None  # the guest's disk, opened by this side's policy
        self.max_mem = host_reservable_memory() if options.max_mem is None else options.max_mem
        self.max_vcpus = default_max_vcpus(kvm) if options.max_vcpus is None else options.max_vcpus
        self.progress = options.progress or (lambda p: None)
        self.incoming = Incoming(source=conn.peer)
        self.machine: Machine | None = None
        self.collected = Collected()  # the main connection's records; its sink once the VM exists
        self.gate = RoundGate()
        self.streams: list[IncomingStream] = []
        self.hashes: digest.BlockHashes | None = None
        self.session = b""  # what the extra page streams present, once accepted
        self.postcopy: TargetPostcopy | None = None  # Hello.postcopy: page-granular hashes, a fetch channel
        self.host_cpuid: tuple | None = None  # this host's CPUID features, read as the machine is built
        self.state_applied = False  # pre-copy: the state went in as it came (`apply_state`)
        self._t0 = time.perf_counter()

    @property
    def switched(self) -> bool:
        """Past the post-copy switch: the guest's last pages are still to come."""
        return self.postcopy is not None and self.postcopy.placer is not None

    def run(self) -> Incoming:
        try:
            hello = self.handshake()
            if hello.dry_run:
                self.link.next()  # the source's Cancel
                return self.incoming
            self.build(hello)
            while True:
                try:
                    if self.on(self.link.next()):
                        return self.incoming
                except TransportError as e:
                    if self.postcopy is None or not self.switched or self.incoming.machine is None:
                        raise
                    self.postcopy.wait_for_the_source(e)  # post-copy after Commit: both sides hold on
        except BaseException as e:
            self.fail(e)
            if self.postcopy is not None and self.switched and self.incoming.machine is not None:
                raise self.postcopy.stopped(e) from e
            raise
        finally:
            close_streams(self.gate, self.streams)
            if self.postcopy is not None:
                self.postcopy.close()
            if self.hashes is not None:
                self.hashes.close()
            if self.session:
                self.ledger.closed(self.session)
            if self.disk is not None:
                self.disk.close()  # the device has its own descriptor

    # --- 1. handshake -----------------------------------------------------------------------------

    def handshake(self) -> Hello:
        link = self.link
        hello = link.take(self.first) if self.first is not None else link.next()
        if not isinstance(hello, Hello):  # the table takes only HELLO first; a caller's read too
            raise ProtocolViolation(f"expected HELLO, got {type(hello).__name__}")
        records = link.records("HELLO", hello.config + hello.layout, HELLO_RECORDS)
        if [type(r) for r in records] != list(HELLO_RECORDS):
            raise ProtocolViolation(f"HELLO carried {[type(r).__name__ for r in records]}, not the header, "
                                    f"CONFIG and LAYOUT once each")
        self.collected.take(records)
        config, layout = self.collected.described()
        self.incoming.config = config
        problems = self.problems(hello, config, layout)
        log.info("HELLO from %s (%d MiB, %d page streams%s): %s", link.conn.peer, config.mem_size >> 20,
                 hello.streams, ", a dry run" if hello.dry_run else "", "; ".join(problems) or "accepted")
        if problems:
            link.tell(Reject(tuple(problems)))
            raise IncompatibleError(problems)
        self.session = secrets.token_bytes(16)
        self.ledger.opened(self.session, link.conn)  # from now on a source in doubt may ask about it
        link.tell(Accept(self.session, round_acks=hello.round_acks))  # a Hello that asks gets them
        return hello

    def problems(self, hello: Hello, config: MachineConfig, layout: DeviceLayout) -> list[str]:
        """Everything that keeps this host from taking the guest HELLO describes (every one)."""
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
        problems += [str(d) for d in formats.diff(expected_layout(config), layout)]
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
        (config, layout), o = self.collected.described(), self.options
        virtio = config.virtio.build(o.virtio_console or o.console, self.disk) if config.virtio else None
        self.machine = machine = blank_machine(self.kvm, config.vm_config(), o.console,
                                               backing=RamBacking.host_filled, virtio=virtio)
        if o.terminal is not None:  # before the guest resumes here: no byte of it is lost
            machine.device("serial0", Serial16550).attach_terminal(o.terminal)
        machine.start(paused=True)  # the vCPU threads made and parked now, not in the pause
        if o.prepare is not None:  # the run's threads and context: a failure is a refusal, not a lost guest
            o.prepare(machine)
        memory = machine.vm.memory
        self.collected.sink = pages.MemorySink(memory)
        place_pages(self.link.reader, memory)  # checked and written in C; no guest runs here yet
        self.streams = accept_streams(self.joins, hello.streams - 1, self.session, machine,
                                      layout.memory, self.gate, self.timeout)
        self.host_cpuid = host_features(self.kvm)  # for the vCPUs' check in the pause: read now
        nothing = {r.guest_base: DirtyBitmap(r.npages) for r in memory.regions}
        block = POSTCOPY_DIGEST_BLOCK if hello.postcopy else DIGEST_BLOCK  # as the source's END
        self.hashes = digest.BlockHashes(memory, nothing, block)  # fresh memory: all zero
        if hello.postcopy and self.joins is not None:  # (`problems` refuses post-copy without joins)
            self.postcopy = TargetPostcopy(self.link, machine, self.collected, layout.memory,
                                           self.hashes, self._invalidate_written,
                                           joins=self.joins, session=self.session, fetch_index=hello.streams,
                                           host_cpuid=self.host_cpuid, wait=o.postcopy_wait)

    # --- 3. to 5.: one message at a time ----------------------------------------------------------

    def on(self, message: Message) -> bool:
        """Act on one message of the exchange; True once the guest runs here."""
        link, pc = self.link, self.postcopy
        match message:
            case Pages(payload=payload) if pc is not None and self.switched:  # the background push
                pc.pages(payload)
            case Pages(round=number, payload=payload):  # `stable`: a buffer only we hold
                self.gate.add(number, self.collected.take(link.records("PAGES", payload, PAGES_RECORDS,
                                                                       stable=True)))
                if pc is not None:  # hashed as they come: the switch waits for little
                    self._invalidate_written()
                    self._hashes().refresh_soon()
            case Discard(missing=missing, pages=count):
                if pc is None:  # (after the switch, the table takes no PAGES and no second Discard)
                    raise ProtocolViolation("Discard in a migration that did not ask for post-copy")
                pc.discard(missing, count)
            case Postcopy(missing=missing, pages=count):
                if pc is None:  # (the table refuses it first)
                    raise ProtocolViolation("Postcopy in a migration whose HELLO did not ask for post-copy")
                pc.switch(missing, count)
            case Complete(payload=payload) if pc is not None and self.switched:
                pc.finish(payload)
                self.ledger.postcopy_finished(self.session)
                return True
            case RoundDone(round=number, pages=count, ack=ack):
                self.round_done(number, count)
                if ack and link.proto.round_acks:  # (RoundDone comes only in TRANSFER, where Applied may go)
                    self.acknowledge(number)
            case State(payload=payload):
                self.collected.take(link.records("STATE", payload, STATE_RECORDS))
                if pc is None:  # (post-copy applies it at the switch, with the missing pages)
                    self.apply_state()
            case Complete(payload=payload):
                self.verify(payload)
            case Commit():
                self.commit()
                return not self.switched  # post-copy: the pages still come
            case Cancel(reason=reason):
                raise MigrationFailed(f"the source cancelled: {reason}", "on the source")
            case Error(code=code, message=text):
                raise MigrationFailed(f"the source failed: {text}", "on the source", code=code)
        return False

    def _machine(self) -> Machine:
        if self.machine is None:  # (the protocol's table takes no page or state before the build)
            raise ProtocolViolation("a message for a machine not built yet")
        return self.machine

    def _hashes(self) -> digest.BlockHashes:
        if self.hashes is None:
            raise ProtocolViolation("pages for a machine not built yet")
        return self.hashes

    def _sinks(self) -> list[pages.MemorySink]:
        main = [] if self.collected.sink is None else [self.collected.sink]  # (None: not built yet)
        return [*main, *(x.sink for x in self.streams)]

    def _invalidate_written(self) -> None:
        hashes = self._hashes()
        for sink in self._sinks():
            hashes.invalidate(sink.take_recent())

    def round_done(self, number: int, count: int) -> None:
        self.gate.round_done(number, count, self.timeout)
        self._invalidate_written()
        self._hashes().refresh_soon()  # hash what this round wrote while the next one arrives
        self.progress(RoundReceived(number, count))

    def acknowledge(self, number: int) -> None:
        """Applied for a live round. It is advisory (the source pauses sooner for it, nothing
        more), so a link that fails as it goes is left to the next read, which says why: a source
        that cancelled has closed its end after its Cancel, and the Cancel is still there to read."""
        try:
            self.link.tell(Applied(number))
        except TransportError as e:
            log.debug("Applied(%d) not sent: %s", number, e)

    def apply_state(self) -> None:
        """The state checked (shape and registers) and applied as it arrives: the source sends
        it first in the pause, so this overlaps the last pages rather than following Complete.
        Nothing here runs before Commit and the digest is still checked before Ready; a failure
        discards the copy as any before Commit does."""
        apply(self._machine(), self.collected.state(self.host_cpuid))
        self.state_applied = True

    def verify(self, payload: bytes) -> None:
        self.collected.take(self.link.records("COMPLETE", payload, COMPLETE_RECORDS))
        self.link.reader.finish()
        state = None if self.state_applied else self.collected.state(self.host_cpuid)  # checked before applied
        self._invalidate_written()
        t0 = time.perf_counter()
        found = self._hashes().digest(2)
        _, _, end = self.collected.ended()
        if found != end.digest:
            raise formats.DigestMismatch(end.digest, found)
        t1 = time.perf_counter()
        if state is not None:  # a post-copy session that finished without the switch applies it here
            apply(self._machine(), state)
        # apply_us: what applying took after Complete, in the wait for Ready (0 when it was done
        # as the state came, beside the last pages)
        self.link.tell(Ready(digest_us=us(t1 - t0), apply_us=us(time.perf_counter() - t1) if state is not None else 0))

    def commit(self) -> None:
        t0 = time.perf_counter()
        machine = self._machine()
        with self.ledger.committing(self.session, postcopy=self.switched) as allowed:
            if not allowed:
                raise MigrationFailed("Commit came after the source, in doubt, asked about this session and "
                                      "heard 'not committed'; this copy is discarded", "on the source")
            # Commit made this side the owner: run, even if Resumed is lost. Counted until the
            # vCPU threads are on their way into KVM_RUN: the guest's first instruction here.
            machine.resume(wait_running=True)
        try:
            self.link.tell(Resumed(resume_us=us(time.perf_counter() - t0)))
        except TransportError:
            log.warning("the source did not hear Resumed; the guest runs here regardless")
        log.info("Commit: the guest runs here now")  # after Resumed went: not in the downtime
        self.incoming.machine = machine
        self.incoming.pages = sum(sink.pages for sink in self._sinks())
        self.incoming.seconds = time.perf_counter() - self._t0

    # --- or else ----------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Tear the half-built VM down and, if the exchange is still open, tell the source why."""
        close_streams(self.gate, self.streams)  # before the memory they write into goes away
        if self.machine is not None and self.incoming.machine is None:
            discard(self.machine)
        self.link.tell_why(error)


def receive(conn: Connection, kvm: Kvm, options: ReceiveOptions | None = None, *, listener: Listener | None = None,
            joins: Joins | None = None, ledger: SessionLedger | None = None, first: Hello | None = None) -> Incoming:
    """Take one incoming migration on `conn`: check, build, fill, verify, and on Commit run the
    guest, as `options` say (`ReceiveOptions`). Any failure before Commit tears the half-built VM
    down and raises. A guest with a disk gets `options.disk` (this host's file for it), or the
    file of the stream's disk's name in `options.disk_dir`; with neither it is refused
    (`migrate.disks`). The extra page streams a source may open come from `joins` (or are
    accepted on `listener`); `ledger` records the session for a source in doubt to ask about
    (`migrate.live.receiver` shares one); `first` is HELLO if the caller read it already."""
    if joins is None and listener is not None:
        joins = listener_joins(listener)
    return Target(conn, kvm, options or ReceiveOptions(), joins=joins, ledger=ledger, first=first).run()
