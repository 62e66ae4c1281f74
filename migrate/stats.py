"""What a live migration reports: how it ended (`MigrationOutcome`), round by round figures
(`RoundStats`) and the totals (`MigrationStats`, also the JSON `migrate send --json` prints)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


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


@dataclass
class MigrationStats:
    outcome: MigrationOutcome = MigrationOutcome.FAILED
    reason: str = ""
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

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.sent_bytes_pages if self.sent_bytes_pages else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compression_ratio"] = round(self.compression_ratio, 3)
        return d
