"""virtio over PCI, modern only (virtio 1.x, 4.1): the device models of hv.devices.virtio
(blk, console, rng backends, queues, worker) behind a PCI function instead of an MMIO window.

    PCI IDs   vendor 0x1AF4, device 0x1040 + virtio device id, revision 1 (no legacy interface)
    BAR 0     32-bit memory, 16 KiB:
              0x0000 common configuration (4.1.4.3)   0x1000 ISR status (4.1.4.5)
              0x2000 device configuration (4.1.4.6)   0x3000 notifications, queue i at 0x3000 + 4i
    BAR 1     32-bit memory, 4 KiB: the MSI-X table at 0, the PBA at 0x800
    vectors   one per queue and one for configuration changes (the driver chooses which it uses)

The capability list holds the four virtio structures (vendor-specific capabilities, cfg_type 1-4,
each naming BAR 0 and an offset and length in it), the PCI configuration access capability
(cfg_type 5, which the spec requires: a window onto the BARs through configuration space, for
drivers that cannot map them: the driver writes bar, offset and length, then reads or writes
pci_cfg_data) and MSI-X.

Notifications: the driver writes the queue index (16 bits) at its queue's notify address; KVM
turns it into a signal on the queue's eventfd (an ioeventfd registered wherever BAR 0 is decoded,
moved when the guest moves the BAR), and the worker of `VirtioMmio` processes the queue.
Interrupts: with MSI-X enabled, the vector the driver wrote for each queue whose used ring moved
(`queue_msix_vector`), and the configuration vector for a configuration change (NEEDS_RESET);
`NO_VECTOR` means none. With MSI-X off, the INTx line (level, through the IOAPIC): ISR bits set
and the line raised, the ISR read returns the bits, clears them and lowers the line.

The transport reuses `VirtioMmio`'s core (status and feature negotiation, queues, worker, lock,
lifecycle, the transport part of the state) and replaces its register decoding and its interrupt.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from hv.devices.virtio.blk import VirtioBlk
from hv.devices.virtio.console import VirtioConsole
from hv.devices.virtio.net import DEFAULT_MAC, VirtioNet
from hv.devices.virtio.mmio import (
    INT_CONFIG_CHANGE,
    INT_USED_BUFFER,
    STATUS_FEATURES_OK,
    VirtioMmio,
    VirtioMmioState,
)
from hv.devices.virtio.rng import VirtioRng
from hv.errors import StateRestoreError
from hv.kvm.memory import GuestMemory
from hv.persist import check_int, check_type

from .config import COMMAND_INTX_DISABLE, Bar, BarKind, PciConfigSpace, PciIdentity
from .msix import NO_VECTOR, MsixState, MsixVectors
from .root import check_config

if TYPE_CHECKING:
    from hv.kvm.vm import Vm

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_MODERN_BASE = 0x1040
VIRTIO_PCI_SUBSYSTEM = 0x1100
CAP_ID_VENDOR = 0x09
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE, CFG_PCI = 1, 2, 3, 4, 5

BAR_REGISTERS, BAR_MSIX = 0, 1
REGISTERS_SIZE = 0x4000
COMMON, ISR, DEVICE, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
COMMON_SIZE, ISR_SIZE, DEVICE_SIZE, NOTIFY_SIZE = 0x38, 0x4, 0x1000, 0x1000
NOTIFY_MULTIPLIER = 4
MSIX_SIZE, MSIX_TABLE, MSIX_PBA = 0x1000, 0x000, 0x800

# common configuration fields (offset: size)
DEVICE_FEATURE_SELECT, DEVICE_FEATURE, DRIVER_FEATURE_SELECT, DRIVER_FEATURE = 0x00, 0x04, 0x08, 0x0C
CONFIG_MSIX_VECTOR, NUM_QUEUES, DEVICE_STATUS, CONFIG_GENERATION = 0x10, 0x12, 0x14, 0x15
QUEUE_SELECT, QUEUE_SIZE, QUEUE_MSIX_VECTOR, QUEUE_ENABLE, QUEUE_NOTIFY_OFF = 0x16, 0x18, 0x1A, 0x1C, 0x1E
QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE = 0x20, 0x28, 0x30
_COMMON_LAYOUT = struct.Struct("<IIIIHHBBHHHHHQQQ")
_QUEUE_ADDRESSES = {QUEUE_DESC: "desc", QUEUE_DRIVER: "driver", QUEUE_DEVICE: "device"}

# PCI class codes (base, sub, interface) by virtio device id, as QEMU gives them
CLASS_CODES = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00}


@dataclass(frozen=True)
class VirtioPciState:
    """The function's configuration space and MSI-X table, the virtio registers (the transport
    state virtio-mmio has too, and the vectors the driver chose) and the backend's state."""

    config: bytes
    msix: MsixState
    transport: VirtioMmioState
    config_vector: int
    queue_vectors: tuple[int, ...]
    backend: Any


