"""hv: a KVM hypervisor layer for Python.

Layers, lowest first: `hv._kvm_build` (cffi, from <linux/kvm.h>) -> `hv.kvm` (one method per ioctl)
-> `hv.vm` / `hv.vcpu` / `hv.memory` (the x86 platform) -> `hv.machine` (vCPU threads, lifecycle)
-> `hv.builder` (a bootable machine from a kernel image). hv knows nothing of snapshots or migration.
"""

from hv.errors import HvError
from hv.hypervisor import Kvm
from hv.machine import Machine, RunState
from hv.memory import GuestMemory, MemoryRegion
from hv.vcpu import Vcpu
from hv.vm import Vm, VmConfig

__all__ = ["HvError", "Kvm", "Machine", "RunState", "GuestMemory", "MemoryRegion", "Vcpu", "Vm", "VmConfig"]
