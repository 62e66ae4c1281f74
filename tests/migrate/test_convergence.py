"""The stop-and-copy policy as properties: `convergence.decide` over any round figures and options."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from migrate.live.convergence import SHRINK, Action, Decision, Reason, RoundFigures, decide, next_throttle
from migrate.options import MigrationOptions
from migrate.stats import MigrationStats, RoundStats

rates = st.floats(0, 5000, allow_nan=False)


@st.composite
def figures(draw: st.DrawFn) -> RoundFigures:
    return RoundFigures(
        rounds=draw(st.one_of(st.integers(1, 4), st.integers(1, 40))), seconds=draw(st.floats(0, 200, allow_nan=False)),
        dirty_pages=draw(st.integers(0, 1 << 20)), last_pages=draw(st.integers(0, 1 << 20)),
        last_dirty_rate_mib_s=draw(rates), last_bandwidth_mib_s=draw(rates), bandwidth_mib_s=draw(rates),
        compression=draw(st.floats(0, 1.2, allow_nan=False)),
        throttle=draw(st.sampled_from([0.0, 0.2, 0.3, 0.5, 0.9, 0.99])),
        page_ms=draw(st.floats(0, 0.05, allow_nan=False)), dirty_blocks=draw(st.integers(0, 4096)),
        block_ms=draw(st.floats(0, 2, allow_nan=False)), fixed_ms=draw(st.sampled_from([0.0, 5.0, 15.0])))


@st.composite
def options(draw: st.DrawFn) -> MigrationOptions:
    return MigrationOptions(
        downtime_ms=draw(st.floats(0, 2000, allow_nan=False)), auto_converge=draw(st.booleans()),
        max_rounds=draw(st.integers(1, 35)), max_seconds=draw(st.floats(1, 150, allow_nan=False)),
        finish_anyway=draw(st.booleans()), downtime_settle_ms=draw(st.sampled_from([0.0, 2.0, 10.0])),
        throttle_settle_max=draw(st.sampled_from([0.2, 0.5, 0.99])))


def _at_a_limit(f: RoundFigures, o: MigrationOptions) -> bool:
    return f.rounds >= o.max_rounds or f.seconds >= o.max_seconds


@given(figures(), options())
def test_never_stops_over_the_downtime_target_unless_allowed_to_finish_late(f, o) -> None:
    d = decide(f, o)
    if d.action is Action.STOP_AND_COPY and d.estimate_ms > o.downtime_ms:
        assert o.finish_anyway and _at_a_limit(f, o) and d.late


@given(figures(), options())
def test_gives_up_only_at_the_round_or_time_limit_and_never_when_told_to_finish(f, o) -> None:
    d = decide(f, o)
    if d.action is Action.GIVE_UP:
        assert _at_a_limit(f, o) and not o.finish_anyway
        assert d.reason is (Reason.OUT_OF_ROUNDS if f.rounds >= o.max_rounds else Reason.OUT_OF_TIME)
    if _at_a_limit(f, o):  # no more rounds past a limit: it ends, one way or the other
        assert d.action in (Action.STOP_AND_COPY, Action.GIVE_UP)


@given(figures(), options())
def test_stops_once_the_copy_is_settled_and_the_pause_fits(f, o) -> None:
    assume(f.estimate_ms <= o.downtime_settle_ms and f.pause_ms <= o.downtime_ms)
    assert decide(f, o) == Decision(Action.STOP_AND_COPY, Reason.FITS, f.throttle, f.pause_ms)


@given(figures(), options())
def test_the_target_is_a_ceiling_a_shrinking_rest_goes_another_round(f, o) -> None:
    """Fitting is not enough: while a round shrinks what is left and the copy is not settled,
    the source goes on (up to its limits), whatever room the target leaves."""
    assume(o.max_rounds > 1)
    last = max(f.last_pages, 10)
    f = dataclasses.replace(f, rounds=min(f.rounds, o.max_rounds - 1), seconds=0.0, last_pages=last,
                            dirty_pages=max(1, min(f.dirty_pages, int(last * SHRINK) - 1)))
    assume(f.shrinking and f.estimate_ms > o.downtime_settle_ms)
    assert decide(f, o).action in (Action.ANOTHER_ROUND, Action.THROTTLE)


@given(figures(), options())
def test_the_pause_counts_its_fixed_part(f, o) -> None:
    d = decide(f, o)
    assert d.estimate_ms == f.pause_ms == f.estimate_ms + f.fixed_ms
    if f.estimate_ms <= o.downtime_ms < f.pause_ms:  # the copy alone would fit; with the rest it does not
        assert d.action is not Action.STOP_AND_COPY or d.late


@given(figures(), options(), st.floats(0.3, 0.95))
def test_another_round_when_it_fits_but_is_still_shrinking(f, o, fraction) -> None:
    assume(f.dirty_pages > 0 and o.downtime_ms > 1 and o.max_rounds > 1)
    # a bandwidth at which the rest takes `fraction` of the target: fits, not settled
    f = dataclasses.replace(f, rounds=min(f.rounds, o.max_rounds - 1), seconds=0.0, page_ms=0.0, dirty_blocks=0,
                            fixed_ms=0.0, bandwidth_mib_s=f.remaining_mib * 1000 / (fraction * o.downtime_ms))
    assume(f.estimate_ms > o.downtime_settle_ms)
    d = decide(f, o)
    shrinking = f.dirty_pages < SHRINK * f.last_pages
    # not shrinking: stop, unless a throttle step is left to make it shrink
    assert (d.action is Action.STOP_AND_COPY) is (not shrinking and next_throttle(f, o) == f.throttle)
    if d.action is Action.THROTTLE:
        assert d.reason in (Reason.OUTRUNS_LINK, Reason.NOT_SHRINKING)
    elif d.action is Action.ANOTHER_ROUND:
        assert d.reason is Reason.STILL_SHRINKING


@given(figures(), options(), st.floats(1, 100, allow_nan=False))
def test_more_bandwidth_or_a_longer_target_never_turns_a_stop_into_a_round(f, o, factor) -> None:
    assume(decide(f, o).action is Action.STOP_AND_COPY)
    faster = dataclasses.replace(f, bandwidth_mib_s=f.bandwidth_mib_s * factor)
    longer = dataclasses.replace(o, downtime_ms=o.downtime_ms * factor)
    assert decide(faster, o).action is Action.STOP_AND_COPY
    assert decide(f, longer).action is Action.STOP_AND_COPY


@given(figures(), options(), rates, rates)
def test_the_throttle_is_monotone_in_the_dirty_rate(f, o, rate_a, rate_b) -> None:
    low, high = sorted((rate_a, rate_b))
    at_low = decide(dataclasses.replace(f, last_dirty_rate_mib_s=low), o)
    at_high = decide(dataclasses.replace(f, last_dirty_rate_mib_s=high), o)
    assert at_high.throttle >= at_low.throttle
    assert at_low.action is not Action.THROTTLE or at_high.action is Action.THROTTLE
    assert at_low.action is at_high.action or {at_low.action, at_high.action} == {
        Action.ANOTHER_ROUND, Action.THROTTLE}  # the rate decides a throttle step, nothing else


@given(figures(), options())
def test_a_throttle_step_goes_up_by_the_options_steps_and_only_when_allowed(f, o) -> None:
    assume(o.max_rounds > 1)
    # far from fitting and no limit reached: another round, the only question is the throttle
    f = dataclasses.replace(f, rounds=min(f.rounds, o.max_rounds - 1), seconds=0.0, bandwidth_mib_s=0.0,
                            dirty_pages=max(f.dirty_pages, 1))
    d = decide(f, o)
    outruns = f.last_dirty_rate_mib_s > 0.5 * f.last_bandwidth_mib_s
    stepped = o.throttle_initial if f.throttle == 0 else min(o.throttle_max, f.throttle + o.throttle_step)
    if f.throttle >= o.throttle_max:
        stepped = f.throttle
    if o.auto_converge and f.rounds >= 3 and (outruns or not f.shrinking) and stepped != f.throttle:
        reason = Reason.OUTRUNS_LINK if outruns else Reason.NOT_SHRINKING
        assert d == Decision(Action.THROTTLE, reason, stepped, math.inf)
    else:
        assert d == Decision(Action.ANOTHER_ROUND, Reason.TOO_MUCH, f.throttle, math.inf)
    assert d.throttle <= max(o.throttle_max, f.throttle) and d.throttle == next_throttle(f, o)


def test_throttling_starts_at_the_third_round_and_above_half_the_link() -> None:
    o = MigrationOptions()
    busy = RoundFigures(rounds=3, seconds=1.0, dirty_pages=3000, last_pages=5000, last_dirty_rate_mib_s=50.0,
                        last_bandwidth_mib_s=100.0, bandwidth_mib_s=1.0, compression=1.0, throttle=0.0)
    assert decide(busy, o).action is Action.ANOTHER_ROUND  # exactly half the link: not yet
    faster = dataclasses.replace(busy, last_dirty_rate_mib_s=50.5)
    assert decide(faster, o) == Decision(Action.THROTTLE, Reason.OUTRUNS_LINK, 0.2, faster.estimate_ms)
    assert decide(dataclasses.replace(faster, rounds=2), o).action is Action.ANOTHER_ROUND
    assert decide(dataclasses.replace(faster, throttle=0.2), o).throttle == 0.2 + 0.1
    assert decide(dataclasses.replace(faster, throttle=0.95), o).throttle == 0.99
    assert decide(dataclasses.replace(faster, throttle=0.99), o).action is Action.ANOTHER_ROUND  # at the top
    assert decide(faster, dataclasses.replace(o, auto_converge=False)).action is Action.ANOTHER_ROUND
    stuck = dataclasses.replace(busy, dirty_pages=5000)  # at half the link, but the round shrank nothing
    assert decide(stuck, o) == Decision(Action.THROTTLE, Reason.NOT_SHRINKING, 0.2, stuck.pause_ms)


def test_a_rest_that_fits_waits_one_more_round_only_while_the_rounds_shrink_it() -> None:
    o = MigrationOptions(downtime_ms=100.0, auto_converge=False)
    f = RoundFigures(rounds=4, seconds=1.0, dirty_pages=800, last_pages=1000, last_dirty_rate_mib_s=0.0,
                     last_bandwidth_mib_s=100.0, bandwidth_mib_s=0.0, compression=1.0, throttle=0.0)
    f = dataclasses.replace(f, bandwidth_mib_s=f.remaining_mib * 1000 / 50.0)  # takes half the target
    assert decide(f, o).action is Action.STOP_AND_COPY  # exactly SHRINK of the last round: not shrinking
    shrinking = dataclasses.replace(f, dirty_pages=799)
    assert decide(shrinking, o) == Decision(Action.ANOTHER_ROUND, Reason.STILL_SHRINKING, 0.0,
                                            shrinking.pause_ms)
    # a throttle step left: the stuck rest is throttled, not copied, though it fits
    assert decide(f, dataclasses.replace(o, auto_converge=True)).action is Action.THROTTLE
    # a rest past the target by its fixed part alone is not copied
    late = dataclasses.replace(f, fixed_ms=51.0)
    assert decide(late, o).action is Action.ANOTHER_ROUND and decide(late, o).reason is Reason.TOO_MUCH


def test_compression_is_counted_no_better_than_twenty_to_one() -> None:
    f = RoundFigures(rounds=1, seconds=0.0, dirty_pages=256, last_pages=0, last_dirty_rate_mib_s=0.0,
                     last_bandwidth_mib_s=0.0, bandwidth_mib_s=1.0, compression=0.01, throttle=0.0)
    assert math.isclose(f.remaining_mib, 256 * 4096 * 0.05 / (1 << 20))
    assert math.isclose(dataclasses.replace(f, compression=0.5).remaining_mib, 0.5)


def test_without_a_measured_bandwidth_only_a_clean_guest_stops() -> None:
    o = MigrationOptions()
    base = RoundFigures(rounds=2, seconds=1.0, dirty_pages=1, last_pages=10, last_dirty_rate_mib_s=0.0,
                        last_bandwidth_mib_s=0.0, bandwidth_mib_s=0.0, compression=1.0, throttle=0.0)
    assert decide(base, o).action is Action.ANOTHER_ROUND and math.isinf(decide(base, o).estimate_ms)
    clean = dataclasses.replace(base, dirty_pages=0)
    assert decide(clean, o) == Decision(Action.STOP_AND_COPY, Reason.FITS, 0.0, 0.0)


def test_the_figures_come_from_the_last_rounds() -> None:
    stats = MigrationStats(raw_bytes=4000, sent_bytes_pages=1000)
    stats.rounds = [RoundStats(i, 100 * (5 - i), 0, 0, 0.1, 10.0 * i, bw, 0.0)
                    for i, bw in enumerate([900.0, 100.0, 200.0, 300.0, 50.0])]
    f = RoundFigures.after(stats, dirty_pages=7, seconds=3.5, throttle=0.2)
    assert (f.rounds, f.dirty_pages, f.last_pages, f.seconds, f.throttle) == (5, 7, 100, 3.5, 0.2)
    assert f.bandwidth_mib_s == 300.0  # the best of the last three, not of all
    assert (f.last_dirty_rate_mib_s, f.last_bandwidth_mib_s, f.compression) == (40.0, 50.0, 0.25)
    assert math.isclose(f.remaining_mib, 7 * 4096 * 0.25 / (1 << 20))
    assert math.isclose(f.page_ms, 0.1 * 1000 / 300)  # round 2: the only recent one of 256 pages or more
    assert math.isclose(f.estimate_ms, max(f.remaining_mib / 300.0 * 1000, 7 * f.page_ms))



@given(figures(), st.floats(0, 1, allow_nan=False), st.integers(0, 512))
def test_the_estimate_counts_pages_and_digest_blocks_not_only_bytes(f, page_ms, blocks) -> None:
    slower = dataclasses.replace(f, page_ms=f.page_ms + page_ms, dirty_blocks=f.dirty_blocks + blocks)
    assert slower.estimate_ms >= f.estimate_ms  # more cost per page or more blocks: never a shorter pause
    if f.dirty_pages:
        assert slower.estimate_ms >= f.dirty_pages * slower.page_ms + 2 * slower.dirty_blocks * slower.block_ms


def test_pages_that_compress_to_nothing_still_cost_their_handling() -> None:
    """The classic migration-test guest (zero pages, one changing byte each) compresses ~1000:1, so
    bytes on the wire promise a short pause; the rounds' cost per page says otherwise."""
    figures = RoundFigures(rounds=3, seconds=2.0, dirty_pages=65536, last_pages=65536, last_dirty_rate_mib_s=100,
                           last_bandwidth_mib_s=5000, bandwidth_mib_s=5000, compression=0.001, throttle=0.0,
                           page_ms=0.005, dirty_blocks=128, block_ms=0.4)
    assert figures.estimate_ms == pytest.approx(65536 * 0.005 + 2 * 128 * 0.4)  # 430 ms, not 2.6
    decision = decide(figures, MigrationOptions(downtime_ms=300, max_rounds=30))
    assert decision.action is not Action.STOP_AND_COPY and decision.estimate_ms > 300


def test_page_cost_comes_from_the_cheapest_recent_round_of_some_size() -> None:
    stats = MigrationStats(rounds=[RoundStats(0, 200_000, 0, 0, 2.0, 0, 100, 0),  # 0.01 ms a page
                                   RoundStats(1, 100, 0, 0, 1.0, 0, 100, 0),  # too small to say
                                   RoundStats(2, 10_000, 0, 0, 0.05, 0, 100, 0)])  # 0.005 ms a page
    figures = RoundFigures.after(stats, 5000, 3.0, 0.0, dirty_blocks=7, block_ms=0.3)
    assert figures.page_ms == pytest.approx(0.005) and (figures.dirty_blocks, figures.block_ms) == (7, 0.3)


@given(figures(), options())
def test_a_pause_that_fits_is_never_shortened_by_a_throttle_past_the_settle_ceiling(f, o) -> None:
    """Throttling past `throttle_settle_max` only ever happens to a pause that does not fit."""
    d = decide(f, o)
    if f.pause_ms <= o.downtime_ms and d.throttle > f.throttle:
        assert d.throttle <= o.throttle_settle_max
    assert d.throttle >= f.throttle  # auto-converge never lets go mid-migration
