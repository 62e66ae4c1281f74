"""`hv`: run a VM from the command line, and steer a running one.

    hv info [--json]                          what this host's KVM and CPUs offer
    hv run [--kernel ELF|bzImage [--initrd FILE]] [--mem 1G] [--cpus N] [--cmdline ...]
           [--disk FILE[,ro][,transport=pci]] [--virtio-console [pci]] [--rng [pci]] [--console FILE]
           [--net tap=NAME[,mac=..][,bridge=BR][,transport=pci]]
           [--ws MiB --rate MiB/s --every N --passes N]     (built-in guest options)
           [--api SOCK]                       control socket: see hv/vmm/control.py
    hv status|pause|resume|stop SOCK [--json] a running VM, through its control socket

With no --kernel, `hv run` boots the built-in test guest. The guest's serial console goes to
stdout, status lines and logs to stderr; results (hv info, hv status) to stdout. Ctrl-C or
SIGTERM stops the VM cleanly. -v/-q go anywhere on the line. `hv COMMAND --help` for each
command's options (with their defaults and units) and examples."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from hv.boot import multiboot
from hv.devices.serial import Serial16550, Terminal
from hv.errors import ConfigError
from hv.guests import builtin as builtin_guest
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, VirtioNetSpec, builtin_machine, linux_machine, multiboot_machine
from hv.vmm.command import HV_EXITS, ExitStatus, dispatch, parse_size, run_parser, say
from hv.vmm.control import ATTACH_WAIT, CALL_TIMEOUT, ControlContext, ControlServer
from hv.vmm.machine import Machine, RunState
from hv.vmm.owner import owner_of
from hv.vmm.signals import CaughtSignals

log = logging.getLogger("hv.vmm.cli")  # by name: run as `python -m hv.vmm.cli`, __name__ is __main__
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


def cmd_info(args: argparse.Namespace) -> int:
    """What this host's KVM offers, and its CPUs (`hostcpu`: a fact sysfs lacks is shown as
    not known, with the reason)."""
    from hv.platform.hostcpu import Unknown, host_cpu_facts

    cpus = host_cpu_facts()
    with Kvm() as kvm:
        kvm_facts = {f.name: getattr(kvm.capabilities, f.name) for f in dataclasses.fields(kvm.capabilities)}
        kvm_facts |= {"supported_cpuid_leaves": len(kvm.supported_cpuid), "msr_index_list": len(kvm.msr_index_list),
                      "vcpu_tsc_khz": kvm.vcpu_tsc_khz}
    if args.json:
        print(json.dumps({"kvm": kvm_facts, "host_cpus": cpus.as_dict()}, indent=2))
        return 0
    for name, value in kvm_facts.items():
        print(f"{name:26} {value}")
    facts = {"host_cpus": ",".join(map(str, cpus.cpus)), "host_cpu_max_freq_khz": cpus.max_freq_khz,
             "host_cpu_frequencies_khz": cpus.frequencies, "host_cpu_capacity": cpus.capacity,
             "host_cpu_clusters": cpus.clusters if isinstance(cpus.clusters, Unknown)
             else " ".join("{" + ",".join(map(str, group)) + "}" for group in cpus.clusters)}
    for name, value in facts.items():
        if isinstance(value, dict):
            value = ", ".join(f"cpu{cpu} {getattr(v, 'all_khz', v)}" for cpu, v in value.items())
        print(f"{name:26} {value}")
    return 0


TRANSPORTS = ("mmio", "pci")


def _virtio(args: argparse.Namespace, console) -> VirtioConfig | None:
    """--disk FILE[,ro][,transport=pci], --virtio-console [pci], --rng [pci] -> the virtio
    devices (None: none). The transport is chosen per device, as QEMU's -device virtio-blk-pci
    or virtio-blk-device is: one machine can have both (and compare them); MMIO by default."""
    disk, readonly, pci = None, False, []
    if args.disk:
        name, *flags = args.disk.split(",")
        transports = [f.removeprefix("transport=") for f in flags if f.startswith("transport=")]
        if any(f not in ("ro",) and not f.startswith("transport=") for f in flags) \
                or len(transports) > 1 or any(t not in TRANSPORTS for t in transports):
            raise ConfigError("--disk", args.disk, "expected FILE[,ro][,transport=mmio|pci]")
        disk, readonly = Path(name), "ro" in flags
        if transports == ["pci"]:
            pci.append("virtio-blk0")
        if not disk.is_file():
            raise ConfigError("--disk", args.disk, "no such file")
    for device_id, transport in (("virtio-console0", args.virtio_console), ("virtio-rng0", args.rng)):
        if transport == "pci":
            pci.append(device_id)
    net = VirtioNetSpec.parse(args.net) if args.net else None
    if net is not None and net.transport == "pci":
        pci.append(net.device_id)
    if disk is None and not args.virtio_console and not args.rng and net is None:
        return None
    return VirtioConfig(disk, readonly, console if args.virtio_console else None, bool(args.rng), pci=tuple(pci),
                        net=net)


def cmd_run(args: argparse.Namespace) -> int:
    with MachineRun(args.api) as run:  # the control socket claimed before anything boots
        return _run(args, run)


def _run(args: argparse.Namespace, run: MachineRun) -> int:
    watch = None
    out = open(args.console, "ab") if args.console not in (None, "-") else None  # noqa: SIM115 - for the process's life
    config = VmConfig(mem_size=args.mem, vcpus=args.cpus)
    with Kvm() as kvm:
        if args.kernel:
            image = Path(args.kernel)
            if not image.is_file():
                raise ConfigError("--kernel", args.kernel, "no such file")
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
                say("hv", f"Linux by the {booted.protocol} entry, cmdline {booted.cmdline!r}")
        else:
            params = builtin_guest.GuestParams(
                ws_mib=args.ws, rate_mib_s=args.rate, every=args.every, passes=args.passes,
                idle=args.idle, extra=args.cmdline)
            watch = builtin_guest.EndWatch()
            console = LineConsole(watch, echo=False)  # COM1's bytes reach `out` from C
            machine = builtin_machine(kvm, params, config, console, virtio=_virtio(args, LineConsole(out=out)))
            image = builtin_guest.guest_image()
        say("hv", f"booting {image.name} ({args.mem >> 20} MiB, {args.cpus} vCPU)")
        return run_machine(machine, run, watch=watch, timeout=args.timeout,
                           extra={"console": console, "params": params},
                           terminal=terminal(out.fileno() if out else None))


def terminal(out_fd: int | None = None) -> Terminal:
    """COM1 on this process's terminal: its bytes raw to `out_fd` (default stdout), stdin to it
    (stays cooked: the guest gets it line by line). Both are moved by the UART's C threads, which
    read the descriptor itself, never sys.stdin's buffered reader: a thread blocked in that reader
    holds its lock, and an interpreter finalizing with the lock held aborts
    (`Fatal Python error: _enter_buffered_busy`, exit 134); stopping the UART joins them."""
    try:
        in_fd = sys.stdin.fileno() if sys.stdin is not None else None
    except (OSError, ValueError):
        in_fd = None  # a daemon's closed stdin: nothing to forward
    return Terminal(out_fd=sys.stdout.fileno() if out_fd is None else out_fd, in_fd=in_fd)


class MachineRun:
    """What a machine's run needs besides the machine, acquired before the guest may run, so
    that nothing of it can fail once it does (after a migration's Commit nothing may fail that
    loses the guest): the control socket, claimed as this is made (before anything boots,
    restores or is accepted); then, per machine (`prepare`), its control context, COM1 on the
    terminal and the threads that wait for the run's end. A migration target prepares as it
    builds the machine, before it says Ready; `run_machine` prepares one that is not yet.
    Close it (or use it as a context manager) to release the socket. `attach_wait`: how long a
    request that comes before the machine waits for it (a boot, a guest arriving), then is told
    `NoMachine`. `register` adds the commands this VMM serves itself before it has a machine
    (`ControlServer.register_unattached`), before the socket takes any request."""

    def __init__(self, api: str | None, *, attach_wait: float = ATTACH_WAIT,
                 register: Callable[[ControlServer], None] | None = None) -> None:
        self.api = api
        self.server = ControlServer(api, attach_wait=attach_wait) if api else None
        if self.server is not None:
            if register is not None:
                register(self.server)
            self.server.start()  # the path is ours from now on; requests wait for `attach`
        self.machine: Machine | None = None
        self.ctx: ControlContext | None = None
        self.wake = threading.Event()  # the current machine's run has something to end it
        self._no_watch = threading.Event()  # `done` for a run without a guest watch: never set
        self.done = self._no_watch
        self.watch: builtin_guest.EndWatch | None = None
        self._done_waited: set[int] = set()  # `done` events a thread already waits on

    def prepare(self, machine: Machine, *, watch: builtin_guest.EndWatch | None = None, extra: dict | None = None,
                terminal: Terminal | None = None) -> None:
        """Everything `machine`'s run will use, made now (again for another machine: what a
        migration that failed after its target prepared left is released here, so a peer that
        fails migration after migration costs no thread more than one)."""
        ctx = ControlContext(machine, extra=dict(extra or {}))
        serial = machine.devices.get("serial0")
        if isinstance(serial, Serial16550) and terminal is not None and serial.terminal is None:
            serial.attach_terminal(terminal)
        done = watch.done if watch is not None else self._no_watch
        wake = threading.Event()
        # Block until something happens, with no polling: timed waits cost real CPU on nested hosts,
        # and an idle guest should cost its host nothing. One small thread per thing that can happen:
        # the machine's end (that thread ends with a discarded machine), a control command's (the
        # previous context's is set free below), the guest's last line (one thread for the watch,
        # waking whichever run is current).
        for waits_for in (machine.wait, ctx.finished.wait):
            threading.Thread(target=lambda w=waits_for, wake=wake: (w(), wake.set()), daemon=True).start()
        if id(done) not in self._done_waited:
            threading.Thread(target=lambda: (done.wait(), self.wake.set()), daemon=True).start()
            self._done_waited.add(id(done))
        if self.ctx is not None:
            self.ctx.finished.set()  # a machine that never ran here: its waiter ends (its wake is no one's)
        self.machine, self.ctx, self.done, self.wake, self.watch = machine, ctx, done, wake, watch

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def __enter__(self) -> MachineRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_yielding(machine: Machine) -> None:
    """Close a stopped machine's VM from a thread at the lowest priority. Ended by a control
    command, after a completed migration the guest runs elsewhere, maybe on this host's other
    core: unmapping this copy's RAM (tens of ms of kernel time a GiB) yields the CPU to it. Only
    that thread is lowered (Linux's nice is per thread): with the whole process at nice 19, its
    interpreter's own end waited for CPU behind any busy process, and beside two busy cores a
    migrated source took 6-15 s to exit."""
    def close() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, 19)  # 0: the calling thread
        machine.vm.close()

    closer = threading.Thread(target=close, name="vm-close")
    try:
        closer.start()
    except RuntimeError:  # no thread to spare: closed here, at this thread's priority
        machine.vm.close()
        return
    closer.join()


def run_machine(machine: Machine, run: MachineRun, *, watch: builtin_guest.EndWatch | None = None,
                timeout: float = 0, start: bool = True, extra: dict | None = None,
                settle: float = 0.0, announce: str = "", terminal: Terminal | None = None) -> int:
    """Run a built machine until the guest ends, Ctrl-C, `--timeout`, a fatal exit, or a control
    command (stop, a completed migration) ends it; then stop it, close it and say why.

    `run`: its control socket and the rest (`MachineRun`), prepared here with `watch`, `extra`
    and `terminal` unless it was for this machine already. `terminal`: where COM1 meets the host
    (see `terminal()`), unless it was attached already (a migration target attaches it before
    the guest resumes there).

    `settle`: seconds the guest runs alone first (a guest that just moved here): the control
    socket's serving and the terminal output (`announce`, a status line `prog: text`, then the
    socket's line) wait until then, so nothing the guest's exits wait on runs beside its first
    moments. `watch`: the built-in guest's last line ends the run (and an error line exits 1).

    Shared by `hv run`, `migrate restore` and `migrate recv`. Returns the process exit status
    (`ExitStatus`); every ending stops the VM and joins the stdin thread (the socket is
    `run`'s to remove).
    """
    if run.machine is not machine:
        run.prepare(machine, watch=watch, extra=extra, terminal=terminal)
    ctx, done, wake, watch = run.ctx, run.done, run.wake, run.watch
    server = run.server
    # Ctrl-C and SIGTERM (kill, systemd, a container stop) end the run the same orderly way:
    # the VM stopped, the socket file removed, the threads joined, the output flushed.
    signals = CaughtSignals(lambda _signum: wake.set())
    t0 = time.monotonic()
    try:
        with signals:  # restored before the stop: a second Ctrl-C there is Python's again
            if start:
                machine.start()
            log.info("running: %d vCPU, %d MiB, devices %s", len(machine.vcpus), machine.vm.memory.total_size >> 20,
                     ", ".join(sorted(machine.devices)))
            if settle:
                wake.wait(settle)
            if announce:
                say(*announce.split(": ", 1))
            if server:  # after start: every command then finds a machine that has a lifecycle going
                server.attach(ctx)
                say("hv", f"control socket {run.api} ({', '.join(sorted(server.handlers))})")
            if not wake.wait(timeout or None):
                say("hv", f"--timeout {timeout}s reached", "yellow")
    finally:
        if server:
            server.close()
        hold = owner_of(machine).current
        if hold is not None and hold.in_doubt:
            say("hv", f"ending while the hand-over ({hold.owner}) is in doubt: this paused copy of the guest "
                "is dropped", "yellow")
        state = machine.state
        log.info("stopping the VM (it was %s)", state.value)
        machine.stop()
        elapsed = time.monotonic() - t0
        exits = sum(s.exits + s.fast_io_exits for s in machine.stats)
        if ctx.finished.is_set():
            _close_yielding(machine)
        else:
            machine.vm.close()
    if state is RunState.ERROR:
        say("hv", f"the VM failed: {machine.error}", "red")
        return ExitStatus.FAILED
    if signals.first is not None:
        why = "Ctrl-C" if signals.first is signal.SIGINT else signals.first.name
    elif ctx.finished.is_set():
        why = ctx.finish_reason
    elif done.is_set():
        why = "the guest failed" if watch is not None and watch.failure else "guest finished"
    elif machine.stop_reason is not None and machine.stop_reason.exit_code is not None:
        why = f"the guest exited with code {machine.stop_reason.exit_code}"
    else:
        why = str(machine.stop_reason.source) if machine.stop_reason else "stopped"
    say("hv", f"stopped ({why}) after {elapsed:.2f} s, {exits:,} exits")
    if done.is_set() and watch is not None and watch.failure:
        say("hv", f"the guest's last words: {watch.failure}", "red")
        return ExitStatus.FAILED
    if machine.stop_reason is not None and machine.stop_reason.exit_code:
        # a guest's own verdict on its run, at the debug-exit port (QEMU's isa-debug-exit): any
        # code but 0 is a failure, whatever ended the run after it
        say("hv", f"the guest exited with code {machine.stop_reason.exit_code}", "red")
        return ExitStatus.FAILED
    return ExitStatus.OK


EXAMPLES_RUN = """\
  hv run                                        the built-in guest, 256 MiB, console on this terminal
  hv run --mem 1G --ws 256 --rate 100 --api /tmp/vm.sock
                                                a 256 MiB working set dirtied at 100 MiB/s, a control socket
  hv run --kernel vmlinuz --initrd initrd.img --cpus 2 --cmdline console=ttyS0
  hv run --passes 10 --timeout 30               ends when the guest has done 10 passes, or after 30 s"""

CONTROL_COMMANDS = {"status": "show a running VM's state", "pause": "pause a running VM's vCPUs",
                    "resume": "resume a paused VM", "stop": "stop a VM (its process then ends)"}


def cmd_control(args: argparse.Namespace) -> int:
    """`hv status|pause|resume|stop SOCK`: one command on a running VM's control socket."""
    from hv.vmm.control import call

    result = call(args.socket, args.command, timeout=args.timeout or None)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:16} {', '.join(map(str, value)) if isinstance(value, list) else value}")
    return ExitStatus.OK


def add_answer_timeout(p: argparse.ArgumentParser) -> None:
    """--timeout for a command that asks a control socket: how long its whole answer may take."""
    p.add_argument("--timeout", type=float, default=CALL_TIMEOUT, metavar="SECONDS",
                   help="give up (exit 4) if the VM's process has not answered in full by then; 0: wait on")


def build_parser() -> argparse.ArgumentParser:
    ap, command = run_parser("hv", __doc__)
    info = command("info", "show what this host's KVM and CPUs offer", "  hv info\n  hv info --json")
    info.add_argument("--json", action="store_true", help="the facts as JSON on stdout")
    info.set_defaults(func=cmd_info)
    run = command("run", "run a VM (the built-in guest by default)", EXAMPLES_RUN)
    run.add_argument("--kernel", metavar="FILE", help="a Multiboot v1 ELF32 kernel, or a Linux bzImage/vmlinux "
                     "(default: the built-in guest)")
    run.add_argument("--initrd", metavar="FILE", help="with a Linux --kernel: the initramfs")
    run.add_argument("--mem", type=parse_size, default=parse_size("256M"), metavar="SIZE",
                     help="guest RAM: MiB, or with a suffix K, M, G, T, as QEMU's -m (default: 256M)")
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs")
    run.add_argument("--cmdline", default="", metavar="TEXT",
                     help="kernel command line (appended for the built-in guest)")
    run.add_argument("--ws", type=int, default=64, metavar="MiB", help="built-in guest: working set, MiB")
    run.add_argument("--rate", type=int, default=0, metavar="MiB/s",
                     help="built-in guest: dirty rate, MiB/s; 0: as fast as it can")
    run.add_argument("--every", type=int, default=1, metavar="N", help="built-in guest: report every N passes")
    run.add_argument("--passes", type=int, default=0, metavar="N",
                     help="built-in guest: stop after N passes; 0: run on")
    run.add_argument("--idle", action="store_true", help="built-in guest: halt once ready (no workload)")
    run.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                     help="stop the VM after this many seconds; 0: never")
    run.add_argument("--console", metavar="FILE|-", help="COM1's bytes, raw, appended to FILE instead of "
                     "the terminal (-: the terminal, the default); input still comes from the terminal")
    run.add_argument("--disk", metavar="FILE[,ro][,transport=pci]",
                     help="virtio-blk backed by FILE (,ro: read-only; ,transport=pci: on virtio-pci, else virtio-mmio)")
    run.add_argument("--virtio-console", nargs="?", const="mmio", choices=TRANSPORTS, metavar="pci",
                     help="virtio-console, output to the console (pci: on virtio-pci)")
    run.add_argument("--rng", nargs="?", const="mmio", choices=TRANSPORTS, metavar="pci",
                     help="virtio-rng (pci: on virtio-pci)")
    run.add_argument("--net", metavar="tap=NAME[,mac=M][,bridge=BR][,transport=mmio|pci]",
                     help="virtio-net on tap NAME (created if absent; joined to bridge BR)")
    run.add_argument("--api", metavar="SOCK", help="serve a control socket (pause, resume, stop, status, "
                     "snapshot, migration) at this path; see hv status|pause|resume|stop")
    run.set_defaults(func=cmd_run)
    for name, what in CONTROL_COMMANDS.items():
        p = command(name, what, f"  hv {name} /tmp/vm.sock\n  hv {name} /tmp/vm.sock --json")
        p.add_argument("socket", metavar="SOCK", help="the VM's control socket (hv run --api SOCK)")
        p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
        add_answer_timeout(p)
        p.set_defaults(func=cmd_control)
    return ap


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, HV_EXITS)


if __name__ == "__main__":
    sys.exit(main())
