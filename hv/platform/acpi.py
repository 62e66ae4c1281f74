"""ACPI tables for an x86 guest: how a stock Linux kernel learns its CPUs, IOAPIC and devices.

Pure functions build each table as bytes (no KVM); `write_acpi` places them in guest RAM.

Why ACPI, and why the virtio-mmio devices are declared in the DSDT (`LNRO0005`) rather than put
behind virtio-pci:
- Debian's stock kernel has no `VIRTIO_MMIO_CMDLINE_DEVICES`, so `virtio_mmio.device=` on the
  command line does nothing; its virtio_mmio module finds devices only through the device tree or
  ACPI (the driver's ACPI match table holds `LNRO0005`). x86 has no device tree, so: ACPI.
- ACPI discovery is what Firecracker and Cloud Hypervisor do for virtio-mmio on x86. virtio-pci
  would need PCI config space (0xCF8/0xCFC or ECAM), BARs and MSI-X emulated for every device.
- The MADT is also how Linux learns how many CPUs there are (one Local APIC entry per vCPU) and
  where the IOAPIC is; without it (or an MP table, `hv.platform.mptable`) it runs on one CPU.

Choices:
- ACPI 2.0+ only: RSDP revision 2 pointing at an XSDT (64-bit entries); no RSDT.
- The FADT sets HW_REDUCED_ACPI (as Firecracker and Cloud Hypervisor do): no PM1/GPE register
  blocks, no SCI, no FACS, so no ACPI hardware to emulate. Linux then skips the legacy PIC and the
  PIT-based timer setup (acpi_generic_reduced_hw_init). COM1 is declared in the DSDT too
  (`PNP0501`, its ports and IRQ 4), as Firecracker does, so the 8250 PNP driver can claim it
  through ACPI; that part of boot is not reached on this project's hosts (see README), so it is
  untested against a real kernel.
- No interrupt source override for ISA IRQ 0 -> GSI 2, although QEMU declares one: QEMU installs
  its own GSI routing (GSI 0 to IOAPIC pin 2), while hv keeps KVM's default routing, in which GSI
  n goes to IOAPIC pin n (and PIC pin n) for n < 16, the in-kernel PIT included. Overrides can be
  passed when a platform needs them.
- Virtio interrupts are irqfd pulses, so they are declared edge-triggered, active high; the same as
  an ISA line's default, so lines below 16 need no override either.
- All tables live in 0xE0000-0xEFFFF, inside the BIOS area the e820 map already reports reserved
  (`hv.boot.x86.e820_map`), so the e820 map needs no change. The RSDP is at 0xE0000 on a 16-byte
  boundary, where ACPICA's scan of 0xE0000-0xFFFFF finds it even if a loader passes no pointer;
  PVH passes it as `hvm_start_info.rsdp_paddr`, the 64-bit protocol as `boot_params.acpi_rsdp_addr`.

Section numbers are from the ACPI Specification 6.5.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hv.binding.ffi import lib
from hv.errors import HvError
from hv.kvm.memory import GuestMemory

OEM_ID = b"KVMIG "  # 6 bytes
OEM_TABLE_PREFIX = b"KVMIG"  # + 3 characters of the table's signature = 8 bytes
OEM_REVISION = 1
CREATOR_ID = b"KVMG"
CREATOR_REVISION = 1

LOCAL_APIC_ADDRESS = 0xFEE0_0000
IOAPIC_ADDRESS = 0xFEC0_0000
IOAPIC_PINS = lib.KVM_IOAPIC_NUM_PINS  # KVM's in-kernel IOAPIC

ACPI_TABLES_START = 0xE0000  # RSDP first: ACPICA scans 0xE0000-0xFFFFF on 16-byte boundaries
ACPI_TABLES_END = 0xF0000  # 0xF0000-0xFFFFF is left to the MP table (hv.platform.mptable)

VIRTIO_MMIO_HID = "LNRO0005"  # drivers/virtio/virtio_mmio.c: virtio_mmio_acpi_match
COM_HID = "PNP0501"  # 16550A-compatible COM port


class FirmwareTableError(HvError):
    """A firmware table cannot be built as asked (too many entries, no room in its area)."""

    def __init__(self, table: str, detail: str) -> None:
        self.table, self.detail = table, detail
        super().__init__(f"{table}: {detail}")


@dataclass(frozen=True)
class MmioDevice:
    """A virtio-mmio transport: its register window and the GSI it raises."""

    base: int
    size: int
    gsi: int


@dataclass(frozen=True)
class ComPort:
    """A 16550-compatible UART: base I/O port (8 ports) and its IRQ."""

    port: int
    irq: int


@dataclass(frozen=True)
class InterruptOverride:
    """MADT Interrupt Source Override (5.2.12.5): ISA `source` arrives at `gsi`; `flags` are the
    MPS INTI flags (polarity bits 1:0, trigger mode bits 3:2; 0 = conforms to the bus)."""

    source: int
    gsi: int
    flags: int = 0


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with that byte at 0) sum to 0 mod 256 (5.2.6, Checksum)."""
    return -sum(data) & 0xFF