def _capability(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """A virtio_pci_cap's bytes after cap_vndr and cap_next."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, BAR_REGISTERS, 0, offset, length) + extra


class VirtioPci(VirtioMmio):
    """The virtio-pci transport; combined with a device class (`VirtioPciBlk` = this + `VirtioBlk`),
    whose constructor builds the backend."""

    KIND: ClassVar[str]
    VIRTIO_DEVICE_ID: ClassVar[int]
    QUEUES: ClassVar[int]
    state_type: ClassVar[type] = VirtioPciState

    @classmethod
    def pci_shape(cls) -> tuple[PciIdentity, tuple[Bar, ...], int]:
        """(identity, BARs, MSI-X vectors): known without a device, for layouts."""
        d = cls.VIRTIO_DEVICE_ID
        identity = PciIdentity(VIRTIO_PCI_VENDOR, VIRTIO_PCI_MODERN_BASE + d, CLASS_CODES.get(d, 0xFF0000),
                               revision=1, subsystem_vendor_id=VIRTIO_PCI_VENDOR, subsystem_id=VIRTIO_PCI_SUBSYSTEM)
        bars = (Bar(BAR_REGISTERS, BarKind.MEMORY32, REGISTERS_SIZE), Bar(BAR_MSIX, BarKind.MEMORY32, MSIX_SIZE))
        return identity, bars, cls.QUEUES + 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        identity, bars, vectors = self.pci_shape()
        if (self.backend.device_id, len(self.queues)) != (self.VIRTIO_DEVICE_ID, self.QUEUES):
            raise TypeError(f"{type(self).__name__}: its backend is not a device {self.VIRTIO_DEVICE_ID}")
        self.config = PciConfigSpace(identity, bars)
        self.config.add_capability(CAP_ID_VENDOR, _capability(CFG_COMMON, COMMON, COMMON_SIZE))
        self.config.add_capability(CAP_ID_VENDOR, _capability(CFG_NOTIFY, NOTIFY, NOTIFY_SIZE,
                                                              struct.pack("<I", NOTIFY_MULTIPLIER)))
        self.config.add_capability(CAP_ID_VENDOR, _capability(CFG_ISR, ISR, ISR_SIZE))
        self.config.add_capability(CAP_ID_VENDOR, _capability(CFG_DEVICE, DEVICE, DEVICE_SIZE))
        # bar (+4), offset (+8) and length (+12) are the driver's to write, and pci_cfg_data (+16)
        writable = bytes(2) + b"\xff" + bytes(3) + b"\xff" * 12
        self.pci_cfg = self.config.add_capability(CAP_ID_VENDOR, _capability(CFG_PCI, 0, 0, bytes(4)), writable)
        self.msix = MsixVectors(self.config, vectors, BAR_MSIX, MSIX_TABLE, MSIX_PBA)
        self._config_vector = NO_VECTOR
        self._queue_vectors = [NO_VECTOR] * len(self.queues)
        self._intx_line: int | None = None
        self._intx_raised = False
        self._remap: Callable[[], None] = lambda: None
        if self._native is not None:  # queues served in C: their interrupts when not direct
            self._interrupt_requests = {os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC): q
                                        for q in self._native.native_queues}

    # --- KVM and bus wiring ----------------------------------------------------------------------

    def connect_pci(self, vm: Vm, msi_gsi_base: int, intx_line: int) -> None:
        """MSI-X vectors on GSIs from `msi_gsi_base`, INTx on IOAPIC pin `intx_line`. Without an
        irqchip neither exists (the guest polls the ISR, notifies come as MMIO exits)."""
        if not vm.has_irqchip:
            return
        self._vm, self._intx_line = vm, intx_line
        self.msix.connect(vm, msi_gsi_base)

    def attach(self, remap: Callable[[], None]) -> None:
        self._remap = remap

    def bars_mapped(self, mapped: dict[int, int]) -> None:
        """Notifications follow BAR 0: one ioeventfd per queue at its notify address."""
        vm = self._vm
        if vm is None:
            return
        for reg in self._ioeventfds:
            vm.unregister_ioeventfd(reg)
        self._ioeventfds = []
        if BAR_REGISTERS in mapped:
            base = mapped[BAR_REGISTERS] + NOTIFY
            self._ioeventfds = [vm.register_ioeventfd(fd, base + NOTIFY_MULTIPLIER * i, 2)
                                for i, fd in enumerate(self.queue_fds)]

    def _pci_cfg_window(self, offset: int, size: int) -> tuple[int, int, int] | None:
        """(bar, offset in it, length) when [offset, offset + size) touches pci_cfg_data and the
        window the driver set is one the spec allows (a BAR of ours, 1/2/4 bytes, aligned)."""
        data = self.pci_cfg + 16
        if offset + size <= data or offset >= data + 4:
            return None
        bar, at, length = (self.config.read(self.pci_cfg + 4, 1), self.config.read(self.pci_cfg + 8, 4),
                           self.config.read(self.pci_cfg + 12, 4))
        if bar not in self.config.bars or length not in (1, 2, 4) or at % length \
                or at + length > self.config.bars[bar].size:
            return None
        return bar, at, length

    def config_read(self, offset: int, size: int) -> int:
        window = self._pci_cfg_window(offset, size)
        if window is not None:  # pci_cfg_data reads the BAR
            bar, at, length = window
            value = self.bar_read(bar, at, length).to_bytes(length, "little").ljust(4, b"\0")
            data = self.pci_cfg + 16
            self.config.data[data : data + 4] = value
        return self.config.read(offset, size)

    def config_written(self, offset: int, size: int) -> None:
        window = self._pci_cfg_window(offset, size)
        if window is not None:  # pci_cfg_data written: to the BAR
            bar, at, length = window
            self.bar_write(bar, at, length, self.config.read(self.pci_cfg + 16, length))
        self.msix.control_written()
        with self._cond:
            self._rewire_native()
        if self._intx_raised:  # INTx Disable may have changed
            self._set_intx(True)

    # --- BARs ------------------------------------------------------------------------------------

    def bar_read(self, index: int, offset: int, size: int) -> int:
        if index == BAR_MSIX:
            if offset >= MSIX_PBA:
                return self.msix.read_pba(offset - MSIX_PBA, size)
            return self.msix.read_table(offset - MSIX_TABLE, size)
        with self._cond:
            if offset < COMMON + COMMON_SIZE:
                common = self._common_bytes()
                return int.from_bytes(common[offset : offset + size].ljust(size, b"\0"), "little")
            if ISR <= offset < ISR + ISR_SIZE:
                return self._read_isr() if offset == ISR else 0
            if DEVICE <= offset < DEVICE + DEVICE_SIZE:
                start = offset - DEVICE
                return int.from_bytes(self.backend.config()[start : start + size].ljust(size, b"\0"), "little")
        return 0

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None:
        if index == BAR_MSIX:
            if offset < MSIX_PBA:
                self.msix.write_table(offset - MSIX_TABLE, size, value)
                with self._cond:
                    self._rewire_native()
            return  # the PBA is read-only
        if NOTIFY <= offset < NOTIFY + NOTIFY_SIZE:
            queue = (offset - NOTIFY) // NOTIFY_MULTIPLIER  # an exit: no ioeventfd (or another width)
            self.notify(queue)
            return
        if offset < COMMON + COMMON_SIZE:
            with self._cond:
                self._write_common(offset, size, value)

    def _common_bytes(self) -> bytes:
        r, q = self._regs, self._queue()
        features = (self._device_features() >> (32 * r.device_features_sel)) & 0xFFFF_FFFF \
            if r.device_features_sel < 2 else 0
        driver = (r.driver_features >> (32 * r.driver_features_sel)) & 0xFFFF_FFFF if r.driver_features_sel < 2 else 0
        qs = q.state if q else None
        return _COMMON_LAYOUT.pack(
            r.device_features_sel, features, r.driver_features_sel, driver, self._config_vector, len(self.queues),
            r.status, r.config_generation & 0xFF, r.queue_sel & 0xFFFF,
            (qs.num or q.max_size) if q and qs else 0,
            self._queue_vectors[r.queue_sel] if q else NO_VECTOR, int(qs.ready) if qs else 0,
            r.queue_sel if q else 0, qs.desc if qs else 0, qs.driver if qs else 0, qs.device if qs else 0)

    def _vector(self, value: int) -> int:
        """A vector the table has, else NO_VECTOR (what the driver reads back: 4.1.5.1.2)."""
        return value if value < self.msix.vectors else NO_VECTOR

    def _write_common(self, offset: int, size: int, value: int) -> None:
        r, q = self._regs, self._queue()
        base = offset & ~0x7 if offset >= QUEUE_DESC else offset
        match offset:
            case 0x00:
                self._set(device_features_sel=value & 0xFFFF_FFFF)
            case 0x08:
                self._set(driver_features_sel=value & 0xFFFF_FFFF)
            case 0x0C if r.driver_features_sel < 2 and not r.status & STATUS_FEATURES_OK:
                shift = 32 * r.driver_features_sel
                self._set(driver_features=(r.driver_features & ~(0xFFFF_FFFF << shift))
                          | ((value & 0xFFFF_FFFF) << shift))
            case 0x10:
                self._config_vector = self._vector(value & 0xFFFF)
            case 0x14:
                self._write_status(value & 0xFF)
            case 0x16:
                self._set(queue_sel=value & 0xFFFF)
            case 0x18 if q and not q.state.ready:
                q.configure(num=value & 0xFFFF)
            case 0x1A if q:
                self._queue_vectors[q.index] = self._vector(value & 0xFFFF)
                self._rewire_native()
            case 0x1C if q and value & 1 and not q.state.ready:
                if not q.state.num:
                    q.configure(num=q.max_size)
                self._set_ready(q, True)
            case _ if base in _QUEUE_ADDRESSES and q and not q.state.ready:
                name, shift = _QUEUE_ADDRESSES[base], 8 * (offset - base)
                width = (1 << (8 * size)) - 1
                old = getattr(q.state, name)
                q.configure(**{name: ((old & ~(width << shift)) | ((value & width) << shift)) & ((1 << 64) - 1)})

    # --- interrupts ------------------------------------------------------------------------------

    def _interrupt(self, bits: int, queues: tuple[int, ...] = ()) -> None:
        self.interrupts += 1
        if self.msix.enabled:
            if bits & INT_CONFIG_CHANGE:
                self.msix.fire(self._config_vector)
            for vector in dict.fromkeys(self._queue_vectors[i] for i in queues):
                self.msix.fire(vector)
            return
        self._set(interrupt_status=self._regs.interrupt_status | bits)
        self._set_intx(bool(self._regs.interrupt_status))

    # --- queues served in C (virtio-net's rx and tx) ----------------------------------------------

    def _native_irq_fds(self) -> tuple[int, ...]:
        """Each native queue's interrupt: its vector's irqfd while MSI-X would send it at once
        (the engine signals KVM itself, no Python on the way); else the worker's request fd,
        whose `_interrupt` sets the pending bit (masked) or raises INTx; -1 for NO_VECTOR."""
        fds = []
        for fd, q in self._interrupt_requests.items():
            vector = self._queue_vectors[q]
            if not self.msix.enabled:
                fds.append(fd)
            elif vector == NO_VECTOR:
                fds.append(-1)
            else:
                direct = self.msix.direct_fd(vector)
                fds.append(fd if direct is None else direct)
        return tuple(fds)

    def _rewire_native(self) -> None:
        """Under the lock, after the table, Message Control or a queue's vector changed."""
        if self._native is not None and self._native_live:
            self._native.set_irq(self._native_irq_fds())

    def _halt_native(self) -> None:
        """The engine stopped: an interrupt it asked for and the worker has not raised yet is
        raised now (sent, or pending in the PBA, which the state carries), not left in an fd."""
        super()._halt_native()
        for fd, q in self._interrupt_requests.items():
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            if self._driver_ok():
                self._interrupt(INT_USED_BUFFER, (q,))

    def _read_isr(self) -> int:
        status = self._regs.interrupt_status
        if self._native is not None:
            self._native.native_isr(0xFFFF_FFFF)  # the engine's bits: raised through our ISR already
        self._set(interrupt_status=0)
        self._set_intx(False)
        return status

    def _set_intx(self, raised: bool) -> None:
        self._intx_raised = raised
        self.config.set_interrupt_status(raised)
        level = raised and not self.config.command & COMMAND_INTX_DISABLE
        if self._vm is not None and self._intx_line is not None:
            self._vm.set_irq_line(self._intx_line, level)

    def _reset(self) -> None:
        super()._reset()
        self._config_vector = NO_VECTOR
        self._queue_vectors = [NO_VECTOR] * len(self.queues)
        self._set_intx(False)

    def stop(self, timeout: float = 5.0) -> None:
        super().stop(timeout)
        self.msix.close()

    # --- the register block the machine's bus would reach: none (BARs instead) -------------------

    def read(self, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, offset: int, size: int, value: int) -> None:
        pass

    # --- state -----------------------------------------------------------------------------------

    def save(self) -> VirtioPciState:
        with self._cond:
            return VirtioPciState(bytes(self.config.data), self.msix.save(), self.save_transport(),
                                  self._config_vector, tuple(self._queue_vectors), self.backend.save())

    def restore(self, state: VirtioPciState) -> None:
        kind = self.KIND
        check_type(kind, state, VirtioPciState)
        check_config(kind, "config", self.config, state.config)
        check_type(kind, state.msix, MsixState)
        self.msix.check(kind, state.msix)
        check_int(kind, "config_vector", state.config_vector, 0, 0xFFFF)
        if type(state.queue_vectors) is not tuple or len(state.queue_vectors) != len(self.queues):
            raise StateRestoreError(kind, "queue_vectors", f"{len(self.queues)} vectors", state.queue_vectors)
        for i, v in enumerate(state.queue_vectors):
            check_int(kind, f"queue_vectors[{i}]", v, 0, 0xFFFF)
        self.check_transport(state.transport)
        self.apply_transport(state.transport, state.backend)  # the backend checks its part first
        with self._cond:
            self.config.data[:] = state.config
            self.msix.apply(state.msix)
            self._config_vector, self._queue_vectors = state.config_vector, list(state.queue_vectors)
            self._intx_raised = False
            self._rewire_native()  # a live engine's fds follow the table just applied
        self._remap()


class VirtioPciBlk(VirtioPci, VirtioBlk):
    """virtio-blk on PCI, backed by the file at `path`."""

    KIND: ClassVar[str] = "virtio-pci-blk"
    VIRTIO_DEVICE_ID, QUEUES = 2, 1

    def __init__(self, memory: GuestMemory, path: Path, *, read_only: bool = False, fd: int | None = None) -> None:
        super().__init__(memory, path, read_only=read_only, fd=fd)


class VirtioPciConsole(VirtioPci, VirtioConsole):
    """virtio-console on PCI: guest output to `output`, host input through `feed`."""

    KIND: ClassVar[str] = "virtio-pci-console"
    VIRTIO_DEVICE_ID, QUEUES = 3, 2

    def __init__(self, memory: GuestMemory, output: Callable[[bytes], None]) -> None:
        super().__init__(memory, output)


class VirtioPciRng(VirtioPci, VirtioRng):
    """virtio-rng on PCI."""

    KIND: ClassVar[str] = "virtio-pci-rng"
    VIRTIO_DEVICE_ID, QUEUES = 4, 1

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(memory)




class VirtioPciNet(VirtioPci, VirtioNet):
    """virtio-net on PCI over the tap `tap` (as `VirtioNet`): rx and tx each on the MSI-X vector
    the driver gave it, signalled by the C engine straight into KVM while unmasked."""

    KIND: ClassVar[str] = "virtio-pci-net"
    VIRTIO_DEVICE_ID, QUEUES = 1, 3

    def __init__(self, memory: GuestMemory, tap: str | None = None, *, mac: bytes = DEFAULT_MAC,
                 bridge: str | None = None, tap_fd: int | None = None) -> None:
        super().__init__(memory, tap, mac=mac, bridge=bridge, tap_fd=tap_fd)
