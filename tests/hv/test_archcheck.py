"""A vCPU state against the architecture's rules, before any VM exists (issue 21, item 3):
real states pass (a fresh vCPU, a guest in long mode, on whatever CPU model this host is), the
issue's registers are refused, and whatever the check accepts KVM accepts, set on a real vCPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.guests import builtin as bg
from hv.kvm.archcheck import MSR_CANONICAL, allowed_cr4, canonical, host_features, vcpu_problems
from hv.kvm.kvm import Kvm
from hv.kvm.state import Msr, VcpuState
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine, create_vcpus

MiB = 1 << 20
U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def host(kvm: Kvm):
    return host_features(kvm)


@pytest.fixture(scope="module")
def states(kvm: Kvm) -> dict[str, VcpuState]:
    """A fresh vCPU's state (real mode) and a running built-in guest's (long mode, ring 3 work)."""
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=2, rate_mib_s=10), VmConfig(mem_size=32 * MiB), console)
    try:
        fresh = machine.vcpus[0].save()
        machine.start()
        console.wait_pass(1, timeout=60)
        machine.pause()
        running = machine.vcpus[0].save()
    finally:
        machine.stop()
        machine.vm.close()
    return {"fresh": fresh, "running": running}


@pytest.fixture(scope="module")
def target(kvm: Kvm):
    vm = kvm.create_vm(VmConfig(mem_size=16 * MiB))
    create_vcpus(kvm, vm)
    yield vm.vcpus[0]
    vm.close()


def test_real_states_pass_on_this_cpu_model(states, host) -> None:
    for name, state in states.items():
        assert vcpu_problems(state, host) == [], name
        assert vcpu_problems(state) == [], name  # against its own CPUID alone too
    assert states["running"].sregs.efer & (1 << 10), "the built-in guest runs in long mode"


def test_cr4_bits_follow_the_cpuid_not_a_list(states, host) -> None:
    cpuid = states["running"].cpuid
    assert allowed_cr4(cpuid, host) & states["running"].sregs.cr4 == states["running"].sregs.cr4
    no_features = tuple(replace(e, eax=0, ebx=0, ecx=0, edx=0) if e.function in (1, 7) else e for e in cpuid)
    assert allowed_cr4(no_features, host) == 0x7FF  # only the base bits without the features


@pytest.mark.parametrize("change, says", [
    ({"rip": 1 << 47}, "RIP 0x800000000000 is not canonical"),
    ({"rip": U64, "cs_l": 0}, "RIP 0xffffffffffffffff is past 4 GiB"),  # (canonical, but not in 32-bit code)
    ({"cr0": U64}, "CR0"),
    ({"cr0": 1 << 31}, "paging (PG) without protected mode"),
    ({"efer": 1 << 10}, "EFER.LMA set outside long mode"),
    ({"cr4": 1 << 30}, "CR4"),
    ({"lstar": 1 << 47}, "LSTAR"),
    ({"rip": 1 << 64}, "does not fit"),
    ({"gdt": 1 << 60}, "GDT base"),
    ({"xcr0": 0}, "clears x87"),
    ({"xcr0": 0b101}, "AVX without SSE"),
])
def test_the_issues_registers_are_refused(states, host, change, says) -> None:
    state = _changed(states["running"], **change)
    problems = vcpu_problems(state, host)
    assert any(says in p for p in problems), problems


def _changed(state: VcpuState, *, rip=None, cr0=None, cr4=None, efer=None, lstar=None, gdt=None, rflags=None,
             cs_l=None, cs_db=None, fs_base=None, apic_base=None, cr3=None, cr8=None, xcr0=None) -> VcpuState:
    regs, sregs, msrs, xcrs = state.regs, state.sregs, state.msrs, state.xcrs
    if xcr0 is not None and xcrs:
        xcrs = (replace(xcrs[0], value=xcr0), *xcrs[1:])
    if rip is not None:
        regs = replace(regs, rip=rip)
    if rflags is not None:
        regs = replace(regs, rflags=rflags)
    s = {k: v for k, v in {"cr0": cr0, "cr4": cr4, "efer": efer, "apic_base": apic_base, "cr3": cr3,
                           "cr8": cr8}.items() if v is not None}
    if gdt is not None:
        s["gdt"] = replace(sregs.gdt, base=gdt)
    if cs_l is not None or cs_db is not None:
        s["cs"] = replace(sregs.cs, l=sregs.cs.l if cs_l is None else cs_l, db=sregs.cs.db if cs_db is None else cs_db)
    if fs_base is not None:
        s["fs"] = replace(sregs.fs, base=fs_base)
    sregs = replace(sregs, **s)
    if lstar is not None:
        msrs = tuple(m for m in msrs if m.index != 0xC0000082) + (Msr(0xC0000082, lstar),)
    return replace(state, regs=regs, sregs=sregs, msrs=msrs, xcrs=xcrs)


ADDRESSES = st.sampled_from([0, 0x1000, (1 << 32) - 1, 1 << 32, (1 << 47) - 1, 1 << 47, 0xFFFF800000000000,
                             (1 << 56) - 1, 1 << 56, 0xFF00000000000000, U64])


def _bits(original: int, width: int):
    """The original, a few of its bits flipped, or anything of `width` bits."""
    flips = st.lists(st.integers(0, width - 1), max_size=3).map(
        lambda bits: original ^ sum({1 << b for b in bits}))
    return st.one_of(st.just(original), flips, st.integers(0, (1 << width) - 1))


@st.composite
def mutants(draw, base: VcpuState) -> VcpuState:
    sregs = base.sregs
    lstar = {m.index: m.data for m in base.msrs}.get(0xC0000082, 0)
    change = {}
    for name, strategy in (("rip", st.one_of(ADDRESSES, _bits(base.regs.rip, 64))),
                           ("cr0", _bits(sregs.cr0, 33)), ("cr4", _bits(sregs.cr4, 32)),
                           ("efer", _bits(sregs.efer, 16)), ("lstar", st.one_of(ADDRESSES, _bits(lstar, 64))),
                           ("gdt", ADDRESSES), ("rflags", _bits(base.regs.rflags, 23)), ("cs_l", st.integers(0, 1)),
                           ("cs_db", st.integers(0, 1)), ("fs_base", ADDRESSES),
                           ("apic_base", _bits(sregs.apic_base, 40)), ("cr3", _bits(sregs.cr3, 53)),
                           ("cr8", st.integers(0, 16)),
                           ("xcr0", _bits(base.xcrs[0].value if base.xcrs else 3, 20))):
        if draw(st.booleans()):
            change[name] = draw(strategy)
    return _changed(base, **change)


@pytest.mark.parametrize("which", ["fresh", "running"])
@given(data=st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_whatever_the_check_accepts_kvm_accepts(states, host, target, which, data) -> None:
    state = data.draw(mutants(states[which]))
    if vcpu_problems(state, host):
        return
    target.restore(state)  # KVM_SET_CPUID2 ... KVM_SET_SREGS, KVM_SET_REGS, KVM_SET_MSRS: none refuses it


def test_canonical_is_the_sign_extension() -> None:
    assert canonical(0, 48) and canonical((1 << 47) - 1, 48) and canonical(0xFFFF800000000000, 48)
    assert not canonical(1 << 47, 48) and not canonical(0xFFFF000000000000, 48)
    assert canonical(1 << 47, 57) and not canonical(1 << 56, 57)
    assert 0xC0000082 in MSR_CANONICAL
