"""A machine's whole state as plain data, and the one schema registry every stream uses.

`capture` reads a paused machine (vCPUs, in-kernel irqchip/PIT/clock, devices); `apply` writes
such a state into a machine built by `hv.vmm.builder.blank_machine` from the same `MachineConfig`.
Memory is not in here: it moves as page sections (`migrate.pages`). Snapshot files and the live
migration wire both carry exactly these objects, so there is one capture path and one restore path.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import xxhash

import formats
from formats import DeviceEntry, DeviceLayout, IoRange, MemoryLayout, PciBar, PciEntry, SchemaRegistry
from hv.devices.pci import MsixState, PciRoot, VirtioPci, PciRootState, VirtioPciBlk, VirtioPciConsole, VirtioPciNet, VirtioPciRng, VirtioPciState
from hv.devices.debug_exit import DebugExit, DebugExitState
from hv.devices.i8042 import I8042, I8042State
from hv.devices.serial import Serial16550, SerialState
from hv.devices.virtio.blk import BlkState, VirtioBlk, VirtioBlkState
from hv.devices.virtio.console import ConsoleState, VirtioConsole, VirtioConsoleState
from hv.devices.virtio.mmio import VirtioMmioState
from hv.devices.virtio.net import NetState, VirtioNet, VirtioNetState
from hv.devices.virtio.queue import QueueState
from hv.devices.virtio.rng import RngState, VirtioRng, VirtioRngState
from hv.kvm import state as hv_state
from hv.kvm.archcheck import host_features, vcpu_problems
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, VirtioNetSpec, standard_layout
from hv.vmm.machine import DevicePlacement, Machine, RunState
from migrate.disks import OpenDisk
from migrate.errors import StateError, StateShapeError

PRODUCER = "kvmigrate 0.1"

# The one table from a device kind (the model's declared KIND, what LAYOUT entries carry) to its
# state type, the state's wire name and its version. A model whose state changes shape bumps its
# version here; a reader refuses versions it does not know rather than guess. Versions: virtio-blk
# 2 (the disk path left the state, format 2.0); the others 1.
DEVICE_STATES: dict[str, tuple[type, str, int]] = {
    Serial16550.KIND: (SerialState, "hv.device.serial_16550", 1),
    DebugExit.KIND: (DebugExitState, "hv.device.debug_exit", 1),
    I8042.KIND: (I8042State, "hv.device.i8042", 1),
    VirtioBlk.KIND: (VirtioBlkState, "hv.device.virtio_blk", 2),
    VirtioConsole.KIND: (VirtioConsoleState, "hv.device.virtio_console", 1),
    VirtioRng.KIND: (VirtioRngState, "hv.device.virtio_rng", 1),
    VirtioNet.KIND: (VirtioNetState, "hv.device.virtio_net", 1),
    PciRoot.KIND: (PciRootState, "hv.device.pci_host_bridge", 1),
    # the three virtio-pci kinds share one state type (its backend part says which device)
    VirtioPciBlk.KIND: (VirtioPciState, "hv.device.virtio_pci", 1),
    VirtioPciConsole.KIND: (VirtioPciState, "hv.device.virtio_pci", 1),
    VirtioPciRng.KIND: (VirtioPciState, "hv.device.virtio_pci", 1),
    VirtioPciNet.KIND: (VirtioPciState, "hv.device.virtio_pci", 1),
}

# The wire names of the other state types, declared (not derived from class names, so renaming a
# class changes no format). Nested parts are encoded inside their owner; registering them
# compiles their codecs up front.
STATE_TYPES: tuple[tuple[type, str], ...] = (
    (hv_state.Regs, "hv.Regs"), (hv_state.Segment, "hv.Segment"),
    (hv_state.DescriptorTable, "hv.DescriptorTable"), (hv_state.Sregs, "hv.Sregs"),
    (hv_state.Fpu, "hv.Fpu"), (hv_state.Xcr, "hv.Xcr"), (hv_state.Msr, "hv.Msr"),
    (hv_state.CpuidEntry, "hv.CpuidEntry"), (hv_state.DebugRegs, "hv.DebugRegs"),
    (hv_state.ExceptionEvent, "hv.ExceptionEvent"), (hv_state.InterruptEvent, "hv.InterruptEvent"),
    (hv_state.NmiEvent, "hv.NmiEvent"), (hv_state.SmiEvent, "hv.SmiEvent"),
    (hv_state.VcpuEvents, "hv.VcpuEvents"), (hv_state.VcpuState, "hv.VcpuState"),
    (hv_state.PicState, "hv.PicState"), (hv_state.IoapicState, "hv.IoapicState"),
    (hv_state.IrqchipState, "hv.IrqchipState"), (hv_state.PitChannelState, "hv.PitChannelState"),
    (hv_state.PitState, "hv.PitState"), (hv_state.ClockState, "hv.ClockState"),
    (hv_state.VmState, "hv.VmState"),
    (VirtioMmioState, "hv.device.VirtioMmioState"), (QueueState, "hv.device.QueueState"),
    (BlkState, "hv.device.BlkState"), (ConsoleState, "hv.device.ConsoleState"),
    (RngState, "hv.device.RngState"), (MsixState, "hv.device.MsixState"), (NetState, "hv.device.NetState"),
)


@dataclass(frozen=True)
class SnapshotRef:
    """Which snapshot an incremental one builds on: its id and its memory digest."""

    snapshot_id: str
    memory_digest: int
    path: str  # as given when the incremental was taken (informative; the id decides)


@dataclass(frozen=True)
class MemoryFileRef:
    """A mappable snapshot's raw memory image: one file, RAM ranges back to back."""

    path: str  # relative to the snapshot file
    size: int
    snapshot_id: str  # also in the file's trailer: the pair belongs together


