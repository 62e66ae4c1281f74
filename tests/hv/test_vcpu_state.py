"""The complete vCPU state and VM state: struct mapping, round trips on KVM, restore order."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.binding import structconv
from hv.binding.ffi import ffi
from hv.vmm.builder import create_vcpus
from hv.errors import StateRestoreError, VcpuIdError, VcpuStateError
from hv.kvm.kvm import Kvm
from hv.kvm.state import (
    MSR_IA32_TSC,
    MSR_IA32_TSC_DEADLINE,
    DebugRegs,
    Fpu,
    Msr,
    PicState,
    PitState,
    Regs,
    Sregs,
    VcpuEvents,
    VcpuState,
    VmState,
    vcpu_state_differences,
)
from hv.kvm.vcpu import RESTORE_ORDER, SAVE_ORDER
from hv.kvm.vm import Vm, VmConfig

MiB = 1 << 20

MAPPED = [
    (Regs, "struct kvm_regs"),
    (Sregs, "struct kvm_sregs"),
    (Fpu, "struct kvm_fpu"),
    (VcpuEvents, "struct kvm_vcpu_events"),
    (DebugRegs, "struct kvm_debugregs"),
    (PitState, "struct kvm_pit_state2"),
    (PicState, "struct kvm_pic_state"),
]


@pytest.mark.parametrize("cls, ctype", MAPPED)
@given(data=st.data())
@settings(max_examples=40)
def test_struct_mapping_round_trips(cls, ctype, data) -> None:
    raw = data.draw(st.binary(min_size=ffi.sizeof(ctype), max_size=ffi.sizeof(ctype)))
    src = ffi.new(f"{ctype} *")
    ffi.memmove(src, raw, len(raw))
    state = structconv.from_struct(cls, src)
    again = structconv.from_struct(cls, structconv.to_struct(state, ffi.new(f"{ctype} *")))
    assert again == state


def test_wrong_shape_is_refused() -> None:
    regs = structconv.from_struct(Fpu, ffi.new("struct kvm_fpu *"))
    with pytest.raises(structconv.StructShapeError) as err:
        structconv.to_struct(replace(regs, xmm=b"short"), ffi.new("struct kvm_fpu *"))
    assert err.value.path == "Fpu.xmm" and err.value.expected == 256


def test_restore_order_covers_every_part_once() -> None:
    parts = [f.name for f in dataclasses.fields(VcpuState) if f.name not in ("vcpu_id", "tsc_khz")]
    assert sorted(p for p, _ in RESTORE_ORDER) == sorted(parts)
    assert sorted(SAVE_ORDER) == sorted(parts)
    order = [p for p, _ in RESTORE_ORDER]
    assert order.index("cpuid") == 0 and order[-1] == "events"
    assert order.index("regs") < order.index("events")
    assert order.index("sregs") < order.index("lapic") < order.index("msrs")


def _vm_with_vcpu(kvm: Kvm) -> Vm:
    vm = kvm.create_vm(VmConfig(mem_size=16 * MiB))
    create_vcpus(kvm, vm)
    return vm


def test_vcpu_state_round_trips_into_a_second_vm(kvm: Kvm) -> None:
    with _vm_with_vcpu(kvm) as a, _vm_with_vcpu(kvm) as b:
        va = a.vcpus[0]
        va.set_regs(Regs(rax=1, rbx=2, rcx=3, rsp=0x8000, rip=0x1000, rflags=0x202))
        saved = va.save()
        assert saved.msrs and saved.lapic and saved.cpuid
        b.vcpus[0].restore(saved)
        restored = b.vcpus[0].save()
        assert vcpu_state_differences(saved, restored) == []
        tsc = {m.index: m.data for m in saved.msrs}[MSR_IA32_TSC]
        tsc2 = {m.index: m.data for m in restored.msrs}[MSR_IA32_TSC]
        assert 0 <= tsc2 - tsc < saved.tsc_khz * 1000 * 5  # continues from the saved TSC


def test_lapic_is_restored_before_msrs(kvm: Kvm) -> None:
    """The TSC-deadline MSR only sticks when the LAPIC timer is already in TSC-deadline mode."""
    with _vm_with_vcpu(kvm) as a:
        state = a.vcpus[0].save()
    lapic = bytearray(state.lapic)
    lvt_timer = int.from_bytes(lapic[0x320:0x324], "little")
    lvt_timer = (lvt_timer & ~0x7_00FF) | (0b10 << 17) | 0xEC  # TSC-deadline mode, unmasked
    lapic[0x320:0x324] = lvt_timer.to_bytes(4, "little")
    tsc = {m.index: m.data for m in state.msrs}[MSR_IA32_TSC]
    deadline = tsc + 10**12
    msrs = tuple(Msr(m.index, deadline) if m.index == MSR_IA32_TSC_DEADLINE else m for m in state.msrs)
    if MSR_IA32_TSC_DEADLINE not in {m.index for m in msrs}:
        pytest.fail("this host does not save the TSC-deadline MSR")
    state = replace(state, lapic=bytes(lapic), msrs=msrs)
    with _vm_with_vcpu(kvm) as right, _vm_with_vcpu(kvm) as wrong:
        right.vcpus[0].restore(state)
        assert right.vcpus[0].get_msrs([MSR_IA32_TSC_DEADLINE])[0].data == deadline
        # the other order loses it: this is why RESTORE_ORDER puts the LAPIC first
        setters = wrong.vcpus[0]._setters()
        setters["msrs"](state.msrs)
        setters["lapic"](state.lapic)
        assert wrong.vcpus[0].get_msrs([MSR_IA32_TSC_DEADLINE])[0].data == 0


def test_corrupt_state_is_refused_with_the_part_named(kvm: Kvm) -> None:
    with _vm_with_vcpu(kvm) as a:
        state = a.vcpus[0].save()
        # sizes are checked before any ioctl (StateRestoreError); what KVM refuses names its part
        moved = replace(state, regs=replace(state.regs, rax=state.regs.rax ^ 0x1234), xsave=state.xsave[:100])
        with pytest.raises(StateRestoreError) as err:
            a.vcpus[0].restore(moved)
        assert (err.value.owner, err.value.field, err.value.found) == ("vcpu 0", "xsave", "100 bytes")
        assert a.vcpus[0].save().regs == state.regs, "registers were applied before the refusal"
        with pytest.raises(StateRestoreError) as err:
            a.vcpus[0].restore(replace(state, lapic=b"\0" * 10))
        assert (err.value.field, err.value.found) == ("lapic", "10 bytes")
        with pytest.raises(VcpuStateError) as err:
            a.vcpus[0].restore(replace(state, msrs=(Msr(0xDEAD_BEEF, 1),)))
        assert err.value.part == "msrs" and "0xdeadbeef" in str(err.value)


def test_vcpu_id_beyond_config_is_refused(kvm: Kvm) -> None:
    with kvm.create_vm(VmConfig(mem_size=16 * MiB, vcpus=2)) as vm:
        vm.create_vcpu(1)
        with pytest.raises(VcpuIdError) as err:
            vm.create_vcpu(2)
        assert (err.value.vcpu_id, err.value.vcpu_count) == (2, 2)


def test_vm_state_round_trips(kvm: Kvm) -> None:
    with _vm_with_vcpu(kvm) as a, _vm_with_vcpu(kvm) as b:
        a.set_irq_line(4, True)  # leaves an IRR bit in the PIC and IOAPIC state
        saved = a.save()
        assert isinstance(saved, VmState) and len(saved.irqchip.ioapic.redirtbl) == 24
        moved = replace(saved, irqchip=replace(saved.irqchip, ioapic=replace(
            saved.irqchip.ioapic, redirtbl=(0x1_0030,) + saved.irqchip.ioapic.redirtbl[1:])))
        b.restore(moved)
        got = b.save()
        assert got.irqchip == moved.irqchip
        # KVM_SET_PIT2 reloads each counter, so its load time becomes "now" on the host clock
        def no_load_time(pit: PitState) -> list:
            return [replace(c, count_load_time=0) for c in pit.channels]

        assert no_load_time(got.pit) == no_load_time(moved.pit) and got.pit.flags == moved.pit.flags
        assert got.clock.clock >= moved.clock.clock  # kvmclock runs on from the saved value
