"""The exit status of a `migrate` command for each kind of error: the one table, over the three
hierarchies (formats.FormatError, hv.HvError, migrate.MigrateError); hv.vmm.command owns the
statuses (0 done ... 6 in doubt, `ExitStatus`) and hv's own rows, which come last here."""

from __future__ import annotations

from formats import FormatError
from hv.vmm.command import HV_EXITS, ExitRows, ExitStatus
from migrate.errors import (Cancelled, DiskRefused, IncompatibleError, MigrationFailed, MigrationInDoubt,
                            MissingSections, NotConverging, PostcopyFailed, SnapshotError, StateError, StateShapeError,
                            TransportError)
from migrate.live.resolve import StillInDoubt

EXITS: ExitRows = (
    ((MigrationInDoubt, StillInDoubt, PostcopyFailed), ExitStatus.IN_DOUBT),  # (post-copy: paused on the target)
    ((MigrationFailed, Cancelled, NotConverging), ExitStatus.MIGRATION_FAILED),
    (TransportError, ExitStatus.TRANSPORT),
    ((IncompatibleError, DiskRefused, SnapshotError, FormatError, MissingSections, StateError,
      StateShapeError), ExitStatus.REFUSED),
    (ValueError, ExitStatus.USAGE),  # an option's value refused where it is used (a TLS half-given)
    *HV_EXITS,
)

# `migrate send`'s outcomes (MigrationStats.outcome) as exit statuses
OUTCOMES = {"completed": ExitStatus.OK, "dry-run": ExitStatus.OK, "rejected": ExitStatus.REFUSED,
            "cancelled": ExitStatus.MIGRATION_FAILED, "failed": ExitStatus.MIGRATION_FAILED,
            "in-doubt": ExitStatus.IN_DOUBT}
