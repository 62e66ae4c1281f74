"""hv: a KVM hypervisor layer for Python.

Layers, lowest first (hv/DESIGN.md has the map of which module owns what): `hv.binding` (cffi
from <linux/kvm.h>, one method per ioctl) -> `hv.kvm` (`Kvm`, `Vm`, `Vcpu`, guest memory: KVM
with its x86 set-up) -> `hv.platform` (firmware tables, allocation) -> `hv.boot` (kernel loaders)
-> `hv.devices` -> `hv.guests` (the built-in guest's host side) -> `hv.vmm` (`Machine`, the
builder, the control socket, `hv run`). hv knows nothing of snapshots or migration.
"""

from hv.errors import HvError
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.kvm.vcpu import Vcpu
from hv.kvm.vm import Vm, VmConfig
from hv.vmm.machine import Machine, RunState

__all__ = ["HvError", "Kvm", "Machine", "RunState", "GuestMemory", "MemoryRegion", "Vcpu", "Vm", "VmConfig"]