# --- System Description Table Header (5.2.6) ------------------------------------------------------
# Signature[4] Length:u32 Revision:u8 Checksum:u8 OEMID[6] OEMTableID[8] OEMRevision:u32
# CreatorID[4] CreatorRevision:u32 -> 36 bytes; the checksum byte is at offset 9.
_SDT_HEADER = struct.Struct("<4sIBB6s8sI4sI")
SDT_HEADER_SIZE = _SDT_HEADER.size
_SDT_CHECKSUM_OFFSET = 9


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete table: the header with its length and checksum, then `body`."""
    table = bytearray(_SDT_HEADER.pack(signature, SDT_HEADER_SIZE + len(body), revision, 0, OEM_ID,
                                       OEM_TABLE_PREFIX + signature[:3], OEM_REVISION, CREATOR_ID,
                                       CREATOR_REVISION) + body)
    table[_SDT_CHECKSUM_OFFSET] = checksum(table)
    return bytes(table)


# --- RSDP (5.2.5.3) -------------------------------------------------------------------------------
# "RSD PTR " Checksum:u8 (over the first 20 bytes) OEMID[6] Revision:u8 RsdtAddress:u32 Length:u32
# XsdtAddress:u64 ExtendedChecksum:u8 (over all 36 bytes) Reserved[3]
_RSDP = struct.Struct("<8sB6sBIIQB3s")
RSDP_SIZE = _RSDP.size  # 36
RSDP_REVISION = 2  # ACPI 2.0+: Length and XsdtAddress are valid


def rsdp(xsdt_address: int) -> bytes:
    raw = bytearray(_RSDP.pack(b"RSD PTR ", 0, OEM_ID, RSDP_REVISION, 0, RSDP_SIZE, xsdt_address, 0, bytes(3)))
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


# --- XSDT (5.2.8) ---------------------------------------------------------------------------------


def xsdt(table_addresses: Sequence[int]) -> bytes:
    return sdt(b"XSDT", 1, struct.pack(f"<{len(table_addresses)}Q", *table_addresses))


# --- FADT (5.2.9, Table 5.9) ----------------------------------------------------------------------
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_SIZE = 276  # up to and including Hypervisor Vendor Identity (ACPI 6.0+)
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20  # Table 5.10
# IA-PC Boot Architecture Flags (5.2.9.3, Table 5.11)
IAPC_BOOT_ARCH_8042 = 1 << 1  # hv's i8042 controller is there (a reset request stops the VM)
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3  # set unless the machine has PCI (MSI-X)
IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT = 1 << 5  # hv has no RTC model
# field offsets inside the FADT (Table 5.9)
_FADT_DSDT = 40  # u32
_FADT_IAPC_BOOT_ARCH = 109  # u16
_FADT_FLAGS = 112  # u32
_FADT_MINOR_VERSION = 131  # u8
_FADT_X_DSDT = 140  # u64
_FADT_HYPERVISOR_VENDOR = 268  # u64
HYPERVISOR_VENDOR = b"KVMIGRAT"


def fadt(dsdt_address: int, msi: bool = False) -> bytes:
    """A hardware-reduced FADT: only the DSDT pointer (both the 32- and 64-bit fields, equal, as
    ACPICA wants when both are set), flags and boot architecture flags are non-zero. `msi`: the
    machine has PCI with MSI-X (else the boot flags say MSI is not supported)."""
    body = bytearray(FADT_SIZE - SDT_HEADER_SIZE)

    def put(fmt: str, offset: int, value: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - SDT_HEADER_SIZE, value)

    put("<I", _FADT_DSDT, dsdt_address)
    put("<H", _FADT_IAPC_BOOT_ARCH, IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT
        | (0 if msi else IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED) | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
    put("<I", _FADT_FLAGS, FADT_FLAG_HW_REDUCED_ACPI)
    put("<B", _FADT_MINOR_VERSION, FADT_MINOR_REVISION)
    put("<Q", _FADT_X_DSDT, dsdt_address)
    put("<8s", _FADT_HYPERVISOR_VENDOR, HYPERVISOR_VENDOR)
    return sdt(b"FACP", FADT_REVISION, bytes(body))


# --- MADT (5.2.12) --------------------------------------------------------------------------------
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0  # KVM's in-kernel irqchip has the dual 8259 too
MADT_LOCAL_APIC = 0  # 5.2.12.2: type, length 8, ACPI Processor UID:u8, APIC ID:u8, Flags:u32
MADT_IO_APIC = 1  # 5.2.12.3: type, length 12, ID:u8, reserved:u8, Address:u32, GSI base:u32
MADT_INTERRUPT_OVERRIDE = 2  # 5.2.12.5: type, length 10, Bus:u8, Source:u8, GSI:u32, Flags:u16
MADT_LOCAL_APIC_NMI = 4  # 5.2.12.7: type, length 6, ACPI Processor UID:u8, Flags:u16, LINT#:u8
MADT_LOCAL_X2APIC = 9  # 5.2.12.12: type, length 16, reserved:u16, X2APIC ID:u32, Flags:u32, UID:u32
LOCAL_APIC_ENABLED = 1 << 0
ALL_PROCESSORS_UID = 0xFF  # the Local APIC NMI entry applies to every processor
XAPIC_MAX_ID = 0xFE  # 0xFF is the broadcast id: larger ids need x2APIC entries


def ioapic_id(vcpus: int) -> int:
    """The IOAPIC's APIC id: the first id after the vCPUs' (MP spec 1.4 wants APIC ids unique across
    local and I/O APICs), or 0 when the vCPUs take every 8-bit id (x86-64 Linux does not care)."""
    return vcpus if vcpus <= XAPIC_MAX_ID else 0


def madt(vcpus: int, overrides: Sequence[InterruptOverride] = ()) -> bytes:
    """One enabled Local APIC entry per vCPU (APIC id = vCPU id = ACPI processor UID, as
    hv.kvm.cpuid reports it), x2APIC entries past id 254, the IOAPIC with GSI base 0, `overrides`, and
    LINT1 of every processor as NMI (as a PC wires it)."""
    if vcpus < 1:
        raise FirmwareTableError("MADT", f"{vcpus} vCPUs")
    entries = []
    for cpu in range(vcpus):
        if cpu <= XAPIC_MAX_ID:
            entries.append(struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LOCAL_APIC_ENABLED))
        else:
            entries.append(struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, cpu, LOCAL_APIC_ENABLED, cpu))
    entries.append(struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id(vcpus), 0, IOAPIC_ADDRESS, 0))
    for o in overrides:
        entries.append(struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, o.source, o.gsi, o.flags))
    entries.append(struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID, 0, 1))
    return sdt(b"APIC", MADT_REVISION, struct.pack("<II", LOCAL_APIC_ADDRESS, MADT_PCAT_COMPAT) + b"".join(entries))


# --- AML (chapter 20), the subset the DSDT needs --------------------------------------------------
AML_ZERO_OP = 0x00
AML_ONE_OP = 0x01
AML_NAME_OP = 0x08
AML_BYTE_PREFIX = 0x0A
AML_WORD_PREFIX = 0x0B
AML_DWORD_PREFIX = 0x0C
AML_STRING_PREFIX = 0x0D
AML_QWORD_PREFIX = 0x0E
AML_SCOPE_OP = 0x10
AML_BUFFER_OP = 0x11
AML_EXT_OP_PREFIX = 0x5B
AML_DEVICE_OP = 0x82  # after AML_EXT_OP_PREFIX
AML_ROOT_CHAR = 0x5C  # '\'
PKG_LENGTH_MAX = (1 << 28) - 1


def aml_pkg_length(content_length: int) -> bytes:
    """PkgLength (20.2.4) for `content_length` bytes following it; the encoded value counts the
    PkgLength bytes themselves. One byte holds up to 63; otherwise bits 7:6 of the lead byte give
    the number of following bytes (1-3), its bits 3:0 the low nibble, the following bytes the rest."""
    for extra in range(4):
        total = content_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            return bytes([extra << 6 | total & 0xF]) + (total >> 4).to_bytes(extra, "little")
    raise FirmwareTableError("DSDT", f"an AML package of {content_length} bytes")


def aml_name_seg(name: str) -> bytes:
    """NameSeg (20.2.2): 4 characters, lead A-Z or '_', then A-Z, 0-9 or '_', padded with '_'."""
    if not 1 <= len(name) <= 4 or not (name[0].isupper() or name[0] == "_") \
            or any(not (c.isupper() or c.isdigit() or c == "_") or not c.isascii() for c in name):
        raise FirmwareTableError("DSDT", f"bad AML name segment {name!r}")
    return name.ljust(4, "_").encode()


def aml_name_string(path: str) -> bytes:
    """NameString: an optional root prefix '\\', then one NameSeg (or a DualNamePath of two)."""
    root = path.startswith("\\")
    segs = [aml_name_seg(s) for s in path.lstrip("\\").split(".")]
    if len(segs) > 2:
        raise FirmwareTableError("DSDT", f"name path {path!r} longer than two segments")
    prefix = bytes([AML_ROOT_CHAR]) if root else b""
    return prefix + (b"\x2e" + segs[0] + segs[1] if len(segs) == 2 else segs[0])  # 0x2E DualNamePrefix


def aml_integer(value: int) -> bytes:
    """ComputationalData integer (20.2.3): ZeroOp, OneOp, or the smallest prefixed form."""
    if value == 0:
        return bytes([AML_ZERO_OP])
    if value == 1:
        return bytes([AML_ONE_OP])
    for prefix, size in ((AML_BYTE_PREFIX, 1), (AML_WORD_PREFIX, 2), (AML_DWORD_PREFIX, 4), (AML_QWORD_PREFIX, 8)):
        if 0 <= value < 1 << 8 * size:
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise FirmwareTableError("DSDT", f"integer {value} out of range")


def aml_string(value: str) -> bytes:
    """String (20.2.3): StringPrefix, ASCII characters 0x01-0x7F, NUL."""
    raw = value.encode("ascii")
    if 0 in raw:
        raise FirmwareTableError("DSDT", f"string {value!r} holds NUL")
    return bytes([AML_STRING_PREFIX]) + raw + b"\0"


def aml_name(name: str, data: bytes) -> bytes:
    """DefName (19.6.90, 20.2.5.1): NameOp NameString DataRefObject."""
    return bytes([AML_NAME_OP]) + aml_name_string(name) + data


def aml_buffer(data: bytes) -> bytes:
    """DefBuffer (20.2.5.4): BufferOp PkgLength BufferSize ByteList."""
    inner = aml_integer(len(data)) + data
    return bytes([AML_BUFFER_OP]) + aml_pkg_length(len(inner)) + inner


def aml_scope(name: str, terms: bytes) -> bytes:
    """DefScope (20.2.5.1): ScopeOp PkgLength NameString TermList."""
    inner = aml_name_string(name) + terms
    return bytes([AML_SCOPE_OP]) + aml_pkg_length(len(inner)) + inner


def aml_device(name: str, terms: bytes) -> bytes:
    """DefDevice (20.2.5.2): ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    inner = aml_name_string(name) + terms
    return bytes([AML_EXT_OP_PREFIX, AML_DEVICE_OP]) + aml_pkg_length(len(inner)) + inner


