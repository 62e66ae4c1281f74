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
from hv.boot.x86 import EntryState
from hv.devices.pci.virtio_pci import VirtioPciBlk, VirtioPciConsole, VirtioPciNet, VirtioPciRng
from hv.devices.virtio import VirtioBlk, VirtioConsole, VirtioMmio, VirtioRng
from hv.devices.virtio.net import DEFAULT_MAC, VirtioNet, parse_mac
from hv.errors import ConfigError
from hv.guests import builtin as builtin_guest
from hv.kvm.cpuid import boot_msrs, vcpu_cpuid
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory
from hv.kvm.vcpu import Vcpu
from hv.kvm.vm import IDENTITY_MAP_ADDRESS, MMIO_HOLE_END, MMIO_HOLE_START, TSS_ADDRESS, MemoryBacking, Vm, VmConfig
from hv.platform import acpi, hostcpu, mptable
from hv.platform.allocator import DEVICE_MMIO_END, DEVICE_MMIO_START, SystemAllocator
from hv.vmm.machine import Machine, StopReason, discard_on_error
from hv.vmm.placement import VIRTIO_TRANSPORTS, DevicePlacement, VirtioDeviceSpec, place_virtio_device
from hv.devices.pci.root import PciAddress
from hv.vmm.pci import PciDevice, pci_firmware, register_pci_device, virtio_pci_layout


def create_vcpus(kvm: Kvm, vm: Vm) -> None:
    """Every configured vCPU, with its CPUID; non-boot vCPUs wait for INIT/SIPI as KVM leaves them."""
    for vcpu_id in range(vm.config.vcpus):
        X8664Arch.configure_vcpu(kvm, vm.create_vcpu(vcpu_id), vcpu_id, vm.config.vcpus)


def _boot_vcpu_entry(vm: Vm, entry: EntryState) -> None:
    """The boot protocol's registers, then the entry point through `Vcpu.set_entry`."""
    boot_vcpu = vm.vcpus[0]
    boot_vcpu.set_sregs(entry.apply(boot_vcpu.get_sregs()))
    boot_vcpu.set_regs(replace(entry.regs, rip=0))
    boot_vcpu.set_entry(entry.regs.rip)


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
class VirtioRngSpec:
    """virtio-rng: entropy from the host's getrandom."""

    device_id: str = "virtio-rng0"

    @property
    def kind(self) -> str:
        return VirtioRng.KIND

    def build(self, memory: GuestMemory, transport: str = "mmio") -> VirtioMmio:
        return (VirtioPciRng if transport == "pci" else VirtioRng)(memory)


@dataclass(frozen=True)
class VirtioConsoleSpec:
    """virtio-console: the guest's output to `output`."""

    output: Callable[[bytes], None]
    device_id: str = "virtio-console0"

    @property
    def kind(self) -> str:
        return VirtioConsole.KIND

    def build(self, memory: GuestMemory, transport: str = "mmio") -> VirtioMmio:
        return (VirtioPciConsole if transport == "pci" else VirtioConsole)(memory, self.output)


@dataclass
class VirtioBlkSpec:
    """virtio-blk over the file at `path`; `fd`: that file already open, which the device takes
    over when it is built (and which is closed if building fails)."""

    path: Path
    read_only: bool = False
    fd: int | None = None
    device_id: str = "virtio-blk0"
    fd_taken: bool = False  # build() ran: the fd is the device's, or closed

    @property
    def kind(self) -> str:
        return VirtioBlk.KIND

    def build(self, memory: GuestMemory, transport: str = "mmio") -> VirtioMmio:
        self.fd_taken = True
        try:
            model = VirtioPciBlk if transport == "pci" else VirtioBlk
            return model(memory, self.path, read_only=self.read_only, fd=self.fd)
        except BaseException:
            if self.fd is not None:
                os.close(self.fd)
            raise


@dataclass(frozen=True)
class VirtioNetSpec:
    """virtio-net on the tap named `tap` (created if absent, in this process's network
    namespace; made a port of `bridge` if given), the card's address `mac`; `transport` is where
    `hv run --net` asked for it."""

    tap: str
    mac: bytes = DEFAULT_MAC
    transport: str = "mmio"
    bridge: str | None = None  # the tap joins this bridge when opened
    device_id: str = "virtio-net0"

    @classmethod
    def parse(cls, text: str) -> VirtioNetSpec:
        """`hv run --net tap=NAME[,mac=52:54:..][,bridge=BR][,transport=mmio|pci]`."""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, eq, value = part.partition("=")
            if not eq or key not in ("tap", "mac", "bridge", "transport") or key in fields:
                raise ConfigError("--net", text, "expected tap=NAME[,mac=..][,bridge=..][,transport=mmio|pci]")
            fields[key] = value
        if "tap" not in fields:
            raise ConfigError("--net", text, "needs tap=NAME")
        transport = fields.get("transport", "mmio")
        if transport not in VIRTIO_TRANSPORTS:
            raise ConfigError("--net", text, f"transport is one of {VIRTIO_TRANSPORTS}")
        mac = parse_mac(fields["mac"]) if "mac" in fields else DEFAULT_MAC
        return cls(fields["tap"], mac, transport, fields.get("bridge"))

    @property
    def kind(self) -> str:
        return VirtioNet.KIND

    def build(self, memory: GuestMemory, transport: str = "mmio") -> VirtioMmio:
        model = VirtioPciNet if transport == "pci" else VirtioNet
        return model(memory, self.tap, mac=self.mac, bridge=self.bridge)


