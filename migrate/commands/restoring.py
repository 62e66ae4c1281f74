"""`migrate restore`'s three ways: FILE here and now; `--wait --api SOCK`, a VMM that is running
before it has a guest and restores one when asked on its control socket (as Firecracker's API
takes "load snapshot"); and `FILE --into SOCK`, the client that asks it.

A waiting VMM pays before the request for everything a restore from the command line pays each
time and that does not depend on the snapshot: the interpreter's start and its imports, /dev/kvm
opened and asked what a restore asks it (capabilities, supported CPUID, a throwaway vCPU's CPUID
and TSC rate, the MSR list), the consoles, the control socket, and a VM of the expected shape
(`--mem`, `--cpus`, as `hv run` takes them) with its vCPU threads parked
(`migrate.snapshot.spare.SpareMachine`). The request then pays for reading and checking the
snapshot, moving its pages into that VM, its state, and the resume.

The control socket's `restore` (served while no guest runs here; then `NotWaiting`):
`{"command": "restore", "file": PATH, "disk": PATH | null, "disk_dir": PATH | null,
"share_memory": bool, "verify_memory": bool, "disk_from_snapshot": bool, "lazy": bool, "record_ms":
int}`, absolute paths, the names of `RestoreRequest`'s
fields -> `RestoreTimings` as JSON (ms from the request's arrival to the guest's first KVM_RUN,
and per phase). A refused request (no such file, a corrupt or foreign snapshot, a wrong disk, an
unknown argument) is answered with its typed error, and the VMM waits on for the next: the checks
run on staging memory, in no VM, so nothing is left half built; a VM built ahead that a failed
restore had taken already is discarded and built again. `status`, while waiting: `{"state":
"waiting" | "restoring" | "closed", "built_ahead": {"mem_size", "vcpus"} | null, "refused": N}`;
once the guest runs, the socket is the guest's as any VM's (`status`, `pause`, `snapshot`, ...).
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from rich.text import Text

from hv.devices.serial import Serial16550
from hv.errors import HvError
from hv.guests.builtin import EndWatch
from hv.kvm.archcheck import host_features
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.cli import LineConsole, MachineRun, run_machine, terminal
from hv.vmm.command import ExitStatus, UsageError, say
from hv.vmm.control import ControlError, ControlServer, Progress, call, expect
from hv.vmm.control import extensions as control_extensions
from hv.vmm.machine import Machine, discard, discard_on_error
from hv.vmm.signals import CaughtSignals
from migrate.commands.common import NUMBER, FieldTypes, guest_console, print_json, results
from migrate.snapshot.lazy import lazy_restore_of, report_when_resident
from migrate.snapshot.restoring import RestoreClock, RestoreRequest, RestoreTimings, rehearse
from migrate.snapshot.spare import MachineFactory, SpareMachine, fresh_machine
from migrate.state import registry

log = logging.getLogger(__name__)

RESTORE_TIMEOUT = 600.0  # seconds the client waits for its answer: a large compressed snapshot is read whole first
TIMINGS_FIELDS: FieldTypes = {"path": str, "built_ahead": bool, "read_check_ms": NUMBER, "build_ms": NUMBER,
                              "apply_ms": NUMBER, "resume_ms": NUMBER, "first_kvm_run_ms": NUMBER, "started_ns": int,
                              "first_kvm_run_ns": int}


def restore_and_resume(request: RestoreRequest, kvm: Kvm, run: MachineRun, *, console: LineConsole,
                       watch: EndWatch, virtio_console: LineConsole, started_ns: int,
                       build: MachineFactory = fresh_machine) -> tuple[Machine, RestoreTimings]:
    """The snapshot restored, its run prepared (control context, COM1 on this terminal: before
    the guest runs, so nothing of it can fail after) and the guest resumed; the timings taken
    from `started_ns` to the last vCPU's entering KVM_RUN. What both ways of restoring here do.
    A VM built ahead was prepared as it was built, but for its terminal: one that goes unused
    must not read this terminal's input beside the guest's."""
    clock = RestoreClock(started_ns)
    machine = request.restore(kvm, console=console, virtio_console=virtio_console, build=build,
                              phase_done=clock.mark, say_disk=lambda text: say("migrate", text))
    with discard_on_error(machine):
        if run.machine is machine:
            machine.device("serial0", Serial16550).attach_terminal(terminal())
        else:
            run.prepare(machine, watch=watch, extra={"console": console}, terminal=terminal())
        if (pager := lazy_restore_of(machine)) is None:
            machine.resume(wait_running=True)
        else:  # its memory comes in on fault and in the background from now on
            pager.resume()
            report_when_resident(pager, lambda line, failed: say("migrate", line, "red" if failed else "bold"))
    built_ahead = isinstance(build, SpareMachine) and build.taken
    return machine, clock.timings(request.path, machine, built_ahead=built_ahead)


def request_of_args(args: argparse.Namespace) -> RestoreRequest:
    """The command line's request (paths absolute: a waiting VMM's working directory is its own)."""
    def absolute(path: str | None) -> Path | None:
        return Path(path).resolve() if path else None

    if args.record_ms and not args.lazy:
        raise UsageError("--record-ms records a lazy restore's faults: it needs --lazy")
    return RestoreRequest(Path(args.file).resolve(), disk=absolute(args.disk), disk_dir=absolute(args.disk_dir),
                          share_memory=args.share_mem, verify_memory=not args.no_verify,
                          disk_from_snapshot=args.disk_from_snapshot, lazy=args.lazy, record_ms=args.record_ms)


REQUEST_PATHS = ("file", "disk", "disk_dir")
REQUEST_FLAGS = ("share_memory", "verify_memory", "disk_from_snapshot", "lazy")
FLAG_DEFAULTS = (False, True, False, False)


def request_arguments(request: RestoreRequest) -> dict[str, Any]:
    """`request` as the control socket's `restore` takes it."""
    return {"file": str(request.path), "disk": str(request.disk) if request.disk else None,
            "disk_dir": str(request.disk_dir) if request.disk_dir else None,
            **{name: getattr(request, name) for name in REQUEST_FLAGS}, "record_ms": request.record_ms}


