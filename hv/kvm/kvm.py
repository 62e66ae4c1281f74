"""The entry point: `Kvm` opens /dev/kvm, reports what it can do, and creates VMs."""

from __future__ import annotations

import threading
from functools import cached_property
from typing import TYPE_CHECKING

from hv.binding import structconv
from hv.binding.fds import KvmFd
from hv.kvm.capabilities import PlatformCapabilities
from hv.kvm.state import CpuidEntry
from hv.kvm.vm import MemoryBacking, Vm, VmConfig

if TYPE_CHECKING:
    from hv.kvm.vcpu import Vcpu


class Kvm:
    """The hypervisor: one open /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = KvmFd(path)
        self.capabilities = PlatformCapabilities.probe(self.fd)
        self._saveable_msrs: tuple[int, ...] | None = None
        self._lock = threading.Lock()

    @cached_property
    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        cpuid = self.fd.get_supported_cpuid()
        return tuple(structconv.from_struct(CpuidEntry, cpuid.entries[i]) for i in range(cpuid.nent))

    @cached_property
    def guest_cpuid(self) -> tuple[CpuidEntry, ...]:
        """The CPUID a vCPU of this host reports once set up (KVM_GET_CPUID2 after our setup).

        Some hosts report more than KVM_GET_SUPPORTED_CPUID lists (nested PVM reports the host's
        own features), so a guest's saved CPUID is compared with this, measured the same way, on a
        throwaway VM (never the one a restore is about to fill)."""
        from hv.kvm.cpuid import vcpu_cpuid
        from hv.kvm.vm import VmConfig

        with self.create_vm(VmConfig(mem_size=1 << 20, irqchip=True, pit=False)) as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.setup(vcpu_cpuid(self.supported_cpuid, 0, 1))
            return vcpu.cpuid

    @cached_property
    def msr_index_list(self) -> tuple[int, ...]:
        """MSRs KVM lists as saved/restored state (KVM_GET_MSR_INDEX_LIST)."""
        return tuple(self.fd.get_msr_index_list())

    def saveable_msrs(self, vcpu: Vcpu) -> tuple[int, ...]:
        """The listed MSRs that a vCPU of this host actually lets us read.

        KVM_GET_MSRS stops at the first MSR it refuses and returns how many it read; such MSRs are
        dropped one at a time. Probed once per host (the answer depends on the host CPU and the
        guest CPUID we give every vCPU, which is the same for all VMs we build).
        """
        with self._lock:
            if self._saveable_msrs is None:
                candidates = list(self.msr_index_list)
                while True:
                    msrs = vcpu._msr_buffer(candidates)
                    n = vcpu.fd.get_msrs(msrs)
                    if n == len(candidates):
                        break
                    del candidates[n]
                self._saveable_msrs = tuple(candidates)
            return self._saveable_msrs

    def create_vm(self, config: VmConfig | None = None, *, backing: MemoryBacking | None = None) -> Vm:
        """A VM with its platform set up and RAM mapped; vCPUs come from `Vm.create_vcpu`.

        `backing(guest_base, size)` may supply each RAM region's mapping (say, a snapshot file
        mapped MAP_PRIVATE, so pages load lazily on first touch); by default RAM is anonymous.
        """
        config = config or VmConfig()
        config.validate(self.capabilities)
        vm = Vm(self, self.fd.create_vm(), config)
        try:
            vm.setup_platform(backing)
        except BaseException:
            vm.close()
            raise
        return vm

    def close(self) -> None:
        self.fd.close()

    def __enter__(self) -> Kvm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
