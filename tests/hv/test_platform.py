"""System allocator and the vCPUs' boot MSRs."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hv.platform.allocator import AddressAllocator, AllocationError, SystemAllocator


def test_x86_allocator_keeps_legacy_places_and_hands_out_the_rest() -> None:
    alloc = SystemAllocator.x86()
    with pytest.raises(AllocationError) as err:
        alloc.pio.reserve(0x40, 4, "another-pit")
    assert "pit" in str(err.value)
    com1 = alloc.pio.reserve(0x3F8, 8, "serial0")
    assert com1.base == 0x3F8
    a, b = alloc.mmio.allocate(0x200, "virtio0", align=0x1000), alloc.mmio.allocate(0x200, "virtio1", align=0x1000)
    assert a.base == 0xD000_0000 and b.base == 0xD000_1000
    assert alloc.irqs.reserve(4, "serial0") == 4
    with pytest.raises(AllocationError):
        alloc.irqs.reserve(4, "serial1")
    got = [alloc.irqs.allocate(f"dev{i}") for i in range(3)]
    assert got == [5, 6, 7]


@given(st.lists(st.tuples(st.integers(1, 0x5000), st.sampled_from([1, 0x10, 0x1000])), max_size=40))
def test_allocations_never_overlap_and_stay_aligned(requests) -> None:
    alloc = AddressAllocator("test", 0x1000, 0x40000)
    alloc.reserve(0x8000, 0x800, "fixed")
    for i, (size, align) in enumerate(requests):
        try:
            r = alloc.allocate(size, f"d{i}", align)
        except AllocationError:
            continue
        assert r.base % align == 0 and 0x1000 <= r.base and r.end <= 0x40000
    ranges = alloc.ranges
    for x, y in zip(ranges, ranges[1:]):
        assert x.end <= y.base


def test_vcpus_start_with_fast_strings_and_write_back_mtrrs(kvm) -> None:
    from hv.kvm.cpuid import MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE
    from hv.kvm.vm import VmConfig
    from hv.vmm.builder import blank_machine

    machine = blank_machine(kvm, VmConfig(mem_size=16 << 20, vcpus=2))
    try:
        for vcpu in machine.vcpus:
            values = {m.index: m.data for m in vcpu.get_msrs([MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE])}
            assert values[MSR_IA32_MISC_ENABLE] & 1 and values[MSR_MTRR_DEF_TYPE] == 0x806
    finally:
        machine.vm.close()