class DiskCopyKind(StrEnum):
    """How a snapshot's disk copy was made; both are a plain raw image of the disk. An enum, so
    that a reader refuses a kind it does not know (a later kind may not be a whole image)."""

    REFLINK = "reflink"  # FICLONE: the filesystem shares the extents, copy-on-write
    SPARSE = "sparse"  # the data extents copied (copy_file_range), holes left holes


@dataclass(frozen=True)
class DiskFileRef:
    """A snapshot's copy of its guest's disk at the snapshot's instant (format 2.1): a raw image
    next to the snapshot file, its size and its disk digest (`formats.combine_disk_digest`)."""

    path: str  # a file name next to the snapshot file, nothing else (checked where it is opened)
    size: int
    digest: bytes  # DISK_DIGEST_SIZE bytes
    copy: DiskCopyKind

    def __post_init__(self) -> None:
        if len(self.digest) != formats.DISK_DIGEST_SIZE:
            raise ValueError(f"a disk digest has {formats.DISK_DIGEST_SIZE} bytes, not {len(self.digest)}")
        if not 0 <= self.size < 1 << 62:
            raise ValueError(f"a disk of {self.size} bytes")


@dataclass(frozen=True)
class VirtioSpec:
    """The virtio devices a machine has, as a target must build them. `disk` is the path the
    disk had where the stream was written: on the side that reads it, only a name to match
    (`migrate.disks`); that side opens its own file."""

    disk: str | None = None
    disk_readonly: bool = False
    console: bool = False
    rng: bool = False
    pci: tuple[str, ...] = ()  # the device ids on virtio-pci (a field with a default: version kept)
    # virtio-net: the card's MAC (the guest's identity), and the tap and bridge it had there,
    # which a target opens by the same names in its own network namespace (as QEMU's -netdev)
    net_mac: bytes | None = None
    net_tap: str | None = None
    net_bridge: str | None = None

    def net_spec(self) -> VirtioNetSpec | None:
        if self.net_mac is None or self.net_tap is None:
            return None
        return VirtioNetSpec(self.net_tap, self.net_mac, bridge=self.net_bridge)

    def device_ids(self) -> tuple[str, ...]:
        return VirtioConfig(Path(self.disk) if self.disk is not None else None, self.disk_readonly,
                            (lambda b: None) if self.console else None, self.rng,
                            net=self.net_spec()).device_ids()

    def build(self, console_out: Callable[[bytes], None], disk: OpenDisk | None) -> VirtioConfig:
        """The builder's config: console output to `console_out`, the disk this side opened (its
        own copy of the descriptor goes to the device)."""
        if (disk is None) != (self.disk is None):
            raise StateError("a disk goes with a guest that has one, and only with it")
        return VirtioConfig(disk.path if disk else None, self.disk_readonly,
                            console_out if self.console else None, self.rng,
                            disk.dup() if disk else None, self.pci, net=self.net_spec())