def request_of(args: dict[str, Any]) -> RestoreRequest:
    """A `restore` request's arguments -> the request; `BadRequest` for a missing file, a path that
    is not absolute, a flag that is not a boolean, or an argument this VMM does not know (refused,
    not ignored: a way of restoring it does not have must not be silently dropped)."""
    known = (*REQUEST_PATHS, *REQUEST_FLAGS, "record_ms")
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ControlError("BadRequest", f"restore takes {', '.join(known)}; not {unknown}")
    paths: dict[str, Path | None] = {}
    for name in REQUEST_PATHS:
        value = args.get(name)
        if value is None and name != "file":
            paths[name] = None
            continue
        if not isinstance(value, str) or not os.path.isabs(value):
            raise ControlError("BadRequest", f"restore needs {name!r} as an absolute path, not {value!r}")
        paths[name] = Path(value)
    flags = {name: args.get(name, default) for name, default in zip(REQUEST_FLAGS, FLAG_DEFAULTS, strict=True)}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ControlError("BadRequest", f"restore's {name!r} is true or false, not {value!r}")
    record_ms = args.get("record_ms", 0)
    if not isinstance(record_ms, int) or isinstance(record_ms, bool) or record_ms < 0 or \
            (record_ms and not flags["lazy"]):
        raise ControlError("BadRequest", f"restore's 'record_ms' is a count of ms, with 'lazy', not {record_ms!r}")
    path = paths["file"]
    assert path is not None
    return RestoreRequest(path, disk=paths["disk"], disk_dir=paths["disk_dir"], record_ms=record_ms, **flags)


def warm(kvm: Kvm) -> None:
    """What a restore asks of this host and of the code that does not depend on the snapshot,
    asked once now: KVM's supported CPUID and a set-up vCPU's (a throwaway VM), its TSC rate, the
    MSR list, and the stream's schema registry."""
    host_features(kvm)
    _ = kvm.vcpu_tsc_khz, kvm.msr_index_list
    registry()


