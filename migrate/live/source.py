"""The sending side of a live migration: `send(machine, "host:port", options)`.

The exchange is `migrate.protocol` (a two-phase hand-over; the never-two-copies argument is
there); the bytes are one kvmigrate stream (formats/SPEC.md) cut into protocol messages: HELLO
carries its header, CONFIG and LAYOUT; PAGES carry page sections; STATE the vCPU, VM and device
sections; COMPLETE the END section with the memory digest. They go over a `SourceLink`
(`migrate.live.link`: the messages, the pages across the streams, the hand-over).

Round by round while the guest runs: round 0 sends every touched page; each later round fetches
the dirty log (KVM's and the VMM's: `migrate.live.tracking`) and sends what changed. After each
fetch `convergence.decide` says what next: another round, a throttle step first (auto-converge),
stop and copy (the guest is paused and the rest goes), or give up. Pages are encoded on worker
threads while the main thread sends, spread over the page streams (`migrate.live.streams`).

With post-copy asked for, the source switches after `postcopy_after` rounds (or when pre-copy
would not converge, `postcopy_auto`) instead: post-copy's source half
(`migrate.live.postcopy.source`) hands the guest over with the pages the target still lacks and
serves them until the target says it holds every one, reconnecting a lost link on the way.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from formats import FORMAT_MAJOR, FORMAT_MINOR
from hv.kvm.dirty import PAGE_SIZE
from hv.kvm.units import MiB
from hv.vmm.machine import Machine, RunState
from hv.vmm.owner import Lease, owner_of
from migrate import digest, pages
from migrate.errors import Cancelled, Failure, MigrationFailed, MigrationInDoubt, NotConverging, ProtocolViolation, TransportError, error_code, failure_word
from migrate.events import PagesProgress, Progress, RoundSent, Throttled
from migrate.live.convergence import Action, RoundFigures, decide
from migrate.live.link import SourceLink
from migrate.live.postcopy.source import SourcePostcopy
from migrate.live.resolve import InDoubt, restore_source
from migrate.live.tracking import Dirty, DirtyTracker
from migrate.options import MigrationOptions
from migrate.protocol import PROTOCOL_VERSION, Accept, Cancel, ErrorCode, Hello, Outcome, Reject, State, Complete
from migrate.records import state_sections
from migrate.state import PRODUCER, GuestCpuid, MachineConfig, capture, machine_config, machine_layout, registry
from migrate.stats import MigrationOutcome, MigrationPhase, MigrationProgress, MigrationStats, Pause, RoundStats
from migrate.transport.connection import Connection, connect

log = logging.getLogger(__name__)


class Source:
    """One outgoing migration of `machine` over `conn` (and its extra page streams)."""

    def __init__(self, machine: Machine, conn: Connection, options: MigrationOptions,
                 progress: Progress | None, cancel: threading.Event, address: str | None = None,
                 switch: threading.Event | None = None) -> None:
        self.machine, self.options = machine, options
        self.progress = progress or (lambda p: None)
        self.cancel = cancel
        self.stats = MigrationStats()
        self.live = MigrationProgress()
        self.link = SourceLink(conn, address, options, cancel, self.stats, self.live)
        self.postcopy = SourcePostcopy(machine, self.link, options, self.stats, self.live, self.report, switch)
        self.tracker: DirtyTracker | None = None  # from the first round on
        self._unsent: list[pages.MemoryRun] = []  # a round broken off for the switch: what it did not send
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

    # --- the stages -------------------------------------------------------------------------------

    def run(self) -> MigrationStats:
        t0 = time.perf_counter()
        if not self.handshake():
            return self.stats
        self.stats.setup_seconds = time.perf_counter() - t0
        self.link.start_pacing()
        self.live.phase = MigrationPhase.PRECOPY
        self.tracker = tracker = DirtyTracker(self.machine, postcopy=self.options.wants_postcopy)
        everything = pages.populated_runs(self.machine.vm.memory, tracker.touched)
        if self.postcopy.requested():  # pure post-copy: not a page before the switch
            self._unsent = everything
        else:
            self._round(0, everything, 0.0)
        while True:
            if self.cancel.is_set():
                raise Cancelled("cancelled by the user")
            dirty, dirty_pages, dirty_rate = tracker.fetch()
            if self.postcopy.requested():
                return self._switch_to_postcopy(tracker.add_unsent(dirty, self._unsent), t0)
            figures = RoundFigures.after(self.stats, dirty_pages, time.perf_counter() - t0, self.machine.throttle,
                                         dirty_blocks=digest.dirty_blocks(dirty), block_ms=tracker.hashes.block_ms,
                                         bandwidth_cap_mib_s=self.options.bandwidth_mib_s,
                                         fixed_ms=self.options.downtime_fixed_ms)
            decision = decide(figures, self.options)
            log.debug("after round %d: %s (%s), pause forecast %.1f ms", figures.rounds - 1,
                      decision.action.value, decision.reason.value, decision.estimate_ms)
            if self.postcopy.instead_of(decision.action):
                return self._switch_to_postcopy(dirty, t0)
            match decision.action:
                case Action.STOP_AND_COPY:
                    self._let_the_target_catch_up()
                    self.stats.downtime_predicted_ms = round(decision.estimate_ms, 3)
                    self.stats.downtime_copy_predicted_ms = round(figures.estimate_ms, 3)
                    return self._stop_and_copy(dirty, t0, decision.estimate_ms)
                case Action.GIVE_UP:
                    raise NotConverging(figures.rounds, figures.seconds, dirty_pages, decision.estimate_ms,
                                        figures.bandwidth_mib_s, self.options.downtime_ms)
                case Action.THROTTLE:
                    self._throttle(decision.throttle)
            self._round(len(self.stats.rounds), pages.dirty_runs(dirty)[0], dirty_rate)

    def _let_the_target_catch_up(self) -> None:
        """Before the pause, the guest still running: wait until the target has the last live
        round in its RAM (at most the downtime target). A target that shares this host's CPUs
        with the running guest lags a round or two behind what was sent; unread, that lag was
        read in the pause (3-5 ms of a 10 ms pause on two cores). What the guest dirties
        meanwhile is taken at the pause, as always."""
        t = time.perf_counter()
        self.stats.target_caught_up = self.link.caught_up(len(self.stats.rounds) - 1, self.options.downtime_ms / 1000)
        self.stats.target_catch_up_ms = round((time.perf_counter() - t) * 1000, 3)

    def handshake(self) -> bool:
        """HELLO and the target's answer; False when that is the end of it (refused, dry run)."""
        machine, o, link = self.machine, self.options, self.link
        cpuid = GuestCpuid(machine.vcpus[0].cpuid)
        link.message(Hello(PROTOCOL_VERSION, f"{FORMAT_MAJOR}.{FORMAT_MINOR}", PRODUCER,
                           link.writer.header() + link.writer.config(self._config()),
                           link.writer.layout(machine_layout(machine)), registry().encode(cpuid),
                           o.dry_run, o.streams, o.wants_postcopy, round_acks=True))
        reply = link.answer()
        log.info("the target %s: %s", "refused the guest" if isinstance(reply, Reject) else "accepts the guest",
                 "; ".join(getattr(reply, "problems", ())) or "no problems")
        if isinstance(reply, Reject):
            self.stats.outcome, self.stats.problems = MigrationOutcome.REJECTED, list(reply.problems)
            self.stats.reason, self.stats.failure = "the target refused the guest", Failure.REJECTED
            return False
        if not isinstance(reply, Accept):  # (the protocol's table admits Accept or Reject here)
            raise ProtocolViolation(f"expected ACCEPT, got {type(reply).__name__}")
        if o.dry_run:
            link.message(Cancel("dry run: compatibility checked, nothing sent"))
            self.stats.outcome, self.stats.reason = MigrationOutcome.DRY_RUN, "the target would accept this guest"
            return False
        link.session, link.round_acks = reply.session, reply.round_acks
        if o.streams > 1:
            link.open_extra_streams(reply.session)
        if o.wants_postcopy:  # opened now, not at the switch: nothing of it in the downtime
            link.open_fetch_channel(reply.session)
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

    def _throttle(self, throttle: float) -> None:
        self.machine.set_throttle(throttle)
        self.stats.throttle_max = max(self.stats.throttle_max, throttle)
        self.live.throttle = throttle
        self.progress(Throttled(throttle))

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
        live.wire_bytes = self.link.bytes_sent
        live.throttle = self.machine.throttle
        if round_started is not None and now > round_started:
            live.bandwidth_mib_s = round(round_wire / MiB / (now - round_started), 1)
            live.estimate(round_bytes / MiB / (now - round_started) if round_bytes else 0.0)
        self.progress(PagesProgress(dataclasses.replace(live)))

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
        if pool is None:  # the switch may break a live round off; each message is reported
            npages, raw, wire = self.link.send_pages(number, runs, self.live_pool, stop=self.postcopy.requested,
                                                     report=self.report)
        else:
            npages, raw, wire = self.link.send_pages(number, runs, pool)
        if npages < live.round_pages_total:  # broken off for the post-copy switch
            self._unsent = _runs_after(runs, npages)
        seconds = max(time.perf_counter() - t, 1e-6)
        stat = RoundStats(number, npages, raw, wire, seconds, dirty_rate, wire / MiB / seconds,
                          self.machine.throttle)
        self.stats.rounds.append(stat)
        self.stats.pages_sent += npages
        self.stats.raw_bytes += raw
        self.stats.sent_bytes_pages += wire
        self.progress(RoundSent(stat))
        log.info("round %d: %d pages, %.1f MiB in %.0f ms (%.0f MiB/s on the wire), dirty rate %.0f MiB/s, "
                 "throttle %.0f%%", number, npages, raw / MiB, seconds * 1000, stat.bandwidth_mib_s, dirty_rate,
                 stat.throttle * 100)

    def _stop_and_copy(self, pending: Dirty, t0: float, estimate_ms: float) -> MigrationStats:
        """The guest paused, the rest sent, the hand-over. Every wait from the pause on shares one
        deadline, `final_copy_limit_ms`: twice the pause's budget (the downtime target, or the
        estimate when finishing anyway past it) plus `final_copy_margin_ms`. A target that goes
        silent before Commit therefore costs the guest that long, not `timeout`: the source
        resumes and says why; after Commit, the same silence leaves it in doubt as quickly."""
        self.link.limit_final_copy(max(self.options.downtime_ms, estimate_ms))
        try:
            return self._final_copy(pending, t0)
        except TransportError as e:
            raise TransportError(f"final copy (at most {self.link.final_copy_limit_ms:.0f} ms, the guest paused): "
                                 f"{e}") from e

    def _final_copy(self, pending: Dirty, t0: float) -> MigrationStats:
        machine, link, tracker = self.machine, self.link, self._tracker()
        self.live.phase = MigrationPhase.STOP_AND_COPY
        laps, final, rate = tracker.pause_and_take_the_rest(pending, link.paused)
        # the state first: the target reads it (its slowest message to decode) while the last
        # pages are encoded and sent, not after them (the protocol takes State anywhere in TRANSFER)
        state = capture(machine, machine_config(machine))
        link.message(State(b"".join(state_sections(link.writer, state))))
        laps.lap(Pause.STATE)
        self._round(len(self.stats.rounds), pages.dirty_runs(final)[0], rate, self.paused_pool)
        laps.lap(Pause.LAST_ROUND)
        end = link.writer.end(tracker.hashes.digest(self.options.threads))
        laps.lap(Pause.DIGEST)
        link.message(Complete(end))
        link.hand_over(laps)
        if self.stats.downtime_overrun_ms:
            self.stats.problems.append(f"the guest was paused {self.stats.downtime_ms:.0f} ms, past the "
                                       f"{self.options.downtime_ms:.0f} ms downtime target (forecast "
                                       f"{self.stats.downtime_predicted_ms:.0f} ms)")
            log.warning("%s", self.stats.problems[-1])
        return self._completed(t0, "the target runs the guest")

    def _switch_to_postcopy(self, pending: Dirty, t0: float) -> MigrationStats:
        self._unsent = []
        self.postcopy.switch(pending, self._tracker())
        return self._completed(t0, "the target runs the guest (post-copy)")

    def resume_postcopy(self) -> MigrationStats:
        """`migrate send --resume`: after the reconnect window passed, try again (another
        `postcopy_reconnect_s`) and serve on."""
        t0 = time.perf_counter() - self.stats.total_seconds
        if not self.postcopy.resume():
            self.stats.outcome, self.stats.reason = MigrationOutcome.COMPLETED, "the target had every page"
            return self.stats
        self.postcopy.serve(self._tracker())
        return self._completed(t0, "the target runs the guest (post-copy)")

    def _tracker(self) -> DirtyTracker:
        if self.tracker is None:
            raise RuntimeError("the dirty log is tracked from the first round on")
        return self.tracker

    def _completed(self, t0: float, reason: str) -> MigrationStats:
        self.stats.frames_judged_raw = self.live_pool.frames_judged_raw + self.paused_pool.frames_judged_raw
        self.stats.outcome, self.stats.reason = MigrationOutcome.COMPLETED, reason
        self.stats.total_seconds = time.perf_counter() - t0
        self.stats.sent_bytes = self.link.bytes_sent
        return self.stats

    def close(self) -> None:
        self.live_pool.close()
        self.paused_pool.close()
        if self.tracker is not None:
            self.tracker.close()
        self.link.close_streams()
        self.postcopy.close()
        self.link.close()


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
        stats.sent_bytes = source.link.bytes_sent
        stats.reason, stats.failure = str(e) or failure_word(e), failure_word(e)
        code = error_code(e)
        outcome = source.link.fall_back(e, code)
        stats.outcome = {Outcome.SOURCE_RESUME: (MigrationOutcome.CANCELLED if code is ErrorCode.CANCELLED
                                                 else MigrationOutcome.FAILED),
                         Outcome.SOURCE_HOLD: MigrationOutcome.IN_DOUBT,
                         Outcome.SOURCE_SERVE: MigrationOutcome.IN_DOUBT}.get(outcome, MigrationOutcome.FAILED)
        if outcome is Outcome.SOURCE_RESUME:
            restore_source(machine, was_running)
        log.warning("migration to %s: %s (%s)", conn.peer, stats.outcome, stats.reason)
        if outcome is Outcome.SOURCE_HOLD:
            lease.leave_in_doubt(InDoubt(source.link.address, source.link.session, o, stats.reason, was_running))
            raise MigrationInDoubt(stats.reason, "paused here, in doubt: the target may run it; "
                                   "`migrate resolve` asks the target and settles it") from e
        if outcome is Outcome.SOURCE_SERVE:  # the source is kept: a resume serves on from what it sent
            lease.leave_in_doubt(InDoubt(source.link.address, source.link.session, o, stats.reason, was_running,
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
