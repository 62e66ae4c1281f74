"""Intel MultiProcessor Specification 1.4 tables: the pre-ACPI way to announce CPUs and the IOAPIC.

Linux prefers the ACPI MADT (`hv.platform.acpi`) when it finds one; the MP table is what it reads
with `acpi=off`, and what kernels built without ACPI but with X86_MPPARSE (Debian's has both) use.
Firecracker writes one for the same reasons.

Layout, in 0xF0000-0xFFFFF (the BIOS area, which Linux's `smp_scan_config` searches and hv's e820
map reports reserved): the 16-byte floating pointer structure at 0xF0000, the configuration table
right after it. Entries, in the order the spec recommends (4.3): one processor per vCPU (APIC id
= vCPU id, vCPU 0 the bootstrap processor), one ISA bus, the IOAPIC, an I/O interrupt entry per
IOAPIC pin (ISA IRQ n -> pin n: KVM's default GSI routing; virtio GSIs above 15 are announced on
the ISA bus too, as Firecracker does, since there is no other bus), ExtINT on LINT0 and NMI on
LINT1 (virtual wire mode, as a PC wires its local APICs).

Section numbers are from the MP Specification 1.4 (May 1997).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hv.kvm.memory import GuestMemory
from hv.platform.acpi import (
    IOAPIC_ADDRESS,
    IOAPIC_PINS,
    LOCAL_APIC_ADDRESS,
    FirmwareTableError,
    checksum,
    ioapic_id,
)

MPTABLE_START = 0xF0000
MPTABLE_END = 0x100000
MP_SPEC_REVISION = 4  # 1.4
OEM_ID = b"KVMIG   "  # 8 bytes
PRODUCT_ID = b"KVMIGRATE   "  # 12 bytes
MAX_CPUS = 254  # 8-bit APIC ids, 0xFF being broadcast; the IOAPIC takes the next id

# Floating Pointer Structure (4.1, Figure 4-2): "_MP_" PhysicalAddressPointer:u32 Length:u8 (in
# 16-byte units) SpecRev:u8 Checksum:u8 FeatureBytes[5] (byte 1 = 0: a configuration table is
# present; byte 2 bit 7 IMCRP = 0: virtual wire mode).
_FLOATING = struct.Struct("<4sIBBB5s")
# Configuration Table Header (4.2, Figure 4-3): "PCMP" BaseTableLength:u16 SpecRev:u8 Checksum:u8
# OEMID[8] ProductID[12] OEMTablePointer:u32 OEMTableSize:u16 EntryCount:u16 LocalAPICAddress:u32
# ExtendedTableLength:u16 ExtendedTableChecksum:u8 Reserved:u8
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")
_HEADER_CHECKSUM_OFFSET = 7

MP_PROCESSOR = 0  # 4.3.1, 20 bytes
MP_BUS = 1  # 4.3.2, 8 bytes
MP_IOAPIC = 2  # 4.3.3, 8 bytes
MP_IO_INTERRUPT = 3  # 4.3.4, 8 bytes
MP_LOCAL_INTERRUPT = 4  # 4.3.5, 8 bytes
CPU_ENABLED = 1 << 0
CPU_BOOTSTRAP = 1 << 1
IOAPIC_ENABLED = 1 << 0
LOCAL_APIC_VERSION = 0x14  # what KVM's LAPIC version register reports
IOAPIC_VERSION = 0x11  # what KVM's IOAPIC version register reports
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = 0, 1, 2, 3
INT_FLAGS_CONFORM = 0  # polarity and trigger conform to the bus (ISA: edge, active high)
ISA_BUS_ID = 0
ALL_LOCAL_APICS = 0xFF
# CPU signature and feature flags (Table 4-5): family 6, and CPUID.1:EDX FPU | APIC; Linux reads
# neither from here (it executes CPUID), they only have to look plausible.
CPU_SIGNATURE = 6 << 8
CPU_FEATURES = (1 << 0) | (1 << 9)


@dataclass(frozen=True)
class MpTable:
    floating_pointer: int
    config_table: int
    end: int
    entries: int


def processor_entry(apic_id: int, bootstrap: bool) -> bytes:
    flags = CPU_ENABLED | (CPU_BOOTSTRAP if bootstrap else 0)
    return struct.pack("<BBBBII8s", MP_PROCESSOR, apic_id, LOCAL_APIC_VERSION, flags, CPU_SIGNATURE,
                       CPU_FEATURES, bytes(8))


def interrupt_entry(kind: int, int_type: int, src_irq: int, dest_apic: int, dest_pin: int) -> bytes:
    """I/O (4.3.4) or local (4.3.5) interrupt assignment: type, interrupt type, flags:u16, source
    bus id, source bus IRQ, destination APIC id, destination INTIN#/LINTIN#."""
    return struct.pack("<BBHBBBB", kind, int_type, INT_FLAGS_CONFORM, ISA_BUS_ID, src_irq, dest_apic, dest_pin)


def config_table(vcpus: int) -> bytes:
    """The base configuration table (header + entries), checksummed; no extended entries."""
    if not 1 <= vcpus <= MAX_CPUS:
        raise FirmwareTableError("MP table", f"{vcpus} vCPUs (1 to {MAX_CPUS} fit 8-bit APIC ids)")
    io_apic = ioapic_id(vcpus)
    entries = [processor_entry(cpu, cpu == 0) for cpu in range(vcpus)]
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", MP_IOAPIC, io_apic, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_ADDRESS))
    entries += [interrupt_entry(MP_IO_INTERRUPT, INT_TYPE_INT, pin, io_apic, pin) for pin in range(IOAPIC_PINS)]
    entries.append(interrupt_entry(MP_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, ALL_LOCAL_APICS, 0))
    entries.append(interrupt_entry(MP_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, ALL_LOCAL_APICS, 1))
    body = b"".join(entries)
    table = bytearray(_HEADER.pack(b"PCMP", _HEADER.size + len(body), MP_SPEC_REVISION, 0, OEM_ID, PRODUCT_ID,
                                   0, 0, len(entries), LOCAL_APIC_ADDRESS, 0, 0, 0) + body)
    table[_HEADER_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


def floating_pointer(config_address: int) -> bytes:
    raw = bytearray(_FLOATING.pack(b"_MP_", config_address, 1, MP_SPEC_REVISION, 0, bytes(5)))
    raw[10] = checksum(raw)
    return bytes(raw)


def write_mptable(mem: GuestMemory, vcpus: int, start: int = MPTABLE_START) -> MpTable:
    """Write the floating pointer at `start` (16-byte aligned) and the configuration table after it."""
    if start % 16:
        raise FirmwareTableError("MP table", f"floating pointer at {start:#x}, not 16-byte aligned")
    table = config_table(vcpus)
    config_address = start + _FLOATING.size
    end = config_address + len(table)
    if end > MPTABLE_END:
        raise FirmwareTableError("MP table", f"ends at {end:#x}, past {MPTABLE_END:#x}")
    mem.write(start, floating_pointer(config_address) + table)
    entries = struct.unpack_from("<H", table, 34)[0]
    return MpTable(start, config_address, end, entries)
