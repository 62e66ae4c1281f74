"""Progress events: what a migration, a snapshot or a restore tells its caller as it goes.

A closed union of frozen dataclasses, handled with `match` or `isinstance`. Each has a `stage`,
its name on the wire: `as_dict()` is the JSON a control-socket client reads as a progress line
(`{"stage": "pages", ...}`, as before the events were typed; only the target's rounds, which no
client was sent, now say `round-received`, so that a stage names one event), and `from_dict`
reads it back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self, Union

from migrate.stats import RUNNING, MigrationOutcome, MigrationPhase, MigrationProgress, RoundStats


# A progress line: the JSON object a control-socket client reads (`{"stage": ..., ...}`). The one
# loosely typed form of an event, at the socket edge only; `from_dict` makes it an event again.
ProgressLine = dict[str, Any]


@dataclass(frozen=True)
class _Event:
    """A flat event: its fields are its progress line's, besides `stage`."""

    stage: ClassVar[str]

    def as_dict(self) -> ProgressLine:
        return {"stage": self.stage, **dataclasses.asdict(self)}

    @classmethod
    def from_fields(cls, fields: ProgressLine) -> Self:
        """The event of a line's fields, each made the type its field declares (a line is JSON)."""
        return cls(**{f.name: _SCALARS[str(f.type)](fields[f.name]) for f in dataclasses.fields(cls)})


_SCALARS: dict[str, Callable[[Any], object]] = {"int": int, "float": float, "str": str}


@dataclass(frozen=True)
class PagesProgress:
    """The source's live figures (at most every 50 ms while pages go out)."""

    stage: ClassVar[str] = "pages"
    figures: MigrationProgress  # a copy: the source keeps updating its own

    def as_dict(self) -> ProgressLine:
        return {"stage": self.stage, **self.figures.as_dict()}

    @classmethod
    def from_fields(cls, fields: ProgressLine) -> PagesProgress:
        phase = str(fields.get("phase", MigrationPhase.SETUP))
        fields = fields | {"phase": MigrationPhase(phase) if phase in RUNNING else MigrationOutcome(phase)}
        return cls(MigrationProgress(**fields))


@dataclass(frozen=True)
class RoundSent:
    """The source finished a round."""

    stage: ClassVar[str] = "round"
    stats: RoundStats

    def as_dict(self) -> ProgressLine:
        return {"stage": self.stage, **dataclasses.asdict(self.stats)}

    @classmethod
    def from_fields(cls, fields: ProgressLine) -> RoundSent:
        return cls(RoundStats(**fields))


@dataclass(frozen=True)
class Throttled(_Event):
    """Auto-converge changed the guest's throttle (the share of its time taken away)."""

    stage: ClassVar[str] = "throttle"
    throttle: float


@dataclass(frozen=True)
class RoundReceived(_Event):
    """The target took a round's pages."""

    stage: ClassVar[str] = "round-received"
    round: int
    pages: int


@dataclass(frozen=True)
class SnapshotWritten(_Event):
    """A snapshot's memory written so far (guest bytes, before compression)."""

    stage: ClassVar[str] = "memory"
    bytes: int


@dataclass(frozen=True)
class SnapshotRead(_Event):
    """A restore's reading of one snapshot file, so far."""

    stage: ClassVar[str] = "read"
    file: str
    bytes: int


ProgressEvent = Union[PagesProgress, Throttled, RoundSent, RoundReceived, SnapshotWritten, SnapshotRead]
Progress = Callable[[ProgressEvent], None]

_BY_STAGE: dict[str, type[ProgressEvent]] = {cls.stage: cls for cls in (
    PagesProgress, Throttled, RoundSent, RoundReceived, SnapshotWritten, SnapshotRead)}


def from_dict(line: ProgressLine) -> ProgressEvent | None:
    """The event a progress line (`as_dict()`'s form) carries; None for a stage this side does not
    know (a newer server's), or a line that does not fit its stage."""
    cls = _BY_STAGE.get(str(line.get("stage")))
    if cls is None:
        return None
    try:
        return cls.from_fields({k: v for k, v in line.items() if k != "stage"})
    except (KeyError, TypeError, ValueError):
        return None


def to_lines(send: Callable[[ProgressLine], None]) -> Progress:
    """A `Progress` that sends each event on as its line (a control-socket client's progress)."""
    return lambda event: send(event.as_dict())
