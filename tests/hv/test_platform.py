"""System allocator and host CPU facts."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hv.platform.allocator import AddressAllocator, AllocationError, SystemAllocator
from hv.platform.hostcpu import clusters, host_cpus, parse_cpu_list


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


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("") == ()


def test_host_cpus_from_sysfs() -> None:
    cpus = host_cpus()
    assert cpus and all(c.cpu in c.thread_siblings for c in cpus)
    assert sum(len(v) for v in clusters(cpus).values()) == len(cpus)


def test_host_cpus_from_a_fake_sysfs(tmp_path: Path) -> None:
    (tmp_path / "online").write_text("0-1\n")
    for cpu, (cluster, cap, khz) in enumerate(((0, 1024, 3000000), (1, 512, 1800000))):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0")
        (topo / "cluster_id").write_text(str(cluster))
        (topo / "thread_siblings_list").write_text(str(cpu))
        (tmp_path / f"cpu{cpu}" / "cpu_capacity").write_text(str(cap))
        freq = tmp_path / f"cpu{cpu}" / "cpufreq"
        freq.mkdir()
        (freq / "cpuinfo_max_freq").write_text(str(khz))
    cpus = host_cpus(tmp_path)
    assert [(c.capacity, c.max_khz, c.min_khz) for c in cpus] == [(1024, 3000000, None), (512, 1800000, None)]
    assert clusters(cpus) == {(0, 0): (0,), (0, 1): (1,)}


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
