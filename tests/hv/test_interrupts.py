"""Interrupts the host raises, taken by the built-in guest's handler and counted by the guest:
an irqfd (edge), a resampled irqfd (level-triggered), KVM_IRQ_LINE (trigger_edge_irq), and an
interrupt injected into a vCPU (AxArchVCpu::inject_interrupt)."""

from __future__ import annotations

import os
import select
from collections.abc import Iterator

import pytest
from tinyguest import wait_for

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.machine import Machine

MiB = 1 << 20


@pytest.fixture
def guest(kvm: Kvm) -> Iterator[Machine]:
    """The built-in guest past its set-up (IDT, IOAPIC pins routed), running its workload."""
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1, rate_mib_s=20), VmConfig(mem_size=32 * MiB), console)
    machine.start()
    try:
        console.wait_ready(timeout=20)
        yield machine
    finally:
        machine.stop()
        machine.vm.close()


def _count(machine: Machine, vector: int) -> int:
    return bg.interrupt_count(machine.vm.memory, vector)


def _wait_count(machine: Machine, vector: int, n: int) -> None:
    wait_for(lambda: _count(machine, vector) >= n, timeout=20, what=f"interrupt {vector:#x} number {n}")
    assert _count(machine, vector) == n


def _signalled(fd: int, timeout: float = 20.0) -> int:
    readable, _, _ = select.select([fd], [], [], timeout)
    assert readable, "the eventfd was never signalled"
    return int.from_bytes(os.read(fd, 8), "little")


def test_an_irqfd_a_line_and_an_injection_each_reach_the_guests_handler(guest: Machine) -> None:
    vm, edge = guest.vm, bg.HOST_EDGE_VECTOR
    assert _count(guest, edge) == 0
    irq = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        vm.register_irqfd(irq, bg.HOST_EDGE_IRQ)
        os.eventfd_write(irq, 1)
        _wait_count(guest, edge, 1)  # through KVM alone: no exit, no VMM code on the way
        vm.trigger_edge_irq(bg.HOST_EDGE_IRQ)
        _wait_count(guest, edge, 2)
        guest.vcpus[0].inject_interrupt(edge)  # straight to the vCPU's LAPIC, no IOAPIC pin
        _wait_count(guest, edge, 3)
        vm.unregister_irqfd(irq, bg.HOST_EDGE_IRQ)
        os.eventfd_write(irq, 1)  # no longer wired: the next interrupt counted is the line's
        vm.trigger_edge_irq(bg.HOST_EDGE_IRQ)
        _wait_count(guest, edge, 4)
    finally:
        os.close(irq)


def test_a_resampled_irqfd_is_a_level_line_lowered_at_the_guests_eoi(guest: Machine) -> None:
    """KVM_IRQFD_FLAG_RESAMPLE: the level line stays up until the guest's EOI, then KVM lowers it
    and signals the resample fd. Were it left up, the IOAPIC would deliver it again at once, and
    at a higher priority (HOST_LEVEL_VECTOR, 0x31) than the edge interrupt (0x30) sent after it, which would
    then never be taken; so the edge one being counted proves the line came down."""
    vm, level = guest.vm, bg.HOST_LEVEL_VECTOR
    irq, resample = os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        vm.register_irqfd(irq, bg.HOST_LEVEL_IRQ, resample_fd=resample)
        for n in (1, 2):
            os.eventfd_write(irq, 1)
            assert _signalled(resample) == 1  # the guest EOId it: the device may raise it again
            _wait_count(guest, level, n)
            vm.trigger_edge_irq(bg.HOST_EDGE_IRQ)
            _wait_count(guest, bg.HOST_EDGE_VECTOR, n)
            assert _count(guest, level) == n
        vm.unregister_irqfd(irq, bg.HOST_LEVEL_IRQ)
    finally:
        os.close(irq)
        os.close(resample)


def test_a_resample_fd_needs_the_in_kernel_irqchip(kvm: Kvm) -> None:
    from hv.errors import MissingCapabilityError

    with kvm.create_vm(VmConfig(mem_size=2 * MiB, irqchip=False, pit=False)) as vm:
        irq, resample = os.eventfd(0), os.eventfd(0)
        try:
            with pytest.raises(MissingCapabilityError):
                vm.register_irqfd(irq, 5, resample_fd=resample)
        finally:
            os.close(irq)
            os.close(resample)