# The virtio kinds a machine may have, in slot order: the selected ones take consecutive 4 KiB
# windows from 0xD0000000 and IRQs from the system allocator (`placement.place_virtio_device`), so
# the guest finds them by scanning 0xD0000000 + i * 0x1000 for the magic value. A selection
# (device ids) fully determines the layout. (device id, declared KIND)
VIRTIO_KINDS: tuple[tuple[str, str], ...] = (
    ("virtio-blk0", VirtioBlk.KIND),
    ("virtio-console0", VirtioConsole.KIND),
    ("virtio-rng0", VirtioRng.KIND),
    ("virtio-net0", VirtioNet.KIND),
)


def _legacy_layout() -> tuple[DevicePlacement, ...]:
    return tuple(DevicePlacement(d.device_id, d.kind, (d.pio,), (), d.irqs) for d in STANDARD_DEVICES)


def virtio_layout(selected: Iterable[str], transport: str = "mmio") -> tuple[DevicePlacement, ...]:
    """Where the selected virtio devices go, in slot order, as `Machine.add_virtio_device` puts
    them on a machine with the standard devices (on `transport`: "pci", the host bridge first,
    then the functions); plain data, no KVM needed."""
    chosen = set(selected)
    known = [device_id for device_id, _ in VIRTIO_KINDS]
    if unknown := chosen - set(known):
        raise ConfigError("virtio", sorted(unknown), f"not one of {known}")
    if transport not in VIRTIO_TRANSPORTS:
        raise ConfigError("transport", transport, f"not one of {VIRTIO_TRANSPORTS}")
    layout = _legacy_layout()
    if transport == "pci":
        return virtio_pci_layout(layout, [device_id for device_id, _ in VIRTIO_KINDS if device_id in chosen])
    placed: list[DevicePlacement] = []
    for device_id, kind in VIRTIO_KINDS:
        if device_id in chosen:
            placed.append(place_virtio_device((*layout, *placed), device_id, kind, transport))
    return tuple(placed)


def standard_layout(virtio: Iterable[str] = (), pci: Iterable[str] = ()) -> tuple[DevicePlacement, ...]:
    """The device placements `blank_machine` produces (with the virtio device ids `virtio`, those
    in `pci` on virtio-pci, after the others), sorted by id as `Machine.device_layout`."""
    virtio, on_pci = tuple(virtio), set(pci)
    legacy = _legacy_layout()
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
    net: VirtioNetSpec | None = None

    def specs(self) -> tuple[VirtioDeviceSpec, ...]:
        """The devices asked for, in slot order."""
        specs: list[VirtioDeviceSpec] = []
        if self.disk is not None:
            specs.append(VirtioBlkSpec(self.disk, self.disk_readonly, self.disk_fd))
        if self.console_out is not None:
            specs.append(VirtioConsoleSpec(self.console_out))
        if self.rng:
            specs.append(VirtioRngSpec())
        if self.net is not None:
            specs.append(self.net)
        return tuple(specs)

    def device_ids(self) -> tuple[str, ...]:
        return tuple(spec.device_id for spec in self.specs())


def add_virtio_devices(
    machine: Machine, disk: Path | None = None, disk_readonly: bool = False,
    console_out: Callable[[bytes], None] | None = None, rng: bool = False, disk_fd: int | None = None,
    pci: Iterable[str] = (),
) -> tuple[DevicePlacement, ...]:
    """Add virtio-blk (a file; `disk_fd`: that file already open, taken over), virtio-console
    (output to `console_out`) and virtio-rng, those asked for, in that order, each through
    `Machine.add_virtio_device` (so at the slots `virtio_layout` computes); those whose ids are in
    `pci` on virtio-pci, after the others (`virtio_pci_layout`)."""
    specs = VirtioConfig(disk, disk_readonly, console_out, rng, disk_fd).specs()
    if disk is None and disk_fd is not None:
        os.close(disk_fd)  # an fd without a disk to serve: nobody will take it
    on_pci = set(pci)
    try:
        ordered = sorted(specs, key=lambda spec: spec.device_id in on_pci)  # MMIO first
        return tuple(machine.add_virtio_device(spec, "pci" if spec.device_id in on_pci else "mmio")
                     for spec in ordered)
    finally:
        for spec in specs:  # a disk fd never handed to a device is ours to close
            if isinstance(spec, VirtioBlkSpec) and spec.fd is not None and not spec.fd_taken:
                os.close(spec.fd)


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
    virtio_ids = {device_id for device_id, _ in VIRTIO_KINDS}
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
        add_virtio_config(machine, virtio)
    return machine


