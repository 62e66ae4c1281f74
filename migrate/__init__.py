"""Snapshots and live migration of `hv` machines.

    from migrate import snapshot, restore, send, receive, MigrationOptions

`snapshot(machine, path)` / `restore(path, kvm)`: a machine's whole state to a file and back
(`migrate.snapshot.snapshots`). `send(machine, "host:port", options)` / `receive(conn, kvm)`: live migration
by pre-copy with a two-phase hand-over, or post-copy (`MigrationOptions(postcopy=True)`: the guest
runs on the target while its last pages follow; `resume_postcopy(machine)` after a link that
stayed down).

Where things are: `source` and `target` (the two sides of a live migration), `receiver` (the
`migrate recv` server around the target), `resolve` (an in-doubt hand-over settled), `protocol` (the
sans-IO state machine between them), `transport` (sockets, framing, authentication), `streams`
(extra page streams and the round gate), `convergence` (when to stop and copy: a pure function),
`postcopy` (post-copy's two halves: pages served, pages placed by userfaultfd), `options` and
`stats` (what the user asks and what they get back), `snapshots` (files),
`state` (a machine's state as plain data, and the schema registry), `records` (that state as
stream sections and back), `pages` (guest memory to page sections and back), `digest` (the
memory digest, computed the cheap way), `errors`, `cli` and `control` (the `migrate` command and
the control-socket commands), `disks` (which file a received or restored guest's disk is).
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
from migrate.options import MigrationOptions
from migrate.snapshot.snapshots import SnapshotInfo, SnapshotKind, inspect, restore, snapshot
from migrate.live.source import resume_postcopy, send
from migrate.stats import MigrationOutcome, MigrationStats
from migrate.live.receiver import Receiver, listen_and_receive
from migrate.live.target import receive
from migrate.transport.connection import connect
from migrate.transport.listener import Listener
from migrate.transport.tls import Tls

__all__ = [
    "Cancelled", "DiskRefused", "IncompatibleError", "Listener", "Receiver", "MigrateError", "MigrationFailed", "MigrationOptions",
    "MigrationOutcome", "MigrationStats", "MissingSections", "NotConverging", "ProtocolViolation", "SnapshotError",
    "SnapshotInfo", "SnapshotKind", "StateError", "StateShapeError", "Tls", "TransportError", "connect", "inspect", "listen_and_receive",
    "receive", "restore", "send", "snapshot",
]
