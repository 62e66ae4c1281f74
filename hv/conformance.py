"""The concrete classes held to the seed Protocols of `hv.api` by the type checker.

Each assignment below is checked statically (`mypy hv`): a method of a seed trait that goes
missing from its implementation here, or changes its shape, is a type error. Nothing runs at
import beyond building these few objects' types: the values are never created.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hv import api
    from hv.kvm.kvm import Kvm
    from hv.kvm.memory import GuestMemory
    from hv.kvm.vcpu import Vcpu
    from hv.kvm.vm import Vm
    from hv.vmm.builder import X8664Arch
    from hv.vmm.machine import Machine

    def _conforms(kvm: Kvm, vm: Vm, vcpu: Vcpu, memory: GuestMemory, machine: Machine) -> None:
        hypervisor: api.Hypervisor = kvm  # arcbox Hypervisor
        virtual_machine: api.VirtualMachine = vm  # arcbox VirtualMachine (VM fd half) + linux/vm.rs
        runnable: api.RunnableVirtualMachine = machine  # arcbox VirtualMachine (running half)
        arcbox_vcpu: api.Vcpu = vcpu  # arcbox Vcpu
        ax_vcpu: api.AxArchVCpu = vcpu  # axvcpu AxArchVCpu
        both: api.VirtualCpu = vcpu
        guest_memory: api.GuestMemory = memory  # arcbox GuestMemory
        linux_arch: api.LinuxArch = X8664Arch()  # crosvm LinuxArch
        del hypervisor, virtual_machine, runnable, arcbox_vcpu, ax_vcpu, both, guest_memory, linux_arch
