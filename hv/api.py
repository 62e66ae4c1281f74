"""The seed interfaces as Protocols: what the project was made from, each method with its home here.

kvmigrate was made from three sets of traits, and every method of theirs has an implementation in
hv, a test on real KVM, and a row in `hv/DESIGN.md`'s seed table:

- arcbox's hypervisor traits (arcbox-hypervisor `traits.rs`: `Hypervisor`, `VirtualMachine`,
  `Vcpu`, `GuestMemory`) and its KVM backend's VM (`linux/vm.rs`, `KvmVm`);
- axvcpu's `AxArchVCpu` (an architecture's vCPU, as a hypervisor drives it);
- crosvm's `LinuxArch` (arch crate: how an architecture lays out and builds a VM).

The names here are the seeds' names; a method takes hv's name where hv had one before (arcbox's
`snapshot`/`restore` are `Persist`'s `save`/`restore`, its `id` is `vcpu_id`), and each docstring
says which seed method it mirrors. Where KVM puts a seed method on another object than the seed
does, the Protocol follows KVM: arcbox's `VirtualMachine` is split between the VM file descriptor
(`VirtualMachine`: memory, vCPUs, interrupts, dirty log) and the machine that runs its vCPU
threads and devices (`RunnableVirtualMachine`: start, pause, devices); arcbox's `GuestMemory`
dirty tracking is a VM ioctl, so it is `VirtualMachine`'s; axvcpu's `new` and `set_ept_root` are
VM operations under KVM (KVM_CREATE_VCPU; KVM builds the EPT/NPT from the memory slots), so they
are `VirtualMachine.create_vcpu` and `VirtualMachine.add_memory_region`.

`hv.conformance` assigns the concrete classes to these types, so a type checker holds them to it.
Only types are imported here: the module costs nothing at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import mmap

    from hv.kvm.capabilities import PlatformCapabilities
    from hv.kvm.dirty import DirtyBitmap
    from hv.kvm.exits import VcpuExit
    from hv.kvm.kvm import Kvm
    from hv.kvm.memory import MemoryRegion, RamBacking
    from hv.kvm.state import CpuidEntry, Msr, Regs, VcpuState, VmState
    from hv.kvm.vcpu import Vcpu as KvmVcpu
    from hv.kvm.vm import MemoryBacking, Vm, VmConfig
    from hv.platform.allocator import SystemAllocator
    from hv.platform.hostcpu import Unknown
    from hv.vmm.builder import ArchMemoryLayout, VirtioConfig
    from hv.vmm.machine import RunState
    from hv.vmm.placement import DevicePlacement, VirtioDeviceSpec


class GuestMemory(Protocol):
    """arcbox `GuestMemory`: guest physical memory, read and written by the VMM."""

    def read(self, address: int, length: int) -> bytes:
        """arcbox GuestMemory::read (the bytes returned rather than a buffer filled)."""
        ...

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """arcbox GuestMemory::write (dirty-tracked: the VMM's own writes count as dirty)."""
        ...

    def host_address(self, address: int) -> int:
        """arcbox GuestMemory::get_host_address: where a guest address is mapped in this process."""
        ...

    @property
    def total_size(self) -> int:
        """arcbox GuestMemory::size: the bytes of RAM, all regions."""
        ...

    def dump_all(self) -> Iterator[tuple[int, memoryview]]:
        """arcbox GuestMemory::dump_all: every region as (guest base, zero-copy view)."""
        ...


class Vcpu(Protocol):
    """arcbox `Vcpu`: one virtual CPU, run by the caller's thread until an exit."""

    @property
    def vcpu_id(self) -> int:
        """arcbox Vcpu::id."""
        ...

    def run(self, park: Any = ...) -> VcpuExit:
        """arcbox Vcpu::run (and axvcpu AxArchVCpu::run): enter the guest until an exit the VMM
        must handle, as a typed exit."""
        ...

    def get_regs(self) -> Regs:
        """arcbox Vcpu::get_regs."""
        ...

    def set_regs(self, regs: Regs) -> None:
        """arcbox Vcpu::set_regs."""
        ...

    def set_io_result(self, data: bytes) -> None:
        """arcbox Vcpu::set_io_result: the bytes an IoIn exit reads (size * count of them)."""
        ...

    def set_mmio_result(self, data: bytes) -> None:
        """arcbox Vcpu::set_mmio_result: the bytes an MmioRead exit reads."""
        ...

    def save(self) -> VcpuState:
        """arcbox Vcpu::snapshot: the complete architectural state (`persist.Persist.save`)."""
        ...

    def restore(self, state: VcpuState) -> None:
        """arcbox Vcpu::restore: the state put back, validated first (`persist.Persist.restore`)."""
        ...


class AxArchVCpu(Protocol):
    """axvcpu `AxArchVCpu`: the vCPU as a hypervisor core drives it. `new` is
    `VirtualMachine.create_vcpu`; `set_ept_root` is `VirtualMachine.add_memory_region` (KVM keeps
    the second-level page tables and builds them from the memory slots)."""

    def set_entry(self, address: int) -> None:
        """AxArchVCpu::set_entry: the guest address the vCPU starts at (RIP)."""
        ...

    def setup(self, cpuid: Sequence[CpuidEntry], msrs: Sequence[Msr] = ()) -> None:
        """AxArchVCpu::setup: the architecture-specific set-up before the first run (CPUID,
        boot MSRs)."""
        ...

    def run(self, park: Any = ...) -> VcpuExit:
        """AxArchVCpu::run."""
        ...

    def bind(self, host_cpu: int) -> None:
        """AxArchVCpu::bind: the vCPU to a physical CPU (its thread pinned to `host_cpu`)."""
        ...

    def unbind(self) -> None:
        """AxArchVCpu::unbind: free to run on any CPU of this process again."""
        ...

    def set_gpr(self, index: int, value: int) -> None:
        """AxArchVCpu::set_gpr: general-purpose register `index` (0 RAX ... 15 R15)."""
        ...

    def inject_interrupt(self, vector: int) -> None:
        """AxArchVCpu::inject_interrupt: `vector` delivered to this vCPU's local APIC."""
        ...

    def set_return_value(self, value: int) -> None:
        """AxArchVCpu::set_return_value: what the exit the VMM handled returns to the guest
        (an IN's or MMIO read's value; otherwise RAX)."""
        ...


class VirtualCpu(Vcpu, AxArchVCpu, Protocol):
    """What `VirtualMachine.create_vcpu` returns: arcbox's `Vcpu` and axvcpu's `AxArchVCpu` in one."""


class VirtualMachine(Protocol):
    """arcbox `VirtualMachine`, its VM-file-descriptor half, with arcbox's `linux/vm.rs` (`KvmVm`):
    memory, vCPUs, interrupt lines and irqfds, memory slots, the dirty log, the VM-wide state."""

    @property
    def memory(self) -> GuestMemory:
        """arcbox VirtualMachine::memory."""
        ...

    def create_vcpu(self, vcpu_id: int) -> VirtualCpu:
        """arcbox VirtualMachine::create_vcpu (and axvcpu AxArchVCpu::new)."""
        ...

    @property
    def vcpu_count(self) -> int:
        """arcbox VirtualMachine::vcpu_count."""
        ...

    def is_managed_execution(self) -> bool:
        """arcbox VirtualMachine::is_managed_execution: False under KVM (the caller runs vCPUs)."""
        ...

    def set_irq_line(self, irq: int, level: bool) -> None:
        """linux/vm.rs KvmVm::set_irq_line: an interrupt line raised or lowered."""
        ...

    def trigger_edge_irq(self, irq: int) -> None:
        """linux/vm.rs KvmVm::trigger_edge_irq: the line raised then lowered."""
        ...

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """linux/vm.rs KvmVm::register_irqfd: `gsi` raised by a write to `eventfd`; with
        `resample_fd`, level-triggered (KVM_IRQFD_FLAG_RESAMPLE)."""
        ...

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        """linux/vm.rs KvmVm::unregister_irqfd."""
        ...

    def add_memory_region(self, guest_base: int, size: int, *, readonly: bool = False,
                          backing: mmap.mmap | RamBacking | None = None) -> MemoryRegion:
        """linux/vm.rs KvmVm::add_memory_region (and axvcpu AxArchVCpu::set_ept_root)."""
        ...

    def remove_memory_region(self, region: MemoryRegion) -> None:
        """linux/vm.rs KvmVm::remove_memory_region."""
        ...

    def enable_dirty_log(self) -> None:
        """arcbox GuestMemory::enable_dirty_tracking, linux/vm.rs KvmVm::enable_dirty_tracking."""
        ...

    def disable_dirty_log(self) -> None:
        """arcbox GuestMemory::disable_dirty_tracking, linux/vm.rs KvmVm::disable_dirty_tracking."""
        ...

    def fetch_dirty_logs(self) -> Iterator[tuple[MemoryRegion, DirtyBitmap]]:
        """arcbox GuestMemory::get_dirty_pages, linux/vm.rs KvmVm::get_dirty_pages: what was
        written since the last fetch, per region, as bitmaps (merged into runs, not pages)."""
        ...

    def save(self) -> VmState:
        """The VM-wide state (irqchip, PIT, clock): arcbox's VM snapshot, KVM's part of it."""
        ...

    def restore(self, state: VmState) -> None:
        """The VM-wide state put back, validated first."""
        ...

    def close(self) -> None:
        """linux/vm.rs `impl Drop for KvmVm`."""
        ...


class RunnableVirtualMachine(Protocol):
    """arcbox `VirtualMachine`, its running half: devices added before it starts, the lifecycle
    (linux/vm.rs's `VmState`: created, running, paused, stopped), device state."""

    def add_virtio_device(self, spec: VirtioDeviceSpec, transport: str = "mmio") -> DevicePlacement:
        """arcbox VirtualMachine::add_virtio_device: a device of a declared kind, before start."""
        ...

    def start(self, *, paused: bool = False) -> None:
        """arcbox VirtualMachine::start."""
        ...

    def pause(self, timeout: float = 5.0) -> float:
        """arcbox VirtualMachine::pause (really stops the guest: no half-done instruction)."""
        ...

    def resume(self, *, wait_running: bool = False, timeout: float = 5.0) -> float:
        """arcbox VirtualMachine::resume."""
        ...

    def stop(self, timeout: float = 5.0) -> None:
        """arcbox VirtualMachine::stop."""
        ...

    @property
    def state(self) -> RunState:
        """linux/vm.rs KvmVm::state."""
        ...

    def snapshot_devices(self) -> dict[str, Any]:
        """arcbox VirtualMachine::snapshot_devices."""
        ...

    def restore_devices(self, states: dict[str, Any]) -> None:
        """arcbox VirtualMachine::restore_devices."""
        ...


class Hypervisor(Protocol):
    """arcbox `Hypervisor`: the entry point, one per host."""

    @property
    def capabilities(self) -> PlatformCapabilities:
        """arcbox Hypervisor::capabilities."""
        ...

    def create_vm(self, config: VmConfig | None = None, *, backing: MemoryBacking | None = None) -> VirtualMachine:
        """arcbox Hypervisor::create_vm."""
        ...


class LinuxArch(Protocol):
    """crosvm `LinuxArch`: how an architecture lays out, builds and configures a VM, and what it
    knows of the host's CPUs. Implemented by `hv.vmm.builder.X8664Arch` (crosvm's X8664arch)."""

    def arch_memory_layout(self, config: VmConfig) -> ArchMemoryLayout:
        """LinuxArch::arch_memory_layout: the fixed places (MMIO hole, device window, TSS)."""
        ...

    def guest_memory_layout(self, config: VmConfig, layout: ArchMemoryLayout) -> list[tuple[int, int]]:
        """LinuxArch::guest_memory_layout: (guest base, size) of each RAM region."""
        ...

    def get_system_allocator_config(self, vm: Vm) -> SystemAllocator:
        """LinuxArch::get_system_allocator_config: the ports, MMIO and IRQs devices get."""
        ...

    def build_vm(self, kvm: Kvm, config: VmConfig, console: Callable[[bytes], None] = ...,
                 virtio: VirtioConfig | None = None) -> RunnableVirtualMachine:
        """LinuxArch::build_vm: a machine (VM, vCPUs, devices) ready to load a kernel into."""
        ...

    def configure_vcpu(self, kvm: Kvm, vcpu: KvmVcpu, vcpu_id: int, num_cpus: int) -> None:
        """LinuxArch::configure_vcpu: a vCPU's CPUID and boot MSRs."""
        ...

    def register_pci_device(self, machine: Any, device: Any) -> Any:
        """LinuxArch::register_pci_device: a PCI device configured (BARs, INTx, MSI-X) and added
        to the machine's bus; its address returned."""
        ...

    def get_host_cpu_frequencies_khz(self) -> dict[int, tuple[int, ...]] | Unknown:
        """LinuxArch::get_host_cpu_frequencies_khz: each host CPU's frequencies."""
        ...

    def get_host_cpu_max_freq_khz(self) -> dict[int, int] | Unknown:
        """LinuxArch::get_host_cpu_max_freq_khz."""
        ...

    def get_host_cpu_capacity(self) -> dict[int, int] | Unknown:
        """LinuxArch::get_host_cpu_capacity: relative capacity, 1024 the biggest core."""
        ...

    def get_host_cpu_clusters(self) -> tuple[tuple[int, ...], ...] | Unknown:
        """LinuxArch::get_host_cpu_clusters: the host CPUs grouped by cluster."""
        ...
