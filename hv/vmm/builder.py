"""Builds a ready-to-start `Machine` from a kernel image: the policy layer over hv's parts."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from hv.boot import linux, multiboot
from hv.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from hv.devices.i8042 import I8042, I8042_PORT, I8042_PORTS
from hv.devices.serial import COM1_IRQ, COM1_PORT, Serial16550
from hv.devices.virtio import MMIO_WINDOW, VirtioBlk, VirtioConsole, VirtioRng
from hv.errors import ConfigError
from hv.guests import builtin as builtin_guest
from hv.kvm.cpuid import boot_msrs, vcpu_cpuid
from hv.kvm.kvm import Kvm
from hv.kvm.vm import MemoryBacking, Vm, VmConfig
from hv.platform import acpi, mptable
from hv.platform.allocator import SystemAllocator
from hv.vmm.machine import DevicePlacement, Machine, StopReason, discard_on_error
from hv.vmm.pci import VIRTIO_PCI_CLASSES, pci_firmware, register_pci_device, virtio_pci_layout


def create_vcpus(kvm: Kvm, vm: Vm) -> None:
    """Every configured vCPU, with its CPUID; non-boot vCPUs wait for INIT/SIPI as KVM leaves them."""
    for vcpu_id in range(vm.config.vcpus):
        vcpu = vm.create_vcpu(vcpu_id)
        vcpu.setup(vcpu_cpuid(kvm.supported_cpuid, vcpu_id, vm.config.vcpus), boot_msrs())


def _boot_vcpu_entry(vm: Vm, entry) -> None:
    boot_vcpu = vm.vcpus[0]
    boot_vcpu.set_sregs(entry.apply(boot_vcpu.get_sregs()))
    boot_vcpu.set_regs(entry.regs)


@dataclass(frozen=True)
class StandardDevice:
    device_id: str
    kind: str  # the model's declared KIND, as Machine.add_device records it
    pio: tuple[int, int]
    irqs: tuple[int, ...] = ()


# The legacy devices every machine has. A migration target checks its layout against the
# source's before creating anything, so the table is plain data that needs no KVM to read.
STANDARD_DEVICES = (
    StandardDevice("serial0", Serial16550.KIND, (COM1_PORT, 8), (COM1_IRQ,)),
    StandardDevice("debug-exit", DebugExit.KIND, (DEBUG_EXIT_PORT, 4)),
    StandardDevice("i8042", I8042.KIND, (I8042_PORT, I8042_PORTS)),
)


@dataclass(frozen=True)
class VirtioDevice:
    device_id: str
    kind: str  # the model's declared KIND


# The optional virtio-mmio devices, in slot order: the selected ones take consecutive 4 KiB
# windows from 0xD0000000 and IRQs from the system allocator, so the guest finds them by scanning
# 0xD0000000 + i * 0x1000 for the magic value. A selection (device ids) fully determines the layout.
VIRTIO_DEVICES = (
    VirtioDevice("virtio-blk0", VirtioBlk.KIND),
    VirtioDevice("virtio-console0", VirtioConsole.KIND),
    VirtioDevice("virtio-rng0", VirtioRng.KIND),
)


def virtio_layout(selected: Iterable[str]) -> tuple[DevicePlacement, ...]:
    """Where the selected virtio devices go, in slot order; plain data, no KVM needed."""
    chosen = set(selected)
    unknown = chosen - {d.device_id for d in VIRTIO_DEVICES}
    if unknown:
        raise ConfigError("virtio", sorted(unknown), f"not one of {[d.device_id for d in VIRTIO_DEVICES]}")
    alloc = SystemAllocator.x86()
    alloc.irqs.reserve(COM1_IRQ, "serial0")
    placements = []
    for d in VIRTIO_DEVICES:
        if d.device_id in chosen:
            window = alloc.mmio.allocate(MMIO_WINDOW, d.device_id, align=MMIO_WINDOW)
            irq = alloc.irqs.allocate(d.device_id)
            placements.append(DevicePlacement(d.device_id, d.kind, (), ((window.base, window.size),), (irq,)))
    return tuple(placements)


def standard_layout(virtio: Iterable[str] = (), pci: Iterable[str] = ()) -> tuple[DevicePlacement, ...]:
    """The device placements `blank_machine` produces (with the virtio device ids `virtio`, those
    in `pci` on virtio-pci), sorted by id as `Machine.device_layout`."""
    virtio, on_pci = tuple(virtio), set(pci)
    legacy = tuple(DevicePlacement(d.device_id, d.kind, (d.pio,), (), d.irqs) for d in STANDARD_DEVICES)
    mmio = virtio_layout(d for d in virtio if d not in on_pci)
    functions = virtio_pci_layout((*legacy, *mmio), [d for d in virtio if d in on_pci])
    return tuple(sorted((*legacy, *mmio, *functions), key=lambda p: p.device_id))


@dataclass(frozen=True)
class VirtioConfig:
    """Which virtio devices a machine has, and their host-side ends."""

    disk: Path | None = None
    disk_readonly: bool = False
    console_out: Callable[[bytes], None] | None = None
    rng: bool = False
    disk_fd: int | None = None  # the disk already open at `disk` (the device takes it over)
    pci: tuple[str, ...] = ()  # the device ids put on virtio-pci (the others on virtio-mmio)

    def device_ids(self) -> tuple[str, ...]:
        chosen = {"virtio-blk0": self.disk is not None, "virtio-console0": self.console_out is not None,
                  "virtio-rng0": self.rng}
        return tuple(d.device_id for d in VIRTIO_DEVICES if chosen[d.device_id])


def add_virtio_devices(
    machine: Machine, disk: Path | None = None, disk_readonly: bool = False,
    console_out: Callable[[bytes], None] | None = None, rng: bool = False, disk_fd: int | None = None,
    pci: Iterable[str] = (),
) -> tuple[DevicePlacement, ...]:
    """Add virtio-blk (a file; `disk_fd`: that file already open, taken over), virtio-console
    (output to `console_out`) and virtio-rng, those asked for, in that order at consecutive slots
    (`virtio_layout`), wired to KVM; those whose ids are in `pci` on virtio-pci, after the others
    (`hv.vmm.pci.register_pci_device`)."""
    config = VirtioConfig(disk, disk_readonly, console_out, rng)
    on_pci = set(pci)
    mmio = {p.device_id: p for p in virtio_layout(d for d in config.device_ids() if d not in on_pci)}
    memory = machine.vm.memory
    added = []
    try:
        for device_id in sorted(config.device_ids(), key=lambda d: d in on_pci):  # MMIO first
            transport = VIRTIO_PCI_CLASSES[device_id] if device_id in on_pci else None
            match device_id:
                case "virtio-blk0":
                    device = (transport or VirtioBlk)(memory, disk, read_only=disk_readonly, fd=disk_fd)
                    disk_fd = None  # the device owns it now
                case "virtio-console0":
                    device = (transport or VirtioConsole)(memory, console_out)
                case _:
                    device = (transport or VirtioRng)(memory)
            try:
                if transport is not None:
                    register_pci_device(machine, device, device_id)
                    added.append(machine.placements[device_id])
                    continue
                placement = mmio[device_id]
                (base, size), = placement.mmio
                device.connect(machine.vm, base, placement.irqs[0])
                added.append(machine.add_device(placement.device_id, device, mmio=(base, size),
                                                irqs=placement.irqs))
            except BaseException:
                device.stop()
                raise
    finally:
        if disk_fd is not None:  # never handed to a device: ours to close
            os.close(disk_fd)
    return tuple(added)


def _with_console(vm: Vm, console: Callable[[bytes], None]) -> Machine:
    machine = Machine(vm)

    def guest_exit(code: int) -> None:
        machine.request_stop(StopReason("guest-exit", f"exit code {code}", code))

    def guest_reset() -> None:
        machine.request_stop(StopReason("guest-reset", "reset through the i8042 controller"))

    com1 = Serial16550(console, irq_fd=vm.fd.fd if vm.has_irqchip else -1, irq=COM1_IRQ)
    models = {"serial0": com1, "debug-exit": DebugExit(guest_exit),
              "i8042": I8042(guest_reset)}
    for d in STANDARD_DEVICES:
        machine.add_device(d.device_id, models[d.device_id], pio=d.pio, irqs=d.irqs)
    return machine


@dataclass(frozen=True)
class FirmwareTables:
    """Where `write_firmware_tables` put the ACPI tables and the MP table (None past 254 vCPUs)."""

    acpi: acpi.AcpiTables
    mptable: mptable.MpTable | None


def write_firmware_tables(machine: Machine) -> FirmwareTables:
    """ACPI tables (MADT: every vCPU and the IOAPIC; DSDT: COM1 and the virtio-mmio devices of
    `machine.device_layout()`, in slot order) and an MP table, in the BIOS area below 1 MiB: how a
    stock Linux kernel learns it has more than one CPU, and finds virtio-mmio devices at all."""
    layout = {p.device_id: p for p in machine.device_layout()}
    virtio_ids = {d.device_id for d in VIRTIO_DEVICES}
    virtio = sorted((p for p in layout.values() if p.device_id in virtio_ids and p.pci is None),
                    key=lambda p: p.mmio[0][0])
    serial = next(d for d in STANDARD_DEVICES if d.device_id == "serial0")
    vcpus = machine.vm.config.vcpus
    memory = machine.vm.memory
    pci_devices, pci_tables = pci_firmware(machine)
    tables = acpi.write_acpi(memory, vcpus, [acpi.MmioDevice(*p.mmio[0], p.irqs[0]) for p in virtio],
                             [acpi.ComPort(serial.pio[0], serial.irqs[0])] if "serial0" in layout else [],
                             more_devices=pci_devices, more_tables=pci_tables, msi=bool(pci_tables))
    mp = mptable.write_mptable(memory, vcpus) if vcpus <= mptable.MAX_CPUS else None
    return FirmwareTables(tables, mp)


def linux_machine(
    kvm: Kvm,
    kernel: Path,
    cmdline: str = "",
    initrd: Path | None = None,
    config: VmConfig | None = None,
    console: Callable[[bytes], None] = lambda b: None,
    *,
    prefer_pvh: bool = True,
    virtio: VirtioConfig | None = None,
) -> tuple[Machine, linux.LinuxBoot]:
    """A Machine that boots a Linux bzImage or vmlinux: by PVH when the kernel has the note and
    `prefer_pvh`, else by the 64-bit boot protocol with a zero page. ACPI and MP tables describe
    its vCPUs and devices (`write_firmware_tables`), and the kernel is given the RSDP's address."""
    machine = blank_machine(kvm, config, console, virtio=virtio)
    with discard_on_error(machine):
        firmware = write_firmware_tables(machine)
        booted = linux.boot(machine.vm.memory, kernel.read_bytes(), cmdline,
                            initrd.read_bytes() if initrd else None, kernel.name, prefer_pvh=prefer_pvh,
                            rsdp=firmware.acpi.rsdp)
        _boot_vcpu_entry(machine.vm, booted.entry)
    return machine, booted


