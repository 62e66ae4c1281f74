"""A vCPU state against the x86-64 architecture's rules, as KVM would refuse it, before any VM
exists: `vcpu_problems(state, host_cpuid)` lists everything KVM_SET_REGS/SREGS/MSRS (or the first
VM entry) would refuse, as facts, and `check_vcpu` raises `StateRestoreError` with them.

Pure: no KVM, no ioctl. A snapshot's or a stream's vCPU state was written by someone else; a
value KVM refuses after the VM exists costs a built VM and an error of the wrong kind (a corrupt
snapshot exits 3, not 1), and a value cffi cannot even convert (a register past 64 bits) is an
`OverflowError`. The rules, from the SDM and KVM's `kvm_is_valid_sregs`, `kvm_is_valid_cr0/cr4`,
`kvm_set_apic_base` and `kvm_set_msr_common`:

- widths: every field fits its struct member (u64 registers, u16 selectors, u8 segment bits);
- CR0: no bit above 31, none reserved; PG needs PE; NW needs CD;
- CR4: only bits this CPU model may set: the base set, plus each feature bit (PKE, LA57, SMEP,
  PCIDE, ...) only where both the state's own CPUID and the host's KVM offer the feature (KVM
  reserves a bit the guest's CPUID lacks, and one its host lacks). Derived from CPUID, never a
  fixed list, so an Intel state with PKE and an AMD one without both pass where they can run;
- EFER: only SCE, LME, LMA, NXE, and SVME/FFXSR/TCE/AutoIBRS where the CPUID has them; LME with
  PG means long mode: PAE and LMA set, CR3 within MAXPHYADDR; else LMA clear and no 64-bit CS;
- canonical addresses (48 bits, 57 with CR4.LA57): RIP in 64-bit code (below 4 GiB outside it),
  segment and descriptor-table bases, and the MSRs KVM checks (LSTAR, CSTAR, SYSENTER_ESP/EIP,
  FS/GS/KERNEL_GS base);
- RFLAGS: bit 1 set, reserved bits clear; CR8 at most 15; a segment type fits 4 bits, DPL 2,
  CS not both L and D; APIC base: reserved bits clear, x2APIC only when enabled and offered;
- XCR0: x87 on, AVX with SSE, feature groups whole, only what CPUID leaf 0xD offers.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Protocol

from hv.errors import StateRestoreError
from hv.kvm.state import CpuidEntry, VcpuState

U8, U16, U32, U64 = (1 << 8) - 1, (1 << 16) - 1, (1 << 32) - 1, (1 << 64) - 1

CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1 << 0, 1 << 29, 1 << 30, 1 << 31
CR0_DEFINED = 0b1110_0000_0000_0101_0000_0000_0011_1111  # PE MP EM TS ET NE | WP | AM | NW CD PG
CR4_PAE, CR4_LA57 = 1 << 5, 1 << 12
CR4_BASE = 0x7FF  # VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT
EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
RFLAGS_FIXED1, RFLAGS_DEFINED = 1 << 1, 0x3F7FD7
APIC_BASE_BSP, APIC_BASE_EXTD, APIC_BASE_EN = 1 << 8, 1 << 10, 1 << 11

# (CPUID leaf, subleaf, register, bit) -> the CR4 bit it allows (KVM's __cr4_reserved_bits)
CR4_FEATURES: dict[tuple[int, int, str, int], int] = {
    (0x1, 0, "ecx", 26): 1 << 18,  # XSAVE -> OSXSAVE
    (0x1, 0, "ecx", 5): 1 << 13,  # VMX -> VMXE
    (0x1, 0, "ecx", 17): 1 << 17,  # PCID -> PCIDE
    (0x7, 0, "ebx", 0): 1 << 16,  # FSGSBASE
    (0x7, 0, "ebx", 7): 1 << 20,  # SMEP
    (0x7, 0, "ebx", 20): 1 << 21,  # SMAP
    (0x7, 0, "ecx", 2): 1 << 11,  # UMIP
    (0x7, 0, "ecx", 3): 1 << 22,  # PKU -> PKE
    (0x7, 0, "ecx", 16): CR4_LA57,  # LA57
    (0x7, 0, "ecx", 7): 1 << 23,  # CET_SS -> CET
    (0x7, 0, "edx", 20): 1 << 23,  # CET_IBT -> CET
    (0x7, 1, "eax", 26): 1 << 28,  # LAM -> LAM_SUP
}
EFER_FEATURES: dict[tuple[int, int, str, int], int] = {
    (0x80000001, 0, "edx", 29): EFER_LME | EFER_LMA,  # LM
    (0x80000001, 0, "edx", 20): EFER_NXE,  # NX
    (0x80000001, 0, "ecx", 2): 1 << 12,  # SVM -> SVME
    (0x80000001, 0, "edx", 25): 1 << 14,  # FFXSR
    (0x80000001, 0, "ecx", 17): 1 << 15,  # TCE
    (0x80000021, 0, "eax", 8): 1 << 21,  # AutoIBRS
}
X2APIC = (0x1, 0, "ecx", 21)

# MSRs whose value KVM_SET_MSRS refuses when it is not canonical
MSR_CANONICAL = {0x174: "SYSENTER_CS", 0x175: "SYSENTER_ESP", 0x176: "SYSENTER_EIP", 0xC0000082: "LSTAR",
                 0xC0000083: "CSTAR", 0xC0000100: "FS_BASE", 0xC0000101: "GS_BASE", 0xC0000102: "KERNEL_GS_BASE"}
MSR_CANONICAL.pop(0x174)  # (a selector, not an address)


def _has(cpuid: dict[tuple[int, int], CpuidEntry], feature: tuple[int, int, str, int]) -> bool:
    leaf, sub, reg, bit = feature
    entry = cpuid.get((leaf, sub))
    return entry is not None and bool(getattr(entry, reg) >> bit & 1)


def _index(entries: Iterable[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    return {(e.function, e.index): e for e in entries}


def _offered(guest: Sequence[CpuidEntry], host: Sequence[CpuidEntry] | None,
             features: dict[tuple[int, int, str, int], int], base: int) -> int:
    """`base` plus each bit whose feature both the guest's CPUID and the host (if given) have."""
    g, h = _index(guest), _index(host) if host is not None else None
    bits = base
    for feature, bit in features.items():
        if _has(g, feature) and (h is None or _has(h, feature)):
            bits |= bit
    return bits


