"""migrate's commands on a running VM's control socket: `snapshot`, `migrate-send`,
`migrate-cancel` (error `InDoubt` once the migration ended in doubt) and `migrate-resolve`.

`snapshot` and `migrate-send` own the VM's run state while they work (`hv.vmm.owner`: the
lifecycle commands are refused with `Busy` meanwhile). `migrate-resolve` ends an in-doubt
hand-over: `{"command": "migrate-resolve", "force": null | "resume-source" | "stop-source"}` ->
`{"hand_over": "committed" | "not-committed" | "unknown", "action": "stopped" | "resumed",
"asked": "...", "forced": null | "..."}`, or the error `StillInDoubt` (facts: target, session,
asked) when the target could not say and nothing was forced, or `NotInDoubt`.

Registered through the `kvmigrate.control` entry point, so `hv run --api SOCK` serves them
without hv knowing about migration; `migrate snapshot/send --api SOCK` call them.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from hv.vmm.control import ControlContext, ControlError, ControlServer, Progress
from hv.vmm.owner import owner_of


def _snapshot(ctx: ControlContext, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from migrate.snapshots import snapshot

    if not isinstance(args.get("out"), str):
        raise ControlError("BadRequest", "snapshot needs 'out', the file to write")
    with owner_of(ctx.machine).hold(f"snapshot to {args['out']}"):  # it pauses and resumes the guest
        info = snapshot(ctx.machine, args["out"], base=args.get("incremental_from"),
                        level=int(args.get("level", 3)), mappable=bool(args.get("mappable", False)),
                        track_dirty=bool(args.get("track_dirty", False)), progress=progress)
    return dataclasses.asdict(info)


def _migrate_send(ctx: ControlContext, args: dict[str, Any], progress: Progress) -> dict[str, Any]:
    from migrate.options import MigrationOptions
    from migrate.source import send
    from migrate.stats import MigrationOutcome

    if not isinstance(args.get("to"), str):
        raise ControlError("BadRequest", "migrate-send needs 'to', the target's HOST:PORT")
    options = MigrationOptions.from_dict(args.get("options", {}))
    cancel = ctx.extra["migration_cancel"] = threading.Event()
    stats = send(ctx.machine, args["to"], options, progress=progress, cancel=cancel)
    if stats.outcome is MigrationOutcome.COMPLETED:
        ctx.finish(f"migrated to {args['to']}")
    return stats.as_dict()


def _migrate_cancel(ctx: ControlContext, _args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    cancel = ctx.extra.get("migration_cancel")
    if cancel is None:
        raise ControlError("NotMigrating", "no migration has been started on this VM")
    hold = owner_of(ctx.machine).current
    if hold is not None and hold.in_doubt:
        raise ControlError("InDoubt", f"the {hold.owner} is over, in doubt: nothing to cancel; "
                                      "`migrate resolve` settles it", hold.facts())
    cancel.set()
    return {"cancelled": True}


def _migrate_resolve(ctx: ControlContext, args: dict[str, Any], _progress: Progress) -> dict[str, Any]:
    from migrate.protocol import HandOver
    from migrate.resolve import Force, resolve

    force = args.get("force")
    if force is not None and force not in {f.value for f in Force}:
        raise ControlError("BadRequest", f"force is one of {[f.value for f in Force]} or null, not {force!r}")
    resolution = resolve(ctx.machine, Force(force) if force else None)
    if resolution.action == "stopped":
        ctx.finish("migrated (resolved: " + ("the target has the guest)" if resolution.hand_over is HandOver.COMMITTED
                                             else "forced to stop the source)"))
    return resolution.as_dict()


def register(server: ControlServer) -> None:
    server.register("snapshot", _snapshot, exclusive=True)
    server.register("migrate-send", _migrate_send, exclusive=True)
    server.register("migrate-cancel", _migrate_cancel)
    server.register("migrate-resolve", _migrate_resolve)