# --- resource descriptors for _CRS (6.4) ----------------------------------------------------------
RES_IO_PORT = 0x47  # 6.4.2.5 small item, length 7
RES_END_TAG = 0x79  # 6.4.2.9 small item, length 1 (the checksum)
RES_MEMORY32_FIXED = 0x86  # 6.4.3.4 large item, length 9
RES_EXTENDED_INTERRUPT = 0x89  # 6.4.3.6 large item
RES_IO_DECODE16 = 1 << 0
RES_MEM_READ_WRITE = 1 << 0
RES_INT_CONSUMER = 1 << 0
RES_INT_EDGE = 1 << 1  # 0 = level
RES_INT_ACTIVE_LOW = 1 << 2  # 0 = active high
RES_INT_SHARED = 1 << 3  # 0 = exclusive


def res_io(base: int, length: int) -> bytes:
    """IO (Decode16, base, base, 1, length): a fixed range of ports."""
    return struct.pack("<BBHHBB", RES_IO_PORT, RES_IO_DECODE16, base, base, 1, length)


def res_memory32_fixed(base: int, length: int) -> bytes:
    """Memory32Fixed (ReadWrite, base, length)."""
    return struct.pack("<BHBII", RES_MEMORY32_FIXED, 9, RES_MEM_READ_WRITE, base, length)


