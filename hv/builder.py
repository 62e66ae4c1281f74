"""Builds a ready-to-start `Machine` from a kernel image: the policy layer over hv's parts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hv.boot import multiboot
from hv.cpuid import vcpu_cpuid
from hv.devices.serial import COM1_IRQ, COM1_PORT, SerialTx
from hv.hypervisor import Kvm
from hv.machine import Machine
from hv.vm import Vm, VmConfig


def create_vcpus(kvm: Kvm, vm: Vm) -> None:
    """Every configured vCPU, with its CPUID; non-boot vCPUs wait for INIT/SIPI as KVM leaves them."""
    for vcpu_id in range(vm.config.vcpus):
        vcpu = vm.create_vcpu(vcpu_id)
        vcpu.setup(vcpu_cpuid(kvm.supported_cpuid, vcpu_id, vm.config.vcpus))


def multiboot_machine(
    kvm: Kvm,
    image: Path,
    cmdline: str = "",
    config: VmConfig | None = None,
    console: Callable[[bytes], None] = lambda b: None,
) -> Machine:
    """A Machine that boots a Multiboot v1 kernel, with a COM1 transmitter writing to `console`.

    As GRUB and QEMU do, the kernel sees its own file name first on the command line.
    """
    vm = kvm.create_vm(config or VmConfig())
    try:
        create_vcpus(kvm, vm)
        entry = multiboot.boot(vm.memory, image.read_bytes(), f"{image.name} {cmdline}".strip(), image.name)
        boot_vcpu = vm.vcpus[0]
        boot_vcpu.set_sregs(entry.apply(boot_vcpu.get_sregs()))
        boot_vcpu.set_regs(entry.regs)
        machine = Machine(vm)
        machine.add_device("serial0", SerialTx(console), pio=(COM1_PORT, 8), irqs=(COM1_IRQ,))
        return machine
    except BaseException:
        vm.close()
        raise
