"""migrate's commands on a running VM's control socket: `snapshot`, `migrate-send`,
`migrate-status`, `migrate-cancel` (error `InDoubt` once the migration ended in doubt),
`migrate-resolve` and `verify`.

`snapshot` and `migrate-send` own the VM's run state while they work (`hv.vmm.owner`: the
lifecycle commands are refused with `Busy` meanwhile). `migrate-resolve` ends an in-doubt
hand-over: `{"command": "migrate-resolve", "force": null | "resume-source" | "stop-source"}` ->
`{"hand_over": "committed" | "not-committed" | "unknown", "action": "stopped" | "resumed",
"asked": "...", "forced": null | "..."}`, or the error `StillInDoubt` (facts: target, session,
asked) when the target could not say and nothing was forced, or `NotInDoubt`.

Registered through the `kvmigrate.control` entry point, so `hv run --api SOCK` serves them
without hv knowing about migration; `migrate snapshot/send/status/cancel` call them.

A migration runs in the VM's process, on the thread serving the `migrate-send` that started it,
and does not depend on that client: if the client goes (killed, its terminal closed), the
migration goes on and only its progress reports stop, as QEMU's `migrate` goes on when its
monitor client leaves. `migrate-status` (from any client) says how it goes; `migrate-cancel`
stops it, and the guest runs on here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from hv.vmm.control import ControlContext, ControlError, ControlServer, Progress
from hv.vmm.owner import owner_of
from migrate.events import PagesProgress, ProgressEvent, Throttled, to_lines
from migrate.errors import Failure
from migrate.stats import RUNNING, MigrationOutcome, MigrationPhase, MigrationProgress, MigrationStats

log = logging.getLogger(__name__)


def _snapshot(ctx: ControlContext, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from migrate.snapshot.snapshots import snapshot

    if not isinstance(args.get("out"), str):
        raise ControlError("BadRequest", "snapshot needs 'out', the file to write")
    with owner_of(ctx.machine).hold(f"snapshot to {args['out']}"):  # it pauses and resumes the guest
        info = snapshot(ctx.machine, args["out"], base=args.get("incremental_from"),
                        level=int(args.get("level", 3)), mappable=bool(args.get("mappable", False)),
                        track_dirty=bool(args.get("track_dirty", False)), live=bool(args.get("live", False)),
                        progress=to_lines(progress))
    return dataclasses.asdict(info)


def _migrate_send(ctx: ControlContext, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from migrate.options import MigrationOptions
    from migrate.live.source import send

    from migrate.errors import MigrationInDoubt
    from migrate.live.resolve import resume_postcopy
    from migrate.transport.framing import parse_address

    if args.get("resume"):  # post-copy whose link stayed down: reconnect and serve on
        stats = resume_postcopy(ctx.machine)
        ctx.finish("migrated (post-copy, resumed)")
        return stats.as_dict()
    if not isinstance(args.get("to"), str):
        raise ControlError("BadRequest", "migrate-send needs 'to', the target's HOST:PORT")
    try:
        parse_address(args["to"])
        options = MigrationOptions.from_dict(args.get("options", {}))
    except (ValueError, TypeError) as e:
        raise ControlError("BadRequest", str(e)) from e
    cancel = ctx.extra["migration_cancel"] = threading.Event()
    status = ctx.extra["migration_status"] = MigrationStatus(args["to"])
    switch = ctx.extra["migration_switch"] = threading.Event()
    ctx.extra["migration_postcopy"] = options.wants_postcopy
    client = _Client(progress)

    def report(event: ProgressEvent) -> None:
        match event:
            case PagesProgress(figures=figures):
                status.live = figures
            case Throttled(throttle=throttle):
                status.live = dataclasses.replace(status.live, throttle=throttle)
        client(event.as_dict())

    try:
        stats = send(ctx.machine, args["to"], options, progress=report, cancel=cancel, switch=switch)
    except Exception as e:
        status.raised(MigrationOutcome.IN_DOUBT if isinstance(e, MigrationInDoubt) else MigrationOutcome.FAILED, str(e))
        raise
    status.ended(stats)
    if stats.outcome is MigrationOutcome.COMPLETED:
        ctx.finish(f"migrated to {args['to']}")
    return stats.as_dict()


@dataclass
class MigrationStatus:
    """What `migrate-status` says of the migration running (or the last one): the source's live
    figures as its last `PagesProgress` gave them, then how it ended."""

    to: str
    live: MigrationProgress = field(default_factory=MigrationProgress)
    reason: str = ""  # set when it ended
    failure: Failure | None = None  # set when it ended (NONE: it completed)

    def raised(self, outcome: MigrationOutcome, reason: str) -> None:
        """`send` raised: the figures stay as they were."""
        self.live = dataclasses.replace(self.live, phase=outcome)
        self.reason = reason

    def ended(self, stats: MigrationStats) -> None:
        """`send` returned: nothing is left to send, either way."""
        self.live = dataclasses.replace(
            self.live, phase=stats.outcome, remaining_pages=0, remaining_bytes=0,
            eta_seconds=0.0 if stats.outcome is MigrationOutcome.COMPLETED else None)
        self.reason, self.failure = stats.reason, stats.failure

    def as_dict(self) -> dict[str, Any]:
        """The JSON `migrate status --json` prints (and `describe` reads)."""
        ended = {"reason": self.reason} | ({"failure": self.failure} if self.failure is not None else {})
        return {"to": self.to, **self.live.as_dict(), **(ended if self.reason or self.failure is not None else {})}


class _Client:
    """Progress to the client that started the migration, for as long as it listens: once it
    is gone (killed, its terminal closed) the migration goes on without it."""

    def __init__(self, progress: Progress) -> None:
        self._progress, self._gone = progress, False

    def __call__(self, p: dict[str, Any]) -> None:
        if self._gone:
            return
        try:
            self._progress(p)
        except OSError:
            self._gone = True
            log.info("the client of migrate-send went away; the migration goes on")


def _migrate_status(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    """The migration running (or the last one), as `MigrationProgress` says; phase "none": none yet."""
    status = ctx.extra.get("migration_status")
    return status.as_dict() if isinstance(status, MigrationStatus) else {"phase": "none"}


def _verify(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    """`migrate verify SOCK`: the memory digest now, and the built-in guest's rule (paused briefly)."""
    from migrate.snapshot.verify import verify_machine

    owner_of(ctx.machine).check("verify")  # it pauses the guest: not a VM someone else holds
    return verify_machine(ctx.machine)




