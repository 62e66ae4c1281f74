"""What a live migration reports: how it ended (`MigrationOutcome`), round by round figures
(`RoundStats`) and the totals (`MigrationStats`, also the JSON `migrate send --json` prints)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from hv.kvm.units import MiB
from migrate.errors import Failure


class Pause(StrEnum):
    """Where a live migration's pause went (`MigrationStats.downtime_phases_ms`; the values are
    what the JSON says), in the order they come."""

    PAUSE = "pause"  # the vCPUs stopped
    DIRTY_LOG = "dirty_log"  # the last dirty log fetched
    STATE = "state"  # the vCPU, VM and device state captured and sent
    LAST_ROUND = "last_round"  # its pages sent (stop and copy)
    DIGEST = "digest"  # the memory digest (stop and copy)
    BITMAP = "bitmap"  # the missing pages' bitmap (post-copy)
    TARGET_VERIFY = "target_verify"  # waiting for Ready (replaced by the target's own steps and the link's)
    TARGET_RESUME = "target_resume"  # waiting for Resumed (likewise)
    TARGET_DIGEST = "target_digest"  # the target's digest check (from Ready)
    TARGET_APPLY = "target_apply"  # the target applying the state after Complete (from Ready; pre-copy: 0)
    LINK = "link"  # what is left of the waits: the link's


class Laps:
    """Consecutive phases timed one after the other: `lap(name)` ends the phase running now."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name] = (now - self._t) * 1000
        self._t = now
        return self.phases[name]


class MigrationOutcome(StrEnum):
    """Where the guest is once `send` returns (the values are what the CLI and JSON say).

    The protocol's `Outcome` says what a side must do with its copy; this says how the whole
    migration went, as the user sees it."""

    COMPLETED = "completed"  # the target runs the guest
    REJECTED = "rejected"  # the target refused the guest before any page moved; it runs here
    CANCELLED = "cancelled"  # called off; the guest runs here
    FAILED = "failed"  # gave up; the guest runs here
    IN_DOUBT = "in-doubt"  # the link died after Commit: paused here, the target may run it
    DRY_RUN = "dry-run"  # only checked that the target would take it


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


class MigrationPhase(StrEnum):
    """Where a running migration is (`MigrationProgress.phase`; then it is its outcome). The
    values are what `migrate status` and the JSON always said."""

    SETUP = "setup"  # connecting, the handshake, the target building the VM
    PRECOPY = "precopy"  # rounds while the guest runs here
    STOP_AND_COPY = "stop-and-copy"  # the guest paused here: the last pages, the state, the hand-over
    POSTCOPY_SWITCH = "postcopy-switch"  # paused here: the state and what is missing go
    POSTCOPY = "postcopy"  # the guest runs on the target; the pages it lacks still go


RUNNING = tuple(MigrationPhase)  # (the phases compare equal to their values: `"setup" in RUNNING`)


@dataclass
class MigrationProgress:
    """A migration as it goes: what `migrate status` shows and the progress bar draws (the
    source's `migrate.events.PagesProgress` events carry a copy, from the first page on)."""

    phase: MigrationPhase | MigrationOutcome = MigrationPhase.SETUP  # then the outcome (completed, ...)
    round: int = 0
    round_pages_done: int = 0  # pages of this round sent so far
    round_pages_total: int = 0  # pages this round sends (round 0: every touched page)
    pages_done: int = 0  # pages sent in all rounds
    bytes_done: int = 0  # guest bytes sent in all rounds (before compression)
    wire_bytes: int = 0  # bytes on the wire, all streams
    remaining_pages: int = 0  # of this round
    remaining_bytes: int = 0
    dirty_rate_mib_s: float = 0.0  # as last measured (the dirty log of the round before)
    bandwidth_mib_s: float = 0.0  # what the link carries in this round
    throttle: float = 0.0
    elapsed_seconds: float = 0.0
    eta_seconds: float | None = None  # to the end of the migration, if it converges at these rates

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def estimate(self, guest_rate_mib_s: float) -> None:
        """The ETA at `guest_rate_mib_s` (guest bytes sent per second): what is left of this round,
        and the rounds after, each carrying what the guest dirtied during the one before (a
        geometric series: remaining / (rate - dirty rate)); None when the guest outruns the link."""
        net = guest_rate_mib_s - self.dirty_rate_mib_s * (1 - self.throttle)
        self.eta_seconds = round(self.remaining_bytes / MiB / net, 3) if net > 0 else None




@dataclass
class PostcopyStats:
    """What post-copy cost: the pages left behind at the switch, how they came (on demand or in
    the background), how long faults waited (the target's measure: the fault's event read until
    its page was placed) and how long vCPU threads were blocked on them (QEMU's "blocktime")."""

    after_rounds: int = 0  # pre-copy rounds before the switch
    missing_pages: int = 0  # pages the target lacked at the switch
    fetched_pages: int = 0  # sent because the target faulted on them
    fetch_requests: int = 0
    around_pages: int = 0  # sent with a faulted page: the unsent ones just after it
    background_pages: int = 0  # placed from the background push
    push_jumps: int = 0  # times the push moved to just after a fault
    fault_p50_us: int = 0
    fault_p99_us: int = 0
    # the time faults waited for their pages, summed over the threads that took them: vCPUs' faults
    # (here KVM takes them on its async-page-fault workers, not on the vCPU's thread, so they are not
    # told apart by vCPU) and device threads'
    vcpu_blocked_ms: float = 0.0
    seconds: float = 0.0  # from the target's Resumed until its Finished
    reconnects: int = 0  # links re-established after a loss


@dataclass
class MigrationStats:
    outcome: MigrationOutcome = MigrationOutcome.FAILED
    reason: str = ""  # what happened, in words
    failure: Failure = Failure.NONE  # why it did not complete, one public word (migrate.errors.FAILURES)
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
    # where the pause went, in order (source's steps, and the target's as it reports them; "link"
    # is what neither side accounts for: transit and the peer's reading of the messages)
    downtime_phases_ms: dict[str, float] = field(default_factory=dict)
    downtime_target_ms: float = 0.0
    # the pause the source forecast when it stopped (convergence.RoundFigures.pause_ms: the copy
    # and the fixed part), and the copy alone against the phases it forecast (dirty_log,
    # last_round, digest): how far the forecast is to be trusted, per run
    downtime_predicted_ms: float = 0.0
    downtime_copy_predicted_ms: float = 0.0
    downtime_copy_ms: float = 0.0
    frames_judged_raw: int = 0  # page frames sent uncompressed because a sample did not shrink
    final_copy_limit_ms: float = 0.0  # the longest the final copy could keep the guest paused
    postcopy: PostcopyStats | None = None  # set when the migration switched to post-copy
    postcopy_discard_ms: float = 0.0  # the target's hashing and giving back before the pause (not downtime)
    # before the pause, the guest running: how long the target took to say the last live round is
    # in its RAM (Applied), and whether it did within the wait's bound (not downtime)
    target_catch_up_ms: float = 0.0
    target_caught_up: bool = False

    @property
    def downtime_overrun_ms(self) -> float:
        """How far the pause went past its target (0: within it)."""
        return max(0.0, self.downtime_ms - self.downtime_target_ms) if self.downtime_target_ms else 0.0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.sent_bytes_pages if self.sent_bytes_pages else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compression_ratio"] = round(self.compression_ratio, 3)
        d["downtime_overrun_ms"] = round(self.downtime_overrun_ms, 3)
        return d
