"""What this host's KVM can do, read once as a typed record."""

from __future__ import annotations

from dataclasses import dataclass

from hv.binding.fds import KvmFd
from hv.binding.ffi import lib


@dataclass(frozen=True)
class PlatformCapabilities:
    api_version: int
    vcpu_mmap_size: int
    max_vcpus: int
    recommended_vcpus: int
    max_vcpu_id: int
    max_memslots: int
    user_memory: bool
    readonly_mem: bool
    irqchip: bool
    split_irqchip: bool
    pit2: bool
    irqfd: bool
    ioeventfd: bool
    signal_msi: bool
    set_tss_addr: bool
    set_identity_map_addr: bool
    immediate_exit: bool
    manual_dirty_log_protect: int  # KVM_DIRTY_LOG_* flags the host accepts; 0 = not available
    dirty_log_ring_bytes: int  # largest dirty ring; 0 = not available
    xsave: bool
    xsave_size: int  # bytes of the KVM_GET_XSAVE2 buffer (>= 4096 when xsave)
    xcrs: bool
    vcpu_events: bool
    debugregs: bool
    mp_state: bool
    adjust_clock: bool
    tsc_control: bool
    get_tsc_khz: bool
    kvmclock_ctrl: bool
    tsc_deadline_timer: bool

    @classmethod
    def probe(cls, kvm: KvmFd) -> PlatformCapabilities:
        def cap(name: str) -> int:
            return kvm.check_extension(getattr(lib, name))

        xsave = bool(cap("KVM_CAP_XSAVE"))
        xsave2 = cap("KVM_CAP_XSAVE2")
        max_vcpus = cap("KVM_CAP_MAX_VCPUS") or cap("KVM_CAP_NR_VCPUS") or 4
        return cls(
            api_version=kvm.get_api_version(),
            vcpu_mmap_size=kvm.get_vcpu_mmap_size(),
            max_vcpus=max_vcpus,
            recommended_vcpus=cap("KVM_CAP_NR_VCPUS") or 4,
            max_vcpu_id=cap("KVM_CAP_MAX_VCPU_ID") or max_vcpus,
            max_memslots=cap("KVM_CAP_NR_MEMSLOTS") or 32,
            user_memory=bool(cap("KVM_CAP_USER_MEMORY")),
            readonly_mem=bool(cap("KVM_CAP_READONLY_MEM")),
            irqchip=bool(cap("KVM_CAP_IRQCHIP")),
            split_irqchip=bool(cap("KVM_CAP_SPLIT_IRQCHIP")),
            pit2=bool(cap("KVM_CAP_PIT2")),
            irqfd=bool(cap("KVM_CAP_IRQFD")),
            ioeventfd=bool(cap("KVM_CAP_IOEVENTFD")),
            signal_msi=bool(cap("KVM_CAP_SIGNAL_MSI")),
            set_tss_addr=bool(cap("KVM_CAP_SET_TSS_ADDR")),
            set_identity_map_addr=bool(cap("KVM_CAP_SET_IDENTITY_MAP_ADDR")),
            immediate_exit=bool(cap("KVM_CAP_IMMEDIATE_EXIT")),
            manual_dirty_log_protect=cap("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"),
            dirty_log_ring_bytes=cap("KVM_CAP_DIRTY_LOG_RING"),
            xsave=xsave,
            xsave_size=max(xsave2, 4096) if xsave else 0,
            xcrs=bool(cap("KVM_CAP_XCRS")),
            vcpu_events=bool(cap("KVM_CAP_VCPU_EVENTS")),
            debugregs=bool(cap("KVM_CAP_DEBUGREGS")),
            mp_state=bool(cap("KVM_CAP_MP_STATE")),
            adjust_clock=bool(cap("KVM_CAP_ADJUST_CLOCK")),
            tsc_control=bool(cap("KVM_CAP_TSC_CONTROL")),
            get_tsc_khz=bool(cap("KVM_CAP_GET_TSC_KHZ")),
            kvmclock_ctrl=bool(cap("KVM_CAP_KVMCLOCK_CTRL")),
            tsc_deadline_timer=bool(cap("KVM_CAP_TSC_DEADLINE_TIMER")),
        )
