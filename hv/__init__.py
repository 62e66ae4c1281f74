"""hv: a KVM hypervisor layer for Python.

Layers, lowest first: `hv.binding.build` (cffi, from <linux/kvm.h>) -> `hv.binding.fds` (one method per ioctl)
-> `hv.kvm.vm` / `hv.kvm.vcpu` / `hv.kvm.memory` (the x86 platform) -> `hv.vmm.machine` (vCPU threads, lifecycle)
-> `hv.vmm.builder` (a bootable machine from a kernel image). hv knows nothing of snapshots or migration.
"""

from hv.errors import HvError
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.kvm.vcpu import Vcpu
from hv.kvm.vm import Vm, VmConfig
from hv.vmm.machine import Machine, RunState

__all__ = ["HvError", "Kvm", "Machine", "RunState", "GuestMemory", "MemoryRegion", "Vcpu", "Vm", "VmConfig"]
