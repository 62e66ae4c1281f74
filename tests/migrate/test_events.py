"""Progress events: each one's progress line (the control socket's JSON) reads back as the same
event, and a line this side does not know is skipped, not an error."""

from __future__ import annotations

import json

import pytest

from migrate.events import (PagesProgress, ProgressEvent, RoundReceived, RoundSent, SnapshotRead, SnapshotWritten,
                            Throttled, from_dict)
from migrate.stats import MigrationProgress, RoundStats

EVENTS: list[ProgressEvent] = [
    PagesProgress(MigrationProgress(phase="precopy", round=2, round_pages_done=10, round_pages_total=40)),
    Throttled(0.25),
    RoundSent(RoundStats(1, 100, 409600, 1234, 0.5, 12.5, 80.0, 0.0)),
    RoundReceived(3, 77),
    SnapshotWritten(1 << 20),
    SnapshotRead("/tmp/a.snap", 4096),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_a_progress_line_reads_back_as_its_event(event: ProgressEvent) -> None:
    line = json.loads(json.dumps(event.as_dict()))
    assert line["stage"] == event.stage
    assert from_dict(line) == event


def test_each_stage_names_one_event() -> None:
    assert len({type(e).stage for e in EVENTS}) == len(EVENTS)


@pytest.mark.parametrize("line", [{"stage": "teleport"}, {"stage": "throttle"}, {"stage": "pages", "warp": 9}, {}])
def test_an_unknown_or_malformed_line_is_skipped(line: dict) -> None:
    assert from_dict(line) is None
