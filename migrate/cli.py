"""`migrate`: snapshots and live migration from the command line.

    migrate snapshot --api SOCK --out FILE [--incremental-from FILE] [--mappable] [--track-dirty]
    migrate restore FILE [--api SOCK]            run the snapshot's guest, console attached
    migrate inspect FILE [--json]                what a snapshot holds, and whether it checks out
    migrate verify FILE|SOCK [--json]            the memory digest and the built-in guest's rule
    migrate recv --listen HOST:PORT [--api SOCK] [--key-file F] [--once]
    migrate send --api SOCK --to HOST:PORT [--downtime-ms N] [--bandwidth MiB/s] [--streams N]
                 [--no-auto-converge] [--dry-run] [--json] [--plot FILE.png]
    migrate status SOCK [--json]                 how a migration from that VM goes (phase, round, ETA)
    migrate cancel SOCK                          stop it; the guest runs on at the source
    migrate resolve SOCK [--force-resume-source | --force-stop-source]
                                                 end an in-doubt hand-over: ask the target, or force
    migrate plot STATS.json --out FILE.png       draw the rounds of a `migrate send --json`
    migrate demo                                 the built-in guest, migrated live to a second process

The VM to snapshot or send runs in another process (`hv run --api SOCK`, `migrate restore`,
`migrate recv`); these commands talk to its control socket, and a migration runs in that
process: killing `migrate send` leaves it running (watch it with `migrate status`, stop it with
`migrate cancel`); Ctrl-C in `migrate send` cancels it. Status, progress and logs go to stderr,
results (tables, JSON) and the guest console to stdout. `migrate COMMAND --help` for each
command's options (with their defaults and units) and examples.
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
from rich.text import Text

from hv.guests import builtin as builtin_guest
from hv.kvm.kvm import Kvm
from hv.devices.serial import Serial16550
from hv.vmm.cli import LineConsole, MachineRun, add_answer_timeout, run_machine, terminal
from hv.vmm.command import ExitStatus, dispatch, parse_size, quiet, run_parser, say, status
from hv.vmm.control import CALL_TIMEOUT, ControlError, call, expect
from hv.vmm.control import extensions as control_extensions
from hv.vmm.machine import discard
from hv.vmm.signals import CaughtSignals
from hv.kvm.units import MiB
from migrate.events import PagesProgress, ProgressEvent, ProgressLine, SnapshotWritten, Throttled, from_dict
from migrate.stats import RUNNING
from migrate.errors import MigrateError, PostcopyFailed
from migrate.commands.exits import EXITS, OUTCOMES
from migrate.transport.framing import parse_address

results = Console(highlight=False, emoji=False, soft_wrap=True)  # stdout: tables and results

VERIFY_TIMEOUT = 600.0  # seconds: `verify` hashes all of a paused guest's memory
_NUMBER: tuple[type, ...] = (int, float)
FieldTypes = dict[str, type | tuple[type, ...]]  # what `expect` checks a reply's fields against
# what `describe` reads of a migration's status, and as what
STATUS_FIELDS: FieldTypes = {"round": int, "round_pages_total": int, "round_pages_done": int, "dirty_rate_mib_s": _NUMBER,
                 "bandwidth_mib_s": _NUMBER, "throttle": _NUMBER, "eta_seconds": (*_NUMBER, type(None)),
                 "reason": (str, type(None))}


def address(text: str) -> str:
    """HOST:PORT, checked on the command line (the transport's own check: a port 0..65535)."""
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _progress_bar(*columns) -> Progress:
    """A transient bar on stderr; none with -q or when stderr is not a terminal."""
    return Progress(*columns, console=status, transient=True,
                    disable=quiet() or not status.is_terminal)


def _key(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes().strip()
    return os.environ.get("KVMIGRATE_KEY", "").encode()


def _tls(args: argparse.Namespace):
    from migrate.transport.tls import Tls

    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("TLS needs --tls-cert, --tls-key and --tls-ca together")
    return Tls(*(str(Path(p).resolve()) for p in given))


def _add_tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM): mutual TLS, checked both ways; "
                   "with --tls-key and --tls-ca")
    p.add_argument("--tls-key", metavar="FILE", help="our private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="the CA (PEM) that signed the peer's certificate")


def _add_disk_arguments(p: argparse.ArgumentParser) -> None:
    disks = p.add_mutually_exclusive_group()
    disks.add_argument("--disk", metavar="FILE", help="this host's file for the guest's virtio disk "
                       "(the stream's disk path is only a name, never opened)")
    disks.add_argument("--disk-dir", metavar="DIR", help="find the guest's disk here, by the file name the "
                       "stream gives it (a regular file, no symbolic link)")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _guest_console() -> tuple[LineConsole, builtin_guest.EndWatch]:
    """The guest's console on stdout; the built-in guest's end lines end the run."""
    watch = builtin_guest.EndWatch()
    return LineConsole(watch, echo=False), watch  # COM1's bytes reach stdout from C (run_machine)


# --- snapshot / restore / inspect ------------------------------------------------------------------


def cmd_snapshot(args: argparse.Namespace) -> int:
    with _progress_bar(TextColumn("snapshot"), BarColumn(), TextColumn("{task.fields[mib]:.0f} MiB"),
                       TimeElapsedColumn()) as bar:
        task = bar.add_task("snapshot", total=None, mib=0.0)

        def progress(line: ProgressLine) -> None:
            if line.get("stage") == SnapshotWritten.stage:  # (another shape is the socket's fault: BadReply)
                expect(line, args.api, "snapshot", {"bytes": int})
            if isinstance(event := from_dict(line), SnapshotWritten):
                bar.update(task, mib=event.bytes / MiB)

        result = call(args.api, "snapshot", progress=progress, timeout=None, out=str(Path(args.out).resolve()),
                      incremental_from=str(Path(args.incremental_from).resolve()) if args.incremental_from else None,
                      mappable=args.mappable, track_dirty=args.track_dirty, level=args.level)
    expect(result, args.api, "snapshot", {"kind": str, "path": str, "raw_bytes": int, "file_bytes": int,
                                          "pause_seconds": _NUMBER})
    if args.json:
        _print_json(result)
    else:
        results.print(Text(f"{result['kind']} snapshot {result['path']}: "
                           f"{result['raw_bytes'] / MiB:.1f} MiB of guest memory in {result['file_bytes'] / MiB:.1f} "
                           f"MiB, guest paused {result['pause_seconds'] * 1000:.0f} ms"))
    return ExitStatus.OK


def cmd_restore(args: argparse.Namespace) -> int:
    from migrate.snapshot.snapshots import restore

    console, watch = _guest_console()
    with MachineRun(args.api) as run, Kvm() as kvm:  # the control socket claimed before the restore
        if not Path(args.file).is_file():  # the file named is not there: usage (2); a missing base is a refusal (3)
            raise FileNotFoundError(f"{args.file}: no such snapshot file")
        t0 = time.perf_counter()
        machine = restore(args.file, kvm, console=console, disk=args.disk, disk_dir=args.disk_dir,
                          share_memory=args.share_mem, virtio_console=LineConsole(), verify_memory=not args.no_verify)
        say("migrate", f"restored {args.file} in {(time.perf_counter() - t0) * 1000:.1f} ms")
        machine.device("serial0", Serial16550).attach_terminal(terminal())  # before the guest runs
        run.prepare(machine, watch=watch, extra={"console": console})
        machine.resume()
        return run_machine(machine, run, timeout=args.timeout, start=False)


def cmd_inspect(args: argparse.Namespace) -> int:
    from migrate.snapshot.snapshots import inspect

    result = inspect(args.file, verify=not args.no_verify)
    if args.json:
        _print_json(result)
    else:
        table = Table(title=Text(str(args.file)), show_header=False)
        for key in ("snapshot_id", "kind", "base", "memory_bytes", "pages", "raw_bytes", "file_bytes", "header",
                    "sections", "config", "memory_ranges", "layout", "vcpus", "totals", "digest", "verified", "error"):
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
        for part, fields in (("guest", {"summary": str}), ("error", {"type": str, "message": str})):
            if part in result:
                expect(result[part], target, "verify", fields)
    elif target.is_file():
        with Kvm() as kvm:
            result = verify_snapshot(target, kvm)
    else:
        raise FileNotFoundError(f"{target}: neither a snapshot file nor a control socket")
    if args.json:
        _print_json(result)
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


# --- live migration ---------------------------------------------------------------------------------


SETTLE_SECONDS = 0.1  # the guest runs alone this long after it arrives (issue: a quiet switchover)


def cmd_recv(args: argparse.Namespace) -> int:
    from migrate.transport.listener import Listener

    control_extensions()  # found and imported now, not beside the guest's first moments here
    # Every resource the guest needs here once it runs is taken before the target says Ready:
    # the control socket now (a bad --api refuses before anything is accepted), the rest as
    # each migration builds its machine (`prepare`). After Commit nothing is left that can fail.
    with MachineRun(args.api) as run:
        listener = Listener(args.listen, _key(args.key_file), _tls(args))
        return _receive(args, run, listener)


def _receive(args: argparse.Namespace, run: MachineRun, listener) -> int:
    from migrate.live.receiver import Receiver
    from migrate.options import ReceiveOptions

    console, watch = _guest_console()

    def prepare(machine) -> None:
        run.prepare(machine, watch=watch, extra={"console": console})

    with Kvm() as kvm:
        # Queries from a source in doubt are answered for as long as this process runs
        options = ReceiveOptions(console=console, terminal=terminal(), disk=args.disk, disk_dir=args.disk_dir,
                                 max_mem=args.mem, virtio_console=LineConsole(),
                                 postcopy_wait=args.postcopy_wait or None, prepare=prepare, max_vcpus=args.max_vcpus)
        receiver = Receiver(listener, kvm, options, once=args.once)
        try:
            say("migrate", f"listening on {listener.address}")  # once connections are taken
            try:
                incoming = receiver.receive(args.accept_timeout or None)
            except PostcopyFailed as e:
                return _hold_a_stranded_guest(e, args.timeout)
            if incoming.machine is None:
                say("migrate", "dry run: this host would accept the guest")
                return ExitStatus.OK
            return run_machine(incoming.machine, run, timeout=args.timeout, start=False, settle=SETTLE_SECONDS,
                               announce=f"migrate: received the guest from {incoming.source} "
                                        f"({incoming.pages} pages, {incoming.seconds:.2f} s); it runs here now")
        finally:
            receiver.close()
            listener.close()


def _hold_a_stranded_guest(error: PostcopyFailed, timeout: float) -> int:
    """Post-copy broke off past --postcopy-wait: the guest stays paused here with the pages it
    has (it cannot run without the rest, which only its source held) until Ctrl-C, SIGTERM or
    --timeout; then it is given up."""
    ended = threading.Event()
    try:
        with CaughtSignals(lambda _signum: ended.set()):
            say("migrate", f"{error}. The guest is kept paused here; Ctrl-C or SIGTERM gives it up", "red")
            ended.wait(timeout or None)
    finally:
        error.discard()
    return ExitStatus.IN_DOUBT


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
    key = _key(args.key_file)
    if key:
        options["key"] = key.hex()
    if (tls := _tls(args)) is not None:
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


class _RoundView:
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
            expect(line, self.api, "migrate-send", {"throttle": _NUMBER})
        if (event := from_dict(line)) is not None:
            self(event)


def _round_bar() -> Progress:
    return _progress_bar(TextColumn("[bold]migrate[/]"), BarColumn(bar_width=10), TextColumn("{task.fields[info]}"))


def _stats_table(stats: dict[str, Any]) -> Table:
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
    with _round_bar() as bar:
        view = _RoundView(bar, args.api)
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
                _print_json(live)
            say("migrate", describe(live))
            return OUTCOMES.get(live["phase"], ExitStatus.MIGRATION_FAILED)
    _check_stats(stats, args.api)
    if args.json:
        _print_json(stats)
    else:
        results.print(_stats_table(stats))
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


STATS_FIELDS: FieldTypes = {"total_seconds": _NUMBER, "setup_seconds": _NUMBER, "downtime_ms": _NUMBER,
                "downtime_target_ms": _NUMBER, "rounds": list, "raw_bytes": int, "pages_sent": int,
                "zero_pages": int, "sent_bytes": int, "compression_ratio": _NUMBER, "throttle_max": _NUMBER}


def _check_stats(stats: dict[str, Any], api: str) -> None:
    """`migrate-send`'s answer, of the shape `_stats_table` reads (BadReply otherwise)."""
    expect(stats, api, "migrate-send", {"outcome": str, **STATS_FIELDS},
           {"downtime_phases_ms": dict, "postcopy": (dict, type(None)), "reason": (str, type(None)), "problems": list})
    for r in stats["rounds"]:
        expect(r if isinstance(r, dict) else {}, api, "migrate-send", {"dirty_rate_mib_s": _NUMBER})
    if not all(isinstance(v, _NUMBER) for v in stats.get("downtime_phases_ms", {}).values()):
        raise ControlError("BadReply", f"{api} answered 'migrate-send' with downtime phases that are not numbers")
    if stats.get("postcopy") is not None:
        expect(stats["postcopy"], api, "migrate-send", {k: _NUMBER for k in (
            "after_rounds", "missing_pages", "fetched_pages", "background_pages", "seconds", "fault_p50_us",
            "fault_p99_us", "vcpu_blocked_ms")})


def cmd_status(args: argparse.Namespace) -> int:
    """`migrate status SOCK`: the VM's migration (running, or the last one), as QMP's query-migrate."""
    live = _migrate_status(args.socket, args.timeout or None)
    if args.json:
        _print_json(live)
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
        _print_json({**result, "status": live})
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
        _print_json(result)
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
            _print_json({"error": e.kind, "message": e.message, **e.facts})
        else:
            say("migrate", e.message, "yellow")
        return ExitStatus.IN_DOUBT  # the source's copy stays paused
    if args.json:
        _print_json(result)
    else:
        how = f"forced: {result['forced']}" if result["forced"] else result["asked"]
        say("migrate", f"resolved ({how}): the source's copy is {result['action']}")
    return ExitStatus.OK


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
    from migrate.live.source import send
    from migrate.stats import MigrationOutcome

    tmp = Path(tempfile.mkdtemp(prefix="kvmigrate-demo-"))
    target_api, port = tmp / "target.sock", _free_port()
    params = builtin_guest.GuestParams(ws_mib=args.ws, rate_mib_s=args.rate, every=args.every)
    source_console = builtin_guest.GuestConsole(echo=None if args.json else LineConsole(prefix="source | "))
    say("demo", f"booting the built-in guest ({args.mem >> 20} MiB RAM, {args.ws} MiB working "
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
            say("demo", f"the guest has done {before} passes here; migrating it to "
                        f"pid {target.pid} on 127.0.0.1:{port}")
            if not listening.wait(30):
                raise MigrateError(f"the target did not start listening: {''.join(target_log)}")
            with _round_bar() as bar:
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
        results.print(_stats_table(summary))
        if ok:
            g = summary["guest"]
            say("demo", f"the guest kept going: pass {g['passes_on_source']} was its "
                        f"last full report on the source, pass {g['passes_on_target_so_far']} on the target; "
                        f"{g['target_memory_check']}", "bold green")
    return 0 if ok and summary["guest"]["target_memory_check"].startswith("working set consistent") else 1


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap, command = run_parser("migrate", __doc__)

    p = command("snapshot", "snapshot a running VM through its control socket", """\
  migrate snapshot --api /tmp/vm.sock --out vm.snap --track-dirty
  migrate snapshot --api /tmp/vm.sock --out vm.inc --incremental-from vm.snap
  migrate snapshot --api /tmp/vm.sock --out vm.snap --mappable --json""")
    p.add_argument("--api", required=True, metavar="SOCK", help="the VM's control socket (hv run --api SOCK)")
    p.add_argument("--out", required=True, metavar="FILE", help="the snapshot file to write")
    p.add_argument("--incremental-from", metavar="FILE", help="store only pages changed since FILE "
                   "(a snapshot of this VM taken with --track-dirty)")
    p.add_argument("--mappable", action="store_true", help="raw memory in FILE.mem: `migrate restore` "
                   "copies it in (checked), or with --share-mem maps it")
    p.add_argument("--track-dirty", action="store_true", help="keep dirty logging on for a later incremental")
    p.add_argument("--level", type=int, default=3, metavar="N", help="zstd compression level, 1..22")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.set_defaults(func=cmd_snapshot)

    p = command("restore", "restore a snapshot and run it", """\
  migrate restore vm.snap                       checked (digest), then run; console on this terminal
  migrate restore vm.inc --api /tmp/vm2.sock    the whole chain, with a control socket
  migrate restore vm.snap --timeout 10""")
    p.add_argument("file", metavar="FILE", help="the snapshot (the last of a chain)")
    p.add_argument("--api", metavar="SOCK", help="serve a control socket at this path")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="stop the guest after this many seconds; 0: never")
    p.add_argument("--no-verify", action="store_true", help="skip the memory digest check")
    _add_disk_arguments(p)
    p.add_argument("--share-mem", action="store_true", help="a mappable snapshot's .mem is mapped, not copied: "
                   "faster (with --no-verify, milliseconds), but the file must not change while the VM runs")
    p.set_defaults(func=cmd_restore)

    p = command("inspect", "show and check a snapshot", """\
  migrate inspect vm.snap
  migrate inspect vm.snap --json --no-verify""")
    p.add_argument("file", metavar="FILE", help="the snapshot")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.add_argument("--no-verify", action="store_true", help="check framing and checksums only")
    p.set_defaults(func=cmd_inspect)

    p = command("verify", "check a snapshot or a running VM: the memory digest, and the built-in guest's "
                "working-set rule when it is that guest", """\
  migrate verify vm.snap                        the END digest against the restored memory, then the rule
  migrate verify /tmp/vm.sock --json            a running VM, paused for the check""")
    p.add_argument("target", metavar="FILE|SOCK", help="a snapshot file, or a VM's control socket")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.set_defaults(func=cmd_verify)

    p = command("recv", "wait for a migrating guest and run it", """\
  migrate recv                                  on 127.0.0.1:7380, loopback only
  migrate recv --listen 0.0.0.0:7380 --key-file key --api /tmp/target.sock
  migrate recv --listen 10.0.0.2:7380 --tls-cert t.pem --tls-key t.key --tls-ca ca.pem""")
    p.add_argument("--listen", type=address, default="127.0.0.1:7380", metavar="HOST:PORT",
                   help="where to listen; off loopback needs --key-file or TLS")
    p.add_argument("--api", metavar="SOCK", help="serve the received VM's control socket at this path")
    p.add_argument("--key-file", metavar="FILE", help="pre-shared key (also $KVMIGRATE_KEY); required off loopback")
    p.add_argument("--accept-timeout", type=float, default=0, metavar="SECONDS",
                   help="give up if no guest has arrived after this long; 0: wait on")
    p.add_argument("--once", action="store_true",
                   help="one shot: end after the first connection, whatever it was (by default a refused, "
                        "failed, stray or dry-run connection is logged and the next one awaited)")
    _add_disk_arguments(p)
    p.add_argument("--mem", type=parse_size, metavar="SIZE",
                   help="the most guest RAM to take: MiB, or with a suffix K, M, G, T (default: what this host "
                        "can reserve, MemAvailable)")
    p.add_argument("--max-vcpus", type=int, metavar="N",
                   help="the most vCPUs a guest may have to be taken (default: 4 per host CPU, at most what KVM "
                        "allows)")
    _add_tls_arguments(p)
    p.add_argument("--postcopy-wait", type=float, default=60, metavar="SECONDS",
                   help="post-copy: after a lost link, how long the source may take to come back before the "
                        "guest is paused here for good with the pages it has; 0: wait without end")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="stop the received guest after this long; 0: never")
    p.set_defaults(func=cmd_recv)

    p = command("send", "migrate a running VM live to a `migrate recv`", """\
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380
  migrate send --api /tmp/vm.sock --to 10.0.0.2:7380 --key-file key --bandwidth 1000 --downtime-ms 100
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380 --dry-run          only ask the target
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380 --json > stats.json --plot rounds.png
Ctrl-C cancels (the guest runs on at the source). Killing this command does not: the migration
runs in the VM's process; see migrate status and migrate cancel.""")
    p.add_argument("--api", required=True, metavar="SOCK", help="the VM's control socket")
    p.add_argument("--to", type=address, metavar="HOST:PORT", help="the target (migrate recv); required unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="post-copy whose link stayed down past --postcopy-reconnect (the VM waits, paused, in "
                        "doubt): reconnect to its target and send it the pages it still lacks")
    p.add_argument("--downtime-ms", type=float, default=300, metavar="MS",
                   help="stop and copy once the rest fits in this pause, ms")
    p.add_argument("--bandwidth", type=float, default=0, metavar="MiB/s", help="cap what is sent, MiB/s; 0: none")
    p.add_argument("--streams", type=int, default=1, metavar="N", help="page streams: connections sending in "
                   "parallel (QEMU's multifd channels)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="page-encoding threads")
    p.add_argument("--no-auto-converge", action="store_true",
                   help="never throttle the guest (default: throttle one that outruns the link)")
    p.add_argument("--max-rounds", type=int, default=30, metavar="N", help="give up after this many rounds")
    p.add_argument("--max-seconds", type=float, default=120, metavar="SECONDS", help="give up after this long")
    p.add_argument("--finish-anyway", action="store_true",
                   help="at max rounds/time, stop and copy anyway (longer downtime) instead of giving up")
    p.add_argument("--dry-run", action="store_true", help="only check that the target would accept (memory, "
                   "disk, CPUID, TSC, layout); nothing is sent")
    postcopy = p.add_mutually_exclusive_group()
    postcopy.add_argument("--postcopy", action="store_true",
                          help="post-copy after the first pre-copy round: the guest runs on the target at once "
                               "and fetches the pages it still lacks from here. RISK: from the switch until the "
                               "last page is in, the guest needs both hosts; if this one dies or the link stays "
                               "down, the target pauses the guest with what it has (a lost link is reconnected "
                               "within --postcopy-reconnect SECONDS)")
    postcopy.add_argument("--postcopy-after", type=int, metavar="N",
                          help="as --postcopy, after N pre-copy rounds (unless pre-copy has finished by then); "
                               "0: pure post-copy, the switch before any page is sent")
    postcopy.add_argument("--postcopy-after-ms", type=float, metavar="MS",
                          help="as --postcopy, MS after the pages began (mid-round if need be), unless pre-copy "
                               "has finished by then: QEMU's migrate-start-postcopy at a chosen moment")
    postcopy.add_argument("--postcopy-ready", action="store_true",
                          help="negotiate post-copy, but switch only when asked: the control socket's "
                               "migrate-start-postcopy (QEMU's), or `migrate start-postcopy --api SOCK`")
    postcopy.add_argument("--postcopy-auto", action="store_true",
                          help="as --postcopy, but only when pre-copy would not converge within --downtime-ms "
                               "(instead of throttling the guest or giving up)")
    p.add_argument("--postcopy-reconnect", type=float, default=30, metavar="SECONDS",
                   help="after the post-copy switch, how long to try to reconnect a lost link")
    p.add_argument("--final-copy-margin-ms", type=float, default=1000, metavar="MS",
                   help="the paused final copy waits for the target at most twice its downtime budget plus "
                        "this; past it the source resumes (or, after Commit, is in doubt)")
    p.add_argument("--key-file", metavar="FILE", help="pre-shared key (also $KVMIGRATE_KEY)")
    _add_tls_arguments(p)
    p.add_argument("--json", action="store_true", help="the stats as JSON on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="draw the rounds into this PNG (needs kvmigrate[plot])")
    p.set_defaults(func=cmd_send)

    p = command("resolve", "end an in-doubt hand-over: ask the target whether it runs the guest, "
                "then stop or resume the source's copy", """\
  migrate resolve /tmp/vm.sock                  ask the target; exit 6 if it cannot say
  migrate resolve /tmp/vm.sock --force-stop-source""")
    p.add_argument("sock", metavar="SOCK", help="the source VM's control socket")
    force = p.add_mutually_exclusive_group()
    force.add_argument("--force-resume-source", action="store_true",
                       help="if the target cannot say: run the source's copy (RISK: two running copies if "
                            "the target runs the guest)")
    force.add_argument("--force-stop-source", action="store_true",
                       help="if the target cannot say: stop the source's copy (RISK: no running copy if the "
                            "target does not run the guest)")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    add_answer_timeout(p)
    p.set_defaults(func=cmd_resolve)

    p = command("status", "how a VM's migration goes: phase, round, pages and bytes done and left, "
                "rates, throttle, ETA", """\
  migrate status /tmp/vm.sock
  migrate status /tmp/vm.sock --json            phase none: no migration started yet""")
    p.add_argument("socket", metavar="SOCK", help="the migrating VM's control socket")
    p.add_argument("--json", action="store_true", help="the status as JSON on stdout")
    add_answer_timeout(p)
    p.set_defaults(func=cmd_status)

    p = command("cancel", "cancel a VM's running migration; the guest runs on at the source", """\
  migrate cancel /tmp/vm.sock""")
    p.add_argument("socket", metavar="SOCK", help="the migrating VM's control socket")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    add_answer_timeout(p)
    p.set_defaults(func=cmd_cancel)

    p = command("start-postcopy", "switch a VM's running migration to post-copy now (QEMU's "
                "migrate-start-postcopy; the migration must have negotiated it, e.g. --postcopy-ready)", """\
  migrate send --api /tmp/vm.sock --to 10.0.0.2:7380 --postcopy-ready &
  migrate start-postcopy /tmp/vm.sock""")
    p.add_argument("socket", metavar="SOCK", help="the migrating VM's control socket")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.set_defaults(func=cmd_start_postcopy)

    p = command("plot", "draw a migration's rounds (the stats of migrate send --json) into a PNG", """\
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380 --json > stats.json
  migrate plot stats.json --out rounds.png""")
    p.add_argument("stats", metavar="STATS.json", help="what migrate send --json printed")
    p.add_argument("--out", metavar="FILE.png", help="the PNG to write (default: STATS with .png)")
    p.set_defaults(func=cmd_plot)

    p = command("demo", "live-migrate the built-in guest to a second process", "  migrate demo\n"
                "  migrate demo --mem 4G --ws 1024 --rate 0")
    p.add_argument("--mem", type=parse_size, default=parse_size("1G"), metavar="SIZE",
                   help="guest RAM: MiB, or with a suffix K, M, G, T (default: 1G)")
    p.add_argument("--ws", type=int, default=256, metavar="MiB", help="working set, MiB")
    p.add_argument("--rate", type=int, default=100, metavar="MiB/s", help="dirty rate, MiB/s (0: as fast as it can)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="report every N passes")
    p.add_argument("--passes-before", type=int, default=2, metavar="N", help="passes to wait for before migrating")
    p.add_argument("--downtime-ms", type=float, default=300, metavar="MS", help="downtime target, ms")
    p.add_argument("--json", action="store_true", help="the stats as JSON on stdout")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, EXITS)


if __name__ == "__main__":
    sys.exit(main())
