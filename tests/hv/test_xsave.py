"""XSAVE areas compared by architectural meaning, with the layout CPUID leaf 0xD gives.

Synthetic blobs cover every component of the host's layout and of a made-up CPU that has them all
(AVX-512, MPX, PKRU, AMX), so the rules hold on whatever CPU the suite runs on."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hv.vmm.builder import create_vcpus
from hv.kvm.kvm import Kvm
from hv.kvm.state import CpuidEntry
from hv.kvm.vm import VmConfig
from hv.kvm.xsave import (
    FCW_INIT,
    HEADER_OFFSET,
    MXCSR_INIT,
    XFeature,
    XsaveFormatError,
    XsaveLayout,
)

# A CPU with every user component up to AMX, at the standard-format offsets Intel documents.
ALL_COMPONENTS = {  # bit: (size, offset)
    XFeature.AVX: (256, 576), XFeature.BNDREGS: (64, 960), XFeature.BNDCSR: (64, 1024),
    XFeature.OPMASK: (64, 1088), XFeature.ZMM_HI256: (512, 1152), XFeature.HI16_ZMM: (1024, 1664),
    XFeature.PKRU: (8, 2688), XFeature.XTILECFG: (64, 2752), XFeature.XTILEDATA: (8192, 2816),
}
_SUPERVISOR_PT = 8  # listed in the CPUID table as a supervisor (XSS) component: never in the uABI


def _cpuid(components: dict[int, tuple[int, int]]) -> tuple[CpuidEntry, ...]:
    mask = 0b11 | sum(1 << bit for bit in components)
    entries = [CpuidEntry(0xD, 0, 1, mask & 0xFFFF_FFFF, 0, 0, mask >> 32),
               CpuidEntry(0xD, 1, 1, 0xF, 0, 1 << _SUPERVISOR_PT, 0),
               CpuidEntry(0xD, _SUPERVISOR_PT, 1, 128, 0, 1, 0)]
    entries += [CpuidEntry(0xD, bit, 1, size, offset, 0, 0) for bit, (size, offset) in components.items()]
    return tuple(entries)


SYNTHETIC = XsaveLayout.from_cpuid(_cpuid(ALL_COMPONENTS))


@pytest.fixture(scope="module")
def host_layout(kvm: Kvm) -> XsaveLayout:
    return XsaveLayout.from_cpuid(kvm.supported_cpuid)


def _blob(layout: XsaveLayout, in_use: int) -> bytearray:
    """A blob in every component's init state, with the given XSTATE_BV."""
    blob = bytearray(layout.size)
    blob[0:2] = FCW_INIT.to_bytes(2, "little")
    blob[24:28] = MXCSR_INIT.to_bytes(4, "little")
    blob[HEADER_OFFSET:HEADER_OFFSET + 8] = in_use.to_bytes(8, "little")
    return blob


def _each_layout(host_layout: XsaveLayout) -> list[XsaveLayout]:
    return [host_layout, SYNTHETIC]


def test_synthetic_layout_lists_every_user_component_and_no_supervisor_one() -> None:
    assert [c.bit for c in SYNTHETIC.components] == sorted(ALL_COMPONENTS)
    assert not SYNTHETIC.supported >> _SUPERVISOR_PT & 1
    assert SYNTHETIC.size == 2816 + 8192


def test_host_layout_fits_kvms_buffer_and_components_do_not_overlap(kvm: Kvm, host_layout: XsaveLayout) -> None:
    assert host_layout.size <= max(kvm.capabilities.xsave_size, 4096)
    spans = sorted((c.offset, c.offset + c.size) for c in host_layout.components)
    assert all(start >= HEADER_OFFSET + 64 for start, _ in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))


def test_a_component_in_init_state_equals_one_marked_in_use_with_its_init_value(host_layout) -> None:
    # The PKRU case seen on Intel hosts: saved as "init", restored as "in use" with the value zero.
    for layout in _each_layout(host_layout):
        for c in layout.components:
            clear, marked = _blob(layout, 0b11), _blob(layout, 0b11 | 1 << c.bit)
            clear[c.offset:c.offset + c.size] = b"\xa5" * c.size  # stale bytes mean nothing when clear
            assert layout.differences(clear, marked) == [], c.name


def test_a_changed_component_in_use_is_named_and_nothing_else(host_layout) -> None:
    for layout in _each_layout(host_layout):
        everything = layout.supported
        for c in layout.components:
            a, b = _blob(layout, everything), _blob(layout, everything)
            b[c.offset + c.size - 1] ^= 0x01
            assert layout.differences(a, b) == [c.name]
            assert layout.differences(a, _blob(layout, everything & ~(1 << c.bit))) == []