@dataclass(frozen=True)
class MachineConfig:
    """What a target must build to take the guest (the CONFIG section)."""

    mem_size: int
    vcpus: int
    irqchip: bool
    pit: bool
    cpuid_digest: int  # xxh3-64 of the boot vCPU's CPUID entries
    snapshot_id: str = ""
    base: SnapshotRef | None = None  # incremental snapshots only
    memory_file: MemoryFileRef | None = None  # mappable snapshots only
    virtio: VirtioSpec | None = None
    tsc_khz: int = 0  # the guest's TSC rate (0: not recorded: read from a running machine, or older)
    disk_file: DiskFileRef | None = None  # a snapshot of a guest with a disk, from format 2.1

    def vm_config(self) -> VmConfig:
        return VmConfig(mem_size=self.mem_size, vcpus=self.vcpus, irqchip=self.irqchip, pit=self.pit)


@dataclass(frozen=True)
class GuestCpuid:
    """The CPUID the guest sees, sent in HELLO so the target can refuse before any page moves."""

    entries: tuple[hv_state.CpuidEntry, ...]


@dataclass(frozen=True)
class MachineState:
    """Everything but memory, as plain data."""

    config: MachineConfig
    layout: DeviceLayout
    vcpus: tuple[hv_state.VcpuState, ...]
    vm: hv_state.VmState
    devices: tuple[tuple[DeviceEntry, object], ...]


@functools.cache
def registry() -> SchemaRegistry:
    """Every type a kvmigrate stream carries, under stable names (the names are the format).
    Built on first use and kept: no module registers anything into it as it is imported."""
    reg = SchemaRegistry()
    for cls, name in STATE_TYPES:
        reg.register(cls, name, version=1)
    for cls, name, version in DEVICE_STATES.values():
        reg.register(cls, name, version=version)
    for cls, name in ((SnapshotRef, "migrate.SnapshotRef"), (MemoryFileRef, "migrate.MemoryFileRef"),
                      (DiskFileRef, "migrate.DiskFileRef"), (VirtioSpec, "migrate.VirtioSpec"),
                      (MachineConfig, "migrate.MachineConfig"), (GuestCpuid, "migrate.GuestCpuid")):
        reg.register(cls, name, version=1)
    formats.register_format_types(reg)
    return reg


def new_snapshot_id() -> str:
    return secrets.token_hex(16)


def cpuid_digest(entries: tuple[hv_state.CpuidEntry, ...]) -> int:
    h = xxhash.xxh3_64()
    for e in entries:
        h.update(repr((e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)).encode())
    return h.intdigest()


# --- layout -------------------------------------------------------------------------------------


def _entry(p: DevicePlacement) -> DeviceEntry:
    version = DEVICE_STATES[p.kind][2] if p.kind in DEVICE_STATES else 0
    pci = None
    if p.pci is not None:
        pci = PciEntry(*p.pci.address, p.pci.vendor_id, p.pci.device_id, p.pci.class_code,
                       tuple(PciBar(*bar) for bar in p.pci.bars))
    return DeviceEntry(p.device_id, p.kind, tuple(IoRange(b, n) for b, n in p.pio),
                       tuple(IoRange(b, n) for b, n in p.mmio), p.irqs, version, pci)


def memory_layout(config: VmConfig) -> MemoryLayout:
    return MemoryLayout.of(*config.memory_layout())


def layout_for(config: VmConfig, placements: tuple[DevicePlacement, ...]) -> DeviceLayout:
    return DeviceLayout(memory_layout(config), config.vcpus, tuple(_entry(p) for p in placements))