def _migrate_cancel(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    cancel, status = ctx.extra.get("migration_cancel"), ctx.extra.get("migration_status")
    live = status.as_dict() if isinstance(status, MigrationStatus) else {}
    hold = owner_of(ctx.machine).current
    if hold is not None and hold.in_doubt:
        raise ControlError("InDoubt", f"the {hold.owner} is over, in doubt: nothing to cancel; "
                                      "`migrate resolve` settles it", hold.facts())
    if cancel is None or live.get("phase") not in RUNNING:
        last = f" (the last one: {live['phase']})" if live else ""
        raise ControlError("NotMigrating", f"no migration is running on this VM{last}")
    cancel.set()
    return {"cancelled": True, "phase": live["phase"], "round": live.get("round", 0)}


def _migrate_start_postcopy(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    """QEMU's migrate-start-postcopy: the running pre-copy switches to post-copy at its next
    message (mid-round too), in a migration whose handshake negotiated post-copy."""
    switch, status = ctx.extra.get("migration_switch"), ctx.extra.get("migration_status")
    live = status.as_dict() if isinstance(status, MigrationStatus) else {}
    if switch is None or live.get("phase") not in (MigrationPhase.SETUP, MigrationPhase.PRECOPY):
        raise ControlError("NotMigrating", "no pre-copy migration is running here")
    if not ctx.extra.get("migration_postcopy"):
        raise ControlError("BadRequest", "this migration did not negotiate post-copy: start it with "
                           "--postcopy-ready (or another --postcopy option)")
    switch.set()
    return {"switching": True, "phase": live["phase"], "round": live.get("round", 0)}


def _migrate_resolve(ctx: ControlContext, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    from migrate.protocol import HandOver
    from migrate.live.resolve import Force, SourceAction, resolve

    force = args.get("force")
    if force is not None and force not in {f.value for f in Force}:
        raise ControlError("BadRequest", f"force is one of {[f.value for f in Force]} or null, not {force!r}")
    resolution = resolve(ctx.machine, Force(force) if force else None)
    if resolution.action is SourceAction.STOPPED:
        ctx.finish("migrated (resolved: " + ("the target has the guest)" if resolution.hand_over is HandOver.COMMITTED
                                             else "forced to stop the source)"))
    return resolution.as_dict()


def register(server: ControlServer) -> None:
    server.register("snapshot", _snapshot, exclusive=True)
    server.register("migrate-send", _migrate_send, exclusive=True)
    server.register("migrate-cancel", _migrate_cancel)
    server.register("migrate-start-postcopy", _migrate_start_postcopy)
    server.register("migrate-resolve", _migrate_resolve)
    server.register("migrate-status", _migrate_status)
    server.register("verify", _verify, exclusive=True)  # pauses the guest: not beside a migration