def res_interrupt(gsi: int) -> bytes:
    """Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}: one GSI."""
    return struct.pack("<BHBBI", RES_EXTENDED_INTERRUPT, 6, RES_INT_CONSUMER | RES_INT_EDGE, 1, gsi)


def resource_template(*descriptors: bytes) -> bytes:
    """The descriptors then an End Tag whose checksum makes the whole template sum to 0 (6.4.2.9)."""
    body = b"".join(descriptors) + bytes([RES_END_TAG])
    return body + bytes([checksum(body)])


# --- DSDT (5.2.11.1) ------------------------------------------------------------------------------
DSDT_REVISION = 2  # 2+: AML integers are 64-bit


def virtio_device_name(index: int) -> str:
    return f"VR{index:02X}"


def dsdt(virtio: Sequence[MmioDevice], com_ports: Sequence[ComPort] = (), more_devices: bytes = b"") -> bytes:
    """`\\_SB` holding one `LNRO0005` device per virtio-mmio transport (_UID = its index, _CRS =
    its window and GSI), one `PNP0501` per COM port, and `more_devices` (AML: the PCI root of
    `hv.platform.pci_acpi`)."""
    if len(virtio) > 0x100:
        raise FirmwareTableError("DSDT", f"{len(virtio)} virtio devices (names VR00-VRFF)")
    devices = []
    for i, port in enumerate(com_ports):
        crs = resource_template(res_io(port.port, 8), res_interrupt(port.irq))
        devices.append(aml_device(f"COM{i + 1}", aml_name("_HID", aml_string(COM_HID))
                                  + aml_name("_UID", aml_integer(i))
                                  + aml_name("_CRS", aml_buffer(crs))))
    for i, dev in enumerate(virtio):
        crs = resource_template(res_memory32_fixed(dev.base, dev.size), res_interrupt(dev.gsi))
        devices.append(aml_device(virtio_device_name(i), aml_name("_HID", aml_string(VIRTIO_MMIO_HID))
                                  + aml_name("_UID", aml_integer(i))
                                  + aml_name("_CRS", aml_buffer(crs))))
    return sdt(b"DSDT", DSDT_REVISION, aml_scope("\\_SB", b"".join(devices) + more_devices))