def allowed_cr4(guest: Sequence[CpuidEntry], host: Sequence[CpuidEntry] | None) -> int:
    """The CR4 bits a vCPU with CPUID `guest` may set on a host whose KVM offers `host` (None:
    the guest's CPUID alone decides)."""
    return _offered(guest, host, CR4_FEATURES, CR4_BASE)


def allowed_efer(guest: Sequence[CpuidEntry], host: Sequence[CpuidEntry] | None) -> int:
    """The EFER bits, likewise."""
    return _offered(guest, host, EFER_FEATURES, EFER_SCE)


def maxphyaddr(guest: Sequence[CpuidEntry]) -> int:
    entry = _index(guest).get((0x80000008, 0))
    bits = entry.eax & 0xFF if entry is not None else 36
    return bits if 32 <= bits <= 52 else 36


def canonical(address: int, width: int) -> bool:
    """`address` (a u64) is the sign extension of its low `width` bits."""
    top = address >> (width - 1)
    return top == 0 or top == (1 << (65 - width)) - 1


def _fits(problems: list[str], where: str, obj: object, limits: dict[str, int]) -> None:
    for name, most in limits.items():
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
            problems.append(f"{where}.{name} = {value!r} does not fit (0..{most:#x})")


def vcpu_problems(state: VcpuState, host_cpuid: Sequence[CpuidEntry] | None = None) -> list[str]:
    """Everything in `state` that breaks the architecture's rules as KVM enforces them (every
    one, as facts; empty: KVM takes it). `host_cpuid`: what this host's KVM offers (the features
    a CR4 or EFER bit needs must be there too); None checks against the state's own CPUID."""
    who = f"vcpu {state.vcpu_id}"
    problems: list[str] = []
    regs, sregs = state.regs, state.sregs
    _fits(problems, f"{who} regs", regs, {f.name: U64 for f in dataclasses.fields(regs)})
    for i, xcr in enumerate(state.xcrs):
        _fits(problems, f"{who} xcrs[{i}]", xcr, {"xcr": U32, "value": U64})
    _fits(problems, f"{who} sregs", sregs, {"cr0": U64, "cr2": U64, "cr3": U64, "cr4": U64, "cr8": U64,
                                            "efer": U64, "apic_base": U64})
    segments = {name: getattr(sregs, name) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")}
    for name, seg in segments.items():
        _fits(problems, f"{who} {name}", seg, {"base": U64, "limit": U32, "selector": U16, "type": 15,
                                               "present": 1, "dpl": 3, "db": 1, "s": 1, "l": 1, "g": 1,
                                               "avl": 1, "unusable": 1})
    for name in ("gdt", "idt"):
        _fits(problems, f"{who} {name}", getattr(sregs, name), {"base": U64, "limit": U16})
    for i, msr in enumerate(state.msrs):
        _fits(problems, f"{who} msrs[{i}]", msr, {"index": U32, "data": U64})
    if problems:
        return problems  # the rules below read these as the integers they must be

    cr0, cr4, efer = sregs.cr0, sregs.cr4, sregs.efer
    if cr0 & ~CR0_DEFINED:
        problems.append(f"{who}: CR0 {cr0:#x} sets reserved bits {cr0 & ~CR0_DEFINED:#x}")
    if cr0 & CR0_PG and not cr0 & CR0_PE:
        problems.append(f"{who}: CR0 {cr0:#x} enables paging (PG) without protected mode (PE)")
    if cr0 & CR0_NW and not cr0 & CR0_CD:
        problems.append(f"{who}: CR0 {cr0:#x} sets NW without CD")
    cr4_ok = allowed_cr4(state.cpuid, host_cpuid)
    if cr4 & ~cr4_ok:
        problems.append(f"{who}: CR4 {cr4:#x} sets bits {cr4 & ~cr4_ok:#x} this CPU model reserves (its CPUID "
                        "or this host's KVM lacks the feature)")
    efer_ok = allowed_efer(state.cpuid, host_cpuid)
    if efer & ~efer_ok:
        problems.append(f"{who}: EFER {efer:#x} sets bits {efer & ~efer_ok:#x} this CPU model reserves")
    long_mode = bool(efer & EFER_LME and cr0 & CR0_PG)
    if long_mode:
        if not cr4 & CR4_PAE or not efer & EFER_LMA:
            problems.append(f"{who}: long mode (EFER.LME and CR0.PG) without CR4.PAE and EFER.LMA "
                            f"(CR4 {cr4:#x}, EFER {efer:#x})")
        if sregs.cr3 >> maxphyaddr(state.cpuid):
            problems.append(f"{who}: CR3 {sregs.cr3:#x} is past MAXPHYADDR ({maxphyaddr(state.cpuid)} bits)")
    else:
        if efer & EFER_LMA:
            problems.append(f"{who}: EFER.LMA set outside long mode (EFER {efer:#x}, CR0 {cr0:#x})")
        if sregs.cs.l:
            problems.append(f"{who}: a 64-bit code segment (CS.L) outside long mode")
    if sregs.cs.l and sregs.cs.db:
        problems.append(f"{who}: CS has both L and D set")
    if sregs.cr8 > 15:
        problems.append(f"{who}: CR8 {sregs.cr8:#x} is past 15")

    width = 57 if cr4 & CR4_LA57 else 48
    if long_mode and sregs.cs.l:
        if not canonical(regs.rip, width):
            problems.append(f"{who}: RIP {regs.rip:#x} is not canonical ({width}-bit)")
    elif regs.rip > U32:
        problems.append(f"{who}: RIP {regs.rip:#x} is past 4 GiB outside 64-bit code")
    if regs.rflags & ~RFLAGS_DEFINED or not regs.rflags & RFLAGS_FIXED1:
        problems.append(f"{who}: RFLAGS {regs.rflags:#x}: bit 1 must be set and reserved bits clear")
    for name, seg in segments.items():
        if not canonical(seg.base, width):
            problems.append(f"{who}: the {name.upper()} base {seg.base:#x} is not canonical")
    for name in ("gdt", "idt"):
        base = getattr(sregs, name).base
        if not canonical(base, width):
            problems.append(f"{who}: the {name.upper()} base {base:#x} is not canonical")
    for msr in state.msrs:
        if msr.index in MSR_CANONICAL and not canonical(msr.data, width):
            problems.append(f"{who}: MSR {MSR_CANONICAL[msr.index]} {msr.data:#x} is not canonical")

    for xcr in state.xcrs:
        problems += [f"{who}: {p}" for p in xcr_problems(xcr.xcr, xcr.value, state.cpuid, host_cpuid)]

    apic, phys = sregs.apic_base, maxphyaddr(state.cpuid)
    reserved = ~((1 << phys) - 1) & U64 | 0x2FF
    reserved |= APIC_BASE_EXTD & ~_offered(state.cpuid, host_cpuid, {X2APIC: APIC_BASE_EXTD}, 0)
    if apic & reserved:
        problems.append(f"{who}: the APIC base {apic:#x} sets reserved bits {apic & reserved:#x}")
    elif apic & APIC_BASE_EXTD and not apic & APIC_BASE_EN:
        problems.append(f"{who}: the APIC base {apic:#x} selects x2APIC with the APIC disabled")
    return problems


XCR0_X87, XCR0_SSE, XCR0_AVX = 1 << 0, 1 << 1, 1 << 2
XCR0_BND = (1 << 3) | (1 << 4)  # BNDREGS, BNDCSR: both or neither
XCR0_AVX512 = (1 << 5) | (1 << 6) | (1 << 7)  # opmask, ZMM_Hi256, Hi16_ZMM: all or none, with AVX
XCR0_XTILE = (1 << 17) | (1 << 18)  # XTILECFG, XTILEDATA: both or neither


def _xcr0_offered(cpuid: Sequence[CpuidEntry]) -> int:
    entry = _index(cpuid).get((0xD, 0))
    return (entry.eax | entry.edx << 32) if entry is not None else XCR0_X87 | XCR0_SSE


def xcr_problems(index: int, value: int, guest: Sequence[CpuidEntry], host: Sequence[CpuidEntry] | None) -> list[str]:
    """What KVM_SET_XCRS refuses of one XCR (KVM's `__kvm_set_xcr`): only XCR0; x87 always on;
    AVX needs SSE; the MPX pair, the AVX-512 triple (with AVX) and the AMX pair whole; no bit
    the guest's CPUID leaf 0xD (and the host) does not offer."""
    if index != 0:
        return [f"XCR{index} is not XCR0, the one KVM sets"]
    offered = _xcr0_offered(guest) & (_xcr0_offered(host) if host is not None else ~0) | XCR0_X87
    rules = [(not value & XCR0_X87, "clears x87"), (value & XCR0_AVX and not value & XCR0_SSE, "sets AVX without SSE"),
             (value & XCR0_BND not in (0, XCR0_BND), "sets half of MPX"),
             (value & XCR0_AVX512 not in (0, XCR0_AVX512), "sets part of AVX-512"),
             (value & XCR0_AVX512 and not value & XCR0_AVX, "sets AVX-512 without AVX"),
             (value & XCR0_XTILE not in (0, XCR0_XTILE), "sets half of AMX"),
             (value & ~offered, f"sets {value & ~offered:#x}, which CPUID leaf 0xD does not offer")]
    return [f"XCR0 {value:#x} {why}" for broken, why in rules if broken]


def check_vcpu(state: VcpuState, host_cpuid: Sequence[CpuidEntry] | None = None) -> VcpuState:
    """`state`, or `StateRestoreError` listing what `vcpu_problems` finds."""
    if problems := vcpu_problems(state, host_cpuid):
        raise StateRestoreError(f"vcpu {state.vcpu_id}", "architectural state", "what KVM takes", "; ".join(problems))
    return state



class _OffersCpuid(Protocol):
    @property
    def supported_cpuid(self) -> tuple[CpuidEntry, ...]: ...

    @property
    def guest_cpuid(self) -> tuple[CpuidEntry, ...]: ...


# host_features by Kvm: both lists it merges are read once per Kvm, so the merge is done once too
# (a restore into a waiting VMM asks for it in the request's time)
_merged: weakref.WeakKeyDictionary[_OffersCpuid, tuple[CpuidEntry, ...]] = weakref.WeakKeyDictionary()


def host_features(kvm: _OffersCpuid) -> tuple[CpuidEntry, ...]:
    """The CPUID features this host's KVM offers a guest, for `vcpu_problems`: KVM_GET_SUPPORTED_
    CPUID, with what a vCPU set up here reports OR'd in (nested PVM reports the host's own
    features there, and a guest's CR4 follows what it was shown). `kvm` is an `hv.kvm.kvm.Kvm`;
    read it before a pause (`guest_cpuid` probes a throwaway VM once)."""
    if (features := _merged.get(kvm)) is None:
        features = _merged[kvm] = _merge(kvm)
    return features


def _merge(kvm: _OffersCpuid) -> tuple[CpuidEntry, ...]:
    merged: dict[tuple[int, int], CpuidEntry] = {}
    for entry in (*kvm.supported_cpuid, *kvm.guest_cpuid):
        key = (entry.function, entry.index)
        have = merged.get(key)
        merged[key] = entry if have is None else replace(
            have, eax=have.eax | entry.eax, ebx=have.ebx | entry.ebx, ecx=have.ecx | entry.ecx, edx=have.edx | entry.edx)
    return tuple(merged.values())
