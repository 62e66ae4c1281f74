"""Post-copy's source half: when to switch, the switch itself (the guest paused for good, the
state and the bitmap of what the target lacks handed over), then the paused guest's pages served
(`migrate.live.postcopy.serve`) until the target says it holds every one, reconnecting a lost
link on the way. `Source` asks it whether to switch and hands it the pages still dirty."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from hv.vmm.machine import Machine
from migrate.datapath import PageEncoderC
from migrate.errors import SessionFenced, TransportError
from migrate.live.convergence import Action
from migrate.live.link import SourceLink
from migrate.live.postcopy.missing import count_missing, decode_missing, encode_missing
from migrate.live.postcopy.serve import PostcopySource
from migrate.live.tracking import Dirty, DirtyTracker
from migrate.options import MigrationOptions
from migrate.protocol import Complete, Discard, Discarded, Finished, Missing, Postcopy, Reconnect, S, State
from migrate.records import state_sections
from migrate.state import capture, machine_config
from migrate.stats import MigrationPhase, MigrationProgress, MigrationStats, Pause, PostcopyStats

log = logging.getLogger(__name__)


class SourcePostcopy:
    """The source's post-copy, over `link`: asked before every round (`requested`) and after each
    decision (`instead_of`); from `switch` on, it serves the target."""

    def __init__(self, machine: Machine, link: SourceLink, options: MigrationOptions, stats: MigrationStats,
                 live: MigrationProgress, report: Callable[..., None], switch: threading.Event | None) -> None:
        self.machine, self.link, self.options = machine, link, options
        self.stats, self.live, self.report = stats, live, report
        self.switch_now = switch or threading.Event()  # "switch to post-copy now" (migrate-start-postcopy)
        self.server: PostcopySource | None = None  # from the switch on
        self._memory_digest: int | None = None  # of the paused memory, taken once

    def requested(self) -> bool:
        """Post-copy asked for now, whatever pre-copy would do next (as QEMU's
        migrate-start-postcopy, even when a stop-and-copy would fit): after `postcopy_after`
        rounds (0: before any), `postcopy_after_ms` after the pages began, or on request
        (`switch`, the control socket's migrate-start-postcopy)."""
        o = self.options
        if not o.wants_postcopy:
            return False
        if self.switch_now.is_set() or (o.postcopy and len(self.stats.rounds) >= o.postcopy_after):
            return True
        return bool(o.postcopy_after_ms) and (time.perf_counter() - self.link.sent_at_start) * 1000 >= o.postcopy_after_ms

    def instead_of(self, action: Action) -> bool:
        """Post-copy instead of what pre-copy would do next (auto): only when pre-copy would need
        the throttle or give up."""
        return self.options.postcopy_auto and action in (Action.THROTTLE, Action.GIVE_UP)

    # --- the switch -------------------------------------------------------------------------------

    def switch(self, pending: Dirty, tracker: DirtyTracker) -> None:
        """Pause for good, send the state and what the target still lacks, hand over; then serve
        the pages until the target has them all. The pause holds the final copy's deadline too."""
        link, machine = self.link, self.machine
        link.limit_final_copy(self.options.downtime_ms)
        self.live.phase = MigrationPhase.POSTCOPY_SWITCH
        # What the guest dirtied since it was sent is given back on the target now, while the guest
        # still runs here: freeing it costs the target's kernel ~30 ms a 256 MiB, not in the pause.
        discard = {region.guest_base: bits for region, bits in pending}
        link.message(Discard(encode_missing(discard), count_missing(discard)))
        discarded = link.answer_of(Discarded)
        self.stats.postcopy_discard_ms = round((discarded.digest_us + discarded.discard_us) / 1000, 3)
        # (what `pending` has was given back there)
        laps, final, _ = tracker.pause_and_take_the_rest(pending, link.paused)
        missing = {region.guest_base: bits for region, bits in final}
        state = capture(machine, machine_config(machine))
        link.message(State(b"".join(state_sections(link.writer, state))))
        laps.lap(Pause.STATE)
        count = count_missing(missing)
        link.message(Postcopy(encode_missing(missing), count))
        laps.lap(Pause.BITMAP)
        link.hand_over(laps)  # (point 7: from Commit on this copy serves the target, never runs)
        self.stats.postcopy = PostcopyStats(after_rounds=len(self.stats.rounds), missing_pages=count)
        self.server = PostcopySource(machine.vm.memory, missing, self.options.level)
        self.serve(tracker)

    # --- serving ----------------------------------------------------------------------------------

    def serve(self, tracker: DirtyTracker) -> None:
        """The paused guest's pages to the target until it holds them all; a lost link is
        reconnected (`reconnect`) and the serving goes on from what the target still lacks."""
        server, p = self._server()
        self.live.phase = MigrationPhase.POSTCOPY
        self.live.round_pages_total, self.live.round_pages_done = p.missing_pages, 0
        self.report(force=True)
        started = time.perf_counter()
        proto = self.link.proto
        while True:
            try:
                if self._memory_digest is None:  # this memory no longer changes: its digest once
                    self._memory_digest = tracker.hashes.digest(self.options.threads)
                finished = self._serve_pages(server, self._memory_digest)
                break
            except TransportError as e:
                if proto.connection_lost() is not S.POSTCOPY_PAUSED or not self.reconnect(e):
                    raise
                if self.link.proto.state is S.DONE:  # the target had finished; its Finished was lost
                    finished = Finished()
                    break
        p.fetched_pages, p.fetch_requests = finished.fetched, server.figures.fetch_requests
        p.around_pages = server.figures.around
        p.background_pages, p.push_jumps = finished.background, server.figures.push_jumps
        p.fault_p50_us, p.fault_p99_us = finished.fault_p50_us, finished.fault_p99_us
        p.vcpu_blocked_ms = round(finished.blocked_us / 1000, 3)
        p.seconds = round(time.perf_counter() - started, 3)
        self.stats.pages_sent += server.figures.sent

    def _server(self) -> tuple[PostcopySource, PostcopyStats]:
        if self.server is None or self.stats.postcopy is None:
            raise RuntimeError("post-copy serves only after the switch")
        return self.server, self.stats.postcopy

    def _serve_pages(self, server: PostcopySource, memory_digest: int) -> Finished:
        """Faulted pages on the fetch channel (a thread), the rest pushed here; then END (the page
        digest of this memory) and the target's Finished."""
        link = self.link
        if link.fetch_conn is None:
            raise TransportError("post-copy: no fetch channel")
        server.start_fetch_server(link.fetch_conn)
        number = len(self.stats.rounds)

        def send(parts: list[bytes | memoryview]) -> None:
            link.pages_message(number, parts)
            link.pace()  # --bandwidth holds for the push too (the fetch channel's pages are not held back)
            self.live.round_pages_done = server.figures.sent
            self.report()

        server.push(send, PageEncoderC(self.options.level, stable=True), link.writer)  # this memory no longer changes
        link.message(Complete(link.writer.end(memory_digest)))
        return link.answer_of(Finished)

    def resume(self) -> bool:
        """`migrate send --resume`: after the reconnect window passed, try again (another
        `postcopy_reconnect_s`); True if there is serving left to do (False: the target had every
        page)."""
        self.link.proto.connection_lost()
        if not self.reconnect(TransportError("resumed by the operator")):
            raise TransportError(f"post-copy: the target could not be reached again within "
                                 f"{self.options.postcopy_reconnect_s:.0f} s")
        return self.link.proto.state is not S.DONE

    def reconnect(self, error: TransportError) -> bool:
        """After a lost link in post-copy: connect again, say `Reconnect(session)`, and carry on
        from what the target says it lacks (`Missing`), trying for `postcopy_reconnect_s`. False
        when that passed; the protocol's state says how it ended otherwise (POSTCOPY: serve on;
        DONE: the target had finished; FAILED: the target never took Commit, so this copy runs on)."""
        o, link = self.options, self.link
        server, p = self._server()
        deadline = time.monotonic() + o.postcopy_reconnect_s
        log.warning("post-copy: the link to the target went (%s); reconnecting for up to %.0f s", error,
                    o.postcopy_reconnect_s)
        link.close()
        while time.monotonic() < deadline:
            try:
                link.connect_again(min(o.timeout, max(0.1, deadline - time.monotonic())))
                link.message(Reconnect(link.session))
                answer = link.answer()
                if isinstance(answer, Missing):
                    server.reset_missing(decode_missing(answer.missing, self.machine.vm.memory))
                    link.new_stream(len(self.stats.rounds))  # a new stream on the new link
                    link.open_fetch_channel(link.session)
            except TransportError as e:  # (one that breaks after Missing too: the target waits again)
                link.proto.connection_lost()
                link.conn.close()
                log.info("post-copy: reconnecting: %s", e)
                time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
                continue
            if isinstance(answer, Missing):
                p.reconnects += 1
                self.live.round_pages_done = self.live.round_pages_total - answer.pages
                self.report(force=True)  # `migrate status` sees it carry on
                log.warning("post-copy: reconnected; %d pages still to send", answer.pages)
                return True
            if link.proto.state is S.FAILED:
                raise SessionFenced("the target never took Commit and has fenced the session", "here") from error
            if link.proto.state is S.DONE:
                return True
            link.conn.close()  # "unknown": not settled; try again
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return False

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