# --- placing them ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcpiTables:
    """Where `write_acpi` put each table (for the boot protocols, logs and tests)."""

    rsdp: int
    xsdt: int
    fadt: int
    madt: int
    dsdt: int
    end: int  # first byte past the last table


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def layout_acpi(vcpus: int, virtio: Sequence[MmioDevice], com_ports: Sequence[ComPort] = (),
                overrides: Sequence[InterruptOverride] = (),
                start: int = ACPI_TABLES_START, *, more_devices: bytes = b"",
                more_tables: Sequence[bytes] = (), msi: bool = False) -> tuple[AcpiTables, bytes]:
    """Every table laid out from `start` (RSDP, XSDT, FADT, MADT, DSDT, then `more_tables` such
    as MCFG, each 16-byte aligned): the addresses and one image of [start, end). `msi`: as
    `fadt`'s. Pure: no guest memory involved."""
    dsdt_raw, madt_raw = dsdt(virtio, com_ports, more_devices), madt(vcpus, overrides)
    a_rsdp = start
    a_xsdt = _align(a_rsdp + RSDP_SIZE, 16)
    a_fadt = _align(a_xsdt + SDT_HEADER_SIZE + (2 + len(more_tables)) * 8, 16)
    a_madt = _align(a_fadt + FADT_SIZE, 16)
    a_dsdt = _align(a_madt + len(madt_raw), 16)
    end = a_dsdt + len(dsdt_raw)
    placed = []
    for raw in more_tables:
        placed.append((_align(end, 16), raw))
        end = placed[-1][0] + len(raw)
    image = bytearray(end - start)
    # The XSDT lists every table but the DSDT, which only the FADT points at (5.2.8, 5.2.9).
    for address, raw in ((a_rsdp, rsdp(a_xsdt)), (a_xsdt, xsdt((a_fadt, a_madt, *(a for a, _ in placed)))),
                         (a_fadt, fadt(a_dsdt, msi)), (a_madt, madt_raw), (a_dsdt, dsdt_raw), *placed):
        image[address - start : address - start + len(raw)] = raw
    return AcpiTables(a_rsdp, a_xsdt, a_fadt, a_madt, a_dsdt, end), bytes(image)


def write_acpi(mem: GuestMemory, vcpus: int, virtio: Sequence[MmioDevice], com_ports: Sequence[ComPort] = (),
               overrides: Sequence[InterruptOverride] = (), *, more_devices: bytes = b"",
               more_tables: Sequence[bytes] = (), msi: bool = False) -> AcpiTables:
    """Write the tables to 0xE0000-0xEFFFF of guest RAM (reserved in hv's e820 map) and return
    where they are; `.rsdp` is what the boot protocols pass to the kernel."""
    tables, image = layout_acpi(vcpus, virtio, com_ports, overrides, more_devices=more_devices,
                                more_tables=more_tables, msi=msi)
    if tables.end > ACPI_TABLES_END:
        raise FirmwareTableError("ACPI", f"tables end at {tables.end:#x}, past {ACPI_TABLES_END:#x}")
    mem.write(ACPI_TABLES_START, image)
    return tables
