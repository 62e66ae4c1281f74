"""ACPI for the PCI host bridge: the MCFG table (PCI Firmware spec 3.0, 4.1.2) that gives the
ECAM window, and the DSDT's PCI root (`PNP0A08`, compatible `PNP0A03`) with the bus range and
windows it forwards (_CRS) and where each device's INTA goes (_PRT), as a Linux guest needs them
to find the bus and route legacy interrupts. Pure: bytes out; `acpi.py` places them.

The root's _CRS: bus numbers 0-0, ports 0xCF8-0xCFF (consumed: configuration mechanism #1), the
I/O window and the memory window BARs are placed in (produced). _PRT entries are (device
address 0xDDDDFFFF, pin 0 = INTA, source 0, GSI): the IOAPIC pin the function's INTx raises,
level-triggered as PCI lines are; hv raises and lowers it with KVM_IRQ_LINE. The ECAM window
is left out of the memory window and claimed by a `PNP0C02` device (motherboard resources),
where Linux looks before it trusts MCFG (else it falls back to 0xCF8).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .acpi import (aml_buffer, aml_device, aml_integer, aml_name, aml_pkg_length, res_io, res_memory32_fixed,
                   resource_template, sdt)

PCI_ROOT_HID = "PNP0A08"  # PCI Express root bridge
PCI_ROOT_CID = "PNP0A03"  # PCI root bridge
MOTHERBOARD_HID = "PNP0C02"  # motherboard resources (the ECAM window)
AML_PACKAGE_OP = 0x12
RES_WORD_ADDRESS, RES_DWORD_ADDRESS = 0x88, 0x87  # 6.4.3.5.3, 6.4.3.5.2
SPACE_MEMORY, SPACE_IO, SPACE_BUS = 0, 1, 2
FLAGS_PRODUCER_FIXED = 0x0C  # MinFixed | MaxFixed, positive decode, producer
MCFG_REVISION = 1


@dataclass(frozen=True)
class PciHostBridge:
    """What firmware says of the host bridge: its ECAM window and bus range, the windows it
    forwards, and each device's INTA line."""

    ecam_base: int
    bus_end: int  # buses 0..bus_end
    io_window: tuple[int, int]  # [low, high)
    mmio_window: tuple[int, int]
    intx: tuple[tuple[int, int], ...] = ()  # (device number, GSI of its INTA)

    @property
    def ecam_window(self) -> tuple[int, int]:
        return self.ecam_base, self.ecam_base + ((self.bus_end + 1) << 20)

    @property
    def ecam_window_size(self) -> tuple[int, int]:
        return self.ecam_base, (self.bus_end + 1) << 20


def mcfg(bridge: PciHostBridge) -> bytes:
    """The MCFG table: after the header, 8 reserved bytes, then one allocation: base address,
    segment group 0, start and end bus, 4 reserved bytes."""
    return sdt(b"MCFG", MCFG_REVISION, bytes(8) + struct.pack("<QHBBI", bridge.ecam_base, 0, 0, bridge.bus_end, 0))


def eisa_id(text: str) -> int:
    """A compressed EISA id (ACPI 19.3.4, EISAID()): three letters in 5 bits each and four hex
    digits, stored big-endian in a little-endian integer."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = letters[0] << 26 | letters[1] << 21 | letters[2] << 16 | int(text[3:], 16)
    return int.from_bytes(value.to_bytes(4, "big"), "little")


def res_word(space: int, low: int, high: int, type_flags: int = 0) -> bytes:
    """Word address space descriptor (WordBusNumber, WordIO) for [low, high], a producer."""
    return struct.pack("<BHBBBHHHHH", RES_WORD_ADDRESS, 13, space, FLAGS_PRODUCER_FIXED, type_flags, 0,
                       low, high, 0, high - low + 1)


def res_dword_memory(low: int, high: int) -> bytes:
    """DWordMemory (producer, fixed, non-cacheable, read-write) for [low, high]."""
    return struct.pack("<BHBBBIIIII", RES_DWORD_ADDRESS, 23, SPACE_MEMORY, FLAGS_PRODUCER_FIXED, 0x01, 0,
                       low, high, 0, high - low + 1)


def aml_package(elements: Sequence[bytes]) -> bytes:
    inner = bytes([len(elements)]) + b"".join(elements)
    return bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(inner)) + inner


def pci_root_device(bridge: PciHostBridge) -> bytes:
    """Device (PCI0) for the DSDT's \\_SB scope."""
    crs = resource_template(
        res_word(SPACE_BUS, 0, bridge.bus_end),
        res_io(0xCF8, 8),
        res_word(SPACE_IO, bridge.io_window[0], bridge.io_window[1] - 1, type_flags=0x03),
        *(res_dword_memory(low, high - 1) for low, high in _around(bridge.mmio_window, bridge.ecam_window)
          if high > low))
    prt = aml_package([aml_package([aml_integer(device << 16 | 0xFFFF), aml_integer(0), aml_integer(0),
                                    aml_integer(gsi)]) for device, gsi in bridge.intx])
    return aml_device("PCI0", aml_name("_HID", aml_integer(eisa_id(PCI_ROOT_HID)))
                      + aml_name("_CID", aml_integer(eisa_id(PCI_ROOT_CID)))
                      + aml_name("_SEG", aml_integer(0)) + aml_name("_UID", aml_integer(0))
                      + aml_name("_BBN", aml_integer(0))
                      + aml_name("_CRS", aml_buffer(crs)) + aml_name("_PRT", prt)) \
        + aml_device("MCFG", aml_name("_HID", aml_integer(eisa_id(MOTHERBOARD_HID)))
                     + aml_name("_CRS", aml_buffer(resource_template(res_memory32_fixed(*bridge.ecam_window_size)))))


def _around(window: tuple[int, int], hole: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """`window` without `hole` (the ECAM window is the bridge's own, not a BAR window)."""
    return ((window[0], min(window[1], hole[0])), (max(window[0], hole[1]), window[1]))
