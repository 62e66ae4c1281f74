"""When a pre-copy migration stops and copies: a pure function from round figures to a decision.

After each round the source fetches the dirty log and asks `decide` what next:

- STOP_AND_COPY once the pause fits the downtime target - the pause as the rounds so far cost:
  what is dirty at the link's bandwidth (the best of the last three rounds, the compression seen
  so far applied) or at the rounds' cost per page, whichever is slower (a page that compresses to
  nothing still costs its gathering, encoding and placing), plus re-hashing each digest block the
  dirty pages touch, on both sides (`estimate_ms`) - unless the rest is still
  shrinking fast (under half the last round) and would not fit a quarter of the target: a round
  costs the guest nothing, downtime costs it everything;
- GIVE_UP after `max_rounds` rounds or `max_seconds` (or STOP_AND_COPY then, late, if the options
  say `finish_anyway`);
- otherwise another round: THROTTLE first (auto-converge, QEMU's cpu-throttle-initial and
  -increment) when, from the third round on, the guest dirtied memory faster than half what the
  link carried in the last round; ANOTHER_ROUND as it is if not.

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

    @classmethod
    def after(cls, stats: MigrationStats, dirty_pages: int, seconds: float, throttle: float,
              dirty_blocks: int = 0, block_ms: float = 0.0) -> RoundFigures:
        """The figures from a migration's stats so far and the dirty log just fetched."""
        last = stats.rounds[-1]
        recent = stats.rounds[-BANDWIDTH_ROUNDS:]
        costs = [r.seconds * 1000 / r.pages for r in recent if r.pages >= MIN_PAGES_TO_COST]
        return cls(
            rounds=len(stats.rounds), seconds=seconds, dirty_pages=dirty_pages, last_pages=last.pages,
            last_dirty_rate_mib_s=last.dirty_rate_mib_s, last_bandwidth_mib_s=last.bandwidth_mib_s,
            bandwidth_mib_s=max(r.bandwidth_mib_s for r in recent),
            compression=stats.sent_bytes_pages / stats.raw_bytes if stats.raw_bytes else 1.0,
            throttle=throttle, page_ms=min(costs, default=0.0), dirty_blocks=dirty_blocks, block_ms=block_ms)

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


class Action(enum.Enum):
    ANOTHER_ROUND = "another round"
    THROTTLE = "throttle the guest harder, then another round"
    STOP_AND_COPY = "stop and copy"
    GIVE_UP = "give up"


class Reason(enum.Enum):
    FITS = "the rest fits the downtime target"
    STILL_SHRINKING = "the rest fits, but another round is likely to cut it a lot"
    TOO_MUCH = "the rest does not fit the downtime target yet"
    OUTRUNS_LINK = "the guest dirties memory faster than half the link carries"
    OUT_OF_ROUNDS = "the round limit is reached"
    OUT_OF_TIME = "the time limit is reached"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: Reason
    throttle: float  # the throttle for the next round (THROTTLE: the new, higher one)
    estimate_ms: float  # what a stop and copy would cost now

    @property
    def late(self) -> bool:
        """A stop and copy that the options allowed past the downtime target."""
        return self.action is Action.STOP_AND_COPY and self.reason in (Reason.OUT_OF_ROUNDS, Reason.OUT_OF_TIME)


def next_throttle(figures: RoundFigures, options: MigrationOptions) -> float:
    """Auto-converge's throttle for the next round: one step up while the guest outruns the link."""
    if not options.auto_converge or figures.rounds < 3:  # the first rounds say little of the rate
        return figures.throttle
    if figures.last_dirty_rate_mib_s <= 0.5 * figures.last_bandwidth_mib_s:
        return figures.throttle
    if figures.throttle == 0:
        return options.throttle_initial
    return min(options.throttle_max, figures.throttle + options.throttle_step)


def decide(figures: RoundFigures, options: MigrationOptions) -> Decision:
    """What the source does next, given where the migration stands."""
    estimate = figures.estimate_ms
    target = options.downtime_ms
    shrinking = figures.dirty_pages < 0.5 * figures.last_pages
    if estimate <= target and (estimate <= target / 4 or not shrinking):
        return Decision(Action.STOP_AND_COPY, Reason.FITS, figures.throttle, estimate)
    limit = (Reason.OUT_OF_ROUNDS if figures.rounds >= options.max_rounds else
             Reason.OUT_OF_TIME if figures.seconds >= options.max_seconds else None)
    if limit is not None:
        action = Action.STOP_AND_COPY if options.finish_anyway else Action.GIVE_UP
        return Decision(action, limit, figures.throttle, estimate)
    reason = Reason.STILL_SHRINKING if estimate <= target else Reason.TOO_MUCH
    throttle = next_throttle(figures, options)
    if throttle != figures.throttle:
        return Decision(Action.THROTTLE, Reason.OUTRUNS_LINK, throttle, estimate)
    return Decision(Action.ANOTHER_ROUND, reason, throttle, estimate)
