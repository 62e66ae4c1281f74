"""`migrate`: snapshots and live migration from the command line.

    migrate snapshot --api SOCK --out FILE [--incremental-from FILE] [--mappable] [--track-dirty]
    migrate restore FILE [--api SOCK]            run the snapshot's guest, console attached
    migrate inspect FILE [--json]                what a snapshot holds, and whether it checks out
    migrate recv --listen HOST:PORT [--api SOCK] [--key-file F]
    migrate send --api SOCK --to HOST:PORT [--downtime-ms N] [--bandwidth MiB/s] [--streams N]
                 [--no-auto-converge] [--dry-run] [--json]
    migrate demo                                 the built-in guest, migrated live to a second process

The VM to snapshot or send runs in another process (`hv run --api SOCK`, `migrate restore`,
`migrate recv`); these commands talk to its control socket. Status and progress go to stderr,
results (and the guest console) to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from formats import FormatError
from hv.errors import HvError
from hv.kvm.kvm import Kvm
from hv.vmm.cli import LineConsole, dispatch, parse_size, run_machine
from hv.vmm.control import ControlError, call
from hv.vmm.control import extensions as control_extensions
from hv.vmm.machine import discard
from migrate.errors import MigrateError

status = Console(stderr=True, highlight=False)
MiB = 1 << 20


def _key(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes().strip()
    return os.environ.get("KVMIGRATE_KEY", "").encode()


def _tls(args: argparse.Namespace):
    from migrate.transport import Tls

    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("TLS needs --tls-cert, --tls-key and --tls-ca together")
    return Tls(*(str(Path(p).resolve()) for p in given))


def _add_tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", help="our certificate (PEM): TLS, checked both ways")
    p.add_argument("--tls-key", help="our private key (PEM)")
    p.add_argument("--tls-ca", help="the CA (PEM) that signed the peer's certificate")


def _add_disk_arguments(p: argparse.ArgumentParser) -> None:
    disks = p.add_mutually_exclusive_group()
    disks.add_argument("--disk", metavar="FILE", help="this host's file for the guest's virtio disk "
                       "(the stream's disk path is only a name, never opened)")
    disks.add_argument("--disk-dir", metavar="DIR", help="find the guest's disk here, by the file name the "
                       "stream gives it (a regular file, no symbolic link)")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _guest_console() -> tuple[LineConsole, threading.Event]:
    """The guest's console on stdout; the built-in guest's end lines end the run."""
    from hv.guests import builtin as builtin_guest

    done = threading.Event()

    def on_line(line: str) -> None:
        if isinstance(builtin_guest.parse_line(line), (builtin_guest.Done, builtin_guest.GuestError,
                                                       builtin_guest.Fault)):
            done.set()

    return LineConsole(on_line), done


# --- snapshot / restore / inspect ------------------------------------------------------------------


def cmd_snapshot(args: argparse.Namespace) -> int:
    with Progress(TextColumn("snapshot"), BarColumn(), TextColumn("{task.fields[mib]:.0f} MiB"),
                  TimeElapsedColumn(), console=status, transient=True) as bar:
        task = bar.add_task("snapshot", total=None, mib=0.0)

        def progress(p: dict[str, Any]) -> None:
            if p.get("stage") == "memory":
                bar.update(task, mib=p["bytes"] / MiB)

        result = call(args.api, "snapshot", progress=progress, out=str(Path(args.out).resolve()),
                      incremental_from=str(Path(args.incremental_from).resolve()) if args.incremental_from else None,
                      mappable=args.mappable, track_dirty=args.track_dirty, level=args.level)
    if args.json:
        _print_json(result)
    else:
        status.print(f"[bold]migrate[/]: {result['kind']} snapshot {result['path']}: "
                     f"{result['raw_bytes'] / MiB:.1f} MiB of guest memory in {result['file_bytes'] / MiB:.1f} MiB, "
                     f"guest paused {result['pause_seconds'] * 1000:.0f} ms")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from migrate.snapshots import restore

    console, done = _guest_console()
    with Kvm() as kvm:
        t0 = time.perf_counter()
        machine = restore(args.file, kvm, console=console, disk=args.disk, disk_dir=args.disk_dir,
                          share_memory=args.share_mem, virtio_console=LineConsole(), verify_memory=not args.no_verify)
        status.print(f"[bold]migrate[/]: restored {args.file} in {(time.perf_counter() - t0) * 1000:.1f} ms")
        machine.resume()
        return run_machine(machine, done=done, api=args.api, timeout=args.timeout, start=False,
                           extra={"console": console})


def cmd_inspect(args: argparse.Namespace) -> int:
    from migrate.snapshots import inspect

    result = inspect(args.file, verify=not args.no_verify)
    if args.json:
        _print_json(result)
    else:
        table = Table(title=str(args.file), show_header=False)
        for key in ("header", "sections", "config", "memory_ranges", "layout", "vcpus", "totals", "digest",
                    "verified", "error"):
            if key in result:
                table.add_row(key, json.dumps(result[key], default=str))
        Console().print(table)
    return 0 if result["verified"] else 1


# --- live migration ---------------------------------------------------------------------------------


SETTLE_SECONDS = 0.1  # the guest runs alone this long after it arrives (issue: a quiet switchover)


def cmd_recv(args: argparse.Namespace) -> int:
    from migrate.target import listen_and_receive
    from migrate.transport import Listener

    listener = Listener(args.listen, _key(args.key_file), _tls(args))
    control_extensions()  # found and imported now, not beside the guest's first moments here
    status.print(f"[bold]migrate[/]: listening on {listener.address}")
    console, done = _guest_console()
    with Kvm() as kvm:
        try:
            incoming = listen_and_receive(listener, kvm, console=console, disk=args.disk, disk_dir=args.disk_dir,
                                          max_mem=args.mem, virtio_console=LineConsole(),
                                          accept_timeout=args.accept_timeout or None)
        finally:
            listener.close()
        if incoming.machine is None:
            status.print("[bold]migrate[/]: dry run: this host would accept the guest")
            return 0
        return run_machine(incoming.machine, done=done, api=args.api, timeout=args.timeout, start=False,
                           extra={"console": console}, settle=SETTLE_SECONDS,
                           announce=f"[bold]migrate[/]: received the guest from {incoming.source} "
                                    f"({incoming.pages} pages, {incoming.seconds:.2f} s); it runs here now")


def _send_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"downtime_ms": args.downtime_ms, "bandwidth_mib_s": args.bandwidth,
                               "streams": args.streams, "threads": args.threads,
                               "auto_converge": not args.no_auto_converge,
                               "dry_run": args.dry_run, "max_rounds": args.max_rounds,
                               "max_seconds": args.max_seconds, "finish_anyway": args.finish_anyway}
    key = _key(args.key_file)
    if key:
        options["key"] = key.hex()
    if (tls := _tls(args)) is not None:
        options["tls"] = dataclasses.asdict(tls)
    return options


class _RoundView:
    """Live progress of a migration: round, what is left, dirty rate, bandwidth, ETA."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("migrate", total=None, info="connecting")

    def __call__(self, p: dict[str, Any]) -> None:
        stage = p.get("stage")
        if stage == "round":
            eta = ""
            if p["bandwidth_mib_s"] and p["dirty_rate_mib_s"]:
                left = p["dirty_rate_mib_s"] * p["seconds"]
                eta = f", next round ~{left / p['bandwidth_mib_s'] * 1000:.0f} ms"
            info = (f"round {p['round']}: {p['raw_bytes'] / MiB:.1f} MiB in {p['seconds'] * 1000:.0f} ms, "
                    f"dirty {p['dirty_rate_mib_s']:.0f} MiB/s, link {p['bandwidth_mib_s']:.0f} MiB/s, "
                    f"throttle {p['throttle'] * 100:.0f}%{eta}")
        elif stage == "throttle":
            info = f"auto-converge: throttling the guest to {(1 - p['throttle']) * 100:.0f}% of its time"
        else:
            info = str(stage)
        self.bar.update(self.task, info=info)


