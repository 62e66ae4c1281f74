"""axvcpu's set_entry, set_gpr and set_return_value, each on a vCPU running a real (tiny) guest:
what the guest does next shows the value took effect."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from tinyguest import LOAD_ADDRESS, multiboot_elf

from hv.kvm.exits import Interrupted, IoIn, IoOut, MmioRead, VcpuExit
from hv.kvm.kvm import Kvm
from hv.kvm.state import Regs
from hv.kvm.vcpu import GPR_NAMES, Vcpu
from hv.kvm.vm import VmConfig
from hv.vmm.builder import multiboot_machine
from hv.vmm.machine import Machine, discard

MiB = 1 << 20
ENTRY = LOAD_ADDRESS + 12  # after the multiboot header
REPORT = 0x500  # the guests write what they report here (a dword)


def _mov_edx(port: int) -> bytes:
    return b"\xba" + struct.pack("<I", port)


def _report(value: int) -> bytes:
    """mov edx, REPORT ; mov eax, value ; out dx, eax ; jmp $"""
    return _mov_edx(REPORT) + b"\xb8" + struct.pack("<I", value) + b"\xef" + b"\xeb\xfe"


@pytest.fixture
def boot(kvm: Kvm, write_image) -> Iterator:
    made: list[Machine] = []

    def make(code: bytes) -> Vcpu:
        machine = multiboot_machine(kvm, write_image(multiboot_elf(code)), "", VmConfig(mem_size=16 * MiB))
        made.append(machine)
        return machine.vcpus[0]

    yield make
    for machine in made:
        discard(machine)


def _next_exit(vcpu: Vcpu) -> VcpuExit:
    """Run the vCPU (on this thread) to its next exit that is not a kick."""
    while isinstance(exit := vcpu.run(), Interrupted):
        pass
    return exit


def _reported(vcpu: Vcpu) -> int:
    exit = _next_exit(vcpu)
    assert isinstance(exit, IoOut) and exit.port == REPORT, exit
    return int.from_bytes(exit.data, "little")


def test_the_builder_sets_the_entry_and_set_entry_moves_it(boot) -> None:
    first, second = _report(0xA), _report(0xB)
    vcpu = boot(first + second)
    assert vcpu.get_regs().rip == ENTRY  # the builder's `set_entry`, from the Multiboot header
    vcpu.set_entry(ENTRY + len(first))
    assert _reported(vcpu) == 0xB
    assert vcpu.get_regs().rip == ENTRY + 2 * len(first) - 2  # at its `jmp $`
    other = boot(first + second)
    assert _reported(other) == 0xA
    with pytest.raises(ValueError):
        vcpu.set_entry(-1)


def test_set_gpr_sets_the_register_of_that_number(boot) -> None:
    # out 0x501 (stop here) ; then report EBX ; jmp $
    code = _mov_edx(0x501) + b"\xee" + _mov_edx(REPORT) + b"\x89\xd8" + b"\xef" + b"\xeb\xfe"
    vcpu = boot(code)
    assert isinstance(exit := _next_exit(vcpu), IoOut) and exit.port == 0x501
    vcpu.set_gpr(GPR_NAMES.index("rbx"), 0x1234_5678)
    assert _reported(vcpu) == 0x1234_5678
    before = vcpu.get_regs()
    for index, name in enumerate(GPR_NAMES):
        vcpu.set_gpr(index, 0x0101_0101_0101_0101 * (index + 1))
    assert vcpu.get_regs() == Regs(**{n: 0x0101_0101_0101_0101 * (i + 1) for i, n in enumerate(GPR_NAMES)},
                                   rip=before.rip, rflags=before.rflags)
    for bad in ((16, 0), (-1, 0), (0, 1 << 64)):
        with pytest.raises(ValueError):
            vcpu.set_gpr(*bad)


def test_set_return_value_answers_the_exit_the_vmm_handled(boot) -> None:
    code = (
        _mov_edx(0x502) + b"\xed"  # in eax, dx: an IoIn exit; the value lands in EAX
        + _mov_edx(REPORT) + b"\xef"  # report EAX
        + b"\xa1" + struct.pack("<I", 0xC000_0000)  # mov eax, [0xC0000000]: an MMIO read, nothing there
        + _mov_edx(REPORT) + b"\xef"
        + _mov_edx(0x503) + b"\xee"  # out 0x503: a port "hypercall" whose answer is RAX
        + _mov_edx(REPORT) + b"\xef"
        + b"\xeb\xfe"
    )
    vcpu = boot(code)
    assert _next_exit(vcpu) == IoIn(0x502, 4)
    with pytest.raises(ValueError):
        vcpu.set_return_value(1 << 32)  # wider than the IN's 4 bytes
    vcpu.set_return_value(0xCAFE_BABE)
    assert _reported(vcpu) == 0xCAFE_BABE
    assert _next_exit(vcpu) == MmioRead(0xC000_0000, 4)
    vcpu.set_return_value(0x55AA_00FF)
    assert _reported(vcpu) == 0x55AA_00FF
    exit = _next_exit(vcpu)
    assert isinstance(exit, IoOut) and exit.port == 0x503
    vcpu.set_return_value(0x600D)
    assert _reported(vcpu) == 0x600D