class WaitingVmm:
    """The state of a VMM waiting for its guest: `prepare` (on the main thread) makes it ready,
    `restore` requests (on the control socket's threads, one at a time) try to give it one, `wait`
    returns the machine of the first that did (None when the wait was given up)."""

    def __init__(self, shape: VmConfig, *, console: LineConsole, watch: EndWatch,
                 virtio_console: LineConsole) -> None:
        self.shape = shape
        self.console, self.watch, self.virtio_console = console, watch, virtio_console
        self.state = "starting"  # -> waiting <-> restoring -> running | closed
        self.refused = 0
        self.kvm: Kvm | None = None
        self.run: MachineRun | None = None
        self.spare: SpareMachine | None = None
        self.machine: Machine | None = None
        self._lock = threading.Lock()
        self._ready = threading.Event()  # prepared (or closed)
        self._ended = threading.Event()  # a guest runs, or the wait was given up

    def register(self, server: ControlServer) -> None:
        server.register_unattached("restore", self._restore, exclusive=True)
        server.register_unattached("status", self._status)

    def prepare(self, kvm: Kvm, run: MachineRun) -> None:
        try:
            warm(kvm)
            self.kvm, self.run = kvm, run
            self._build_spare()
            if self.spare is not None and self.spare.machine is not None:
                rehearse(kvm, self.spare.machine)
            with self._lock:
                if self.state == "starting":
                    self.state = "waiting"
        finally:
            self._ready.set()

    def _build_spare(self) -> None:
        """A VM built ahead, its run prepared (all but the terminal: `restore_and_resume`); or
        none, said why, and restores build their VM on request."""
        assert self.kvm is not None and self.run is not None  # (prepared)
        try:
            self.spare = SpareMachine(self.kvm, self.shape, self.console)
        except HvError as e:
            self.spare = None
            log.warning("no VM built ahead: restores build theirs on request (%s)", e)
            return
        assert self.spare.machine is not None
        self.run.prepare(self.spare.machine, watch=self.watch, extra={"console": self.console})

    def wait(self) -> Machine | None:
        self._ended.wait()
        return self.machine

    def give_up(self) -> None:
        """No more requests taken (a signal): `wait` returns; a restore under way finishes."""
        with self._lock:
            if self.state != "running":
                self.state = "closed"
        self._ended.set()

    def close(self) -> None:
        """The VM built ahead discarded if no restore took it."""
        if self.spare is not None:
            self.spare.close()

    def _status(self, _args: dict[str, Any], _progress: Progress, _received_ns: int) -> dict[str, Any]:
        spare = self.spare
        ahead = None if spare is None or spare.taken else {"mem_size": spare.config.mem_size,
                                                            "vcpus": spare.config.vcpus}
        return {"state": self.state, "built_ahead": ahead, "refused": self.refused}

    def _restore(self, args: dict[str, Any], _progress: Progress, received_ns: int) -> dict[str, Any]:
        request = request_of(args)
        self._ready.wait()
        with self._lock:
            if self.state != "waiting":
                raise ControlError("NotWaiting", f"this VMM is {self.state}, not waiting for a guest")
            self.state = "restoring"
        kvm, run, spare = self.kvm, self.run, self.spare
        assert kvm is not None and run is not None and run.server is not None  # (prepared, and with a socket)
        try:
            machine, timings = restore_and_resume(
                request, kvm, run, console=self.console, watch=self.watch, virtio_console=self.virtio_console,
                started_ns=received_ns, build=spare or fresh_machine)
        except BaseException:
            self.refused += 1
            if spare is not None and spare.taken:  # it went into the machine that failed: another
                self._build_spare()
            with self._lock:
                if self.state == "restoring":
                    self.state = "waiting"
            raise
        assert run.ctx is not None  # (prepared with the machine)
        run.server.attach(run.ctx)  # the socket is the guest's from now on (restore: NotWaiting)
        with self._lock:
            self.machine = machine
            if self.state == "restoring":
                self.state = "running"
        self._ended.set()
        return timings.as_dict()


WAIT_SHAPE = VmConfig(mem_size=256 << 20, vcpus=1)  # built ahead unless --mem/--cpus say otherwise: hv run's
REQUEST_OPTIONS = ("disk", "disk_dir", "share_mem", "no_verify", "disk_from_snapshot", "lazy",
                   "record_ms")  # what the request brings, not --wait


def cmd_restore(args: argparse.Namespace) -> int:
    """`migrate restore`: FILE here, a VMM that waits for one (`--wait`), or FILE into it (`--into`)."""
    if args.wait:
        given = [name.upper() if name == "file" else f"--{name.replace('_', '-')}"
                 for name in ("file", "into", *REQUEST_OPTIONS) if getattr(args, name)]
        if given:
            raise UsageError(f"--wait takes no {', '.join(given)}: the restore request brings them "
                             "(migrate restore FILE --into SOCK ...)")
        return cmd_restore_wait(args)
    if args.mem is not None or args.cpus is not None:
        raise UsageError("--mem and --cpus shape the VM a waiting VMM builds ahead: they go with --wait")
    if not args.file:
        raise UsageError("restore needs FILE (or --wait)")
    return cmd_restore_into(args) if args.into else cmd_restore_here(args)


