"""Snapshots and live migration of `hv` machines.

    from migrate import snapshot, restore, send, receive, MigrationOptions, ReceiveOptions

`snapshot(machine, path)` / `restore(path, kvm)`: a machine's whole state to a file and back
(`migrate.snapshot.snapshots`). `send(machine, "host:port", options)` / `receive(conn, kvm, options)`: live migration
by pre-copy with a two-phase hand-over, or post-copy (`MigrationOptions(postcopy=True)`: the guest
runs on the target while its last pages follow; `resume_postcopy(machine)` after a link that
stayed down).

Where things are (migrate/DESIGN.md has the layers): `protocol` (the sans-IO exchange),
`transport/` (frames, connections, TLS, the listener), the model at the top (`state`, `pages`,
`digest`, `records`, `options`, `stats`, `events`, `disks`, `errors`), `snapshot/` (files;
taking, restoring, verifying them), `live/` (the engine: `source` and `target` over their ends of
`link`, `postcopy/`'s halves, `streams`, `convergence`, `receiver`, `resolve`, `ledger`),
`commands/` and `cli` (the `migrate` command and the control-socket commands).
"""

from migrate.errors import (
    Cancelled,
    DiskRefused,
    IncompatibleError,
    MigrateError,
    MigrationFailed,
    MissingSections,
    NotConverging,
    PostcopyFailed,
    ProtocolViolation,
    SnapshotError,
    StateError,
    StateShapeError,
    TransportError,
)
from migrate.options import MigrationOptions, ReceiveOptions
from migrate.snapshot.snapshots import SnapshotInfo, SnapshotKind, inspect, restore, snapshot
from migrate.live.resolve import resume_postcopy
from migrate.live.source import send
from migrate.stats import MigrationOutcome, MigrationStats
from migrate.live.receiver import Receiver, listen_and_receive
from migrate.live.target import receive
from migrate.transport.connection import connect
from migrate.transport.listener import Listener
from migrate.transport.tls import Tls

__all__ = [
    "Cancelled", "DiskRefused", "IncompatibleError", "Listener", "Receiver", "MigrateError", "MigrationFailed", "MigrationOptions", "ReceiveOptions",
    "MigrationOutcome", "MigrationStats", "MissingSections", "NotConverging", "ProtocolViolation", "SnapshotError",
    "SnapshotInfo", "SnapshotKind", "StateError", "StateShapeError", "Tls", "TransportError", "connect", "inspect", "listen_and_receive",
    "receive", "restore", "send", "snapshot",
]
