"""The PCI host bridge: bus 0, its functions, both configuration mechanisms, and BAR decoding.

Configuration mechanism #1 (PCI Local Bus 3.0, 3.2.2.3.2): a dword write to port 0xCF8 latches
an address (bit 31 enable, bus 23:16, device 15:11, function 10:8, register 7:2) and accesses
to 0xCFC-0xCFF reach that register (any width, at the byte the port offset says). ECAM
(PCI Express, 7.2.2): a memory window, 1 MiB per bus, where address bits 27:20 are the bus,
19:15 the device, 14:12 the function and 11:0 the register. This root has bus 0 only (MCFG says
so); an access to an absent function, another bus, or a disabled 0xCF8 address reads all ones
and writes go nowhere, as on real hardware.

The bridge itself is 00:00.0 (a host bridge, class 06 00 00). Functions join at the next free
device number (`PciRoot.add`). After every configuration write the root looks at the function's
BARs again: a BAR the Command register lets decode and that lies wholly inside the bridge's
window for its kind (memory or I/O) is mapped on the machine's bus through `BarWindows`; one
outside (mid-sizing, all ones) is not decoded, as a real bridge forwards only its windows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from hv.persist import U32, Persist, check_bytes, check_equal, check_int, check_type
from hv.errors import StateRestoreError

from .config import CONFIG_SIZE, EXTENDED_SIZE, BarKind, PciConfigSpace, PciIdentity

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORTS = 8  # 0xCF8 (address) and 0xCFC-0xCFF (data)
ECAM_BUS_SIZE = 1 << 20
DEVICES_PER_BUS = 32
HOST_BRIDGE = PciIdentity(vendor_id=0x8086, device_id=0x29C0, class_code=0x060000, interrupt_pin=0)


@dataclass(frozen=True, order=True)
class PciAddress:
    """Bus/device/function (crosvm's `PciAddress`)."""

    bus: int
    device: int
    function: int = 0

    def __str__(self) -> str:
        return f"{self.bus:02x}:{self.device:02x}.{self.function}"


class PciFunction(Persist[Any], Protocol):
    """What the root needs of a function: its configuration space, its BARs' contents, and a
    word after each configuration write and each change of where its BARs are decoded."""

    KIND: ClassVar[str]
    config: PciConfigSpace

    def bar_read(self, index: int, offset: int, size: int) -> int: ...

    def bar_write(self, index: int, offset: int, size: int, value: int) -> None: ...

    def config_read(self, offset: int, size: int) -> int:
        """A configuration read (most functions: `config.read`; a window onto a BAR may differ)."""
        ...

    def config_written(self, offset: int, size: int) -> None: ...

    def bars_mapped(self, mapped: dict[int, int]) -> None:
        """BAR index -> the base it is decoded at now (absent: not decoded)."""
        ...

    def attach(self, remap: Callable[[], None]) -> None:
        """The root's hook: called by the function after a restore changed its BARs."""
        ...


class BarWindows(Protocol):
    """Where decoded BARs go (the machine's MMIO and port buses)."""

    def map(self, name: str, kind: BarKind, base: int, size: int, device: _BarWindow) -> None: ...

    def unmap(self, name: str, kind: BarKind, base: int) -> None: ...


class _BarWindow:
    """One decoded BAR as a bus device: offsets within the BAR."""

    def __init__(self, function: PciFunction, index: int) -> None:
        self.function, self.index = function, index

    def read(self, offset: int, size: int) -> int:
        return self.function.bar_read(self.index, offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.function.bar_write(self.index, offset, size, value)


@dataclass(frozen=True)
class PciRootState:
    config_address: int  # the 0xCF8 latch
    bridge_config: bytes  # 00:00.0's configuration space


class PciRoot:
    """Bus 0 with the host bridge at 00:00.0; the device for ports 0xCF8-0xCFF (`read`/`write`)
    and, through `ecam`, for the ECAM window."""

    KIND: ClassVar[str] = "pci-host-bridge"

    def __init__(self, windows: BarWindows, mmio_window: tuple[int, int], io_window: tuple[int, int]) -> None:
        self.windows = windows
        self.mmio_window, self.io_window = mmio_window, io_window
        self.bridge = PciConfigSpace(HOST_BRIDGE)
        self.functions: dict[PciAddress, PciFunction] = {}
        self.names: dict[PciAddress, str] = {}
        self._mapped: dict[PciAddress, dict[int, int]] = {}
        self._config_address = 0
        self._lock = threading.RLock()
        self.ecam = _Ecam(self)

    # --- the bus -------------------------------------------------------------------------------

    def add(self, function: PciFunction, name: str) -> PciAddress:
        """Put `function` at the next free device number of bus 0 (function 0)."""
        with self._lock:
            for device in range(1, DEVICES_PER_BUS):
                address = PciAddress(0, device, 0)
                if address not in self.functions:
                    break
            else:
                raise ValueError("PCI bus 0 is full (31 devices)")
            self.functions[address] = function
            self.names[address] = name
            self._mapped[address] = {}
            function.attach(lambda: self.remap(address))
        self.remap(address)
        return address

    def _space(self, address: PciAddress) -> PciConfigSpace | None:
        if address == PciAddress(0, 0, 0):
            return self.bridge
        function = self.functions.get(address)
        return function.config if function is not None else None

    def config_read(self, address: PciAddress, register: int, size: int) -> int:
        with self._lock:
            space = self._space(address)
            if space is None or register + size > EXTENDED_SIZE:
                return (1 << (8 * size)) - 1
            function = self.functions.get(address)
        return function.config_read(register, size) if function is not None else space.read(register, size)

    def config_write(self, address: PciAddress, register: int, size: int, value: int) -> None:
        with self._lock:
            space = self._space(address)
            if space is None or register + size > EXTENDED_SIZE or register >= CONFIG_SIZE:
                return
            space.write(register, size, value)
            function = self.functions.get(address)
        if function is not None:
            function.config_written(register, size)
            self.remap(address)

    def remap(self, address: PciAddress) -> None:
        """Map the function's decodable BARs where they now point; unmap the rest."""
        with self._lock:
            function = self.functions[address]
            old = self._mapped[address]
            new = {}
            for index, (base, size) in function.config.decoded_bars().items():
                kind = function.config.bars[index].kind
                low, high = self.io_window if kind is BarKind.IO else self.mmio_window
                if low <= base and base + size <= high:
                    new[index] = base
            if new == old:
                return
            name = self.names[address]
            for index, base in old.items():
                if new.get(index) != base:
                    self.windows.unmap(f"{name} BAR{index}", function.config.bars[index].kind, base)
            for index, base in new.items():
                if old.get(index) != base:
                    bar = function.config.bars[index]
                    self.windows.map(f"{name} BAR{index}", bar.kind, base, bar.size, _BarWindow(function, index))
            self._mapped[address] = new
        function.bars_mapped(dict(new))

    # --- configuration mechanism #1 (ports 0xCF8-0xCFF) ---------------------------------------------

    def _latched(self) -> tuple[PciAddress, int] | None:
        a = self._config_address
        if not a & 0x8000_0000:
            return None
        return PciAddress((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7), a & 0xFC

    def read(self, offset: int, size: int) -> int:
        if offset == 0:
            return self._config_address if size == 4 else (1 << (8 * size)) - 1
        latched = self._latched() if offset >= 4 else None
        if latched is None:
            return (1 << (8 * size)) - 1
        address, register = latched
        return self.config_read(address, register + offset - 4, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == 0:
            if size == 4:  # byte writes to 0xCF8/0xCF9 are other registers (reset control)
                self._config_address = value & 0x80FF_FFFC
            return
        latched = self._latched() if offset >= 4 else None
        if latched is not None:
            address, register = latched
            self.config_write(address, register + offset - 4, size, value)

    # --- state ---------------------------------------------------------------------------------

    def save(self) -> PciRootState:
        with self._lock:
            return PciRootState(self._config_address, bytes(self.bridge.data))

    def restore(self, state: PciRootState) -> None:
        check_type(self.KIND, state, PciRootState)
        check_int(self.KIND, "config_address", state.config_address, 0, U32)
        if state.config_address & ~0x80FF_FFFC:
            raise StateRestoreError(self.KIND, "config_address", "reserved bits 0", hex(state.config_address))
        check_config(self.KIND, "bridge_config", self.bridge, state.bridge_config)
        with self._lock:
            self._config_address = state.config_address
            self.bridge.data[:] = state.bridge_config


def check_config(owner: str, field: str, space: PciConfigSpace, saved: object) -> None:
    """A saved configuration space fits `space`: its size, and every read-only bit equal."""
    check_bytes(owner, field, saved, CONFIG_SIZE)
    assert isinstance(saved, bytes)
    check_equal(owner, f"{field} length", CONFIG_SIZE, len(saved))
    differ = space.read_only_differences(saved)
    if differ:
        raise StateRestoreError(owner, f"{field}[{differ[0]:#x}]", f"{space.data[differ[0]]:#04x} (read-only)",
                                f"{saved[differ[0]]:#04x}")


class _Ecam:
    """The ECAM window as a bus device."""

    KIND: ClassVar[str] = "pci-ecam"

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    @staticmethod
    def _decode(offset: int) -> tuple[PciAddress, int]:
        return PciAddress(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 0x7), offset & 0xFFF

    def read(self, offset: int, size: int) -> int:
        address, register = self._decode(offset)
        return self.root.config_read(address, register, size)

    def write(self, offset: int, size: int, value: int) -> None:
        address, register = self._decode(offset)
        self.root.config_write(address, register, size, value)
