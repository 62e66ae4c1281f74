"""What the user may ask of a live migration: `MigrationOptions` (the `migrate send` flags, the
control socket's `options`, `send(..., options)`) on the source, `ReceiveOptions` (the `migrate
recv` flags, `receive(..., options)`) on the target."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from migrate.events import Progress
from migrate.transport.tls import Tls

if TYPE_CHECKING:
    from hv.devices.serial import Terminal
    from hv.vmm.machine import Machine


@dataclass(frozen=True)
class MigrationOptions:
    downtime_ms: float = 300.0  # the longest pause allowed (a ceiling: the pause is made as short as it gets)
    downtime_settle_ms: float = 2.0  # a final copy forecast this short is as short as it will get
    # the pause's fixed part (pausing, the state, the target's apply and resume, the round trips)
    # counted beside the copy when the forecast is held against the downtime target
    downtime_fixed_ms: float = 10.0
    bandwidth_mib_s: float = 0.0  # cap on what we send (0: as fast as the link goes)
    streams: int = 1  # page streams (connections), as QEMU's multifd channels
    threads: int = 2  # page-encoding threads (at least `streams`)
    auto_converge: bool = True
    throttle_initial: float = 0.2  # QEMU's cpu-throttle-initial / -increment, as fractions
    throttle_step: float = 0.1
    throttle_max: float = 0.99
    # the deepest throttle taken only to shorten a pause that already fits the target: past it a
    # throttled vCPU sleeps more than it runs, and the guest's clients wait longer for each answer
    # while it is migrated than the pause would make them wait once
    throttle_settle_max: float = 0.5
    max_rounds: int = 30
    max_seconds: float = 120.0
    finish_anyway: bool = False  # at max rounds/time: stop and copy regardless (longer downtime)
    level: int = 1  # zstd level
    dry_run: bool = False
    timeout: float = 30.0  # longest wait for any one answer from the target
    # the final copy (guest paused) waits at most twice its budget plus this, in all, for the target
    final_copy_margin_ms: float = 1000.0
    # post-copy (opt-in: after the switch the guest needs both hosts until every page is in)
    postcopy: bool = False  # switch after `postcopy_after` pre-copy rounds (0: pure post-copy, no round)
    postcopy_after: int = 1
    postcopy_auto: bool = False  # switch when pre-copy would not converge within downtime_ms
    postcopy_after_ms: float = 0.0  # switch this long after the pages began, mid-round if need be (0: off)
    postcopy_ready: bool = False  # post-copy negotiated; switch on `migrate-start-postcopy` (QEMU's)
    postcopy_reconnect_s: float = 30.0  # after a lost link, how long to try to reconnect
    key: bytes = b""
    tls: Tls | None = None  # mutual TLS (certificates checked against a private CA)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationOptions:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise ValueError(f"unknown migration options: {sorted(unknown)}")
        values = dict(d)
        if isinstance(values.get("key"), str):
            values["key"] = bytes.fromhex(values["key"])
        if isinstance(values.get("tls"), dict):
            values["tls"] = Tls(**values["tls"])
        return cls(**values)

    @property
    def wants_postcopy(self) -> bool:
        return self.postcopy or self.postcopy_auto or self.postcopy_ready or self.postcopy_after_ms > 0


def _no_console(data: bytes) -> None:
    """A guest console nobody reads."""


@dataclass(frozen=True)
class ReceiveOptions:
    """What the user may ask of a migration target: `receive(conn, kvm, options)`, `Receiver`,
    `listen_and_receive` (the `migrate recv` flags)."""

    console: Callable[[bytes], None] = _no_console  # the guest's COM1 output
    virtio_console: Callable[[bytes], None] | None = None  # its virtio console's (default: `console`)
    terminal: Terminal | None = None  # where COM1 meets this host (attached before the guest resumes here)
    timeout: float = 60.0  # longest wait for any one message from the source
    disk: str | None = None  # this host's file for the guest's disk ...
    disk_dir: str | None = None  # ... or the folder where the file of the stream's disk's name is
    max_mem: int | None = None  # the most guest RAM taken (default: what the host can reserve now)
    max_vcpus: int | None = None  # the most vCPUs a guest may have here (default: `default_max_vcpus`)
    progress: Progress | None = None  # typed progress events (`migrate.events`)
    # after a lost link in post-copy, how long the source may take to reconnect (None: for as long
    # as it takes) before the guest is paused here for good
    postcopy_wait: float | None = 30.0
    # whatever the guest's run here needs, acquired as the machine is built (before Ready: its
    # failure is a refusal, and nothing that can fail is left for after Commit)
    prepare: Callable[[Machine], None] | None = None
