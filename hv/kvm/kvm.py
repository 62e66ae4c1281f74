"""The entry point: `Kvm` opens /dev/kvm, reports what it can do, and creates VMs."""

from __future__ import annotations

from functools import cached_property

from hv.binding import structconv
from hv.binding.fds import KvmFd
from hv.kvm.capabilities import PlatformCapabilities
from hv.kvm.cpuid import vcpu_cpuid
from hv.kvm.state import CpuidEntry
from hv.kvm.vcpu import SaveableMsrs
from hv.kvm.vm import MemoryBacking, Vm, VmConfig


class Kvm:
    """The hypervisor: one open /dev/kvm."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        self.fd = KvmFd(path)
        self.capabilities = PlatformCapabilities.probe(self.fd)
        # probed on the first vCPU that saves its state, then the same for every VM of this host
        self.saveable_msrs = SaveableMsrs(lambda: self.msr_index_list)

    @cached_property
    def supported_cpuid(self) -> tuple[CpuidEntry, ...]:
        cpuid = self.fd.get_supported_cpuid()
        return tuple(structconv.from_struct(CpuidEntry, cpuid.entries[i]) for i in range(cpuid.nent))

    @property
    def guest_cpuid(self) -> tuple[CpuidEntry, ...]:
        """The CPUID a vCPU of this host reports once set up (KVM_GET_CPUID2 after our setup).

        Some hosts report more than KVM_GET_SUPPORTED_CPUID lists (nested PVM reports the host's
        own features), so a guest's saved CPUID is compared with this, measured the same way, on a
        throwaway VM (never the one a restore is about to fill)."""
        return self._probed_vcpu[0]

    @property
    def vcpu_tsc_khz(self) -> int:
        """The TSC rate a new vCPU of this host runs at (KVM_GET_TSC_KHZ), measured on the same
        throwaway VM: a guest from elsewhere needs it, or KVM's TSC scaling (`tsc_control`)."""
        return self._probed_vcpu[1]

    @cached_property
    def _probed_vcpu(self) -> tuple[tuple[CpuidEntry, ...], int]:
        with self.create_vm(VmConfig(mem_size=1 << 20, irqchip=True, pit=False)) as vm:
            vcpu = vm.create_vcpu(0)
            vcpu.setup(vcpu_cpuid(self.supported_cpuid, 0, 1))
            return vcpu.cpuid, vcpu.fd.get_tsc_khz()

    @cached_property
    def msr_index_list(self) -> tuple[int, ...]:
        """MSRs KVM lists as saved/restored state (KVM_GET_MSR_INDEX_LIST)."""
        return tuple(self.fd.get_msr_index_list())

    def create_vm(self, config: VmConfig | None = None, *, backing: MemoryBacking | None = None) -> Vm:
        """A VM with its platform set up and RAM mapped; vCPUs come from `Vm.create_vcpu`.

        `backing(guest_base, size)` may supply each RAM region's mapping (say, a snapshot file
        mapped MAP_PRIVATE, so pages load lazily on first touch); by default RAM is anonymous.
        """
        config = config or VmConfig()
        config.validate(self.capabilities)
        vm = Vm(self.fd.create_vm(), config, self.capabilities, self.saveable_msrs)
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
