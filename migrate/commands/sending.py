"""`migrate send`, `status`, `cancel`, `start-postcopy`, `resolve`, `plot`: a migration asked of a
running VM's control socket, followed live and reported (a line, a table, JSON)."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from hv.vmm.command import ExitStatus, say
from hv.vmm.control import CALL_TIMEOUT, ControlError, call, expect
from hv.kvm.units import MiB
from migrate.events import PagesProgress, ProgressEvent, ProgressLine, Throttled, from_dict
from migrate.stats import RUNNING
from migrate.errors import MigrateError
from migrate.commands.exits import OUTCOMES
from migrate.commands.common import (NUMBER, STATUS_FIELDS, FieldTypes, print_json, progress_bar, read_key, results,
                                     tls_of)


def _send_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"downtime_ms": args.downtime_ms, "bandwidth_mib_s": args.bandwidth,
                               "streams": args.streams, "threads": args.threads,
                               "auto_converge": not args.no_auto_converge,
                               "dry_run": args.dry_run, "max_rounds": args.max_rounds,
                               "max_seconds": args.max_seconds, "finish_anyway": args.finish_anyway,
                               "final_copy_margin_ms": args.final_copy_margin_ms,
                               "postcopy": args.postcopy or args.postcopy_after is not None,
                               "postcopy_after": 1 if args.postcopy_after is None else args.postcopy_after,
                               "postcopy_auto": args.postcopy_auto,
                               "postcopy_after_ms": args.postcopy_after_ms or 0.0,
                               "postcopy_ready": args.postcopy_ready,
                               "postcopy_reconnect_s": args.postcopy_reconnect}
    key = read_key(args.key_file)
    if key:
        options["key"] = key.hex()
    if (tls := tls_of(args)) is not None:
        options["tls"] = dataclasses.asdict(tls)
    return options


def describe(live: dict[str, Any]) -> str:
    """A migration in one line (the progress bar, `migrate status`): the round and how far it
    is, the rates, the throttle, the ETA."""
    phase = live.get("phase", "setup")
    if phase == "setup":
        return "connecting, checking the target"
    if phase == "none":
        return "no migration has been started on this VM"
    if phase not in RUNNING:
        return f"{phase}: {live.get('reason', '')}"
    total, done = live.get("round_pages_total", 0), live.get("round_pages_done", 0)
    dirty = f"{live.get('dirty_rate_mib_s', 0):.0f}" if live.get("round") else "-"  # measured from round 1 on
    eta = live.get("eta_seconds")
    if phase == "postcopy":
        return "post-copy: the guest runs on the target, its last pages going"
    return (f"{'stop-and-copy, ' if phase == 'stop-and-copy' else ''}round {live.get('round', 0)} "
            f"{done * 100 // total if total else 0}% {done * 4096 / MiB:.0f}/{total * 4096 / MiB:.0f} MiB, "
            f"dirty {dirty} link {live.get('bandwidth_mib_s', 0):.0f} MiB/s, throttle {live.get('throttle', 0) * 100:.0f}%, "
            + (f"ETA {eta:.1f} s" if eta is not None else "ETA -"))


class RoundView:
    """Live progress of a migration, from the first page on: the round's share done (the bar),
    MiB, rates, throttle, ETA."""

    def __init__(self, bar: Progress, api: str = "") -> None:
        self.bar, self.api = bar, api
        self.task = bar.add_task("migrate", total=None, info="connecting, checking the target")

    def __call__(self, event: ProgressEvent) -> None:
        match event:
            case PagesProgress(figures=live):
                self.bar.update(self.task, total=max(live.round_pages_total, 1), completed=live.round_pages_done,
                                info=describe(live.as_dict()))
            case Throttled(throttle=throttle):
                self.bar.update(self.task, info=f"auto-converge: throttling the guest to "
                                                f"{(1 - throttle) * 100:.0f}% of its time")

    def line(self, line: ProgressLine) -> None:
        """A progress line from the control socket, its shape checked (another shape is the
        socket's fault: BadReply), as its event."""
        stage = line.get("stage")
        if stage == PagesProgress.stage:
            expect(line, self.api, "migrate-send", {"round_pages_total": int, "round_pages_done": int}, STATUS_FIELDS)
        elif stage == Throttled.stage:
            expect(line, self.api, "migrate-send", {"throttle": NUMBER})
        if (event := from_dict(line)) is not None:
            self(event)


def round_bar() -> Progress:
    return progress_bar(TextColumn("[bold]migrate[/]"), BarColumn(bar_width=10), TextColumn("{task.fields[info]}"))


def stats_table(stats: dict[str, Any]) -> Table:
    table = Table(title=f"migration {stats['outcome']}", show_header=False)
    rows = [("total", f"{stats['total_seconds'] * 1000:.0f} ms"),
            ("setup", f"{stats['setup_seconds'] * 1000:.0f} ms"),
            ("downtime", f"{stats['downtime_ms']:.1f} ms (forecast {stats.get('downtime_predicted_ms', 0):.1f}, "
                         f"target {stats['downtime_target_ms']:.0f} ms)"),
            ("downtime by phase", ", ".join(f"{k.replace('_', ' ')} {v:.1f}"
                                            for k, v in stats.get("downtime_phases_ms", {}).items()) + " ms"),
            ("rounds", str(len(stats["rounds"]))),
            ("guest memory sent", f"{stats['raw_bytes'] / MiB:.1f} MiB ({stats['pages_sent']} pages, "
                                  f"{stats['zero_pages']} zero)"),
            ("bytes on the wire", f"{stats['sent_bytes'] / MiB:.1f} MiB (ratio {stats['compression_ratio']:.2f}; "
                                  f"{stats.get('frames_judged_raw', 0)} frames sent raw, a sample of them "
                                  "not shrinking)"),
            ("dirty rate per round", ", ".join(f"{r['dirty_rate_mib_s']:.0f}" for r in stats["rounds"]) + " MiB/s"),
            ("throttle applied", f"{stats['throttle_max'] * 100:.0f}%")]
    if (pc := stats.get("postcopy")) is not None:
        rows.append(("post-copy", f"after {pc['after_rounds']} rounds, {pc['missing_pages']} pages left behind: "
                                  f"{pc['fetched_pages']} fetched on demand, {pc['background_pages']} in the "
                                  f"background, in {pc['seconds'] * 1000:.0f} ms"))
        rows.append(("post-copy faults", f"latency p50 {pc['fault_p50_us'] / 1000:.2f} ms, p99 "
                                         f"{pc['fault_p99_us'] / 1000:.2f} ms; vCPUs blocked "
                                         f"{pc['vcpu_blocked_ms']:.1f} ms"))
    if stats.get("reason"):
        rows.append(("reason", stats["reason"]))
    for problem in stats.get("problems", []):
        rows.append(("problem", problem))
    for k, v in rows:
        table.add_row(k, Text(v))  # the peer's words among them: never markup
    return table


def _wait_for_end(api: str, timeout: float = 120.0) -> dict[str, Any]:
    """The migration's status once it is no longer running (after a cancel)."""
    deadline = time.monotonic() + timeout
    while (live := _migrate_status(api))["phase"] in RUNNING and time.monotonic() < deadline:
        time.sleep(0.1)
    return live


def cmd_send(args: argparse.Namespace) -> int:
    if args.plot:
        from migrate.commands.plot import require_matplotlib

        require_matplotlib()  # before the migration, not after it
    with round_bar() as bar:
        view = RoundView(bar, args.api)
        try:
            if args.resume:
                stats = call(args.api, "migrate-send", progress=view.line, timeout=None, resume=True)
            elif args.to is None:
                raise MigrateError("migrate send needs --to HOST:PORT (or --resume)")
            else:
                stats = call(args.api, "migrate-send", progress=view.line, timeout=None, to=args.to,
                             options=_send_options(args))
        except KeyboardInterrupt:
            say("migrate", "cancelling (the guest stays on the source)", "yellow")
            call(args.api, "migrate-cancel")
            live = _wait_for_end(args.api)
            if args.json:
                print_json(live)
            say("migrate", describe(live))
            return OUTCOMES.get(live["phase"], ExitStatus.MIGRATION_FAILED)
    _check_stats(stats, args.api)
    if args.json:
        print_json(stats)
    else:
        results.print(stats_table(stats))
    if args.plot:
        from migrate.commands.plot import plot_rounds

        say("migrate", f"rounds drawn in {plot_rounds(stats, args.plot)}")
    if stats["outcome"] == "completed" and stats.get("downtime_overrun_ms"):
        return ExitStatus.OVERRAN  # it moved, but the promise of the downtime target was broken
    return OUTCOMES.get(stats["outcome"], ExitStatus.MIGRATION_FAILED)


def _migrate_status(api: str, timeout: float | None = CALL_TIMEOUT) -> dict[str, Any]:
    """`migrate-status`, its fields of the types `describe` reads."""
    return expect(call(api, "migrate-status", timeout=timeout), api, "migrate-status", {"phase": str},
                  STATUS_FIELDS)


STATS_FIELDS: FieldTypes = {"total_seconds": NUMBER, "setup_seconds": NUMBER, "downtime_ms": NUMBER,
                "downtime_target_ms": NUMBER, "rounds": list, "raw_bytes": int, "pages_sent": int,
                "zero_pages": int, "sent_bytes": int, "compression_ratio": NUMBER, "throttle_max": NUMBER}


def _check_stats(stats: dict[str, Any], api: str) -> None:
    """`migrate-send`'s answer, of the shape `stats_table` reads (BadReply otherwise)."""
    expect(stats, api, "migrate-send", {"outcome": str, **STATS_FIELDS},
           {"downtime_phases_ms": dict, "postcopy": (dict, type(None)), "reason": (str, type(None)), "problems": list})
    for r in stats["rounds"]:
        expect(r if isinstance(r, dict) else {}, api, "migrate-send", {"dirty_rate_mib_s": NUMBER})
    if not all(isinstance(v, NUMBER) for v in stats.get("downtime_phases_ms", {}).values()):
        raise ControlError("BadReply", f"{api} answered 'migrate-send' with downtime phases that are not numbers")
    if stats.get("postcopy") is not None:
        expect(stats["postcopy"], api, "migrate-send", {k: NUMBER for k in (
            "after_rounds", "missing_pages", "fetched_pages", "background_pages", "seconds", "fault_p50_us",
            "fault_p99_us", "vcpu_blocked_ms")})


def cmd_status(args: argparse.Namespace) -> int:
    """`migrate status SOCK`: the VM's migration (running, or the last one), as QMP's query-migrate."""
    live = _migrate_status(args.socket, args.timeout or None)
    if args.json:
        print_json(live)
    else:
        results.print(Text(describe(live)))
        for key, value in live.items():
            results.print(Text(f"  {key:18} {value}"))
    return ExitStatus.OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """`migrate cancel SOCK`: stop the VM's running migration; the guest runs on there."""
    result = expect(call(args.socket, "migrate-cancel", timeout=args.timeout or None), args.socket, "migrate-cancel", {"round": int, "phase": str})
    live = _wait_for_end(args.socket)
    if args.json:
        print_json({**result, "status": live})
    if live["phase"] == "completed":  # the cancel came in the hand-over, too late to stop it
        say("migrate", f"too late: {describe(live)}", "yellow")
        return ExitStatus.REFUSED
    if not args.json:
        say("migrate", f"cancelled in round {result['round']}; {describe(live)}")
    return ExitStatus.OK


def cmd_start_postcopy(args: argparse.Namespace) -> int:
    """`migrate start-postcopy SOCK`: QEMU's migrate-start-postcopy for the VM's running migration."""
    result = call(args.socket, "migrate-start-postcopy")
    if args.json:
        print_json(result)
    else:
        say("migrate", f"switching to post-copy (was in round {result['round']})")
    return ExitStatus.OK


def cmd_plot(args: argparse.Namespace) -> int:
    from migrate.commands.plot import load_stats, plot_rounds

    out = plot_rounds(load_stats(args.stats), args.out or Path(args.stats).with_suffix(".png"))
    say("migrate", f"rounds drawn in {out}")
    return ExitStatus.OK




def cmd_resolve(args: argparse.Namespace) -> int:
    force = "resume-source" if args.force_resume_source else "stop-source" if args.force_stop_source else None
    try:
        result = expect(call(args.sock, "migrate-resolve", force=force, timeout=args.timeout or None), args.sock, "migrate-resolve",
                        {"action": str, "asked": str, "forced": (str, type(None))})
    except ControlError as e:
        if e.kind != "StillInDoubt":
            raise
        if args.json:
            print_json({"error": e.kind, "message": e.message, **e.facts})
        else:
            say("migrate", e.message, "yellow")
        return ExitStatus.IN_DOUBT  # the source's copy stays paused
    if args.json:
        print_json(result)
    else:
        how = f"forced: {result['forced']}" if result["forced"] else result["asked"]
        say("migrate", f"resolved ({how}): the source's copy is {result['action']}")
    return ExitStatus.OK
