"""`hv`: run a VM from the command line.

    hv info                                   what this host's KVM offers
    hv run [--kernel ELF|bzImage [--initrd FILE]] [--mem 1G] [--cpus N] [--cmdline ...]
           [--disk FILE[,ro]] [--virtio-console] [--rng] [--console FILE]
           [--ws MiB --rate MiB/s --every N --passes N]     (built-in guest options)
           [--api SOCK]                       control socket: see hv/vmm/control.py

With no --kernel, `hv run` boots the built-in test guest. The guest's serial console goes to
stdout; status goes to stderr. Ctrl-C stops the VM cleanly.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from rich.console import Console

from hv.boot import multiboot
from hv.devices.serial import Serial16550, Terminal
from hv.errors import ConfigError, HvError
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, builtin_machine, linux_machine, multiboot_machine
from hv.vmm.control import ControlContext, ControlServer, check_socket_path
from hv.vmm.machine import Machine, RunState
from hv.vmm.owner import owner_of

status = Console(stderr=True, highlight=False)

_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1G', '512M', '4096K', '1073741824' -> bytes (binary units)."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 512M or 1G)")
    shift = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    return int(m.group(1)) << shift


_stdout_lock = threading.Lock()


class LineConsole:
    """Guest console bytes -> `out` (stdout by default) a whole line at a time, each after
    `prefix`, and each line -> an optional callback.

    Whole lines, under one lock: a machine has several consoles (COM1, virtio-console) written
    from different threads, and their lines must not cut into each other."""

    def __init__(self, on_line=None, echo: bool = True, *, prefix: str = "", out=None) -> None:
        self._buf = bytearray()
        self._on_line = on_line
        self._echo = echo
        self._prefix = prefix.encode()
        self._out = out

    MAX_LINE = 64 * 1024  # a guest that never ends its line: passed on in pieces this long

    def __call__(self, data: bytes) -> None:
        self._buf.extend(data)
        while (nl := self._buf.find(b"\n")) >= 0 or len(self._buf) >= self.MAX_LINE:
            end = nl + 1 if nl >= 0 else self.MAX_LINE
            raw = bytes(self._buf[:end])
            del self._buf[:end]
            if self._echo:
                try:
                    with _stdout_lock:
                        out = self._out or sys.stdout.buffer
                        out.write(self._prefix + raw)
                        out.flush()
                except BrokenPipeError:
                    self._echo = False  # the reader went away; keep the guest running
            if self._on_line is not None:
                self._on_line(raw.removesuffix(b"\n").decode(errors="replace").rstrip("\r"))


def cmd_info(_args: argparse.Namespace) -> int:
    with Kvm() as kvm:
        for f in dataclasses.fields(kvm.capabilities):
            print(f"{f.name:26} {getattr(kvm.capabilities, f.name)}")
        print(f"{'supported_cpuid_leaves':26} {len(kvm.supported_cpuid)}")
        print(f"{'msr_index_list':26} {len(kvm.msr_index_list)}")
    return 0


def _virtio(args: argparse.Namespace, console) -> VirtioConfig | None:
    """--disk FILE[,ro], --virtio-console, --rng -> the virtio devices (None: none)."""
    disk, readonly = None, False
    if args.disk:
        name, _, flag = args.disk.partition(",")
        if flag not in ("", "ro"):
            raise ConfigError("--disk", args.disk, "expected FILE or FILE,ro")
        disk, readonly = Path(name), flag == "ro"
        if not disk.is_file():
            raise ConfigError("--disk", args.disk, "no such file")
    if disk is None and not args.virtio_console and not args.rng:
        return None
    return VirtioConfig(disk, readonly, console if args.virtio_console else None, args.rng)


def cmd_run(args: argparse.Namespace) -> int:
    if args.api:
        check_socket_path(args.api)  # a clear refusal before boot, not after
    done = threading.Event()
    out = open(args.console, "ab") if args.console else None  # noqa: SIM115 - for the process's life
    config = VmConfig(mem_size=args.mem, vcpus=args.cpus)
    with Kvm() as kvm:
        if args.kernel:
            image = Path(args.kernel)
            if not image.is_file():
                status.print(f"[red]hv[/]: no kernel at {image}")
                return 2
            console, params = LineConsole(echo=False), None  # COM1's bytes reach `out` from C
            virtio = _virtio(args, LineConsole(out=out))
            if multiboot.is_multiboot(image.read_bytes()[:multiboot.HEADER_SEARCH]):
                if args.initrd:
                    raise ConfigError("--initrd", args.initrd, "is for Linux kernels; this one is Multiboot")
                machine = multiboot_machine(kvm, image, args.cmdline or "", config, console, virtio=virtio)
            else:  # a Linux bzImage or vmlinux, with ACPI/MP tables for its vCPUs and devices
                initrd = Path(args.initrd) if args.initrd else None
                machine, booted = linux_machine(kvm, image, args.cmdline or "", initrd, config, console,
                                                virtio=virtio)
                status.print(f"[bold]hv[/]: Linux by the {booted.protocol} entry, cmdline {booted.cmdline!r}")
        else:
            from hv.guests import builtin as builtin_guest

            params = builtin_guest.GuestParams(
                ws_mib=args.ws, rate_mib_s=args.rate, every=args.every, passes=args.passes,
                idle=args.idle, extra=args.cmdline)

            def on_line(line: str) -> None:
                if isinstance(builtin_guest.parse_line(line),
                              (builtin_guest.Done, builtin_guest.GuestError, builtin_guest.Fault)):
                    done.set()

            console = LineConsole(on_line, echo=False)
            machine = builtin_machine(kvm, params, config, console, virtio=_virtio(args, LineConsole(out=out)))
            image = builtin_guest.guest_image()
        status.print(f"[bold]hv[/]: booting {image.name} ({args.mem >> 20} MiB, {args.cpus} vCPU)")
        return run_machine(machine, done=done, api=args.api, timeout=args.timeout,
                           extra={"console": console, "params": params},
                           terminal=terminal(out.fileno() if out else None))


def terminal(out_fd: int | None = None) -> Terminal:
    """COM1 on this process's terminal: its bytes raw to `out_fd` (default stdout), stdin to
    it (stays cooked: the guest gets it line by line)."""
    try:
        in_fd = sys.stdin.fileno() if sys.stdin is not None else None
    except (OSError, ValueError):
        in_fd = None  # a daemon's closed stdin: nothing to forward
    return Terminal(out_fd=sys.stdout.fileno() if out_fd is None else out_fd, in_fd=in_fd)


def run_machine(machine: Machine, *, done: threading.Event | None = None, api: str | None = None,
                timeout: float = 0, start: bool = True, extra: dict | None = None,
                settle: float = 0.0, announce: str = "", terminal: Terminal | None = None) -> int:
    """Run a built machine until the guest ends, Ctrl-C, `--timeout`, a fatal exit, or a control
    command (stop, a completed migration) ends it; then stop it, close it and say why.

    `terminal`: where COM1 meets the host (see `terminal()`), unless it was attached already
    (a migration target attaches it before the guest resumes there).

    `settle`: seconds the guest runs alone first (a guest that just moved here): the control
    socket's start-up and the terminal output (`announce`, then the socket's line) wait until then,
    so nothing the guest's exits wait on runs beside its first moments.

    Shared by `hv run`, `migrate restore` and `migrate recv`. Returns the process exit status.
    """
    done = done or threading.Event()
    ctx = ControlContext(machine, extra=dict(extra or {}))
    serial = machine.devices.get("serial0")
    if isinstance(serial, Serial16550) and terminal is not None and serial.terminal is None:
        serial.attach_terminal(terminal)
    server = ControlServer(api, ctx) if api else None
    interrupted, wake = threading.Event(), threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: (interrupted.set(), wake.set()))
    terminated = threading.Event()  # SIGTERM ends the run as cleanly as Ctrl-C (the socket file goes)
    previous_term = signal.signal(signal.SIGTERM, lambda *_: (terminated.set(), wake.set()))
    # Block until something happens, with no polling: timed waits cost real CPU on nested hosts,
    # and an idle guest should cost its host nothing. One small thread per thing that can happen.
    for waits_for in (machine.wait, done.wait, ctx.finished.wait):
        threading.Thread(target=lambda w=waits_for: (w(), wake.set()), daemon=True).start()
    t0 = time.monotonic()
    try:
        if start:
            machine.start()
        if settle:
            wake.wait(settle)
        if announce:
            status.print(announce)
        if server:  # after start: every command then finds a machine that has a lifecycle going
            server.start()
            status.print(f"[bold]hv[/]: control socket {api} ({', '.join(sorted(server.handlers))})")
        if not wake.wait(timeout or None):
            status.print(f"[yellow]hv[/]: --timeout {timeout}s reached")
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
        if server:
            server.close()
        hold = owner_of(machine).current
        if hold is not None and hold.in_doubt:
            status.print(f"[yellow]hv[/]: ending while the hand-over ({hold.owner}) is in doubt: this paused "
                         "copy of the guest is dropped")
        state = machine.state
        if ctx.finished.is_set():
            # ended by a control command; after a completed migration the guest runs elsewhere,
            # maybe on this host's other core: this process's teardown (unmapping its RAM, tens
            # of ms of kernel time a GiB) yields the CPU to it
            os.setpriority(os.PRIO_PROCESS, 0, 19)
        machine.stop()
        elapsed = time.monotonic() - t0
        exits = sum(s.exits + s.fast_io_exits for s in machine.stats)
        machine.vm.close()
    if state is RunState.ERROR:
        status.print(f"[red]hv[/]: the VM failed: {machine.error}")
        return 1
    if interrupted.is_set():
        why = "Ctrl-C"
    elif terminated.is_set():
        why = "SIGTERM"
    elif ctx.finished.is_set():
        why = ctx.finish_reason
    elif done.is_set():
        why = "guest finished"
    else:
        why = str(machine.stop_reason.source) if machine.stop_reason else "stopped"
    status.print(f"[bold]hv[/]: stopped ({why}) after {elapsed:.2f} s, {exits:,} exits")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="show KVM capabilities").set_defaults(func=cmd_info)
    run = sub.add_parser("run", help="run a VM (the built-in guest by default)")
    run.add_argument("--kernel", help="a Multiboot v1 ELF32 kernel, or a Linux bzImage/vmlinux "
                     "(default: the built-in guest)")
    run.add_argument("--initrd", help="with a Linux --kernel: the initramfs")
    run.add_argument("--mem", type=parse_size, default=parse_size("256M"), help="guest RAM (e.g. 1G)")
    run.add_argument("--cpus", type=int, default=1)
    run.add_argument("--cmdline", default="", help="kernel command line (appended for the built-in guest)")
    run.add_argument("--ws", type=int, default=64, help="built-in guest: working set, MiB")
    run.add_argument("--rate", type=int, default=0, help="built-in guest: dirty rate, MiB/s (0 = max)")
    run.add_argument("--every", type=int, default=1, help="built-in guest: report every N passes")
    run.add_argument("--passes", type=int, default=0, help="built-in guest: stop after N passes (0 = run)")
    run.add_argument("--idle", action="store_true", help="built-in guest: halt once ready (no workload)")
    run.add_argument("--timeout", type=float, default=0, help="stop after this many seconds (0 = never)")
    run.add_argument("--console", metavar="FILE", help="guest console output to FILE (appended) "
                     "instead of the terminal; input still comes from the terminal")
    run.add_argument("--disk", metavar="FILE[,ro]", help="virtio-blk backed by FILE (,ro: read-only)")
    run.add_argument("--virtio-console", action="store_true", help="virtio-console, output to the console")
    run.add_argument("--rng", action="store_true", help="virtio-rng")
    run.add_argument("--api", metavar="SOCK", help="serve a control socket (pause, resume, stop, status, "
                     "snapshot, migration) at this path")
    run.set_defaults(func=cmd_run)
    return ap


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None,
             expected: tuple[type[BaseException], ...]) -> int:
    """Parse, set up logging, run the chosen command; an `expected` error is a one-line message
    and exit status 2, not a traceback. Shared by `hv` and `migrate`."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # stdout closed early (e.g. piped to head): not an error of ours
        return 0
    except expected as e:
        status.print(f"[red]{parser.prog}: {type(e).__name__}[/]: {e}")
        return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, (HvError,))


if __name__ == "__main__":
    sys.exit(main())
