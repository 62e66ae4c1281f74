"""The source the live-migration tests start from: the built-in guest running its workload."""

from __future__ import annotations

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.machine import Machine

MiB = 1 << 20
CONFIG = VmConfig(mem_size=64 * MiB)


def running_source(kvm: Kvm, ws: int = 8, rate: int = 40) -> tuple[Machine, bg.GuestConsole]:
    """A 64 MiB guest dirtying `ws` MiB at `rate` MiB/s, past its first pass."""
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=ws, rate_mib_s=rate), CONFIG, console)
    machine.start()
    console.wait_pass(1, timeout=30)
    return machine, console
