"""Plain-data state of vCPUs and of the VM's in-kernel devices.

These frozen dataclasses are the one schema for each state type: `hv.binding.structconv` maps them to and
from the kernel structs, and `formats` encodes them from their annotations. Field names follow the
kernel's (`<asm/kvm.h>`), so the api.rst text applies to them as written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hv.binding.ffi import lib
from hv.kvm.xsave import XsaveLayout

# --- general purpose and system registers ------------------------------------------------------


@dataclass(frozen=True)
class Regs:
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0
    rflags: int = 0x2  # bit 1 is reserved and always set


@dataclass(frozen=True)
class Segment:
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int
    g: int
    avl: int
    unusable: int


@dataclass(frozen=True)
class DescriptorTable:
    base: int
    limit: int


@dataclass(frozen=True)
class Sregs:
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DescriptorTable
    idt: DescriptorTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    interrupt_bitmap: tuple[int, ...]


@dataclass(frozen=True)
class Fpu:
    fpr: bytes  # 8 x 16 bytes
    fcw: int
    fsw: int
    ftwx: int
    last_opcode: int
    last_ip: int
    last_dp: int
    xmm: bytes  # 16 x 16 bytes
    mxcsr: int


@dataclass(frozen=True)
class Xcr:
    xcr: int
    value: int


@dataclass(frozen=True)
class Msr:
    index: int
    data: int


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@dataclass(frozen=True)
class DebugRegs:
    db: tuple[int, ...]
    dr6: int
    dr7: int
    flags: int


# --- pending events (struct kvm_vcpu_events) ---------------------------------------------------


@dataclass(frozen=True)
class ExceptionEvent:
    injected: int
    nr: int
    has_error_code: int
    pending: int
    error_code: int


@dataclass(frozen=True)
class InterruptEvent:
    injected: int
    nr: int
    soft: int
    shadow: int


@dataclass(frozen=True)
class NmiEvent:
    injected: int
    pending: int
    masked: int


@dataclass(frozen=True)
class SmiEvent:
    smm: int
    pending: int
    smm_inside_nmi: int
    latched_init: int


@dataclass(frozen=True)
class VcpuEvents:
    exception: ExceptionEvent
    interrupt: InterruptEvent
    nmi: NmiEvent
    sipi_vector: int
    flags: int
    smi: SmiEvent
    triple_fault_pending: int = field(metadata={"c": "triple_fault.pending"})
    exception_has_payload: int
    exception_payload: int


def lapic_registers(lapic: bytes) -> tuple[int, ...]:
    """The architectural LAPIC registers in a KVM_GET_LAPIC page: 32 bits at every 16-byte
    offset. The bytes between them are reserved (the kernel may leave anything there), so compare
    LAPIC states through this, not byte for byte."""
    return tuple(int.from_bytes(lapic[off : off + 4], "little") for off in range(0, len(lapic), 16))


# --- the whole vCPU ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VcpuState:
    """Everything KVM lets userspace read about one x86 vCPU.

    `xsave` includes the legacy FPU/SSE area; `fpu` is kept as well because KVM_SET_FPU is the
    only path on hosts without XSAVE. The TSC is among `msrs` (IA32_TSC), `tsc_khz` is its rate.
    """

    vcpu_id: int
    cpuid: tuple[CpuidEntry, ...]
    mp_state: int
    regs: Regs
    sregs: Sregs
    fpu: Fpu
    xsave: bytes
    xcrs: tuple[Xcr, ...]
    debug_regs: DebugRegs
    lapic: bytes
    msrs: tuple[Msr, ...]
    events: VcpuEvents
    tsc_khz: int


# --- VM-wide in-kernel devices -----------------------------------------------------------------


@dataclass(frozen=True)
class PicState:
    last_irr: int
    irr: int
    imr: int
    isr: int
    priority_add: int
    irq_base: int
    read_reg_select: int
    poll: int
    special_mask: int
    init_state: int
    auto_eoi: int
    rotate_on_auto_eoi: int
    special_fully_nested_mode: int
    init4: int
    elcr: int
    elcr_mask: int


@dataclass(frozen=True)
class IoapicState:
    base_address: int
    ioregsel: int
    id: int
    irr: int
    redirtbl: tuple[int, ...] = field(metadata={"c": None})  # 24 raw 64-bit entries


@dataclass(frozen=True)
class IrqchipState:
    pic_master: PicState
    pic_slave: PicState
    ioapic: IoapicState


@dataclass(frozen=True)
class PitChannelState:
    count: int
    latched_count: int
    count_latched: int
    status_latched: int
    status: int
    read_state: int
    write_state: int
    write_latch: int
    rw_mode: int
    mode: int
    bcd: int
    gate: int
    count_load_time: int


@dataclass(frozen=True)
class PitState:
    channels: tuple[PitChannelState, ...]
    flags: int


@dataclass(frozen=True)
class ClockState:
    """kvmclock: nanoseconds of guest time, as KVM_GET_CLOCK reports it."""

    clock: int
    flags: int


@dataclass(frozen=True)
class VmState:
    """The VM-wide state outside guest memory and outside the vCPUs."""

    irqchip: IrqchipState | None
    pit: PitState | None
    clock: ClockState


# --- comparing states by meaning ---------------------------------------------------------------

# MSRs whose value moves with time between a save and a later read: the TSC and what counts or
# fires by it, and kvmclock's registrations (KVM rewrites them as it updates the guest's clock).
MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_IA32_MPERF, MSR_IA32_APERF = 0x10, 0x6E0, 0xE7, 0xE8
MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME = lib.MSR_KVM_WALL_CLOCK, lib.MSR_KVM_SYSTEM_TIME
MSR_KVM_WALL_CLOCK_NEW, MSR_KVM_SYSTEM_TIME_NEW = lib.MSR_KVM_WALL_CLOCK_NEW, lib.MSR_KVM_SYSTEM_TIME_NEW
TIME_MSRS = frozenset({MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE, MSR_IA32_MPERF, MSR_IA32_APERF,
                       MSR_KVM_WALL_CLOCK, MSR_KVM_SYSTEM_TIME, MSR_KVM_WALL_CLOCK_NEW,
                       MSR_KVM_SYSTEM_TIME_NEW})
LAPIC_TIMER_CURRENT_COUNT = 0x390  # counts down while the timer runs


def lapic_architectural(lapic: bytes) -> dict[int, int]:
    """The LAPIC's registers by offset, without the timer's current count (time moves it)."""
    return {off: value for off, value in zip(range(0, len(lapic), 16), lapic_registers(lapic))
            if off != LAPIC_TIMER_CURRENT_COUNT}


def vcpu_state_differences(a: VcpuState, b: VcpuState) -> list[str]:
    """Where two vCPU states differ in what the guest can observe, apart from the passing of time
    (the TSC and what follows it), by part name: `xsave.<component>`, `msr.<index>`, `lapic.<offset>`.

    Byte equality is the wrong test: KVM may report an XSAVE component in its init state as
    "init" on save and "in use" after restore (seen: PKRU on Intel), the LAPIC page has reserved
    gaps, and which MSRs and XSAVE components exist differs from CPU to CPU.
    """
    out = [part for part in ("vcpu_id", "cpuid", "mp_state", "regs", "sregs", "fpu", "xcrs",
                             "debug_regs", "events", "tsc_khz") if getattr(a, part) != getattr(b, part)]
    if a.xsave or b.xsave:
        out += [f"xsave.{name}" for name in XsaveLayout.from_cpuid(a.cpuid).differences(a.xsave, b.xsave)]
    la, lb = lapic_architectural(a.lapic), lapic_architectural(b.lapic)
    out += [f"lapic.{off:#x}" for off in sorted(la.keys() | lb.keys()) if la.get(off) != lb.get(off)]
    ma = {m.index: m.data for m in a.msrs if m.index not in TIME_MSRS}
    mb = {m.index: m.data for m in b.msrs if m.index not in TIME_MSRS}
    out += [f"msr.{i:#x}" for i in sorted(ma.keys() | mb.keys()) if ma.get(i) != mb.get(i)]
    return out
