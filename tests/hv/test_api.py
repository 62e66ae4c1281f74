"""Every method of every seed Protocol (`hv.api`) called on its concrete class, on real KVM.

Each object is used through a `Recording` proxy, and each test ends by checking that every member
of its Protocols was used: a method added to a Protocol without a call here fails the test. (mypy
checks the shapes: `hv/conformance.py`.)"""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
from tinyguest import LOAD_ADDRESS, OUT_LOOP, multiboot_elf, wait_for

from hv import api
from hv.errors import HvError
from hv.kvm.cpuid import boot_msrs, vcpu_cpuid
from hv.kvm.exits import Interrupted, IoIn, IoOut, MmioRead, VcpuExit
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.platform.allocator import SystemAllocator
from hv.platform.hostcpu import host_cpu_facts
from hv.vmm.builder import VirtioRngSpec, X8664Arch, multiboot_machine
from hv.vmm.machine import RunState, discard

MiB = 1 << 20
ENTRY = LOAD_ADDRESS + 12


def members(protocol: type) -> set[str]:
    """A Protocol's methods and properties, its Protocol bases' included."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls is object or cls.__name__ in ("Protocol", "Generic"):
            continue
        names |= {n for n in vars(cls) if not n.startswith("_")}
    return names


class Recording:
    """`target`, with the names of the attributes read through it recorded in `used`."""

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "used", set())

    def __getattr__(self, name: str) -> Any:
        self.used.add(name)
        return getattr(self.target, name)


def _next_exit(vcpu: Any) -> VcpuExit:
    while isinstance(exit := vcpu.run(), Interrupted):
        pass
    return exit


def test_protocol_members_are_what_the_seeds_have() -> None:
    assert members(api.AxArchVCpu) == {"set_entry", "setup", "run", "bind", "unbind", "set_gpr",
                                       "inject_interrupt", "set_return_value"}
    assert "register_pci_device" in members(api.LinuxArch)
    assert members(api.VirtualCpu) == members(api.Vcpu) | members(api.AxArchVCpu)


def test_hypervisor_virtual_machine_and_guest_memory(kvm: Kvm) -> None:
    hypervisor = Recording(kvm)
    assert hypervisor.capabilities.irqchip
    vm = Recording(hypervisor.create_vm(VmConfig(mem_size=4 * MiB, vcpus=2)))
    try:
        assert vm.vcpu_count == 2 and vm.is_managed_execution() is False
        vcpu = vm.create_vcpu(1)
        assert vcpu.vcpu_id == 1
        memory = Recording(vm.memory)
        assert memory.total_size == 4 * MiB
        vm.enable_dirty_log()
        memory.write(0x2000, b"seed")
        assert memory.read(0x2000, 4) == b"seed"
        assert memory.host_address(0x2000) == memory.host_address(0) + 0x2000
        dumped = {base: bytes(view[0x2000:0x2004]) for base, view in memory.dump_all()}
        assert dumped == {0: b"seed"}
        dirty = {region.guest_base: bitmap for region, bitmap in vm.fetch_dirty_logs()}
        assert 2 in dirty[0].pages().tolist()  # the VMM's own write counts
        vm.disable_dirty_log()
        region = vm.add_memory_region(64 * MiB, 1 * MiB)
        memory.write(64 * MiB, b"x")
        vm.remove_memory_region(region)
        with pytest.raises(HvError):
            memory.read(64 * MiB, 1)
        irq, resample = os.eventfd(0), os.eventfd(0)
        try:
            vm.register_irqfd(irq, 10)
            vm.unregister_irqfd(irq, 10)
            vm.register_irqfd(irq, 11, resample_fd=resample)
            vm.unregister_irqfd(irq, 11)
        finally:
            os.close(irq)
            os.close(resample)
        vm.set_irq_line(4, True)
        vm.set_irq_line(4, False)
        vm.trigger_edge_irq(3)
        state = vm.save()
        vm.restore(state)
        assert vm.save().irqchip == state.irqchip
    finally:
        vm.close()
    assert members(api.Hypervisor) <= hypervisor.used
    assert members(api.VirtualMachine) <= vm.used
    assert members(api.GuestMemory) <= memory.used


def test_vcpu_arcbox_and_axvcpu_on_a_running_guest(kvm: Kvm, write_image) -> None:
    code = (
        b"\xba\x02\x05\x00\x00" b"\xed"  # in eax, 0x502 (dx)
        + b"\xa1" + struct.pack("<I", 0xC000_0000)  # mov eax, [0xC0000000]: an MMIO read
        + b"\xed"  # in eax, dx again
        + b"\xba\x00\x05\x00\x00" b"\xef"  # out 0x500, eax: report it
        + b"\xeb\xfe"
    )
    machine = multiboot_machine(kvm, write_image(multiboot_elf(code)), "", VmConfig(mem_size=16 * MiB))
    vcpu = Recording(machine.vcpus[0])
    try:
        vcpu.setup(vcpu_cpuid(kvm.supported_cpuid, 0, 1), boot_msrs())
        vcpu.bind(0)
        vcpu.unbind()
        vcpu.set_entry(ENTRY)
        vcpu.set_gpr(0, 0)
        regs = vcpu.get_regs()
        vcpu.set_regs(regs)
        assert vcpu.vcpu_id == 0
        assert _next_exit(vcpu) == IoIn(0x502, 4)
        vcpu.set_io_result(b"\x01\x02\x03\x04")
        assert _next_exit(vcpu) == MmioRead(0xC000_0000, 4)
        assert vcpu.get_regs().rax == 0x0403_0201  # the IN completed into EAX
        vcpu.set_mmio_result(b"\x11\x22\x33\x44")
        assert _next_exit(vcpu) == IoIn(0x502, 4)
        assert vcpu.get_regs().rax == 0x4433_2211
        vcpu.set_return_value(0x600D)
        saved = vcpu.save()
        vcpu.inject_interrupt(0x30)  # accepted; this guest runs with interrupts off (delivery: test_interrupts.py)
        exit = _next_exit(vcpu)
        assert isinstance(exit, IoOut) and exit.data == (0x600D).to_bytes(4, "little")
        vcpu.restore(saved)  # back to before the report
        assert vcpu.get_regs().rip == saved.regs.rip
    finally:
        discard(machine)
    assert members(api.VirtualCpu) <= vcpu.used


def test_runnable_virtual_machine(kvm: Kvm, write_image) -> None:
    out = bytearray()
    machine = Recording(multiboot_machine(kvm, write_image(multiboot_elf(OUT_LOOP)), "",
                                          VmConfig(mem_size=16 * MiB), out.extend))
    try:
        placement = machine.add_virtio_device(VirtioRngSpec())
        assert placement.device_id == "virtio-rng0" and placement.mmio == ((0xD000_0000, 0x1000),)
        assert machine.state is RunState.CREATED
        machine.start()
        wait_for(lambda: len(out) > 100)
        machine.pause()
        states = machine.snapshot_devices()
        assert set(states) == {"serial0", "debug-exit", "i8042", "virtio-rng0"}
        machine.restore_devices(states)
        machine.resume()
        machine.stop()
        assert machine.state is RunState.STOPPED
    finally:
        discard(machine.target)
    assert members(api.RunnableVirtualMachine) <= machine.used


def test_linux_arch(kvm: Kvm) -> None:
    from hv.devices.pci.root import PciAddress
    from hv.devices.pci.virtio_pci import VirtioPciRng

    arch = Recording(X8664Arch())
    config = VmConfig(mem_size=4 * MiB)
    layout = arch.arch_memory_layout(config)
    assert arch.guest_memory_layout(config, layout) == [(0, 4 * MiB)]
    big = VmConfig(mem_size=4 << 30)
    regions = arch.guest_memory_layout(big, layout)
    assert sum(size for _, size in regions) == 4 << 30
    assert all(base + size <= layout.mmio_hole[0] or base >= layout.mmio_hole[1] for base, size in regions)
    machine = arch.build_vm(kvm, config)
    try:
        assert isinstance(arch.get_system_allocator_config(machine.vm), SystemAllocator)
        with kvm.create_vm(VmConfig(mem_size=2 * MiB, vcpus=2)) as vm:
            vcpu = vm.create_vcpu(1)
            arch.configure_vcpu(kvm, vcpu, 1, 2)
            apic_ids = {e.ebx >> 24 for e in vcpu.cpuid if e.function == 1}
            assert apic_ids == {1}
    finally:
        discard(machine)
    facts = host_cpu_facts()
    assert arch.get_host_cpu_capacity() == facts.capacity
    assert arch.get_host_cpu_clusters() == facts.clusters
    assert arch.get_host_cpu_max_freq_khz() == facts.max_freq_khz
    arch.get_host_cpu_frequencies_khz()  # its values: test_hostcpu.py
    bare = arch.build_vm(kvm, config)
    try:  # a PCI function joins bus 0 at the first free slot (the host bridge is 00:00.0)
        assert arch.register_pci_device(bare, VirtioPciRng(bare.vm.memory)) == PciAddress(0, 1, 0)
    finally:
        discard(bare)
    assert members(api.LinuxArch) <= arch.used


def test_add_virtio_device_only_before_it_runs_and_only_a_known_transport(kvm: Kvm, write_image) -> None:
    from hv.errors import ConfigError, LifecycleError
    from hv.vmm.builder import virtio_layout

    image = write_image(multiboot_elf(OUT_LOOP))
    machine = multiboot_machine(kvm, image, "", VmConfig(mem_size=16 * MiB))
    try:
        with pytest.raises(ConfigError):
            machine.add_virtio_device(VirtioRngSpec(), transport="usb")
        with pytest.raises(ConfigError):
            virtio_layout(["virtio-rng0"], transport="usb")
        assert "virtio-rng0" not in machine.devices
        machine.add_virtio_device(VirtioRngSpec())
        assert machine.device_layout()[-1] == virtio_layout(["virtio-rng0"])[0]
        assert machine.device_layout()[-1].pci is None
        machine.start(paused=True)  # started, but no vCPU entered the guest (a VM built ahead of a restore)
        machine.add_virtio_device(VirtioRngSpec("virtio-rng1"))
        machine.resume()
        machine.pause()
        with pytest.raises(LifecycleError):
            machine.add_virtio_device(VirtioRngSpec("virtio-rng2"))
        assert "virtio-rng2" not in machine.devices
    finally:
        discard(machine)
    on_pci = multiboot_machine(kvm, image, "", VmConfig(mem_size=16 * MiB))
    try:  # the same device as a PCI function: placed where the layout a target computes says
        placement = on_pci.add_virtio_device(VirtioRngSpec(), transport="pci")
        assert placement.pci is not None and placement.kind == "virtio-pci-rng"
        assert placement == virtio_layout(["virtio-rng0"], transport="pci")[-1]
    finally:
        discard(on_pci)
