"""CPUID for a vCPU: the host's KVM-supported set with the per-vCPU fixes a guest expects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from hv.state import CpuidEntry

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
