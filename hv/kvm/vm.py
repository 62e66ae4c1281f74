"""A KVM virtual machine: x86 setup, memory slots, interrupts, dirty logging, VM-wide state."""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hv.binding import structconv
from hv.binding.fds import VmFd
from hv.binding.ffi import ffi, lib
from hv.errors import ConfigError, MissingCapabilityError, SlotError, StateRestoreError, VcpuIdError
from hv.kvm.capabilities import PlatformCapabilities
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import GuestMemory, MemoryRegion, RamBacking
from hv.persist import U64, check_equal, check_int, check_type
from hv.kvm.state import (
    ClockState,
    IoapicState,
    IrqchipState,
    PicState,
    PitState,
    VmState,
)
from hv.kvm.units import GiB, MiB
from hv.kvm.vcpu import SaveableMsrs, Vcpu

structconv.prepare(ClockState, IoapicState, PicState, PitState)


# x86 platform addresses: the top of the 32-bit space below the BIOS area is where QEMU and
# Firecracker put KVM's real-mode TSS (3 pages) and identity map page, outside guest RAM.
TSS_ADDRESS = 0xFFFB_D000
IDENTITY_MAP_ADDRESS = 0xFFFB_C000
# RAM below 4 GiB stops here; [3 GiB, 4 GiB) is left for MMIO (LAPIC, IOAPIC, devices).
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB


# GSI routing (KVM_SET_GSI_ROUTING replaces the table whole): the in-kernel irqchip's default
# routes are KVM's own (irq_comm.c): GSIs 0-15 to both PICs and the IOAPIC pin of the same
# number, 16-23 to IOAPIC pins only. MSI routes (PCI MSI-X vectors) take GSIs from 24 on.
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS


def default_irqchip_routes() -> list[tuple[int, int, int]]:
    """(gsi, chip, pin) of the routes KVM_CREATE_IRQCHIP sets up."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 16:
            pic = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, pic, gsi % 8))
        routes.append((gsi, lib.KVM_IRQCHIP_IOAPIC, gsi))
    return routes


MemoryBacking = Callable[[int, int], "mmap.mmap | RamBacking"]
"""(guest base, size) -> the mapping that backs that RAM region."""


@dataclass(frozen=True)
class VmConfig:
    mem_size: int = 256 * MiB
    vcpus: int = 1
    irqchip: bool = True  # in-kernel PIC + IOAPIC + LAPICs
    pit: bool = True  # in-kernel i8254

    def memory_layout(self) -> list[tuple[int, int]]:
        """(guest base, size) of each RAM region: below the MMIO hole, then above 4 GiB."""
        low = min(self.mem_size, MMIO_HOLE_START)
        layout = [(0, low)]
        if self.mem_size > low:
            layout.append((MMIO_HOLE_END, self.mem_size - low))
        return layout

    def validate(self, caps: PlatformCapabilities) -> None:
        if self.mem_size <= 0 or self.mem_size % PAGE_SIZE:
            raise ConfigError("mem_size", self.mem_size, "must be a positive number of 4 KiB pages")
        if not 1 <= self.vcpus <= caps.max_vcpus:
            raise ConfigError("vcpus", self.vcpus, f"must be between 1 and {caps.max_vcpus}")
        if self.irqchip and not caps.irqchip:
            raise MissingCapabilityError("KVM_CAP_IRQCHIP", "the in-kernel interrupt controller")
        if self.pit and not (caps.pit2 and self.irqchip):
            raise ConfigError("pit", True, "the in-kernel PIT needs KVM_CAP_PIT2 and the irqchip")


@dataclass(frozen=True)
class IoEventFdRegistration:
    fd: int
    address: int
    length: int
    pio: bool
    datamatch: int | None


class Vm:
    """A VM built from a `VmConfig`: memory laid out, irqchip and PIT created, vCPUs on demand."""

    def __init__(self, fd: VmFd, config: VmConfig, capabilities: PlatformCapabilities,
                 saveable_msrs: SaveableMsrs) -> None:
        self.fd = fd
        self.config = config
        self.capabilities = capabilities
        self.saveable_msrs = saveable_msrs  # shared by every VM of one Kvm
        self.memory = GuestMemory()
        self.vcpus: dict[int, Vcpu] = {}
        self._slots_lock = threading.Lock()
        self._next_slot = 0
        self._free_slots: list[int] = []
        self._dirty_logging = False
        self._dirty_generation = 0
        self._manual_protect = False
        self._irqfds: set[tuple[int, int]] = set()
        self._msi_routes: dict[int, tuple[int, int]] = {}  # gsi -> (address, data)
        self._routes_lock = threading.Lock()
        self._ioeventfds: set[IoEventFdRegistration] = set()

    # --- setup --------------------------------------------------------------------------------

    def setup_platform(self, backing: MemoryBacking | None = None) -> None:
        """x86 setup that must happen before any vCPU exists; RAM from `backing` if given."""
        caps, cfg = self.capabilities, self.config
        self.fd.set_tss_addr(TSS_ADDRESS)
        if caps.set_identity_map_addr:
            self.fd.set_identity_map_addr(IDENTITY_MAP_ADDRESS)
        if cfg.irqchip:
            self.fd.create_irqchip()
        if cfg.pit:
            self.fd.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)
        if caps.manual_dirty_log_protect & lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            # Manual protect: KVM_GET_DIRTY_LOG only reads; we re-protect with KVM_CLEAR_DIRTY_LOG
            # right after, so one fetch costs one pass over the slot, not a protect-all.
            self.fd.enable_cap(
                lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            )
            self._manual_protect = True
        for base, size in cfg.memory_layout():
            self.add_memory_region(base, size, backing=backing(base, size) if backing else None)

    @property
    def has_irqchip(self) -> bool:
        return self.config.irqchip

    @property
    def xsave_size(self) -> int:
        return self.capabilities.xsave_size

    # --- memory slots -------------------------------------------------------------------------

    def _take_slot(self) -> int:
        if self._free_slots:
            return self._free_slots.pop()
        if self._next_slot >= self.capabilities.max_memslots:
            raise SlotError(self._next_slot, f"KVM allows {self.capabilities.max_memslots} slots")
        self._next_slot += 1
        return self._next_slot - 1

    def _slot_flags(self, region: MemoryRegion) -> int:
        flags = lib.KVM_MEM_READONLY if region.readonly else 0
        if region.log_dirty:
            flags |= lib.KVM_MEM_LOG_DIRTY_PAGES
        return flags

    def _register(self, region: MemoryRegion, size: int | None = None) -> None:
        self.fd.set_user_memory_region(
            region.slot, self._slot_flags(region), region.guest_base,
            region.size if size is None else size, region.host_address,
        )

    def add_memory_region(
        self, guest_base: int, size: int, *, readonly: bool = False,
        backing: mmap.mmap | RamBacking | None = None,
    ) -> MemoryRegion:
        """Back [guest_base, guest_base+size) with fresh anonymous memory (or `backing`, a mapping
        of exactly `size` bytes, e.g. a MAP_PRIVATE file mapping) in a new slot."""
        mapped = backing.mapping if isinstance(backing, RamBacking) else backing
        if mapped is not None and len(mapped) != size:
            raise ConfigError("backing", len(mapped), f"must map exactly {size} bytes")
        if readonly and not self.capabilities.readonly_mem:
            raise MissingCapabilityError("KVM_CAP_READONLY_MEM", "read-only memory slots")
        with self._slots_lock:
            self.memory.check_free(guest_base, size)
            slot = self._take_slot()
            region = MemoryRegion(guest_base, size, slot=slot, readonly=readonly, backing=backing)
            region.log_dirty = self._dirty_logging and not readonly
            try:
                self._register(region)
            except BaseException:
                self._free_slots.append(slot)
                region.close()
                raise
            self.memory.insert(region)
        return region

    def remove_memory_region(self, region: MemoryRegion) -> None:
        with self._slots_lock:
            if region not in self.memory.regions:
                raise SlotError(region.slot, "is not a memory slot of this VM")
            self._register(region, size=0)  # size 0 deletes the slot
            self.memory.remove(region)
            self._free_slots.append(region.slot)
            region.close()

    # --- interrupts and eventfds ----------------------------------------------------------------

    def set_irq_line(self, irq: int, level: bool) -> None:
        self.fd.irq_line(irq, 1 if level else 0)

    def trigger_edge_irq(self, irq: int) -> None:
        self.fd.irq_line(irq, 1)
        self.fd.irq_line(irq, 0)

    def signal_msi(self, address: int, data: int) -> int:
        return self.fd.signal_msi(address, data)

    def set_msi_route(self, gsi: int, address: int, data: int) -> None:
        """Route `gsi` (at least `FIRST_MSI_GSI`) to an MSI message: an irqfd on it then
        delivers that message. The table KVM holds is replaced whole (KVM_SET_GSI_ROUTING), so
        it is rebuilt from the in-kernel irqchip's default routes and every MSI route set."""
        if gsi < FIRST_MSI_GSI:
            raise ValueError(f"GSI {gsi} is an irqchip pin; MSI routes start at {FIRST_MSI_GSI}")
        with self._routes_lock:
            self._msi_routes[gsi] = (address, data)
            self._apply_routes()

    def clear_msi_route(self, gsi: int) -> None:
        with self._routes_lock:
            if self._msi_routes.pop(gsi, None) is not None:
                self._apply_routes()

    def _apply_routes(self) -> None:
        msi = [(gsi, a, d) for gsi, (a, d) in sorted(self._msi_routes.items())]
        self.fd.set_gsi_routing(default_irqchip_routes(), msi)

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Have KVM raise `gsi` when `eventfd` is signalled (a write of 1), without an exit.

        Without `resample_fd` the line is pulsed: an edge. With it (KVM_IRQFD_FLAG_RESAMPLE, for
        a level-triggered line: an IOAPIC pin programmed level, as a PCI INTx is) the line stays
        asserted until the guest EOIs it; KVM then lowers it and signals `resample_fd`, so the
        device model can raise it again (signal `eventfd`) if its condition still holds."""
        if resample_fd is None:
            self.fd.irqfd(eventfd, gsi)
        else:
            if not self.has_irqchip:
                raise MissingCapabilityError("KVM_CAP_IRQCHIP", "a resampled (level-triggered) irqfd")
            self.fd.irqfd(eventfd, gsi, lib.KVM_IRQFD_FLAG_RESAMPLE, resample_fd)
        self._irqfds.add((eventfd, gsi))

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        self.fd.irqfd(eventfd, gsi, lib.KVM_IRQFD_FLAG_DEASSIGN)
        self._irqfds.discard((eventfd, gsi))

    def _ioeventfd(self, reg: IoEventFdRegistration, extra_flags: int) -> None:
        flags = extra_flags | (lib.KVM_IOEVENTFD_FLAG_PIO if reg.pio else 0)
        if reg.datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        self.fd.ioeventfd(reg.fd, reg.address, reg.length, flags, reg.datamatch or 0)

    def register_ioeventfd(
        self, eventfd: int, address: int, length: int = 4, *, pio: bool = False,
        datamatch: int | None = None,
    ) -> IoEventFdRegistration:
        """Have KVM signal `eventfd` on a guest write to `address` instead of exiting."""
        reg = IoEventFdRegistration(eventfd, address, length, pio, datamatch)
        self._ioeventfd(reg, 0)
        self._ioeventfds.add(reg)
        return reg

    def unregister_ioeventfd(self, reg: IoEventFdRegistration) -> None:
        self._ioeventfd(reg, lib.KVM_IOEVENTFD_FLAG_DEASSIGN)
        self._ioeventfds.discard(reg)

    # --- vCPUs --------------------------------------------------------------------------------

    @property
    def vcpu_count(self) -> int:
        """The vCPUs this VM is configured for (arcbox VirtualMachine::vcpu_count)."""
        return self.config.vcpus

    def is_managed_execution(self) -> bool:
        """False: the caller runs each vCPU on a thread of its own (`Vcpu.run`, as `Machine`
        does); KVM does not (arcbox VirtualMachine::is_managed_execution, KVM's answer)."""
        return False

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        if not 0 <= vcpu_id < self.config.vcpus:
            raise VcpuIdError(vcpu_id, self.config.vcpus)
        if vcpu_id in self.vcpus:
            raise ConfigError("vcpu_id", vcpu_id, "already created")
        vcpu = Vcpu(self, vcpu_id, self.fd.create_vcpu(vcpu_id), self.capabilities.vcpu_mmap_size)
        self.vcpus[vcpu_id] = vcpu
        return vcpu

    # --- dirty logging ------------------------------------------------------------------------

    @property
    def dirty_logging(self) -> bool:
        return self._dirty_logging

    @property
    def dirty_log_generation(self) -> int:
        """Counts every enable, disable and fetch of the dirty log: whoever relies on "pages
        dirtied since my last fetch" (an incremental snapshot) checks that nobody fetched since."""
        return self._dirty_generation

    def _set_dirty_logging(self, on: bool) -> None:
        with self._slots_lock:
            self._dirty_generation += 1
            self._dirty_logging = on
            for region in self.memory.regions:
                if region.readonly:
                    continue
                region.log_dirty = on
                self._register(region)

    def enable_dirty_log(self) -> None:
        """Start logging guest writes in every writable slot; the first fetch reports writes
        made from now on. VMM writes are tracked all the time and merged in on fetch."""
        self._set_dirty_logging(True)

    def disable_dirty_log(self) -> None:
        self._set_dirty_logging(False)

    def fetch_dirty_log(self, region: MemoryRegion) -> DirtyBitmap:
        """Pages of `region` written since the last fetch (KVM's log OR the VMM's), and reset."""
        kvm_bitmap = DirtyBitmap(region.npages)
        self._dirty_generation += 1
        if region.log_dirty:
            buf = ffi.from_buffer("__u64[]", kvm_bitmap.words)
            self.fd.get_dirty_log(region.slot, buf)
            if self._manual_protect and kvm_bitmap.words.any():
                self.fd.clear_dirty_log(region.slot, 0, region.npages, buf)
        kvm_bitmap |= region.take_vmm_dirty()
        return kvm_bitmap

    def fetch_dirty_logs(self) -> Iterator[tuple[MemoryRegion, DirtyBitmap]]:
        for region in self.memory.regions:
            yield region, self.fetch_dirty_log(region)

    # --- VM-wide state ------------------------------------------------------------------------

    def get_clock(self) -> ClockState:
        return structconv.from_struct(ClockState, self.fd.get_clock())

    def set_clock(self, state: ClockState) -> None:
        clock = ffi.new("struct kvm_clock_data *")
        clock.clock = state.clock  # flags are outputs of GET; SET takes none of them here
        self.fd.set_clock(clock)

    def _chip(self, chip: object, ctype: str) -> object:
        return ffi.cast(ctype, ffi.cast("char *", chip) + lib.KVMIG_IRQCHIP_CHIP_OFFSET)

    def _redirtbl(self, ioapic: object) -> object:
        return ffi.cast("__u64 *", ffi.cast("char *", ioapic) + lib.KVMIG_IOAPIC_REDIRTBL_OFFSET)

    def get_irqchip(self) -> IrqchipState:
        pics = []
        for chip_id in (lib.KVM_IRQCHIP_PIC_MASTER, lib.KVM_IRQCHIP_PIC_SLAVE):
            chip = self.fd.get_irqchip(chip_id)
            pics.append(structconv.from_struct(PicState, self._chip(chip, "struct kvm_pic_state *")))
        chip = self.fd.get_irqchip(lib.KVM_IRQCHIP_IOAPIC)
        ioapic = self._chip(chip, "struct kvm_ioapic_state *")
        table = self._redirtbl(ioapic)
        redir = tuple(int(table[i]) for i in range(lib.KVM_IOAPIC_NUM_PINS))
        return IrqchipState(pics[0], pics[1], structconv.from_struct(IoapicState, ioapic, redirtbl=redir))

    def set_irqchip(self, state: IrqchipState) -> None:
        for chip_id, pic in ((lib.KVM_IRQCHIP_PIC_MASTER, state.pic_master),
                             (lib.KVM_IRQCHIP_PIC_SLAVE, state.pic_slave)):
            chip = ffi.new("struct kvm_irqchip *")
            chip.chip_id = chip_id
            structconv.to_struct(pic, self._chip(chip, "struct kvm_pic_state *"))
            self.fd.set_irqchip(chip)
        if len(state.ioapic.redirtbl) != lib.KVM_IOAPIC_NUM_PINS:
            raise StateRestoreError("vm", "ioapic.redirtbl entries", lib.KVM_IOAPIC_NUM_PINS,
                                    len(state.ioapic.redirtbl))
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = lib.KVM_IRQCHIP_IOAPIC
        ioapic = self._chip(chip, "struct kvm_ioapic_state *")
        structconv.to_struct(state.ioapic, ioapic)
        table = self._redirtbl(ioapic)
        for i, entry in enumerate(state.ioapic.redirtbl):
            table[i] = entry
        self.fd.set_irqchip(chip)

    def get_pit(self) -> PitState:
        return structconv.from_struct(PitState, self.fd.get_pit2())

    def set_pit(self, state: PitState) -> None:
        self.fd.set_pit2(structconv.to_struct(state, ffi.new("struct kvm_pit_state2 *")))

    def save(self) -> VmState:
        return VmState(
            irqchip=self.get_irqchip() if self.config.irqchip else None,
            pit=self.get_pit() if self.config.pit else None,
            clock=self.get_clock(),
        )

    def _check(self, state: object) -> VmState:
        """The parts this VM has (and only those), with the sizes the kernel's structs have."""
        state = check_type("vm", state, VmState)
        for part, cls, present in (("irqchip", IrqchipState, self.config.irqchip),
                                   ("pit", PitState, self.config.pit)):
            value = getattr(state, part)
            check_equal("vm", f"{part} present", present, value is not None)
            if value is not None:
                check_type(f"vm {part}", value, cls)
        if state.irqchip is not None:
            for chip in ("pic_master", "pic_slave"):
                check_type(f"vm irqchip {chip}", getattr(state.irqchip, chip), PicState)
            check_type("vm irqchip ioapic", state.irqchip.ioapic, IoapicState)
            check_equal("vm", "ioapic.redirtbl entries", lib.KVM_IOAPIC_NUM_PINS,
                        len(state.irqchip.ioapic.redirtbl))
        if state.pit is not None:
            check_equal("vm", "pit.channels", 3, len(state.pit.channels))
        check_type("vm clock", state.clock, ClockState)
        check_int("vm", "clock.clock", state.clock.clock, 0, U64)
        return state

    def restore(self, state: VmState) -> None:
        """Check the state (`_check`), then apply the irqchip, the PIT and the clock."""
        state = self._check(state)
        if state.irqchip is not None:
            self.set_irqchip(state.irqchip)
        if state.pit is not None:
            self.set_pit(state.pit)
        self.set_clock(state.clock)

    # --- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        for vcpu in self.vcpus.values():
            vcpu.close()
        self.vcpus.clear()
        self.fd.close()
        for region in self.memory.regions:
            self.memory.remove(region)
            region.close()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

