"""What an observer pinging a guest's console saw during a migration, reduced to figures.

Pure: no clock, no threads, no I/O. tools/bench/echo_observer.py records the timeline (monotonic
seconds), tools/bench/bench_blackout.py runs the peers; tests/test_bench_blackout.py feeds this
module synthetic timelines.

The figures (the blackout issue's method):
- steady latency: ping-to-echo latency on the source before the migration starts (the VMM's own
  console path plus the guest's poll interval); its drift (median of the window's second half
  minus its first half) shows whether the ping period saturates the console: pings queueing up
  make the latency grow through the window.
- blackout: first echo from the target, less the steady latency (p50), minus the last echo from
  the source. `gap` is the same without the steady latency taken off. Any echo the target prints
  counts as its first, also one of a ping only the source was sent (`carried`: the source VMM
  had taken it in, and it moved with the guest's state before the guest answered it).
- echo p50/p99 while migrating: latency of the pings sent to the source in the migration window
  (the VMM's own total time, ending when it said the migration completed) that the source
  answered (pings neither side answered are counted as `lost`, not given a latency).
A latency counts only for a ping written to the console the echo came from, once per ping; an
echo other than those and the carried ones (a garbled line's number, a second one) is a `stray`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

SOURCE, TARGET = "source", "target"


class TimelineError(ValueError):
    """The timeline lacks what a figure needs (no steady echoes, no echo from the target...)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


@dataclass(frozen=True)
class Ping:
    seq: int
    sent: float  # monotonic seconds, taken just before the write
    sides: frozenset[str]  # the consoles it was written to


@dataclass(frozen=True)
class Echo:
    seq: int
    received: float  # monotonic seconds, taken when the read returned
    side: str


@dataclass(frozen=True)
class Timeline:
    period: float  # seconds between pings: the resolution of every figure here
    pings: tuple[Ping, ...]
    echoes: tuple[Echo, ...]
    steady_from: float  # the steady window: pings sent in [steady_from, steady_until)
    steady_until: float  # the migration was asked for
    migration_start: float  # the window "while migrating": [migration_start, migration_end)
    migration_end: float  # the VMM said the migration completed


@dataclass(frozen=True)
class EchoFigures:
    period_ms: float
    steady_pings: int
    steady_answered: int
    steady_p50_ms: float
    steady_p99_ms: float
    steady_drift_ms: float
    during_pings: int
    during_answered: int
    during_p50_ms: float | None
    during_p99_ms: float | None
    last_source_echo_ms: float  # times from the migration's start
    first_target_echo_ms: float
    first_target_ping_ms: float  # when the ping the target answered first was sent
    gap_ms: float
    blackout_ms: float
    lost: int  # pings sent to the source while migrating, before the target's first echo, answered by nobody
    carried: int  # the target's echoes of pings the source had taken in before it stopped
    strays: int
    target_p50_ms: float | None  # the target's own latency once it answered

    @property
    def saturated(self) -> bool:
        """The console did not keep up with the pings: the latency grew over the steady window
        by a period or more and by half its median or more (a guest that polls its console
        seldom has latencies spread over its poll interval, not growing), or a tenth of the
        pings went unanswered."""
        return (self.steady_drift_ms >= max(self.period_ms, self.steady_p50_ms / 2)
                or self.steady_answered < 0.9 * self.steady_pings)


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        raise TimelineError(f"no values for a p{q:g}")
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Matched:
    latency: dict[tuple[str, int], float]  # (side, seq) -> seconds, the first echo of each ping on each side
    carried: int  # echoes the target printed of pings only the source was sent
    strays: int


def matched_echoes(timeline: Timeline) -> Matched:
    pings = {p.seq: p for p in timeline.pings}
    latency: dict[tuple[str, int], float] = {}
    carried = strays = 0
    for echo in timeline.echoes:
        ping = pings.get(echo.seq)
        key = (echo.side, echo.seq)
        if ping is None or echo.received < ping.sent or key in latency:
            strays += 1
        elif echo.side in ping.sides:
            latency[key] = echo.received - ping.sent
        elif echo.side == TARGET and SOURCE in ping.sides:
            carried += 1
        else:
            strays += 1
    return Matched(latency, carried, strays)


def _window(timeline: Timeline, side: str, start: float, end: float) -> list[Ping]:
    return [p for p in timeline.pings if side in p.sides and start <= p.sent < end]


def analyse(timeline: Timeline) -> EchoFigures:
    matched = matched_echoes(timeline)
    latency = matched.latency
    t0 = timeline.migration_start

    steady = _window(timeline, SOURCE, timeline.steady_from, timeline.steady_until)
    steady_ms = [latency[SOURCE, p.seq] * 1000 for p in steady if (SOURCE, p.seq) in latency]
    if len(steady_ms) < 2:
        raise TimelineError(f"{len(steady_ms)} source echoes in the steady window before the migration")
    half = len(steady_ms) // 2
    drift = statistics.median(steady_ms[half:]) - statistics.median(steady_ms[:half])
    steady_p50 = percentile(steady_ms, 50)

    during = _window(timeline, SOURCE, t0, timeline.migration_end)
    during_ms = [latency[SOURCE, p.seq] * 1000 for p in during if (SOURCE, p.seq) in latency]

    pings = {p.seq: p for p in timeline.pings}
    source_echoes = [pings[seq].sent + lat for (side, seq), lat in latency.items() if side == SOURCE]
    # any echo the target prints is its guest running, also of a ping the source had received
    # and not yet answered when it stopped
    alive = sorted((e.received, e.seq) for e in timeline.echoes
                   if e.side == TARGET and e.seq in pings and e.received >= pings[e.seq].sent)
    if not alive:
        raise TimelineError("the target never echoed a ping")
    first_target, first_seq = alive[0]
    last_source = max((t for t in source_echoes if t < first_target), default=None)
    if last_source is None:
        raise TimelineError("no source echo before the target's first")
    answered = {seq for _, seq in latency} | {seq for _, seq in alive}
    lost = sum(1 for p in during if p.seq not in answered and p.sent < first_target)
    # the target's latency once it runs: pings sent to it after its first echo
    settled = [lat * 1000 for (side, seq), lat in latency.items()
               if side == TARGET and pings[seq].sent > first_target]
    gap = (first_target - last_source) * 1000
    return EchoFigures(
        period_ms=timeline.period * 1000,
        steady_pings=len(steady), steady_answered=len(steady_ms),
        steady_p50_ms=steady_p50, steady_p99_ms=percentile(steady_ms, 99), steady_drift_ms=drift,
        during_pings=len(during), during_answered=len(during_ms),
        during_p50_ms=percentile(during_ms, 50) if during_ms else None,
        during_p99_ms=percentile(during_ms, 99) if during_ms else None,
        last_source_echo_ms=(last_source - t0) * 1000, first_target_echo_ms=(first_target - t0) * 1000,
        first_target_ping_ms=(pings[first_seq].sent - t0) * 1000,
        gap_ms=gap, blackout_ms=gap - steady_p50, lost=lost, carried=matched.carried, strays=matched.strays,
        target_p50_ms=percentile(settled, 50) if settled else None)