def _stats_table(stats: dict[str, Any]) -> Table:
    table = Table(title=f"migration {stats['outcome']}", show_header=False)
    rows = [("total", f"{stats['total_seconds'] * 1000:.0f} ms"),
            ("setup", f"{stats['setup_seconds'] * 1000:.0f} ms"),
            ("downtime", f"{stats['downtime_ms']:.1f} ms (target {stats['downtime_target_ms']:.0f} ms)"),
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
    if stats.get("reason"):
        rows.append(("reason", stats["reason"]))
    for problem in stats.get("problems", []):
        rows.append(("problem", problem))
    for k, v in rows:
        table.add_row(k, v)
    return table


def cmd_send(args: argparse.Namespace) -> int:
    with Progress(TextColumn("[bold]migrate[/]"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=status, transient=True) as bar:
        view = _RoundView(bar)
        try:
            stats = call(args.api, "migrate-send", progress=view, to=args.to, options=_send_options(args))
        except KeyboardInterrupt:
            status.print("[yellow]migrate[/]: cancelling (the guest stays on the source)")
            call(args.api, "migrate-cancel")
            return 130
    if args.json:
        _print_json(stats)
    else:
        Console(stderr=True).print(_stats_table(stats))
    from migrate.stats import MigrationOutcome

    return 0 if stats["outcome"] in (MigrationOutcome.COMPLETED, MigrationOutcome.DRY_RUN) else 1


# --- demo -------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cmd_demo(args: argparse.Namespace) -> int:
    """Boot the built-in guest here, migrate it live to a `migrate recv` in a second process on
    loopback, and show that it kept going there."""
    from hv.guests import builtin as builtin_guest
    from hv.vmm.builder import builtin_machine
    from hv.kvm.vm import VmConfig
    from migrate.options import MigrationOptions
    from migrate.source import send
    from migrate.stats import MigrationOutcome

    tmp = Path(tempfile.mkdtemp(prefix="kvmigrate-demo-"))
    target_api, port = tmp / "target.sock", _free_port()
    params = builtin_guest.GuestParams(ws_mib=args.ws, rate_mib_s=args.rate, every=args.every)
    source_console = builtin_guest.GuestConsole(echo=None if args.json else LineConsole(prefix="source | "))
    status.print(f"[bold]demo[/]: booting the built-in guest ({args.mem >> 20} MiB RAM, {args.ws} MiB working "
                 f"set dirtied at {args.rate or 'full'} MiB/s) in this process")
    target = subprocess.Popen([sys.executable, "-m", "migrate.cli", "recv", "--listen", f"127.0.0.1:{port}",
                               "--api", str(target_api), "--accept-timeout", "60"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target_console = builtin_guest.GuestConsole(echo=None if args.json else LineConsole(prefix="target | "))
    reader = threading.Thread(target=lambda: [target_console(line.encode()) for line in target.stdout],
                              daemon=True)
    reader.start()
    target_log: list[str] = []
    listening = threading.Event()

    def watch_target_status() -> None:
        for line in target.stderr:
            target_log.append(line)
            if "listening on" in line:
                listening.set()

    threading.Thread(target=watch_target_status, daemon=True).start()
    with Kvm() as kvm:
        machine = builtin_machine(kvm, params, VmConfig(mem_size=args.mem), source_console)
        try:
            machine.start()
            source_console.wait_pass(args.passes_before, timeout=120)
            before = source_console.last_pass()
            status.print(f"[bold]demo[/]: the guest has done {before} passes here; migrating it to "
                         f"pid {target.pid} on 127.0.0.1:{port}")
            if not listening.wait(30):
                raise MigrateError(f"the target did not start listening: {''.join(target_log)}")
            with Progress(TextColumn("[bold]migrate[/]"), BarColumn(), TextColumn("{task.fields[info]}"),
                          TimeElapsedColumn(), console=status, transient=True) as bar:
                stats = send(machine, f"127.0.0.1:{port}", MigrationOptions(downtime_ms=args.downtime_ms),
                             progress=_RoundView(bar))
        finally:
            discard(machine)
    summary = stats.as_dict()
    ok = stats.outcome is MigrationOutcome.COMPLETED
    if ok:
        target_console.wait_pass(before + 3, timeout=60)
        check = call(target_api, "guest-check")
        call(target_api, "stop")
        summary["guest"] = {"passes_on_source": before, "passes_on_target_so_far": target_console.last_pass(),
                            "target_memory_check": check["summary"]}
    target.wait(timeout=30)
    if args.json:
        _print_json(summary)
    else:
        Console(stderr=True).print(_stats_table(summary))
        if ok:
            g = summary["guest"]
            status.print(f"[bold green]demo[/]: the guest kept going: pass {g['passes_on_source']} was its "
                         f"last full report on the source, pass {g['passes_on_target_so_far']} on the target; "
                         f"{g['target_memory_check']}")
    return 0 if ok and summary["guest"]["target_memory_check"].startswith("working set consistent") else 1


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="migrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("snapshot", help="snapshot a running VM through its control socket")
    p.add_argument("--api", required=True, metavar="SOCK")
    p.add_argument("--out", required=True, metavar="FILE")
    p.add_argument("--incremental-from", metavar="FILE", help="store only pages changed since FILE")
    p.add_argument("--mappable", action="store_true", help="raw memory in FILE.mem, restored lazily")
    p.add_argument("--track-dirty", action="store_true", help="keep dirty logging on for a later incremental")
    p.add_argument("--level", type=int, default=3, help="zstd level")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("restore", help="restore a snapshot and run it")
    p.add_argument("file")
    p.add_argument("--api", metavar="SOCK")
    p.add_argument("--timeout", type=float, default=0)
    p.add_argument("--no-verify", action="store_true", help="skip the memory digest check")
    _add_disk_arguments(p)
    p.add_argument("--share-mem", action="store_true", help="a mappable snapshot's .mem is mapped, not copied: "
                   "faster (with --no-verify, milliseconds), but the file must not change while the VM runs")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("inspect", help="show and verify a snapshot")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-verify", action="store_true", help="check framing and checksums only")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("recv", help="wait for a migrating guest and run it")
    p.add_argument("--listen", default="127.0.0.1:7380", metavar="HOST:PORT")
    p.add_argument("--api", metavar="SOCK")
    p.add_argument("--key-file", help="pre-shared key (also $KVMIGRATE_KEY); required off loopback")
    p.add_argument("--accept-timeout", type=float, default=0, help="give up waiting after this many s")
    _add_disk_arguments(p)
    p.add_argument("--mem", type=parse_size, metavar="SIZE",
                   help="the most guest RAM to take (default: what this host can reserve, MemAvailable)")
    _add_tls_arguments(p)
    p.add_argument("--timeout", type=float, default=0, help="stop the received guest after this many s")
    p.set_defaults(func=cmd_recv)

    p = sub.add_parser("send", help="migrate a running VM live to a `migrate recv`")
    p.add_argument("--api", required=True, metavar="SOCK")
    p.add_argument("--to", required=True, metavar="HOST:PORT")
    p.add_argument("--downtime-ms", type=float, default=300)
    p.add_argument("--bandwidth", type=float, default=0, metavar="MiB/s", help="cap (0: none)")
    p.add_argument("--streams", type=int, default=1, help="page streams: connections sending in parallel "
                   "(QEMU's multifd channels)")
    p.add_argument("--threads", type=int, default=2, help="page-encoding threads")
    p.add_argument("--no-auto-converge", action="store_true")
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument("--max-seconds", type=float, default=120)
    p.add_argument("--finish-anyway", action="store_true",
                   help="at max rounds/time, stop and copy anyway (longer downtime) instead of giving up")
    p.add_argument("--dry-run", action="store_true", help="only check that the target would accept")
    p.add_argument("--key-file")
    _add_tls_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("demo", help="live-migrate the built-in guest to a second process")
    p.add_argument("--mem", type=parse_size, default=parse_size("1G"))
    p.add_argument("--ws", type=int, default=256, help="working set, MiB")
    p.add_argument("--rate", type=int, default=100, help="dirty rate, MiB/s (0 = as fast as it can)")
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--passes-before", type=int, default=2, help="passes to wait for before migrating")
    p.add_argument("--downtime-ms", type=float, default=300)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, (MigrateError, FormatError, HvError, ControlError, OSError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
