"""What a restore is asked (`RestoreRequest`: the arguments `migrate restore` takes on its command
line, and a waiting VMM's `restore` on its control socket) and what it took (`RestoreTimings`).

One request type for both, calling the one `restore`: a way of restoring that `migrate restore`
learns (a lazy one, say) is a field here, and a waiting VMM (`migrate restore --wait`) takes it
too. The phases are those `restore` marks: the snapshot read and checked (everything a corrupt or
foreign snapshot is refused by, before any VM), the VM built (or the one built ahead taken), the
state applied, and the vCPUs back in KVM_RUN. "The first guest instruction" is when the last vCPU
thread left its park for KVM_RUN after the resume, as that thread saw it
(`Machine.unparked_ns`, CLOCK_MONOTONIC: another process on this host can subtract its own
`time.monotonic_ns()` from it).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig
from hv.vmm.machine import Machine
from migrate.snapshot.snapshots import RestorePhase, restore, snapshot
from migrate.snapshot.spare import MachineFactory, fresh_machine

log = logging.getLogger(__name__)

NS_PER_MS = 1_000_000
REHEARSALS = 8  # CPython 3.11 specializes a function's bytecode after it ran a few times


@dataclass(frozen=True)
class RestoreRequest:
    """`restore`'s arguments that say which snapshot and how (the rest is the VMM's own: its KVM,
    its consoles, how it builds the VM)."""

    path: Path
    disk: Path | None = None  # this host's file for the guest's virtio disk
    disk_dir: Path | None = None  # ... or the directory holding it by the snapshot's name for it
    share_memory: bool = False  # a mappable snapshot's .mem mapped, not copied
    verify_memory: bool = True  # the memory digest checked
    disk_from_snapshot: bool = False  # the named disk replaced by the snapshot's
    lazy: bool = False  # the guest run before its memory is read (`migrate.snapshot.lazy`)
    record_ms: int = 0  # with lazy: the pages touched in the first ms recorded into the snapshot

    def restore(self, kvm: Kvm, *, console: Callable[[bytes], None], virtio_console: Callable[[bytes], None],
                build: MachineFactory = fresh_machine, phase_done: Callable[[RestorePhase], None] | None = None,
                say_disk: Callable[[str], None] | None = None) -> Machine:
        """The snapshot restored into a paused machine (`migrate.snapshot.snapshots.restore`)."""
        return restore(self.path, kvm, console=console, virtio_console=virtio_console, disk=self.disk,
                       disk_dir=self.disk_dir, share_memory=self.share_memory, verify_memory=self.verify_memory,
                       disk_from_snapshot=self.disk_from_snapshot, lazy=self.lazy, record_ms=self.record_ms,
                       build=build, phase_done=phase_done, say_disk=say_disk or log.info)


@dataclass(frozen=True)
class RestoreTimings:
    """Where a restore's time went, in ms, from `started_ns` (a waiting VMM: the request's arrival;
    the command line: the restore's start, after the interpreter's) to the guest's first KVM_RUN."""

    path: str
    built_ahead: bool  # the VM was built before the restore was asked for (`SpareMachine`)
    read_check_ms: float  # the snapshot read and checked, its pages in staging memory
    build_ms: float  # the VM built, or the one built ahead taken (pages moved in, virtio added)
    apply_ms: float  # the state applied (vCPUs, VM, devices)
    resume_ms: float  # the run prepared (control context, console) and the vCPUs released
    first_kvm_run_ms: float  # from `started_ns` to the last vCPU entering KVM_RUN
    started_ns: int  # time.monotonic_ns()
    first_kvm_run_ns: int  # time.monotonic_ns(): when the last vCPU entered KVM_RUN

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        built = "a VM built ahead" if self.built_ahead else "a VM built on request"
        return (f"first guest instruction {self.first_kvm_run_ms:.2f} ms after the request (read and check "
                f"{self.read_check_ms:.2f}, build {self.build_ms:.2f} ({built}), apply {self.apply_ms:.2f}, "
                f"resume {self.resume_ms:.2f})")


@dataclass
class RestoreClock:
    """The phases' ends as `restore` marks them (`mark` is its `phase_done`), then `timings`."""

    started_ns: int
    marks: dict[RestorePhase, int] = field(default_factory=dict)

    def mark(self, phase: RestorePhase) -> None:
        self.marks[phase] = time.monotonic_ns()

    def timings(self, path: Path, machine: Machine, *, built_ahead: bool) -> RestoreTimings:
        """Once `machine` resumed with `wait_running`: its vCPUs' own time of entering KVM_RUN."""
        ran = machine.unparked_ns
        checked, built, applied = (self.marks[p] for p in ("checked", "built", "applied"))
        return RestoreTimings(
            str(path), built_ahead, read_check_ms=(checked - self.started_ns) / NS_PER_MS,
            build_ms=(built - checked) / NS_PER_MS, apply_ms=(applied - built) / NS_PER_MS,
            resume_ms=(ran - applied) / NS_PER_MS, first_kvm_run_ms=(ran - self.started_ns) / NS_PER_MS,
            started_ns=self.started_ns, first_kvm_run_ns=ran)


class _Rehearsed(Exception):
    """Raised where a rehearsal's restore would build its VM: everything before that ran."""


def _stop_short(kvm: Kvm, config: VmConfig, console: Callable[[bytes], None], *, virtio: VirtioConfig | None,
                staging: GuestMemory | None, shared: bool) -> Machine:
    raise _Rehearsed


def rehearse(kvm: Kvm, machine: Machine, rounds: int = REHEARSALS) -> None:
    """A restore's reading and checking, run `rounds` times before any request asks for one, over
    two snapshots of `machine` (a VM built ahead: blank, so they are small), compressed (checked
    whole) and mappable (mapped, unchecked), each stopping short of building a VM. The code a
    request runs is then warm: specialized by the interpreter, in the CPU's caches (a first request
    into a waiting VMM read and checked its snapshot in 3.1-4.8 ms without this, 2.6-3.7 with it;
    1 GiB, mappable, three runs each, 2026-12-08)."""
    with tempfile.TemporaryDirectory(prefix="kvmigrate-rehearsal-") as tmp:
        for mappable in (False, True):
            path = Path(tmp) / ("mappable.snap" if mappable else "full.snap")
            snapshot(machine, path, mappable=mappable)
            for _ in range(rounds):
                try:
                    restore(path, kvm, share_memory=mappable, verify_memory=not mappable, build=_stop_short)
                except _Rehearsed:
                    pass
