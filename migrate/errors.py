"""migrate's errors: one root, the facts in each.

Stream and file problems stay `formats.FormatError`s (a corrupt snapshot, a bad page run); VM
problems stay `hv.HvError`s. These are the failures of the migration itself.
"""

from __future__ import annotations

from collections.abc import Sequence


class MigrateError(Exception):
    """Root of migrate's errors."""


class StateError(MigrateError):
    """An operation asked of a machine in the wrong state (say, capture of a running one)."""


class IncompatibleError(MigrateError):
    """The target cannot take this guest: every reason, not just the first."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{len(self.problems)} incompatibilities:\n  {lines}")


class SnapshotError(MigrateError):
    """A snapshot file set that does not hold together (missing memory file, wrong base)."""

    def __init__(self, path: object, detail: str) -> None:
        self.path, self.detail = path, detail
        super().__init__(f"{path}: {detail}")


class TransportError(MigrateError):
    """The link to the peer failed (closed, timed out, a frame too large, authentication)."""


class MigrationFailed(MigrateError):
    """A live migration ended without handing the guest over; says where the guest runs now."""

    def __init__(self, reason: str, guest_on: str, *, code: object = None) -> None:
        self.reason, self.guest_on, self.code = reason, guest_on, code
        super().__init__(f"migration failed: {reason} (the guest is {guest_on})")
