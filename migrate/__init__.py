"""Snapshots and live migration of `hv` machines.

    from migrate import snapshot, restore, send, receive, MigrationOptions

`snapshot(machine, path)` / `restore(path, kvm)`: a machine's whole state to a file and back
(`migrate.snapshots`). `send(machine, "host:port", options)` / `receive(conn, kvm)`: live migration
by pre-copy with a two-phase hand-over (`migrate.live`, `migrate.protocol`).
"""

from migrate.errors import (
    IncompatibleError,
    MigrateError,
    MigrationFailed,
    SnapshotError,
    StateError,
    TransportError,
)
from migrate.live import (
    MigrationOptions,
    MigrationStats,
    listen_and_receive,
    receive,
    send,
)
from migrate.snapshots import SnapshotInfo, inspect, restore, snapshot
from migrate.transport import Listener, Tls, connect

__all__ = [
    "IncompatibleError", "Listener", "MigrateError", "MigrationFailed", "MigrationOptions", "MigrationStats",
    "SnapshotError", "SnapshotInfo", "StateError", "Tls", "TransportError", "connect", "inspect",
    "listen_and_receive", "receive", "restore", "send", "snapshot",
]
