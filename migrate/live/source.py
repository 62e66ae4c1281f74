"""The sending side of a live migration: `send(machine, "host:port", options)`.

The exchange is `migrate.protocol` (a two-phase hand-over; the never-two-copies argument is
there); the bytes are one kvmigrate stream (formats/SPEC.md) cut into protocol messages: HELLO
carries its header, CONFIG and LAYOUT; PAGES carry page sections; STATE the vCPU, VM and device
sections; COMPLETE the END section with the memory digest.

Round by round while the guest runs: round 0 sends every touched page; each later round fetches
the dirty log (KVM's and the VMM's) and sends what changed. After each fetch `convergence.decide`
says what next: another round, a throttle step first (auto-converge), stop and copy (the guest is
paused and the rest goes), or give up. Pages are encoded on worker threads while the main thread
sends, spread over the page streams (`migrate.live.streams`).

With post-copy asked for, the source switches after `postcopy_after` rounds (or when pre-copy
would not converge, `postcopy_auto`) instead: `_switch_to_postcopy` hands the guest over with
the pages the target still lacks, and `_serve_postcopy` serves them (`migrate.live.postcopy`) until
the target says it holds every one, reconnecting a lost link on the way.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from formats import FORMAT_MAJOR, FORMAT_MINOR, StreamWriter
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.vmm.machine import Machine, RunState
from hv.vmm.owner import Lease, owner_of
from hv.kvm.memory import MemoryRegion
from hv.kvm.units import MiB
from formats import POSTCOPY_DIGEST_BLOCK, DIGEST_BLOCK
from migrate import digest, pages
from migrate.datapath import PageEncoderC
from migrate.live.postcopy import PostcopySource, count_missing, decode_missing, encode_missing
from migrate.live.convergence import Action, RoundFigures, decide
from migrate.errors import (Cancelled, MigrationFailed, MigrationInDoubt, NotConverging, ProtocolViolation, SessionFenced,
                            TransportError, error_code, failure_word)
from migrate.options import MigrationOptions
from migrate.protocol import (PROTOCOL_VERSION, Cancel, Channel, Commit, Complete, Error, ErrorCode,
                              Discard, Finished, Hello, Missing, Outcome, Pages, Postcopy, Protocol, Ready, Reconnect,
                              Reject, RemoteProtocolError, Resumed, Role, RoundDone, S, State)
from migrate.protocol import Message
from migrate.records import state_sections
from migrate.state import PRODUCER, GuestCpuid, MachineConfig, capture, machine_config, machine_layout, registry
from migrate.errors import Failure
from migrate.events import PagesProgress, Progress, RoundSent, Throttled
from migrate.stats import MigrationPhase
from migrate.stats import Laps, MigrationOutcome, MigrationProgress, MigrationStats, PostcopyStats, RoundStats
from migrate.live.streams import OutgoingStream
from migrate.transport.connection import Connection, connect

log = logging.getLogger(__name__)

MESSAGE_BYTES = 8 << 20  # page payload per PAGES message
Dirty = list[tuple[MemoryRegion, DirtyBitmap]]


class Source:
    """One outgoing migration of `machine` over `conn` (and its extra page streams)."""

    def __init__(self, machine: Machine, conn: Connection, options: MigrationOptions,
                 progress: Progress | None, cancel: threading.Event, address: str | None = None,
                 switch: threading.Event | None = None) -> None:
        self.machine, self.conn, self.options = machine, conn, options
        self.address = address
        self.progress = progress or (lambda p: None)
        self.cancel = cancel
        self.switch = switch or threading.Event()  # "switch to post-copy now" (migrate-start-postcopy)
        self._unsent: list[pages.MemoryRun] = []  # a round broken off for the switch: what it did not send
        self.proto = Protocol(Role.SOURCE)
        self.writer = StreamWriter(registry(), producer=PRODUCER)
        self.stats = MigrationStats()
        self.live = MigrationProgress()
        self._t0 = time.perf_counter()
        self._reported_at = 0.0
        workers = max(options.threads, options.streams)
        # two pools: the live rounds' copy each run before encoding it (the guest writes on); the
        # final round's read the paused guest's memory in place (stable), warm already. (Running
        # the live ones at a lower CPU priority was measured: it made hot256-max's migration 1.8x
        # longer and its echo p99 no better, so they run at the usual one.)
        self.live_pool = pages.PageEncoderPool(options.level, workers)
        self.paused_pool = pages.PageEncoderPool(options.level, workers, stable=True)
        self.paused_pool.warm()
        self.extra: list[OutgoingStream] = []
        self.fetch_conn: Connection | None = None  # post-copy's fetch channel (opened at the handshake)
        self.postcopy: PostcopySource | None = None
        self._memory_digest: int | None = None  # post-copy: of the paused memory, taken once
        self._sent_at_start = 0.0
        self._fetched_at = 0.0
        self._bytes_at_start = 0
        self._touched: pages.Touched = {}
        self._hashes: digest.BlockHashes | None = None
        self.session = b""  # the target's name for this exchange (its Accept), for a Query if in doubt
        self._deadline: float | None = None  # the final copy's: every wait once the guest is paused
        self._final_copy_limit_ms = 0.0

    def _wait_limit(self) -> float | None:
        """How long the next wait may take: the final copy's time left (None before it)."""
        if self._deadline is None:
            return None
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TransportError(f"the target did not keep up: the final copy's {self._final_copy_limit_ms:.0f} ms "
                                 "are spent")
        return left

    # --- messages ---------------------------------------------------------------------------------

    def message(self, message: Message) -> None:
        limit = self._wait_limit()  # first: a Commit the deadline stops is one that never left
        self.proto.send(message)
        self.conn.send(message, timeout=limit)

    def pages_message(self, round_number: int, parts: list[bytes | memoryview]) -> None:
        if self.conn.has_message():  # the target does not speak during a round unless it gives up
            self.answer()
        limit = self._wait_limit()
        self.proto.send(Pages(round_number, b""))  # the protocol tracks the kind, not the bytes
        self.conn.send_pages(round_number, parts, timeout=limit)

    def answer(self) -> Message:
        """The target's next message (its frame capped by kind, its body decoded within a budget,
        its texts cut: `migrate.transport`), which must be one the exchange allows now; waited
        for no longer than the final copy's deadline allows."""
        left = self._wait_limit()
        message = self.conn.receive(self.options.timeout if left is None else min(left, self.options.timeout))
        try:
            self.proto.receive(message)
        except RemoteProtocolError as e:  # out of order: typed; the target is told why
            raise ProtocolViolation(str(e)) from None
        if isinstance(message, Error):  # the target gave up and says why
            raise MigrationFailed(f"the target failed: {message.code.name}: {message.message}",
                                  "here", code=message.code)
        return message

    @property
    def bytes_sent(self) -> int:
        fetch = self.fetch_conn.bytes_sent if self.fetch_conn is not None else 0
        return self.conn.bytes_sent + sum(x.conn.bytes_sent for x in self.extra) + fetch

    # --- the stages -------------------------------------------------------------------------------

    def run(self) -> MigrationStats:
        t0 = time.perf_counter()
        if not self.handshake():
            return self.stats
        self.stats.setup_seconds = time.perf_counter() - t0
        self._sent_at_start, self._bytes_at_start = time.perf_counter(), self.bytes_sent
        self.live.phase = MigrationPhase.PRECOPY
        vm = self.machine.vm
        self._track_dirty_pages()
        everything = pages.populated_runs(vm.memory, self._touched)
        if self._switch_requested():  # pure post-copy: not a page before the switch
            self._unsent = everything
        else:
            self._round(0, everything, 0.0)
        while True:
            if self.cancel.is_set():
                raise Cancelled("cancelled by the user")
            dirty, dirty_pages, dirty_rate = self._fetch()
            if self._switch_requested():
                return self._switch_to_postcopy(self._with_unsent(dirty), t0)
            figures = RoundFigures.after(self.stats, dirty_pages, time.perf_counter() - t0, self.machine.throttle,
                                         dirty_blocks=digest.dirty_blocks(dirty), block_ms=self._hashes.block_ms,
                                         bandwidth_cap_mib_s=self.options.bandwidth_mib_s,
                                         fixed_ms=self.options.downtime_fixed_ms)
            decision = decide(figures, self.options)
            log.debug("after round %d: %s (%s), pause forecast %.1f ms", figures.rounds - 1,
                      decision.action.value, decision.reason.value, decision.estimate_ms)
            if self._switch_now(decision.action):
                return self._switch_to_postcopy(dirty, t0)
            match decision.action:
                case Action.STOP_AND_COPY:
                    self.stats.downtime_predicted_ms = round(decision.estimate_ms, 3)
                    self.stats.downtime_copy_predicted_ms = round(figures.estimate_ms, 3)
                    return self._stop_and_copy(dirty, t0, decision.estimate_ms)
                case Action.GIVE_UP:
                    raise NotConverging(figures.rounds, figures.seconds, dirty_pages, decision.estimate_ms,
                                        figures.bandwidth_mib_s, self.options.downtime_ms)
                case Action.THROTTLE:
                    self._throttle(decision.throttle)
            self._round(len(self.stats.rounds), pages.dirty_runs(dirty)[0], dirty_rate)

    def _switch_requested(self) -> bool:
        """Post-copy asked for now, whatever pre-copy would do next (as QEMU's
        migrate-start-postcopy, even when a stop-and-copy would fit): after `postcopy_after`
        rounds (0: before any), `postcopy_after_ms` after the pages began, or on request
        (`switch`, the control socket's migrate-start-postcopy)."""
        o = self.options
        if not o.wants_postcopy:
            return False
        if self.switch.is_set() or (o.postcopy and len(self.stats.rounds) >= o.postcopy_after):
            return True
        return bool(o.postcopy_after_ms) and (time.perf_counter() - self._sent_at_start) * 1000 >= o.postcopy_after_ms

    def _switch_now(self, action: Action) -> bool:
        """Post-copy instead of what pre-copy would do next (auto): only when pre-copy would need
        the throttle or give up."""
        return self.options.postcopy_auto and action in (Action.THROTTLE, Action.GIVE_UP)

    def _with_unsent(self, dirty: Dirty) -> Dirty:
        """`dirty` and the pages a round broken off for the switch (or never begun) did not send:
        the target lacks both."""
        memory = self.machine.vm.memory
        for run in self._unsent:
            region, offset = memory.find(run.address, len(run.view))
            bits = next(b for r, b in dirty if r is region)
            bits.set_range(offset // PAGE_SIZE, len(run.view) // PAGE_SIZE)
        self._unsent = []
        return dirty

    def handshake(self) -> bool:
        """HELLO and the target's answer; False when that is the end of it (refused, dry run)."""
        machine, o = self.machine, self.options
        cpuid = GuestCpuid(machine.vcpus[0].cpuid)
        self.message(Hello(PROTOCOL_VERSION, f"{FORMAT_MAJOR}.{FORMAT_MINOR}", PRODUCER,
                           self.writer.header() + self.writer.config(self._config()),
                           self.writer.layout(machine_layout(machine)), registry().encode(cpuid),
                           o.dry_run, o.streams, o.wants_postcopy))
        reply = self.answer()
        log.info("the target %s: %s", "refused the guest" if isinstance(reply, Reject) else "accepts the guest",
                 "; ".join(getattr(reply, "problems", ())) or "no problems")
        if isinstance(reply, Reject):
            self.stats.outcome, self.stats.problems = MigrationOutcome.REJECTED, list(reply.problems)
            self.stats.reason, self.stats.failure = "the target refused the guest", Failure.REJECTED
            return False
        if o.dry_run:
            self.message(Cancel("dry run: compatibility checked, nothing sent"))
            self.stats.outcome, self.stats.reason = MigrationOutcome.DRY_RUN, "the target would accept this guest"
            return False
        self.session = reply.session
        if o.streams > 1:
            self.open_extra_streams(reply.session)
        if o.wants_postcopy:  # opened now, not at the switch: nothing of it in the downtime
            self.open_fetch_channel(reply.session)
        return True

    def _config(self) -> MachineConfig:
        """CONFIG with the guest's TSC rate, which is read on a paused vCPU: a running guest is
        paused for that read (well under a millisecond), so the target can check it can give it."""
        machine = self.machine
        if machine.state is not RunState.RUNNING:
            return machine_config(machine)
        machine.pause()
        try:
            return machine_config(machine)
        finally:
            machine.resume()

    def open_extra_streams(self, session: bytes) -> None:
        """Streams 1..N-1: connect, authenticate, join the exchange, send the stream header."""
        o = self.options
        for index in range(1, o.streams):
            conn = connect(self.address, o.key, o.timeout, o.tls)
            stream = OutgoingStream(conn)
            self.extra.append(stream)
            conn.send(Channel(session, index))
            conn.send_pages(0, [stream.writer.header()])

    def open_fetch_channel(self, session: bytes) -> None:
        """Post-copy's fetch channel: the join after the page streams (index `streams`)."""
        o = self.options
        self.fetch_conn = connect(self.address, o.key, o.timeout, o.tls)
        self.fetch_conn.send(Channel(session, o.streams))

    def _track_dirty_pages(self) -> None:
        """Dirty logging on, counting from now; the touched map and block hashes start from here."""
        vm = self.machine.vm
        if not vm.dirty_logging:
            vm.enable_dirty_log()
        for _ in vm.fetch_dirty_logs():  # the log now counts writes from here on
            pass
        self._fetched_at = time.perf_counter()
        self._touched = pages.touched_pages(vm.memory)  # kept up to date from each dirty log
        block = POSTCOPY_DIGEST_BLOCK if self.options.wants_postcopy else DIGEST_BLOCK  # the target's too
        self._hashes = digest.BlockHashes(vm.memory, self._touched, block)
        self._hashes.refresh_soon()  # the digest at the end then hashes only what changed since

    def _fetch(self, *, paused: bool = False) -> tuple[Dirty, int, float]:
        """The dirty log since the last fetch, its page count and the rate the guest dirtied at.
        `paused`: no background hashing now (the final copy has the CPUs to itself; the digest
        hashes what is stale once the pages are out)."""
        dirty = list(self.machine.vm.fetch_dirty_logs())
        for region, bitmap in dirty:
            self._touched[region.guest_base] |= bitmap
        if self._hashes is not None:
            self._hashes.invalidate(dirty)
            if not paused:
                self._hashes.refresh_soon()
        now = time.perf_counter()
        count = sum(b.count() for _, b in dirty)
        rate = count * PAGE_SIZE / MiB / max(now - self._fetched_at, 1e-6)
        self._fetched_at = now
        return dirty, count, rate

    def _throttle(self, throttle: float) -> None:
        self.machine.set_throttle(throttle)
        self.stats.throttle_max = max(self.stats.throttle_max, throttle)
        self.live.throttle = throttle
        self.progress(Throttled(throttle))  # typed progress events (issue 22)

    def report(self, round_started: float | None = None, round_bytes: int = 0, round_wire: int = 0,
               *, force: bool = False) -> None:
        """The live figures out as a `pages` progress event (at most every 50 ms, unless `force`)."""
        now = time.perf_counter()
        if not force and now - self._reported_at < 0.05:
            return
        self._reported_at = now
        live = self.live
        live.elapsed_seconds = round(now - self._t0, 3)
        live.remaining_pages = max(0, live.round_pages_total - live.round_pages_done)
        live.remaining_bytes = live.remaining_pages * PAGE_SIZE
        live.wire_bytes = self.bytes_sent
        live.throttle = self.machine.throttle
        if round_started is not None and now > round_started:
            live.bandwidth_mib_s = round(round_wire / MiB / (now - round_started), 1)
            live.estimate(round_bytes / MiB / (now - round_started) if round_bytes else 0.0)
        self.progress(PagesProgress(dataclasses.replace(live)))  # typed progress events (issue 22)

    def _round(self, number: int, runs: list[pages.MemoryRun], dirty_rate: float,
               pool: pages.PageEncoderPool | None = None) -> None:
        """A round of `runs` through `pool` (the live one unless the guest is paused)."""
        paused = pool is not None
        t = time.perf_counter()
        live = self.live
        live.round, live.round_pages_done = number, 0
        live.round_pages_total = sum(len(r.view) for r in runs) // PAGE_SIZE
        if number:
            live.dirty_rate_mib_s = round(dirty_rate, 1)
        if not paused:  # a progress line is not worth a moment of the guest's downtime
            self.report(force=True)
        npages, raw, wire = self.send_pages(number, runs, pool or self.live_pool)
        if npages < live.round_pages_total:  # broken off for the post-copy switch
            self._unsent = _runs_after(runs, npages)
        seconds = max(time.perf_counter() - t, 1e-6)
        stat = RoundStats(number, npages, raw, wire, seconds, dirty_rate, wire / MiB / seconds,
                          self.machine.throttle)
        self.stats.rounds.append(stat)
        self.stats.pages_sent += npages
        self.stats.raw_bytes += raw
        self.stats.sent_bytes_pages += wire
        self.progress(RoundSent(stat))  # typed progress events (issue 22)
        log.info("round %d: %d pages, %.1f MiB in %.0f ms (%.0f MiB/s on the wire), dirty rate %.0f MiB/s, "
                 "throttle %.0f%%", number, npages, raw / MiB, seconds * 1000, stat.bandwidth_mib_s, dirty_rate,
                 stat.throttle * 100)

    def _stop_and_copy(self, pending: Dirty, t0: float, estimate_ms: float) -> MigrationStats:
        """The guest paused, the rest sent, the hand-over. Every wait from the pause on shares one
        deadline, `final_copy_limit_ms`: twice the pause's budget (the downtime target, or the
        estimate when finishing anyway past it) plus `final_copy_margin_ms`. A target that goes
        silent before Commit therefore costs the guest that long, not `timeout`: the source
        resumes and says why; after Commit, the same silence leaves it in doubt as quickly."""
        self._limit_final_copy(max(self.options.downtime_ms, estimate_ms))
        try:
            return self._final_copy(pending, t0)
        except TransportError as e:
            raise TransportError(f"final copy (at most {self._final_copy_limit_ms:.0f} ms, the guest paused): "
                                 f"{e}") from e

    def _pause_and_take_the_rest(self, pending: Dirty) -> tuple[Laps, Dirty, float]:
        """Pause the guest (the final copy's deadline runs from here) and fetch the dirty log,
        with `pending` (fetched while it ran, not sent yet) folded in; the laps started, the
        pages to send, the dirty rate."""
        laps = Laps()
        self.machine.pause()
        self._deadline = time.monotonic() + self._final_copy_limit_ms / 1000
        # the final copy paced from here, at the cap the forecast assumed: neither a debt of the
        # rounds (a sleep in the pause) nor their credit (a burst the forecast did not count)
        self._sent_at_start, self._bytes_at_start = time.perf_counter(), self.bytes_sent
        laps.lap("pause")
        final, _, rate = self._fetch(paused=True)
        for (_, merged), (_, earlier) in zip(final, pending, strict=True):
            merged |= earlier
        laps.lap("dirty_log")
        return laps, final, rate

    def _final_copy(self, pending: Dirty, t0: float) -> MigrationStats:
        machine = self.machine
        self.live.phase = MigrationPhase.STOP_AND_COPY
        laps, final, rate = self._pause_and_take_the_rest(pending)
        self._round(len(self.stats.rounds), pages.dirty_runs(final)[0], rate, self.paused_pool)
        laps.lap("last_round")
        state = capture(machine, machine_config(machine))
        self.message(State(b"".join(state_sections(self.writer, state))))
        laps.lap("state")
        end = self.writer.end(self._hashes.digest(self.options.threads))
        laps.lap("digest")
        self.message(Complete(end))
        self._hand_over(laps)
        if self.stats.downtime_overrun_ms:
            self.stats.problems.append(f"the guest was paused {self.stats.downtime_ms:.0f} ms, past the "
                                       f"{self.options.downtime_ms:.0f} ms downtime target (forecast "
                                       f"{self.stats.downtime_predicted_ms:.0f} ms)")
            log.warning("%s", self.stats.problems[-1])
        return self._completed(t0, "the target runs the guest")

    def _limit_final_copy(self, budget_ms: float) -> None:
        """Every wait from the pause on shares one deadline: twice `budget_ms` plus the margin."""
        self._final_copy_limit_ms = 2 * budget_ms + self.options.final_copy_margin_ms
        self.stats.final_copy_limit_ms = self._final_copy_limit_ms

    def _hand_over(self, laps: Laps) -> None:
        """Ready, Commit, Resumed: the end of the pause, whose phases (the target's own steps
        taken out of the waits they were in) become the downtime's."""
        ready = self.answer()  # Ready: the target holds its copy, built and paused
        waited = laps.lap("target_verify")
        log.info("the target holds its copy (%.1f ms after the pause); committing", sum(laps.phases.values()))
        self.message(Commit())
        # From here the target may be running the guest: never resume on our own (protocol.py).
        resumed = self.answer()  # Resumed
        committed = laps.lap("target_resume")
        self._deadline = None
        self.stats.downtime_ms = sum(laps.phases.values())
        self.stats.downtime_phases_ms = _with_target_phases(laps.phases, ready, resumed, waited, committed)
        self.stats.downtime_target_ms = self.options.downtime_ms
        self.stats.downtime_copy_ms = round(sum(laps.phases.get(k, 0.0) for k in ("dirty_log", "last_round",
                                                                                  "digest")), 3)

    def _completed(self, t0: float, reason: str) -> MigrationStats:
        self.stats.frames_judged_raw = self.live_pool.frames_judged_raw + self.paused_pool.frames_judged_raw
        self.stats.outcome, self.stats.reason = MigrationOutcome.COMPLETED, reason
        self.stats.total_seconds = time.perf_counter() - t0
        self.stats.sent_bytes = self.bytes_sent
        return self.stats

    # --- post-copy (migrate.live.postcopy) ------------------------------------------------------------

    def _switch_to_postcopy(self, pending: Dirty, t0: float) -> MigrationStats:
        """Pause for good, send the state and what the target still lacks, hand over; then serve
        the pages until the target has them all. The pause holds the final copy's deadline too."""
        self._limit_final_copy(self.options.downtime_ms)
        machine = self.machine
        self.live.phase = MigrationPhase.POSTCOPY_SWITCH
        # What the guest dirtied since it was sent is given back on the target now, while the guest
        # still runs here: freeing it costs the target's kernel ~30 ms a 256 MiB, not in the pause.
        discard = {region.guest_base: bits for region, bits in pending}
        self.message(Discard(encode_missing(discard), count_missing(discard)))
        discarded = self.answer()
        self.stats.postcopy_discard_ms = round((discarded.digest_us + discarded.discard_us) / 1000, 3)
        laps, final, _ = self._pause_and_take_the_rest(pending)  # (what `pending` has was given back there)
        missing = {region.guest_base: bits for region, bits in final}
        state = capture(machine, machine_config(machine))
        self.message(State(b"".join(state_sections(self.writer, state))))
        laps.lap("state")
        count = count_missing(missing)
        self.message(Postcopy(encode_missing(missing), count))
        laps.lap("bitmap")
        self._hand_over(laps)  # (point 7: from Commit on this copy serves the target, never runs)
        self.stats.postcopy = PostcopyStats(after_rounds=len(self.stats.rounds), missing_pages=count)
        self.postcopy = PostcopySource(machine.vm.memory, missing, self.options.level)
        return self._serve_postcopy(t0)

    def _serve_postcopy(self, t0: float) -> MigrationStats:
        """The paused guest's pages to the target until it holds them all; a lost link is
        reconnected (`_reconnect`) and the serving goes on from what the target still lacks."""
        self.live.phase = MigrationPhase.POSTCOPY
        self.live.round_pages_total, self.live.round_pages_done = self.stats.postcopy.missing_pages, 0
        self.report(force=True)
        started = time.perf_counter()
        while True:
            try:
                if self._memory_digest is None:  # this memory no longer changes: its digest once
                    self._memory_digest = self._hashes.digest(self.options.threads)
                finished = self._serve_pages(self._memory_digest)
                break
            except TransportError as e:
                self.proto.connection_lost()
                if self.proto.state is not S.POSTCOPY_PAUSED or not self._reconnect(e):
                    raise
                if self.proto.state is S.DONE:  # the target had finished; its Finished was lost
                    finished = Finished()
                    break
        server, p = self.postcopy, self.stats.postcopy
        p.fetched_pages, p.fetch_requests = finished.fetched, server.figures.fetch_requests
        p.around_pages = server.figures.around
        p.background_pages, p.push_jumps = finished.background, server.figures.push_jumps
        p.fault_p50_us, p.fault_p99_us = finished.fault_p50_us, finished.fault_p99_us
        p.vcpu_blocked_ms = round(finished.blocked_us / 1000, 3)
        p.seconds = round(time.perf_counter() - started, 3)
        self.stats.pages_sent += server.figures.sent
        return self._completed(t0, "the target runs the guest (post-copy)")

    def resume_postcopy(self) -> MigrationStats:
        """`migrate send --resume`: after the reconnect window passed, try again (another
        `postcopy_reconnect_s`) and serve on."""
        t0 = time.perf_counter() - self.stats.total_seconds
        self.proto.connection_lost()
        if not self._reconnect(TransportError("resumed by the operator")):
            raise TransportError(f"post-copy: the target could not be reached again within "
                                 f"{self.options.postcopy_reconnect_s:.0f} s")
        if self.proto.state is S.DONE:
            self.stats.outcome, self.stats.reason = MigrationOutcome.COMPLETED, "the target had every page"
            return self.stats
        return self._serve_postcopy(t0)

    def _serve_pages(self, memory_digest: int) -> Finished:
        """Faulted pages on the fetch channel (a thread), the rest pushed here; then END (the page
        digest of this memory) and the target's Finished."""
        server = self.postcopy
        server.start_fetch_server(self.fetch_conn)
        number = len(self.stats.rounds)

        def send(parts: list[bytes | memoryview]) -> None:
            self.pages_message(number, parts)
            self._pace()  # --bandwidth holds for the push too (the fetch channel's pages are not held back)
            self.live.round_pages_done = server.figures.sent
            self.report()

        server.push(send, PageEncoderC(self.options.level, stable=True), self.writer)  # this memory no longer changes
        self.message(Complete(self.writer.end(memory_digest)))
        return self.answer()

    def _reconnect(self, error: TransportError) -> bool:
        """After a lost link in post-copy: connect again, say `Reconnect(session)`, and carry on
        from what the target says it lacks (`Missing`), trying for `postcopy_reconnect_s`. False
        when that passed; the protocol's state says how it ended otherwise (POSTCOPY: serve on;
        DONE: the target had finished; FAILED: the target never took Commit, so this copy runs on)."""
        o = self.options
        deadline = time.monotonic() + o.postcopy_reconnect_s
        log.warning("post-copy: the link to the target went (%s); reconnecting for up to %.0f s", error,
                    o.postcopy_reconnect_s)
        self.conn.close()
        if self.fetch_conn is not None:
            self.fetch_conn.close()
        while time.monotonic() < deadline:
            try:
                self.conn = connect(self.address, o.key, min(o.timeout, max(0.1, deadline - time.monotonic())), o.tls)
                self.proto.link_back()
                self.message(Reconnect(self.session))
                answer = self.answer()
                if isinstance(answer, Missing):
                    self.postcopy.reset_missing(decode_missing(answer.missing, self.machine.vm.memory))
                    self.writer = StreamWriter(registry(), producer=PRODUCER)  # a new stream on the new link
                    self.pages_message(len(self.stats.rounds), [self.writer.header()])
                    self.open_fetch_channel(self.session)
            except TransportError as e:  # (one that breaks after Missing too: the target waits again)
                self.proto.connection_lost()
                self.conn.close()
                log.info("post-copy: reconnecting: %s", e)
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            if isinstance(answer, Missing):
                self.stats.postcopy.reconnects += 1
                self.live.round_pages_done = self.live.round_pages_total - answer.pages
                self.report(force=True)  # `migrate status` sees it carry on
                log.warning("post-copy: reconnected; %d pages still to send", answer.pages)
                return True
            if self.proto.state is S.FAILED:
                raise SessionFenced("the target never took Commit and has fenced the session", "here") from error
            if self.proto.state is S.DONE:
                return True
            self.conn.close()  # "unknown": not settled; try again
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return False

    # --- pages across the streams -----------------------------------------------------------------

    def _pace(self) -> None:
        limit = self.options.bandwidth_mib_s * MiB
        if limit:
            ahead = (self.bytes_sent - self._bytes_at_start) / limit - (time.perf_counter() - self._sent_at_start)
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

    def send_pages(self, round_number: int, runs: Iterable[pages.MemoryRun],
                   pool: pages.PageEncoderPool) -> tuple[int, int, int]:
        """Encode and send `runs`, message by message across the streams; returns (pages, raw
        bytes, bytes on the wire) once every stream has sent its share."""
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
                if pool is not self.paused_pool and self._switch_requested():
                    break  # post-copy now: the rest of this round is missing on the target
                self._pace()
                stream = (stream + 1) % streams
                if pool is not self.paused_pool:  # no progress lines in the downtime
                    self.report(t0, raw, self.bytes_sent - wire0)
        if parts:
            self._dispatch(stream, round_number, parts)
        for extra in self.extra:  # the round's bandwidth counts only what has left
            if not extra.wait_sent(self._wait_limit()):
                raise TransportError(f"page stream to {extra.conn.peer}: not taken within the final copy's "
                                     f"{self._final_copy_limit_ms:.0f} ms")
            if extra.error is not None:
                raise TransportError(f"page stream: {extra.error}")
        self.message(RoundDone(round_number, npages))
        return npages, raw, self.bytes_sent - wire0

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

    def close(self) -> None:
        self.live_pool.close()
        self.paused_pool.close()
        if self._hashes is not None:
            self._hashes.close()
        for extra in self.extra:
            extra.close()
        if self.postcopy is not None:
            self.postcopy.close()
        if self.fetch_conn is not None:
            self.fetch_conn.close()
        self.conn.close()


@dataclass(frozen=True)
class InDoubt:
    """What a source left in doubt keeps for whoever settles it (`migrate.live.resolve`): where the
    target was, the session it named, how to reach it again, and why it is in doubt."""

    target: str | None  # HOST:PORT (None: sent over a connection given to `send`; nobody to ask)
    session: bytes
    options: MigrationOptions  # the key, TLS and timeout to ask with
    reason: str
    was_running: bool = True  # what resuming the source goes back to
    postcopy: bool = False  # past the post-copy switch: the target may need this copy's pages
    resume: Callable[[], MigrationStats] | None = None  # post-copy: reconnect and serve on (`resume_postcopy`)


def send(machine: Machine, target: str | Connection, options: MigrationOptions | None = None, *,
         progress: Progress | None = None, cancel: threading.Event | None = None,
         switch: threading.Event | None = None) -> MigrationStats:
    """Migrate a running (or paused) machine to `target` (HOST:PORT or a connection).

    Returns the stats; `outcome` says where the guest is. Anything that fails before the target
    acknowledged the hand-over leaves the guest running here, as it was (throttle off, dirty
    logging off); after Commit with no answer the guest is kept paused here, in doubt, and
    `MigrationFailed` says so: the machine's run state stays held (`hv.vmm.owner`) until
    `migrate.live.resolve` settles it. After a post-copy switch (`options.postcopy*`) a lost link is
    reconnected for `postcopy_reconnect_s`, then the guest is kept paused here, in doubt, with
    the pages the target lacks, until `resume_postcopy`. Meanwhile, and during the whole
    migration, nobody else may pause, resume or stop the machine (`Busy`). `switch`, once set,
    asks for the post-copy switch at the next message (a migration that negotiated post-copy)."""
    o = options or MigrationOptions()
    where = target if isinstance(target, str) else target.peer
    with owner_of(machine).hold(f"migration to {where}") as lease:  # Busy if held or in doubt
        return _send(machine, target, o, progress, cancel, lease, switch)


def _send(machine: Machine, target: str | Connection, o: MigrationOptions, progress: Progress | None,
          cancel: threading.Event | None, lease: Lease, switch: threading.Event | None = None) -> MigrationStats:
    t0 = time.perf_counter()
    if machine.state not in (RunState.RUNNING, RunState.PAUSED):
        raise MigrationFailed(f"the machine is {machine.state.value}", "where it was")
    was_running = machine.state is RunState.RUNNING
    conn = target if isinstance(target, Connection) else connect(target, o.key, o.timeout, o.tls)
    if (o.streams > 1 or o.wants_postcopy) and isinstance(target, Connection):
        raise MigrationFailed("several streams and post-copy need an address to connect to", "where it was")
    source = Source(machine, conn, o, progress, cancel or threading.Event(),
                    address=None if isinstance(target, Connection) else target, switch=switch)
    try:
        stats = source.run()
    except (Exception, KeyboardInterrupt) as e:
        stats = source.stats
        stats.total_seconds = time.perf_counter() - t0
        stats.sent_bytes = source.bytes_sent
        stats.reason, stats.failure = str(e) or failure_word(e), failure_word(e)
        code = error_code(e)
        outcome = source.fall_back(e, code)
        stats.outcome = {Outcome.SOURCE_RESUME: (MigrationOutcome.CANCELLED if code is ErrorCode.CANCELLED
                                                 else MigrationOutcome.FAILED),
                         Outcome.SOURCE_HOLD: MigrationOutcome.IN_DOUBT,
                         Outcome.SOURCE_SERVE: MigrationOutcome.IN_DOUBT}.get(outcome, MigrationOutcome.FAILED)
        if outcome is Outcome.SOURCE_RESUME:
            restore_source(machine, was_running)
        log.warning("migration to %s: %s (%s)", conn.peer, stats.outcome, stats.reason)
        if outcome is Outcome.SOURCE_HOLD:
            lease.leave_in_doubt(InDoubt(source.address, source.session, o, stats.reason, was_running))
            raise MigrationInDoubt(stats.reason, "paused here, in doubt: the target may run it; "
                                   "`migrate resolve` asks the target and settles it") from e
        if outcome is Outcome.SOURCE_SERVE:  # the source is kept: a resume serves on from what it sent
            lease.leave_in_doubt(InDoubt(source.address, source.session, o, stats.reason, was_running,
                                         postcopy=True, resume=source.resume_postcopy))
            raise MigrationInDoubt(stats.reason, "paused here after the post-copy switch: the target runs the "
                                   "guest and still needs pages only this copy holds; `migrate send --resume` "
                                   "reconnects") from e
        return stats
    finally:
        source.close()
    machine.set_throttle(0)
    if stats.outcome is MigrationOutcome.COMPLETED:
        machine.stop()  # the target runs the guest now
    return stats


def resume_postcopy(machine: Machine) -> MigrationStats:
    """Reconnect a post-copy migration whose link stayed down past its reconnect window (the
    machine is held, in doubt, by it) and serve the target on; the machine stops once the target
    holds every page. `hv.vmm.owner.NotInDoubt` if nothing waits; `MigrationFailed` if the doubt
    is not a post-copy one (that is `migrate resolve`'s)."""
    with owner_of(machine).settling("post-copy resume") as lease:
        doubt = lease.hold.record
        if not isinstance(doubt, InDoubt) or doubt.resume is None:
            lease.leave_in_doubt(doubt)
            raise MigrationFailed("this VM's hand-over is in doubt, but not in post-copy: see migrate resolve",
                                  "paused here, in doubt")
        try:
            stats = doubt.resume()
        except (Exception, KeyboardInterrupt) as e:
            if isinstance(e, SessionFenced):
                restore_source(machine, doubt.was_running)  # the target never took Commit
                raise
            lease.leave_in_doubt(doubt)
            raise MigrationInDoubt(f"post-copy resume: {e}", "paused here after the post-copy switch") from e
        machine.set_throttle(0)
        machine.stop()  # the target holds every page now
        return stats


def _runs_after(runs: list[pages.MemoryRun], sent: int) -> list[pages.MemoryRun]:
    """What of `runs` (in the order sent) lies past its first `sent` pages."""
    out: list[pages.MemoryRun] = []
    for run in runs:
        count = len(run.view) // PAGE_SIZE
        if sent >= count:
            sent -= count
            continue
        out.append(pages.MemoryRun(run.address + sent * PAGE_SIZE, run.view[sent * PAGE_SIZE:]))
        sent = 0
    return out


def _with_target_phases(phases: dict[str, float], ready: Ready, resumed: Resumed, waited_ms: float,
                        committed_ms: float) -> dict[str, float]:
    """The source's laps with the target's own steps (from Ready and Resumed) taken out of the
    waits they happened in; what is left of a wait is the link's ("link")."""
    target = {"target_digest": ready.digest_us / 1000, "target_apply": ready.apply_us / 1000,
              "target_resume": resumed.resume_us / 1000}
    out = {k: round(v, 3) for k, v in phases.items() if k not in ("target_verify", "target_resume")}
    out |= {k: round(v, 3) for k, v in target.items()}
    out["link"] = round(max(0.0, waited_ms + committed_ms - sum(target.values())), 3)
    return out


def restore_source(machine: Machine, was_running: bool) -> None:
    """The source's guest as it was before the migration: no throttle, no dirty log, running if it was."""
    machine.set_throttle(0)
    if machine.vm.dirty_logging:
        machine.vm.disable_dirty_log()
    if was_running and machine.state is RunState.PAUSED:
        machine.resume()
