"""When a pre-copy migration stops and copies: a pure function from round figures to a decision.

After each round the source fetches the dirty log and asks `decide` what next. The downtime
target is a ceiling, not the aim: the pause is made as short as it will get, and never, by a
forecast, longer than the target.

- The pause is forecast as the rounds so far cost it (`pause_ms`): the copy - what is dirty at
  the link's bandwidth (the best of the last three rounds, the compression seen so far applied,
  never above the user's `--bandwidth` cap, which the final copy keeps too) or at the rounds'
  cost per page, whichever is slower (a page that compresses to nothing still costs its
  gathering, encoding and placing), plus re-hashing each digest block the dirty pages touch, on
  both sides (`estimate_ms`) - plus the pause's fixed part (state, hand-over: `fixed_ms`).
- STOP_AND_COPY once the forecast fits the target and the pause is as short as it will get: the
  copy is settled (within `downtime_settle_ms`), or the last round did not shrink what is left
  (`SHRINK`) and no throttle step is left to make it shrink;
- GIVE_UP after `max_rounds` rounds or `max_seconds` (or STOP_AND_COPY then, late, if the options
  say `finish_anyway`: the only pause allowed past the target);
- otherwise another round: THROTTLE first (auto-converge, QEMU's cpu-throttle-initial and
  -increment) when, from the third round on and with the copy not settled, the guest dirtied
  memory faster than half what the link carried in the last round, or the last round did not
  shrink what is left - up to `throttle_max` while the pause does not fit the target, only up
  to `throttle_settle_max` when it fits (a vCPU throttled past one half sleeps more than it
  runs: its clients would wait longer while it is migrated than the pause makes them wait);
  ANOTHER_ROUND as it is if not.

No clock, no I/O, no machine here: `tests/migrate/test_convergence.py` checks the rules above as
properties.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from hv.kvm.dirty import PAGE_SIZE
from hv.kvm.units import MiB
from migrate.options import MigrationOptions
from migrate.stats import MigrationStats

MIN_COMPRESSION = 0.05  # wire bytes per guest byte assumed at best (zero pages cost ~nothing)
BANDWIDTH_ROUNDS = 3  # the bandwidth estimate is the best of this many last rounds
MIN_PAGES_TO_COST = 256  # a round this small says little about the cost of a page
SHRINK = 0.8  # a round shrank what is left if what is dirty after it is under this much of what it sent


@dataclass(frozen=True)
class RoundFigures:
    """What the source knows after a round and a fresh dirty log, before the next step."""

    rounds: int  # rounds sent so far (at least one)
    seconds: float  # since the migration started
    dirty_pages: int  # dirty now: what a stop and copy would send
    last_pages: int  # what the last round sent
    last_dirty_rate_mib_s: float  # how fast the guest dirtied memory during the last round
    last_bandwidth_mib_s: float  # what the link carried during the last round
    bandwidth_mib_s: float  # the estimate a stop and copy would go at
    compression: float  # wire bytes per guest byte so far (1.0 before any)
    throttle: float  # the guest's throttle now (0: none)
    page_ms: float = 0.0  # what one page cost a recent round, all told (the cheapest of them)
    dirty_blocks: int = 0  # digest blocks holding dirty pages: each side re-hashes them in the pause
    block_ms: float = 0.0  # what hashing one digest block costs (measured by the block hashes)
    fixed_ms: float = 0.0  # the pause's part no page costs: pausing, the state, the hand-over

    @classmethod
    def after(cls, stats: MigrationStats, dirty_pages: int, seconds: float, throttle: float,
              dirty_blocks: int = 0, block_ms: float = 0.0, *, bandwidth_cap_mib_s: float = 0.0,
              fixed_ms: float = 0.0) -> RoundFigures:
        """The figures from a migration's stats so far and the dirty log just fetched; a round
        can measure faster than `bandwidth_cap_mib_s` (a burst after an idle moment) where the
        final copy, paced, cannot: the bandwidth is never counted above the cap."""
        last = stats.rounds[-1]
        recent = stats.rounds[-BANDWIDTH_ROUNDS:]
        costs = [r.seconds * 1000 / r.pages for r in recent if r.pages >= MIN_PAGES_TO_COST]
        return cls(
            rounds=len(stats.rounds), seconds=seconds, dirty_pages=dirty_pages, last_pages=last.pages,
            last_dirty_rate_mib_s=last.dirty_rate_mib_s, last_bandwidth_mib_s=last.bandwidth_mib_s,
            bandwidth_mib_s=min(max(r.bandwidth_mib_s for r in recent), bandwidth_cap_mib_s or math.inf),
            compression=stats.sent_bytes_pages / stats.raw_bytes if stats.raw_bytes else 1.0,
            throttle=throttle, page_ms=min(costs, default=0.0), dirty_blocks=dirty_blocks, block_ms=block_ms,
            fixed_ms=fixed_ms)

    @property
    def remaining_mib(self) -> float:
        """What a stop and copy would put on the wire now."""
        return self.dirty_pages * PAGE_SIZE * max(self.compression, MIN_COMPRESSION) / MiB

    @property
    def estimate_ms(self) -> float:
        """How long a stop and copy would take now (the downtime it would cost)."""
        if self.dirty_pages == 0:
            return 0.0
        wire = self.remaining_mib / self.bandwidth_mib_s * 1000 if self.bandwidth_mib_s > 0 else math.inf
        return max(wire, self.dirty_pages * self.page_ms) + 2 * self.dirty_blocks * self.block_ms

    @property
    def pause_ms(self) -> float:
        """The pause a stop and copy would cost now: the copy and the fixed part."""
        return self.estimate_ms + self.fixed_ms

    @property
    def shrinking(self) -> bool:
        """Did the last round shrink what is left (another like it would shrink it further)."""
        return self.dirty_pages < SHRINK * self.last_pages


class Action(enum.Enum):
    ANOTHER_ROUND = "another round"
    THROTTLE = "throttle the guest harder, then another round"
    STOP_AND_COPY = "stop and copy"
    GIVE_UP = "give up"


class Reason(enum.Enum):
    FITS = "the rest fits the downtime target, and the pause is as short as it will get"
    STILL_SHRINKING = "the rest fits, but another round is likely to cut it"
    NOT_SHRINKING = "the rounds no longer shrink the rest: a throttle step first"
    TOO_MUCH = "the rest does not fit the downtime target yet"
    OUTRUNS_LINK = "the guest dirties memory faster than half the link carries"
    OUT_OF_ROUNDS = "the round limit is reached"
    OUT_OF_TIME = "the time limit is reached"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    throttle: float  # the throttle for the next round (THROTTLE: the new, higher one)
    estimate_ms: float  # the pause a stop and copy would cost now (`RoundFigures.pause_ms`)

    @property
    def late(self) -> bool:
        """A stop and copy that the options allowed past the downtime target."""
        return self.action is Action.STOP_AND_COPY and self.reason in (Reason.OUT_OF_ROUNDS, Reason.OUT_OF_TIME)


def settled(figures: RoundFigures, options: MigrationOptions) -> bool:
    """The copy is as short as it will get: within `downtime_settle_ms` (more rounds would
    trade the guest's time for under a millisecond or two of pause)."""
    return figures.estimate_ms <= options.downtime_settle_ms


def next_throttle(figures: RoundFigures, options: MigrationOptions) -> float:
    """Auto-converge's throttle for the next round: one step up while the guest outruns the link
    or the rounds no longer shrink an unsettled rest; up to `throttle_max` while the pause does
    not fit the target, only to `throttle_settle_max` to shorten one that already fits (the
    guest's answers while it is migrated count as much as the pause)."""
    if not options.auto_converge or figures.rounds < 3:  # the first rounds say little of the rate
        return figures.throttle
    if settled(figures, options):
        return figures.throttle
    outruns = figures.last_dirty_rate_mib_s > 0.5 * figures.last_bandwidth_mib_s
    if not outruns and figures.shrinking:
        return figures.throttle
    fits = figures.pause_ms <= options.downtime_ms
    ceiling = min(options.throttle_max, options.throttle_settle_max) if fits else options.throttle_max
    if figures.throttle >= ceiling:
        return figures.throttle
    return min(ceiling, options.throttle_initial if figures.throttle == 0 else figures.throttle + options.throttle_step)


def decide(figures: RoundFigures, options: MigrationOptions) -> Decision:
    """What the source does next, given where the migration stands."""
    pause = figures.pause_ms
    fits = pause <= options.downtime_ms
    throttle = next_throttle(figures, options)
    if fits and (settled(figures, options) or (not figures.shrinking and throttle == figures.throttle)):
        return Decision(Action.STOP_AND_COPY, Reason.FITS, figures.throttle, pause)
    limit = (Reason.OUT_OF_ROUNDS if figures.rounds >= options.max_rounds else
             Reason.OUT_OF_TIME if figures.seconds >= options.max_seconds else None)
    if limit is not None:
        action = Action.STOP_AND_COPY if options.finish_anyway else Action.GIVE_UP
        return Decision(action, limit, figures.throttle, pause)
    if throttle != figures.throttle:
        outruns = figures.last_dirty_rate_mib_s > 0.5 * figures.last_bandwidth_mib_s
        return Decision(Action.THROTTLE, Reason.OUTRUNS_LINK if outruns else Reason.NOT_SHRINKING, throttle, pause)
    return Decision(Action.ANOTHER_ROUND, Reason.STILL_SHRINKING if fits else Reason.TOO_MUCH, throttle, pause)