def add_virtio_config(machine: Machine, virtio: VirtioConfig) -> None:
    """The virtio devices `virtio` asks for, added to a machine none of whose vCPUs has run
    (`blank_machine`'s last step; a machine built before its restore was asked for takes them
    then); on failure the machine is discarded, and the disk's fd closed unless a device took it."""
    with discard_on_error(machine):
        add_virtio_devices(machine, virtio.disk, virtio.disk_readonly, virtio.console_out, virtio.rng,
                           virtio.disk_fd, virtio.pci)
        if virtio.net is not None:  # on PCI when its spec or the config's `pci` says so
            on_pci = virtio.net.transport == "pci" or virtio.net.device_id in virtio.pci
            machine.add_virtio_device(virtio.net, transport="pci" if on_pci else "mmio")


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


@dataclass(frozen=True)
class ArchMemoryLayout:
    """Where x86-64 puts things in the guest's physical address space, whatever the RAM size."""

    mmio_hole: tuple[int, int] = (MMIO_HOLE_START, MMIO_HOLE_END)  # no RAM here: LAPIC, IOAPIC, devices
    device_mmio: tuple[int, int] = (DEVICE_MMIO_START, DEVICE_MMIO_END)  # what the allocator hands out
    tss: int = TSS_ADDRESS  # KVM's real-mode TSS (3 pages)
    identity_map: int = IDENTITY_MAP_ADDRESS


class X8664Arch:
    """crosvm's `LinuxArch` for x86-64 (its `X8664arch`): the memory layout, the allocator, a
    built machine, each vCPU's configuration, and the host's CPU facts. Stateless; the methods
    are static as crosvm's are associated functions."""

    @staticmethod
    def arch_memory_layout(config: VmConfig) -> ArchMemoryLayout:
        return ArchMemoryLayout()

    @staticmethod
    def guest_memory_layout(config: VmConfig, layout: ArchMemoryLayout) -> list[tuple[int, int]]:
        """(guest base, size) of each RAM region: below the MMIO hole, then above 4 GiB."""
        return config.memory_layout()  # which leaves out layout.mmio_hole

    @staticmethod
    def register_pci_device(machine: Machine, device: PciDevice) -> PciAddress:
        """A PCI function on the machine's bus 0: BARs, INTx line and MSI-X vectors placed and
        wired (`hv.vmm.pci.register_pci_device`); its address."""
        return register_pci_device(machine, device)

    @staticmethod
    def get_system_allocator_config(vm: Vm) -> SystemAllocator:
        """A fresh allocator of this platform's ports, device MMIO and IRQs."""
        return SystemAllocator.x86()

    @staticmethod
    def build_vm(kvm: Kvm, config: VmConfig, console: Callable[[bytes], None] = lambda b: None,
                 virtio: VirtioConfig | None = None) -> Machine:
        """The machine every front end builds (`blank_machine`), nothing loaded yet."""
        return blank_machine(kvm, config, console, virtio=virtio)

    @staticmethod
    def configure_vcpu(kvm: Kvm, vcpu: Vcpu, vcpu_id: int, num_cpus: int) -> None:
        """The vCPU's CPUID (its APIC id, the vCPU count) and the MSRs it boots with."""
        vcpu.setup(vcpu_cpuid(kvm.supported_cpuid, vcpu_id, num_cpus), boot_msrs())

    @staticmethod
    def get_host_cpu_frequencies_khz() -> dict[int, tuple[int, ...]] | hostcpu.Unknown:
        cpus = hostcpu.online_cpus()
        freqs = hostcpu.frequencies_khz(cpus)
        return freqs if isinstance(freqs, hostcpu.Unknown) else {c: f.all_khz for c, f in freqs.items()}

    @staticmethod
    def get_host_cpu_max_freq_khz() -> dict[int, int] | hostcpu.Unknown:
        return hostcpu.host_cpu_facts().max_freq_khz

    @staticmethod
    def get_host_cpu_capacity() -> dict[int, int] | hostcpu.Unknown:
        return hostcpu.capacity(hostcpu.online_cpus())

    @staticmethod
    def get_host_cpu_clusters() -> tuple[tuple[int, ...], ...] | hostcpu.Unknown:
        return hostcpu.clusters(hostcpu.online_cpus())