def machine_layout(machine: Machine) -> DeviceLayout:
    return layout_for(machine.vm.config, machine.device_layout())


def expected_layout(config: MachineConfig) -> DeviceLayout:
    """The layout `blank_machine` will build for `config`: checked before any VM exists."""
    virtio = config.virtio.device_ids() if config.virtio else ()
    pci = config.virtio.pci if config.virtio else ()
    return layout_for(config.vm_config(), standard_layout(virtio, pci))


def virtio_spec(machine: Machine) -> VirtioSpec | None:
    """The virtio devices `machine` has, as plain data; the disk from the device's configuration."""
    blk, console, rng, net = (machine.devices.get(i) for i in ("virtio-blk0", "virtio-console0", "virtio-rng0",
                                                               "virtio-net0"))
    if blk is None and console is None and rng is None and net is None:
        return None
    disk = blk if isinstance(blk, VirtioBlk) else None
    card = net if isinstance(net, VirtioNet) else None
    pci = tuple(d for d in ("virtio-blk0", "virtio-console0", "virtio-rng0", "virtio-net0")
                if isinstance(machine.devices.get(d), VirtioPci))
    return VirtioSpec(str(disk.path) if disk else None, bool(disk and disk.read_only), console is not None,
                      rng is not None, pci, card.backend.mac if card else None, card.tap if card else None,
                      card.bridge if card else None)


# --- capture and apply ----------------------------------------------------------------------------


def machine_config(machine: Machine, *, snapshot_id: str = "", base: SnapshotRef | None = None,
                   memory_file: MemoryFileRef | None = None) -> MachineConfig:
    """The machine's CONFIG. Its TSC rate only from a paused (or not started) machine: a vCPU
    ioctl waits for KVM_RUN to return, which a running guest may not do for long."""
    c = machine.vm.config
    quiet = machine.state in (RunState.PAUSED, RunState.CREATED)
    return MachineConfig(c.mem_size, c.vcpus, c.irqchip, c.pit, cpuid_digest(machine.vcpus[0].cpuid),
                         virtio=virtio_spec(machine), tsc_khz=machine.vcpus[0].fd.get_tsc_khz() if quiet else 0,
                         snapshot_id=snapshot_id, base=base, memory_file=memory_file)


def capture(machine: Machine, config: MachineConfig | None = None) -> MachineState:
    """The state of a paused (or not yet started) machine."""
    if machine.state not in (RunState.PAUSED, RunState.CREATED):
        raise StateError(f"capture needs a paused machine, this one is {machine.state.value}")
    devices = []
    for placement in machine.device_layout():
        model = machine.devices[placement.device_id]
        devices.append((_entry(placement), model.save()))
    return MachineState(
        config=config or machine_config(machine),
        layout=machine_layout(machine),
        vcpus=tuple(v.save() for v in machine.vcpus),
        vm=machine.vm.save(),
        devices=tuple(devices),
    )


def shape_problems(state: MachineState, host_cpuid: Sequence[hv_state.CpuidEntry] | None = None) -> list[str]:
    """Everything structurally wrong with `state` against its own layout (every one): a vCPU
    count or id that differs, a device of the layout without a state, a state for a device the
    layout lacks or for one placed elsewhere, a state of another type than the device's kind
    takes; and each vCPU's registers against the architecture's rules as KVM enforces them
    (`hv.kvm.archcheck`; `host_cpuid`: what this host offers, `host_features`). Checked in
    staging, before any VM exists: `apply` then cannot fail on structure."""
    layout, problems = state.layout, []
    if state.config.vcpus != layout.vcpus:
        problems.append(f"the config has {state.config.vcpus} vCPUs, the layout {layout.vcpus}")
    if len(state.vcpus) != layout.vcpus:
        problems.append(f"{len(state.vcpus)} vCPU states for {layout.vcpus} vCPUs")
    for index, vcpu in enumerate(state.vcpus):
        if type(vcpu) is not hv_state.VcpuState:
            problems.append(f"vCPU state {index} is a {type(vcpu).__name__}, not a VcpuState")
        elif vcpu.vcpu_id != index:
            problems.append(f"vCPU state {index} is for vCPU {vcpu.vcpu_id}")
        else:
            problems += vcpu_problems(vcpu, host_cpuid)
    if type(state.vm) is not hv_state.VmState:
        problems.append(f"the VM state is a {type(state.vm).__name__}, not a VmState")
    expected = {d.device_id: d for d in layout.devices}
    seen: set[str] = set()
    for entry, saved in state.devices:
        placed = expected.get(entry.device_id)
        if placed is None:
            problems.append(f"a state for device {entry.device_id!r}, which the layout does not have")
            continue
        if entry.device_id in seen:
            problems.append(f"two states for device {entry.device_id!r}")
        seen.add(entry.device_id)
        if entry != placed:
            problems.append(f"device {entry.device_id!r}: its state's entry differs from the layout's")
        kind = DEVICE_STATES.get(placed.kind)
        if kind is None:
            problems.append(f"device {entry.device_id!r}: kind {placed.kind!r} is not one this side has")
        elif type(saved) is not kind[0]:
            problems.append(f"device {entry.device_id!r} ({placed.kind}): its state is a "
                            f"{type(saved).__name__}, not a {kind[0].__name__}")
    problems += [f"device {d!r} of the layout has no state" for d in expected if d not in seen]
    return problems