def cmd_restore_wait(args: argparse.Namespace) -> int:
    """`migrate restore --wait --api SOCK [--mem SIZE] [--cpus N]`."""
    if not args.api:
        raise UsageError("--wait needs --api SOCK: the control socket the restore request comes on")
    control_extensions()  # found and imported now, not in a request's time
    console, watch = guest_console()
    shape = VmConfig(mem_size=args.mem or WAIT_SHAPE.mem_size, vcpus=args.cpus or WAIT_SHAPE.vcpus)
    waiting = WaitingVmm(shape, console=console, watch=watch, virtio_console=LineConsole())
    try:
        with MachineRun(args.api, register=waiting.register) as run, Kvm() as kvm:
            with CaughtSignals(lambda _signum: waiting.give_up()) as signals:
                waiting.prepare(kvm, run)
                # What is made so far (the imports, the VM built ahead) is never scanned again by
                # the cyclic collector: a full collection over it costs ~20 ms, which a request
                # would pay whenever one fell in its time.
                gc.freeze()
                ahead = (f"a VM of {shape.mem_size >> 20} MiB and {shape.vcpus} vCPU built ahead"
                         if waiting.spare is not None else "no VM built ahead")
                say("migrate", f"waiting for a restore on {args.api} ({ahead})")
                machine = waiting.wait()
            if machine is None or signals.first is not None:
                run.close()  # a restore under way finishes first; its guest goes with the rest
                if waiting.machine is not None:
                    discard(waiting.machine)
                say("migrate", f"stopped waiting ({signals.first.name if signals.first else 'closed'})")
                return ExitStatus.OK
            if waiting.spare is not None:
                waiting.spare.close()  # the guest got a VM built on request: this one will not be used
            pager = lazy_restore_of(machine)
            try:
                return run_machine(machine, run, timeout=args.timeout, start=False)
            finally:
                if pager is not None:
                    pager.close()
    finally:
        waiting.close()


def cmd_restore_into(args: argparse.Namespace) -> int:
    """`migrate restore FILE --into SOCK`: ask the VMM waiting there, print what it took."""
    if args.api or args.wait:
        raise UsageError("--into asks the VMM waiting at SOCK, which serves the guest: no --api or --wait here")
    if not Path(args.file).is_file():
        raise FileNotFoundError(f"{args.file}: no such snapshot file")
    request = request_of_args(args)
    sent_ns = time.monotonic_ns()
    result = expect(call(args.into, "restore", timeout=RESTORE_TIMEOUT, **request_arguments(request)), args.into,
                    "restore", TIMINGS_FIELDS)
    answered_ns = time.monotonic_ns()
    result["sent_to_first_kvm_run_ms"] = (result["first_kvm_run_ns"] - sent_ns) / 1e6  # this command's view
    result["answered_ms"] = (answered_ns - sent_ns) / 1e6
    if args.json:
        print_json(result)
    else:
        timings = RestoreTimings(**{name: result[name] for name in TIMINGS_FIELDS})
        results.print(Text(f"restored {request.path} into {args.into}: {timings.summary()}; "
                           f"{result['sent_to_first_kvm_run_ms']:.2f} ms after this command sent it, "
                           f"answered after {result['answered_ms']:.2f} ms"))
    return ExitStatus.OK


def cmd_restore_here(args: argparse.Namespace) -> int:
    """`migrate restore FILE`: restored in this process, run with the console attached."""
    console, watch = guest_console()
    with MachineRun(args.api) as run, Kvm() as kvm:  # the control socket claimed before the restore
        if not Path(args.file).is_file():  # the file named is not there: usage (2); a missing base is a refusal (3)
            raise FileNotFoundError(f"{args.file}: no such snapshot file")
        machine, timings = restore_and_resume(request_of_args(args), kvm, run, console=console, watch=watch,
                                              virtio_console=LineConsole(), started_ns=time.monotonic_ns())
        lazily = " (lazily: no page read before it ran)" if args.lazy else ""
        say("migrate", f"restored {args.file}{lazily}: {timings.summary()}")
        pager = lazy_restore_of(machine)
        try:
            status = run_machine(machine, run, timeout=args.timeout, start=False)
        finally:
            if pager is not None:
                pager.close()
    result = timings.as_dict()
    if pager is not None:
        stats = pager.stats()
        result["lazy"] = stats.as_dict()
        if stats.error is not None:  # a corrupt page (named on stderr as it was found)
            status = ExitStatus.FAILED
    if args.json:  # after the run: stdout carried the guest's console until then
        print_json(result)
    return status
