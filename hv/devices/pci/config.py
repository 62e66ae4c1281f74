"""A PCI function's configuration space (type 0 header) and the rules its registers follow.

Sans-IO and pure: 256 bytes of registers with, per byte, a mask of the bits software may write
and a mask of the bits it clears by writing 1 (W1C). Every rule of the PCI Local Bus spec this
model keeps is one of those two masks, so the whole space behaves the same through either
configuration mechanism and a reference model (tests) can state the rules independently:

- identity (vendor, device, revision, class, subsystem, header type, interrupt pin, the
  capabilities pointer and every capability's id and next pointer) is read-only;
- Command: I/O space, memory space, bus master, parity/SERR response and INTx disable are
  writable, the rest read as 0; Status: the interrupt status and capabilities bits are read-only,
  the error bits are W1C;
- a BAR of size 2^n has its low n address bits read-only 0 (so writing all ones and reading back
  gives the size: BAR sizing), its type bits read-only; the upper half of a 64-bit BAR is a
  plain writable register; unimplemented BARs and the expansion ROM read 0;
- cache line size, latency timer and interrupt line are plain read/write;
- capabilities declare which of their bytes are writable (MSI-X: enable and function mask).

Extended configuration space (ECAM offsets 0x100-0xFFF) is not implemented: it reads 0, which
says "no extended capabilities" to a guest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CONFIG_SIZE = 0x100
EXTENDED_SIZE = 0x1000

VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_PROG, CACHE_LINE_SIZE, LATENCY_TIMER, HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0D, 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID = 0x2C, 0x2E
ROM_ADDRESS, CAPABILITIES_POINTER = 0x30, 0x34
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
FIRST_CAPABILITY = 0x40
BAR_COUNT = 6

COMMAND_IO, COMMAND_MEMORY, COMMAND_MASTER = 0x1, 0x2, 0x4
COMMAND_PARITY, COMMAND_SERR, COMMAND_INTX_DISABLE = 0x40, 0x100, 0x400
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_PARITY | COMMAND_SERR \
    | COMMAND_INTX_DISABLE
STATUS_INTERRUPT, STATUS_CAPABILITIES = 0x08, 0x10
STATUS_W1C = 0x0100 | 0xF800  # master data parity error; target/master aborts, SERR, parity

BAR_IO, BAR_MEM64, BAR_PREFETCH = 0x1, 0x4, 0x8
INTERRUPT_PIN_INTA = 1


class BarKind(enum.Enum):
    MEMORY32 = "mem32"
    MEMORY64 = "mem64"
    IO = "io"


@dataclass(frozen=True)
class Bar:
    """One base address register: its index, kind and size (a power of two)."""

    index: int
    kind: BarKind
    size: int
    prefetchable: bool = False

    def __post_init__(self) -> None:
        minimum = 4 if self.kind is BarKind.IO else 16
        if self.size < minimum or self.size & (self.size - 1):
            raise ValueError(f"BAR {self.index}: size {self.size:#x} is not a power of two >= {minimum}")
        last = self.index + (1 if self.kind is BarKind.MEMORY64 else 0)
        if not 0 <= self.index or last >= BAR_COUNT:
            raise ValueError(f"BAR {self.index} ({self.kind.value}) does not fit in BARs 0-5")
        if self.kind is BarKind.IO and self.size > 0x100:
            raise ValueError(f"BAR {self.index}: an I/O BAR of {self.size:#x} ports (at most 0x100)")

    @property
    def type_bits(self) -> int:
        if self.kind is BarKind.IO:
            return BAR_IO
        return (BAR_MEM64 if self.kind is BarKind.MEMORY64 else 0) | (BAR_PREFETCH if self.prefetchable else 0)

    @property
    def address_mask(self) -> int:
        """The BAR's (first dword's) writable bits."""
        return ~(self.size - 1) & 0xFFFF_FFFF


@dataclass(frozen=True)
class PciIdentity:
    vendor_id: int
    device_id: int
    class_code: int  # base class << 16 | subclass << 8 | programming interface
    revision: int = 0
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    interrupt_pin: int = INTERRUPT_PIN_INTA  # 0: no INTx


class PciConfigSpace:
    """Registers plus their write and W1C masks; `read`/`write` at any offset and width."""

    def __init__(self, identity: PciIdentity, bars: tuple[Bar, ...] = ()) -> None:
        self.identity = identity
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1c = bytearray(CONFIG_SIZE)
        self.bars: dict[int, Bar] = {}
        self._next_capability = FIRST_CAPABILITY
        self._last_capability = 0
        i = identity
        self._put(VENDOR_ID, 2, i.vendor_id)
        self._put(DEVICE_ID, 2, i.device_id)
        self._put(REVISION_ID, 1, i.revision)
        self._put(CLASS_PROG, 3, i.class_code)
        self._put(SUBSYSTEM_VENDOR_ID, 2, i.subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, i.subsystem_id)
        self._put(INTERRUPT_PIN, 1, i.interrupt_pin)
        self._put(COMMAND, 2, 0, wmask=COMMAND_WRITABLE)
        self._put(STATUS, 2, 0, w1c=STATUS_W1C)
        self._put(CACHE_LINE_SIZE, 1, 0, wmask=0xFF)
        self._put(LATENCY_TIMER, 1, 0, wmask=0xFF)
        self._put(INTERRUPT_LINE, 1, 0xFF if i.interrupt_pin else 0, wmask=0xFF)
        for bar in bars:
            self._add_bar(bar)

    def _put(self, offset: int, size: int, value: int, *, wmask: int = 0, w1c: int = 0) -> None:
        end = offset + size
        self.data[offset:end] = value.to_bytes(size, "little")
        self.wmask[offset:end] = wmask.to_bytes(size, "little")
        self.w1c[offset:end] = w1c.to_bytes(size, "little")

    def _add_bar(self, bar: Bar) -> None:
        taken = {b.index for b in self.bars.values()} | {b.index + 1 for b in self.bars.values()
                                                         if b.kind is BarKind.MEMORY64}
        if bar.index in taken or (bar.kind is BarKind.MEMORY64 and bar.index + 1 in taken):
            raise ValueError(f"BAR {bar.index} overlaps another BAR")
        self.bars[bar.index] = bar
        self._put(BAR0 + 4 * bar.index, 4, bar.type_bits, wmask=bar.address_mask)
        if bar.kind is BarKind.MEMORY64:
            self._put(BAR0 + 4 * (bar.index + 1), 4, 0, wmask=0xFFFF_FFFF)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (`body`: its bytes after the id and next pointer; `writable`: the
        write mask of those bytes) to the list; returns its offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > CONFIG_SIZE:
            raise ValueError(f"no room for a capability of {length} bytes at {offset:#x}")
        self.data[offset] = cap_id
        self.data[offset + 2 : offset + length] = body
        if writable is not None:
            self.wmask[offset + 2 : offset + length] = writable
        if self._last_capability:
            self.data[self._last_capability + 1] = offset
        else:
            self.data[CAPABILITIES_POINTER] = offset
            self.data[STATUS] |= STATUS_CAPABILITIES
        self._last_capability = offset
        self._next_capability = (offset + length + 3) & ~3
        return offset

    # --- accesses ------------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset >= CONFIG_SIZE:
            return 0
        return int.from_bytes(self.data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """Apply the masks byte by byte: writable bits take the value, W1C bits written as 1
        clear, every other bit keeps what it had."""
        for i in range(size):
            at = offset + i
            if at >= CONFIG_SIZE:
                return
            byte = (value >> (8 * i)) & 0xFF
            old, wmask = self.data[at], self.wmask[at]
            self.data[at] = ((old & ~wmask) | (byte & wmask)) & ~(byte & self.w1c[at]) & 0xFF

    # --- facts read from the registers ---------------------------------------------------------

    @property
    def command(self) -> int:
        return self.read(COMMAND, 2)

    def set_interrupt_status(self, raised: bool) -> None:
        """Status bit 3 follows the function's INTx state (a read-only bit: the device sets it)."""
        if raised:
            self.data[STATUS] |= STATUS_INTERRUPT
        else:
            self.data[STATUS] &= ~STATUS_INTERRUPT & 0xFF

    def bar_address(self, index: int) -> int:
        """The address BAR `index` holds (whatever decoding is on)."""
        bar = self.bars[index]
        low = self.read(BAR0 + 4 * index, 4)
        if bar.kind is BarKind.IO:
            return low & ~0x3
        high = self.read(BAR0 + 4 * (index + 1), 4) if bar.kind is BarKind.MEMORY64 else 0
        return (high << 32) | (low & ~0xF)

    def set_bar_address(self, index: int, address: int) -> None:
        """Firmware's placement: what the guest reads until it writes the BAR itself."""
        bar = self.bars[index]
        if address & (bar.size - 1):
            raise ValueError(f"BAR {index}: {address:#x} is not aligned to its size {bar.size:#x}")
        self.data[BAR0 + 4 * index : BAR0 + 4 * index + 4] = ((address & 0xFFFF_FFFF) | bar.type_bits).to_bytes(4, "little")
        if bar.kind is BarKind.MEMORY64:
            self.data[BAR0 + 4 * index + 4 : BAR0 + 4 * index + 8] = (address >> 32).to_bytes(4, "little")

    def decoded_bars(self) -> dict[int, tuple[int, int]]:
        """BAR index -> (address, size) of the BARs the Command register lets decode."""
        command = self.command
        out = {}
        for index, bar in sorted(self.bars.items()):
            enabled = command & (COMMAND_IO if bar.kind is BarKind.IO else COMMAND_MEMORY)
            if enabled:
                out[index] = (self.bar_address(index), bar.size)
        return out

    def read_only_differences(self, saved: bytes) -> list[int]:
        """Offsets where `saved` differs from these registers in a bit software cannot write:
        a saved space must be this function's (same identity, BARs, capabilities)."""
        fixed = [~(w | c) & 0xFF for w, c in zip(self.wmask, self.w1c, strict=True)]
        volatile = {STATUS}  # the interrupt status bit is the device's, set at run time
        return [i for i in range(CONFIG_SIZE)
                if (saved[i] ^ self.data[i]) & fixed[i] & ~(STATUS_INTERRUPT if i in volatile else 0)]