def blank_machine(
    kvm: Kvm, config: VmConfig | None = None, console: Callable[[bytes], None] = lambda b: None,
    *, backing: MemoryBacking | None = None, virtio: VirtioConfig | None = None,
) -> Machine:
    """The machine every front end builds (VM, vCPUs with CPUID, standard devices, the virtio
    devices `virtio` asks for) with nothing loaded: what a restore or an incoming migration fills
    with saved state. `backing` as for `Kvm.create_vm` (a restore maps its memory file there)."""
    try:
        vm = kvm.create_vm(config or VmConfig(), backing=backing)
    except BaseException:
        if virtio is not None and virtio.disk_fd is not None:
            os.close(virtio.disk_fd)  # it was handed over to this machine, which never came to be
        raise
    try:
        create_vcpus(kvm, vm)
        machine = _with_console(vm, console)
    except BaseException:
        vm.close()
        if virtio is not None and virtio.disk_fd is not None:
            os.close(virtio.disk_fd)
        raise
    if virtio is not None:
        with discard_on_error(machine):
            add_virtio_devices(machine, virtio.disk, virtio.disk_readonly, virtio.console_out, virtio.rng,
                               virtio.disk_fd, virtio.pci)
    return machine


def multiboot_machine(
    kvm: Kvm,
    image: Path,
    cmdline: str = "",
    config: VmConfig | None = None,
    console: Callable[[bytes], None] = lambda b: None,
    *,
    virtio: VirtioConfig | None = None,
) -> Machine:
    """A Machine that boots a Multiboot v1 kernel, with a COM1 transmitter writing to `console`.

    As GRUB and QEMU do, the kernel sees its own file name first on the command line.
    """
    machine = blank_machine(kvm, config, console, virtio=virtio)
    with discard_on_error(machine):
        entry = multiboot.boot(machine.vm.memory, image.read_bytes(), f"{image.name} {cmdline}".strip(),
                               image.name)
        _boot_vcpu_entry(machine.vm, entry)
    return machine


def builtin_machine(
    kvm: Kvm,
    params: builtin_guest.GuestParams,
    config: VmConfig | None = None,
    console: Callable[[bytes], None] = lambda b: None,
    *,
    virtio: VirtioConfig | None = None,
) -> Machine:
    """A Machine running the built-in guest with `params`; the guest paces itself by the vCPU's TSC.
    With `virtio` devices and 2+ vCPUs, the guest's second CPU drives them."""
    config = config or VmConfig()
    params = replace(params, cpus=config.vcpus)
    if config.mem_size < params.min_mem:
        raise ConfigError("mem_size", config.mem_size, f"a {params.ws_mib} MiB working set needs at "
                          f"least {params.min_mem >> 20} MiB of guest memory")
    image = builtin_guest.guest_image()
    machine = multiboot_machine(kvm, image, "", config, console, virtio=virtio)
    with discard_on_error(machine):
        if not params.tsc_khz:
            params = replace(params, tsc_khz=machine.vcpus[0].fd.get_tsc_khz())
        # the command line is written after the vCPU exists, since it carries the vCPU's TSC rate
        multiboot.write_info(machine.vm.memory, f"{image.name} {params.cmdline()}")
    return machine
