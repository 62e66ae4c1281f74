"""The blackout benchmark's arithmetic (tools/bench/echo_timeline.py, blackout_report.py) on
synthetic timelines: times are made up, nothing here depends on a clock."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))
from blackout_report import ratios, summarise  # noqa: E402
from echo_timeline import (  # noqa: E402
    SOURCE,
    TARGET,
    Echo,
    Ping,
    Timeline,
    TimelineError,
    analyse,
    percentile,
)

MS = 1e-3
BOTH = frozenset({SOURCE, TARGET})
SOURCE_ONLY = frozenset({SOURCE})


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile(range(1, 102), 99) == 100  # rank 99 of 0..100
    assert percentile([10, 20], 75) == pytest.approx(17.5)
    assert percentile([7], 99) == 7
    with pytest.raises(TimelineError):
        percentile([], 50)


def migration(steady_latency_ms=lambda i: 3, carried_at_ms: int | None = None) -> Timeline:
    """Pings every 5 ms from 0 to 2 s. Steady window [200, 1000) ms; the migration runs over
    [1000, 1600) ms. The source answers every ping sent up to 1500 ms: steady ones after
    `steady_latency_ms(i)`, the i-th ping of the migration after 1 + i ms (so 1..101 ms: p50 51,
    p99 100; the last echo leaves at 1500 + 101 = 1601 ms). The target was sent the first three
    pings of the migration and answers them when it runs, from 1700 ms; with `carried_at_ms` it
    first prints an echo of a ping only the source was sent (ping 1550 ms)."""
    pings, echoes = [], []
    for seq, t in enumerate(range(0, 2000, 5)):
        to_target = t in (1000, 1005, 1010) or t >= 1700
        pings.append(Ping(seq, t * MS, BOTH if to_target else SOURCE_ONLY))
        if 200 <= t < 1000:
            echoes.append(Echo(seq, (t + steady_latency_ms((t - 200) // 5)) * MS, SOURCE))
        elif 1000 <= t <= 1500:
            echoes.append(Echo(seq, (t + 1 + (t - 1000) // 5) * MS, SOURCE))
        elif t == 1550 and carried_at_ms is not None:
            echoes.append(Echo(seq, carried_at_ms * MS, TARGET))
        if t in (1000, 1005, 1010):
            echoes.append(Echo(seq, (1700 + (t - 1000)) * MS, TARGET))
        elif t >= 1700:
            echoes.append(Echo(seq, (t + 4) * MS, TARGET))
    return Timeline(5 * MS, tuple(pings), tuple(echoes), steady_from=200 * MS, steady_until=1000 * MS,
                    migration_start=1000 * MS, migration_end=1600 * MS)


def test_blackout_is_the_gap_less_the_steady_latency() -> None:
    figures = analyse(migration())
    assert figures.period_ms == pytest.approx(5)
    assert (figures.steady_pings, figures.steady_answered) == (160, 160)
    assert figures.steady_p50_ms == pytest.approx(3)
    assert figures.steady_drift_ms == pytest.approx(0)
    assert not figures.saturated
    assert figures.last_source_echo_ms == pytest.approx(601)
    assert figures.first_target_echo_ms == pytest.approx(700)
    assert figures.first_target_ping_ms == pytest.approx(0)
    assert figures.gap_ms == pytest.approx(99)
    assert figures.blackout_ms == pytest.approx(96)
    assert (figures.during_pings, figures.during_answered) == (120, 101)
    assert figures.during_p50_ms == pytest.approx(51)
    assert figures.during_p99_ms == pytest.approx(100)
    assert figures.lost == 19  # 1505..1595 ms: nobody answered them
    assert (figures.carried, figures.strays) == (0, 0)
    assert figures.target_p50_ms == pytest.approx(4)


def test_an_echo_carried_over_from_the_source_is_the_targets_first() -> None:
    figures = analyse(migration(carried_at_ms=1650))
    assert figures.first_target_echo_ms == pytest.approx(650)
    assert figures.gap_ms == pytest.approx(49)
    assert figures.carried == 1
    assert figures.lost == 18  # the carried ping was answered


def test_strays_do_not_count() -> None:
    timeline = migration()
    noise = (Echo(99_999, 1.0, TARGET),  # never sent: a garbled number
             Echo(timeline.echoes[-1].seq, 1.999, TARGET))  # a second echo of the last ping
    figures = analyse(Timeline(timeline.period, timeline.pings, timeline.echoes + noise,
                               timeline.steady_from, timeline.steady_until, timeline.migration_start,
                               timeline.migration_end))
    assert figures.strays == 2
    assert figures.first_target_echo_ms == pytest.approx(700)


def test_a_console_that_falls_behind_is_saturated() -> None:
    figures = analyse(migration(steady_latency_ms=lambda i: 3 + i // 10))  # 1 ms more every 10 pings
    assert figures.steady_drift_ms == pytest.approx(8)
    assert figures.saturated


def test_no_echo_from_the_target_is_an_error() -> None:
    timeline = migration()
    silent = tuple(e for e in timeline.echoes if e.side == SOURCE)
    with pytest.raises(TimelineError, match="target never echoed"):
        analyse(Timeline(timeline.period, timeline.pings, silent, timeline.steady_from, timeline.steady_until,
                         timeline.migration_start, timeline.migration_end))


def test_summaries_give_the_median_the_spread_and_the_ratio() -> None:
    def run(blackout: float, downtime: float) -> dict:
        return {"outcome": "completed", "blackout_ms": blackout, "downtime_ms": downtime, "saturated": False}

    summary = {"kvmigrate": summarise([run(30, 10), run(20, 14), run(40, 12), {"outcome": "failed", "error": "x"}]),
               "qemu": summarise([run(10, 2), run(12, 4), run(14, 3)])}
    assert summary["kvmigrate"]["blackout_ms"] == {"median": 30, "min": 20, "max": 40}
    assert (summary["kvmigrate"]["measured"], summary["kvmigrate"]["runs"]) == (3, 4)
    assert summary["kvmigrate"]["errors"] == ["x"]
    assert summary["qemu"]["during_p99_ms"] is None  # not in these runs
    ratio = ratios(summary)
    assert list(ratio) == ["kvmigrate/qemu"]  # the post-copy pair only when both of it ran
    assert ratio["kvmigrate/qemu"]["blackout_ms"] == pytest.approx(30 / 12)
    assert ratio["kvmigrate/qemu"]["downtime_ms"] == pytest.approx(12 / 3)
    assert ratio["kvmigrate/qemu"]["total_ms"] is None
    summary |= {"kvmigrate-postcopy": summarise([run(20, 5)]), "qemu-postcopy": summarise([run(40, 1)])}
    assert ratios(summary)["kvmigrate-postcopy/qemu-postcopy"]["blackout_ms"] == pytest.approx(0.5)
