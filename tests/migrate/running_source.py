"""The source the live-migration tests start from: the built-in guest running its workload."""

from __future__ import annotations

import time
from collections.abc import Callable

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.machine import Machine, RunState
from migrate.events import ProgressEvent, RoundSent

MiB = 1 << 20
CONFIG = VmConfig(mem_size=64 * MiB)


def running_source(kvm: Kvm, ws: int = 8, rate: int = 40) -> tuple[Machine, bg.GuestConsole]:
    """A 64 MiB guest dirtying `ws` MiB at `rate` MiB/s, past its first pass."""
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=ws, rate_mib_s=rate), CONFIG, console)
    machine.start()
    console.wait_pass(1, timeout=30)
    return machine, console


def wait_guest_pass(machine: Machine, passes: int, timeout: float = 30) -> None:
    """Until the running guest's status page counts `passes` passes (read from its memory)."""
    deadline = time.monotonic() + timeout
    while bg.read_status(machine.vm.memory).passes < passes:
        assert time.monotonic() < deadline, f"fewer than {passes} passes in {timeout} s"
        time.sleep(0.01)  # polling interval only; the verdict is the guest's own count


def a_pass_per_round(machine: Machine) -> Callable[[ProgressEvent], None]:
    """A progress callback: at the end of each round (before the source fetches the dirty log)
    it waits for the guest to finish one more pass, so every round leaves the whole working set
    dirty, on any host."""
    def wait(p: ProgressEvent) -> None:
        if isinstance(p, RoundSent) and machine.state is RunState.RUNNING:  # not the paused final copy
            wait_guest_pass(machine, bg.read_status(machine.vm.memory).passes + 1)
    return wait
