"""`migrate demo`: the built-in guest, migrated live to a `migrate recv` in a second process."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from hv.guests import builtin as builtin_guest
from hv.kvm.kvm import Kvm
from hv.vmm.cli import LineConsole
from hv.vmm.command import say
from hv.vmm.control import call
from hv.vmm.machine import discard
from migrate.errors import MigrateError
from migrate.commands.common import print_json, results
from migrate.commands.sending import RoundView, round_bar, stats_table


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

    def read_target_console() -> None:
        for line in target.stdout or ():
            target_console(line.encode())

    reader = threading.Thread(target=read_target_console, daemon=True)
    reader.start()
    target_log: list[str] = []
    listening = threading.Event()

    def watch_target_status() -> None:
        for line in target.stderr or ():
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
            with round_bar() as bar:
                stats = send(machine, f"127.0.0.1:{port}", MigrationOptions(downtime_ms=args.downtime_ms),
                             progress=RoundView(bar))
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
        print_json(summary)
    else:
        results.print(stats_table(summary))
        if ok:
            g = summary["guest"]
            say("demo", f"the guest kept going: pass {g['passes_on_source']} was its "
                        f"last full report on the source, pass {g['passes_on_target_so_far']} on the target; "
                        f"{g['target_memory_check']}", "bold green")
    return 0 if ok and summary["guest"]["target_memory_check"].startswith("working set consistent") else 1
