"""CPUID for a vCPU: the host's KVM-supported set with the per-vCPU fixes a guest expects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from hv.kvm.state import CpuidEntry, Msr

_HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX: "running under a hypervisor"


def vcpu_cpuid(supported: Sequence[CpuidEntry], vcpu_id: int, vcpu_count: int) -> tuple[CpuidEntry, ...]:
    """Per-vCPU CPUID: APIC ids in leaves 1, 0xB and 0x1F, logical count, hypervisor bit."""
    out = []
    for e in supported:
        if e.function == 1:
            ebx = (e.ebx & 0x0000_FFFF) | (vcpu_id << 24) | (min(vcpu_count, 255) << 16)
            e = replace(e, ebx=ebx, ecx=e.ecx | _HYPERVISOR_BIT)
        elif e.function in (0xB, 0x1F):
            e = replace(e, edx=vcpu_id)
        out.append(e)
    return tuple(out)


# MSRs a vCPU starts with (Firecracker's choice for booting Linux): fast string operations on,
# and MTRRs enabled with write-back as the default memory type (otherwise every access without
# an MTRR range is uncached, which a kernel notices and complains about).
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE, MTRR_TYPE_WRBACK = 1 << 11, 6


def boot_msrs() -> tuple[Msr, ...]:
    return (Msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
            Msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK))