def test_x87_init_state_has_its_control_word() -> None:
    clear = _blob(SYNTHETIC, 0)
    clear[32] = 0x77  # a stale ST0 byte: meaningless with the x87 bit clear
    assert SYNTHETIC.differences(clear, _blob(SYNTHETIC, 0b01)) == []
    wrong_fcw = _blob(SYNTHETIC, 0b01)
    wrong_fcw[0:2] = (0x027F).to_bytes(2, "little")  # 53-bit precision: a real change
    assert SYNTHETIC.differences(clear, wrong_fcw) == ["x87"]


def test_mxcsr_counts_while_sse_or_avx_is_in_use() -> None:
    odd = _blob(SYNTHETIC, 0)
    odd[24:28] = (0x1FA0).to_bytes(4, "little")
    assert SYNTHETIC.differences(odd, _blob(SYNTHETIC, 0)) == []  # both SSE and AVX init: MXCSR init
    for bit in (XFeature.SSE, XFeature.AVX):
        a, b = _blob(SYNTHETIC, 1 << bit), _blob(SYNTHETIC, 1 << bit)
        b[24:28] = (0x1FA0).to_bytes(4, "little")
        assert SYNTHETIC.differences(a, b) == ["sse"], bit.name


def test_xmm_registers_count_only_while_sse_is_in_use() -> None:
    a, b = _blob(SYNTHETIC, 0b01), _blob(SYNTHETIC, 0b01)
    b[200] = 1
    assert SYNTHETIC.differences(a, b) == []
    a[HEADER_OFFSET] = b[HEADER_OFFSET] = 0b11
    assert SYNTHETIC.differences(a, b) == ["sse"]


def test_bytes_outside_any_component_are_not_state() -> None:
    a, b = _blob(SYNTHETIC, SYNTHETIC.supported), _blob(SYNTHETIC, SYNTHETIC.supported)
    b[28] ^= 0xFF  # MXCSR_MASK: describes the CPU
    b[450] ^= 0xFF  # reserved for software
    b[2700] ^= 0xFF  # the gap after PKRU's 8 bytes
    assert SYNTHETIC.differences(a, b) == []


def test_malformed_blobs_are_refused_with_the_component_named() -> None:
    with pytest.raises(XsaveFormatError, match="shorter"):
        SYNTHETIC.architectural(bytes(100))
    lacking = XsaveLayout.from_cpuid(_cpuid({XFeature.AVX: (256, 576)}))
    with pytest.raises(XsaveFormatError, match="pkru") as err:
        lacking.architectural(bytes(_blob(SYNTHETIC, 1 << XFeature.PKRU)))
    assert err.value.component == XFeature.PKRU
    with pytest.raises(XsaveFormatError, match="xtiledata"):
        SYNTHETIC.architectural(bytes(_blob(SYNTHETIC, 1 << XFeature.XTILEDATA))[:4096])
    assert SYNTHETIC.differences(bytes(_blob(SYNTHETIC, 0))[:4096], bytes(_blob(SYNTHETIC, 0))) == []


def test_a_cpu_without_leaf_0xd_has_the_legacy_region_only() -> None:
    layout = XsaveLayout.from_cpuid([CpuidEntry(1, 0, 0, 0, 0, 0, 0)])
    assert layout.components == () and layout.supported == 0b11


def test_kvm_round_trip_of_a_blob_with_components_marked_init_is_equivalent(kvm: Kvm) -> None:
    """On KVM: a vCPU's XSAVE area, set back with every extended component marked "init" where
    its value is the init value, reads back equivalent whatever bits KVM then reports."""
    if not kvm.capabilities.xsave:
        pytest.fail("this host's KVM lacks KVM_CAP_XSAVE: the XSAVE state cannot be tested")
    with kvm.create_vm(VmConfig(mem_size=16 << 20)) as vm:
        create_vcpus(kvm, vm)
        vcpu = vm.vcpus[0]
        state = vcpu.save()
        layout = XsaveLayout.from_cpuid(state.cpuid)
        assert layout.supported >> XFeature.SSE & 1
        init_marked = bytearray(state.xsave)
        in_use = int.from_bytes(init_marked[HEADER_OFFSET:HEADER_OFFSET + 8], "little")
        for c in layout.components:
            if not any(init_marked[c.offset:c.offset + c.size]):
                in_use &= ~(1 << c.bit)
        init_marked[HEADER_OFFSET:HEADER_OFFSET + 8] = in_use.to_bytes(8, "little")
        vcpu.restore(replace(state, xsave=bytes(init_marked)))
        again = vcpu.save().xsave
        assert layout.differences(state.xsave, again) == []
        assert layout.differences(bytes(init_marked), again) == []
