"""A saved guest's CPUID against what a host offers: only real feature gaps are problems."""

from __future__ import annotations

from hv.kvm.state import CpuidEntry
from migrate.state import cpuid_problems

HOST = (CpuidEntry(0x1, 0, 0, 0, 0, ecx=1 << 0, edx=1 << 0), CpuidEntry(0x7, 0, 1, 0, ebx=1 << 5, ecx=0, edx=0))


def test_bits_kvm_sets_itself_are_not_problems() -> None:
    # hypervisor, OSXSAVE and OSPKE mirror the guest's CR4 / KVM's own choice; APIC follows the LAPIC
    saved = (CpuidEntry(0x1, 0, 0, 0, 0, ecx=(1 << 0) | (1 << 31) | (1 << 27), edx=(1 << 0) | (1 << 9)),
             CpuidEntry(0x7, 0, 1, 0, ebx=1 << 5, ecx=1 << 4, edx=0))
    assert cpuid_problems(saved, HOST) == []


def test_every_missing_feature_is_listed_with_its_leaf_and_register() -> None:
    avx512f, pku = 1 << 16, 1 << 3
    saved = (CpuidEntry(0x7, 0, 1, 0, ebx=(1 << 5) | avx512f, ecx=pku, edx=0),
             CpuidEntry(0x80000001, 0, 0, 0, 0, ecx=1, edx=0))
    problems = cpuid_problems(saved, HOST)
    assert len(problems) == 3
    assert "leaf 0x7.0 ebx" in problems[0] and f"{avx512f:#x}" in problems[0]
    assert "leaf 0x7.0 ecx" in problems[1] and f"{pku:#x}" in problems[1]
    assert "leaf 0x80000001.0 ecx" in problems[2]  # a leaf the host does not list at all
