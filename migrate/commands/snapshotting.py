"""`migrate snapshot`, `restore`, `inspect`, `verify`: snapshots from the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from hv.kvm.kvm import Kvm
from hv.vmm.command import ExitStatus
from hv.vmm.control import call, expect
from hv.kvm.units import MiB
from migrate.events import ProgressLine, SnapshotWritten, from_dict
from migrate.commands.common import NUMBER, VERIFY_TIMEOUT, FieldTypes, print_json, progress_bar, results


def cmd_snapshot(args: argparse.Namespace) -> int:
    with progress_bar(TextColumn("snapshot"), BarColumn(), TextColumn("{task.fields[mib]:.0f} MiB"),
                       TimeElapsedColumn()) as bar:
        task = bar.add_task("snapshot", total=None, mib=0.0)

        def progress(line: ProgressLine) -> None:
            if line.get("stage") == SnapshotWritten.stage:  # (another shape is the socket's fault: BadReply)
                expect(line, args.api, "snapshot", {"bytes": int})
            if isinstance(event := from_dict(line), SnapshotWritten):
                bar.update(task, mib=event.bytes / MiB)

        result = call(args.api, "snapshot", progress=progress, timeout=None, out=str(Path(args.out).resolve()),
                      incremental_from=str(Path(args.incremental_from).resolve()) if args.incremental_from else None,
                      mappable=args.mappable, track_dirty=args.track_dirty, live=args.live, level=args.level)
    expect(result, args.api, "snapshot", {"kind": str, "path": str, "raw_bytes": int, "file_bytes": int,
                                          "pause_seconds": NUMBER}, {"disk": (dict, type(None))})
    disk = result.get("disk")
    if disk is not None:
        expect(disk, args.api, "snapshot", {"name": str, "guest_disk": str, "bytes": int, "copied": int, "copy": str,
                                            "copy_seconds": NUMBER})
    if args.json:
        print_json(result)
    else:
        results.print(Text(f"{result['kind']} snapshot {result['path']}: "
                           f"{result['raw_bytes'] / MiB:.1f} MiB of guest memory in {result['file_bytes'] / MiB:.1f} "
                           f"MiB, guest paused {result['pause_seconds'] * 1000:.1f} ms"
                           + _held_for(result.get("live"))))
        if disk is not None:
            results.print(Text(f"  with its disk {Path(disk['guest_disk']).name} as it was then: {disk['name']}, "
                               f"{disk['bytes'] / MiB:.1f} MiB ({disk['copy']} copy, {disk['copied'] / MiB:.1f} MiB "
                               f"of data copied in {disk['copy_seconds'] * 1000:.1f} ms)"))
    return ExitStatus.OK


def _held_for(live: object) -> str:
    """What a live snapshot's instant cost the guest after the pause, for the line above."""
    if not isinstance(live, dict):
        return ""
    return (f" (live: {live.get('saved', 0)} pages the guest wrote first were saved aside, "
            f"{live.get('saved_peak_bytes', 0) / MiB:.1f} MiB at most)")


def cmd_restore(args: argparse.Namespace) -> int:
    """FILE here, a VMM that waits for one (`--wait`), or FILE into it (`--into`)."""
    from migrate.commands.restoring import cmd_restore as restore_command

    return restore_command(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from migrate.snapshot.snapshots import inspect

    result = inspect(args.file, verify=not args.no_verify)
    if args.json:
        print_json(result)
    else:
        table = Table(title=Text(str(args.file)), show_header=False)
        for key in ("snapshot_id", "kind", "base", "memory_bytes", "pages", "raw_bytes", "file_bytes", "header",
                    "sections", "config", "disk", "memory_ranges", "layout", "vcpus", "totals", "memory_index",
                    "working_set", "digest", "verified", "error"):
            if key in result:
                table.add_row(key, Text(json.dumps(result[key], default=str)))
        results.print(table)
    return ExitStatus.OK if result["verified"] else ExitStatus.REFUSED


def cmd_verify(args: argparse.Namespace) -> int:
    """A snapshot file, or a running VM's control socket: the digest and the guest's rule."""
    from migrate.snapshot.verify import verify_snapshot

    target = Path(args.target)
    if target.is_socket():
        result = expect(call(target, "verify", timeout=VERIFY_TIMEOUT), target, "verify", {"ok": bool},
                        {"guest": dict, "error": dict})
        parts: tuple[tuple[str, FieldTypes], ...] = (("guest", {"summary": str}), ("error", {"type": str, "message": str}))
        for part, fields in parts:
            if part in result:
                expect(result[part], target, "verify", fields)
    elif target.is_file():
        with Kvm() as kvm:
            result = verify_snapshot(target, kvm)
    else:
        raise FileNotFoundError(f"{target}: neither a snapshot file nor a control socket")
    if args.json:
        print_json(result)
    else:
        for key in ("path", "digest", "memory_digest"):
            if key in result:
                results.print(Text(f"{key:14} {result[key]}"))
        if "guest" in result:
            results.print(Text(f"{'guest':14} {result['guest']['summary']}"))
        if "error" in result:
            results.print(Text(f"{'error':14} {result['error']['type']}: {result['error']['message']}"))
        results.print(Text(f"{'ok':14} {result['ok']}"))
    if result["ok"]:
        return ExitStatus.OK
    return ExitStatus.REFUSED if "error" in result else ExitStatus.FAILED