def check_shape(state: MachineState, host_cpuid: Sequence[hv_state.CpuidEntry] | None = None) -> MachineState:
    """`state`, or `StateShapeError` listing everything `shape_problems` finds."""
    if problems := shape_problems(state, host_cpuid):
        raise StateShapeError(problems)
    return state


def apply(machine: Machine, state: MachineState) -> None:
    """Write `state` into a machine that has not run (memory is loaded separately, before): a
    created one, or one started paused whose vCPUs never entered the guest. Its shape was checked
    in staging (`check_shape`); what is left to fail is KVM's or a device's refusal of a value."""
    if machine.state is not RunState.CREATED and (machine.state is not RunState.PAUSED or machine.ever_ran):
        raise StateError(f"state goes into a machine that has not run, not a {machine.state.value} one")
    formats.check(state.layout, machine_layout(machine))
    check_shape(state)
    machine.vm.restore(state.vm)
    for vcpu, saved in zip(machine.vcpus, state.vcpus, strict=True):
        vcpu.restore(saved)
    for entry, device_state in state.devices:
        machine.devices[entry.device_id].restore(device_state)


# CPUID bits KVM sets in a vCPU's CPUID itself, whatever the host's supported list says: leaf 1
# ECX bit 31 (hypervisor), bit 27 (OSXSAVE) and leaf 7 ECX bit 4 (OSPKE) mirror the guest's CR4;
# leaf 1 EDX bit 9 (APIC) follows the in-kernel LAPIC.
_KVM_SET_BITS = {(0x1, "ecx"): (1 << 31) | (1 << 27), (0x1, "edx"): 1 << 9, (0x7, "ecx"): 1 << 4}


def cpuid_problems(saved: tuple[hv_state.CpuidEntry, ...],
                   supported: tuple[hv_state.CpuidEntry, ...]) -> list[str]:
    """Feature bits the guest was given that this host's KVM cannot give (every one listed).

    Only the feature-flag leaves are compared; values like APIC ids and cache sizes are per vCPU
    and per host and are set by the target's own CPUID setup."""
    feature_regs = {(0x1, 0): ("ecx", "edx"), (0x7, 0): ("ebx", "ecx", "edx"), (0xD, 1): ("eax",),
                    (0x80000001, 0): ("ecx", "edx")}
    have = {(e.function, e.index): e for e in supported}
    problems = []
    for e in saved:
        regs = feature_regs.get((e.function, e.index))
        if regs is None:
            continue
        host = have.get((e.function, e.index))
        for reg in regs:
            missing = getattr(e, reg) & ~(getattr(host, reg) if host else 0)
            missing &= ~_KVM_SET_BITS.get((e.function, reg), 0)
            if missing:
                problems.append(f"CPUID leaf {e.function:#x}.{e.index} {reg}: the guest uses "
                                f"{missing:#x} which this host cannot offer")
    return problems

