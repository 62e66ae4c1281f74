"""Firmware tables (ACPI, MP) parsed back independently of the code that builds them; iasl as a
second opinion on the AML; the tables in a real VM's RAM where the e820 map says reserved."""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hv.boot.x86 import E820_RESERVED, e820_map
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.kvm.vm import VmConfig
from hv.platform import acpi, mptable
from hv.vmm.builder import VirtioConfig, blank_machine, virtio_layout, write_firmware_tables

MiB = 1 << 20
VIRTIO = [acpi.MmioDevice(0xD000_0000 + 0x1000 * i, 0x1000, gsi) for i, gsi in enumerate((5, 6, 7, 16))]
COM1 = acpi.ComPort(0x3F8, 4)


# --- an independent reader ------------------------------------------------------------------------


def sum8(data: bytes) -> int:
    return sum(data) & 0xFF


@dataclass
class Table:
    address: int
    signature: bytes
    revision: int
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[36:]


def read_table(image: bytes, base: int, address: int) -> Table:
    off = address - base
    signature, length, revision = struct.unpack_from("<4sIB", image, off)
    raw = image[off : off + length]
    assert len(raw) == length >= 36, signature
    assert sum8(raw) == 0, f"{signature} checksum"
    assert raw[10:16] == acpi.OEM_ID
    return Table(address, signature, revision, raw)


def read_all(image: bytes, base: int) -> dict[bytes, Table]:
    """RSDP at `base` -> XSDT -> its tables, and the FADT's DSDT; every checksum checked."""
    rsdp = image[:36]
    assert rsdp[:8] == b"RSD PTR " and sum8(rsdp[:20]) == 0 and sum8(rsdp) == 0
    revision, rsdt, length, xsdt = struct.unpack_from("<BIIQ", rsdp, 15)
    assert (revision, rsdt, length) == (2, 0, 36)
    tables = {b"XSDT": read_table(image, base, xsdt)}
    body = tables[b"XSDT"].body
    for (address,) in struct.iter_unpack("<Q", body):
        t = read_table(image, base, address)
        assert t.signature not in tables and t.signature != b"DSDT"  # only the FADT points at the DSDT
        tables[t.signature] = t
    fadt = tables[b"FACP"]
    dsdt32, = struct.unpack_from("<I", fadt.raw, 40)
    x_dsdt, = struct.unpack_from("<Q", fadt.raw, 140)
    assert dsdt32 == x_dsdt
    tables[b"DSDT"] = read_table(image, base, x_dsdt)
    return tables


def madt_entries(madt: Table) -> list[tuple[int, bytes]]:
    body, pos, out = madt.body[8:], 0, []
    while pos < len(body):
        kind, length = body[pos], body[pos + 1]
        assert length >= 2
        out.append((kind, body[pos : pos + length]))
        pos += length
    assert pos == len(body)
    return out


# --- a tiny AML walker for the subset the DSDT uses -----------------------------------------------


def pkg_length(data: bytes, pos: int) -> tuple[int, int]:
    """(end of the package, position after the PkgLength)."""
    lead = data[pos]
    extra = lead >> 6
    if extra == 0:
        return pos + (lead & 0x3F), pos + 1
    value = lead & 0x0F
    for i in range(extra):
        value |= data[pos + 1 + i] << (4 + 8 * i)
    return pos + value, pos + 1 + extra


def name_string(data: bytes, pos: int) -> tuple[str, int]:
    prefix = ""
    if data[pos] == 0x5C:
        prefix, pos = "\\", pos + 1
    if data[pos] == 0x2E:
        return prefix + data[pos + 1 : pos + 5].decode() + "." + data[pos + 5 : pos + 9].decode(), pos + 9
    return prefix + data[pos : pos + 4].decode(), pos + 4


def data_object(data: bytes, pos: int) -> tuple[object, int]:
    op = data[pos]
    if op in (0x00, 0x01):
        return op, pos + 1
    sizes = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    if op in sizes:
        n = sizes[op]
        return int.from_bytes(data[pos + 1 : pos + 1 + n], "little"), pos + 1 + n
    if op == 0x0D:
        end = data.index(0, pos + 1)
        return data[pos + 1 : end].decode(), end + 1
    if op == 0x11:
        end, p = pkg_length(data, pos + 1)
        size, p = data_object(data, p)
        assert size == end - p
        return data[p:end], end
    raise AssertionError(f"AML op {op:#x} at {pos}")


def walk(data: bytes, pos: int, end: int, scope: str, out: dict[str, object]) -> None:
    """Fill `out` with every Name's value by its full path; Scope and Device nest."""
    while pos < end:
        op = data[pos]
        if op == 0x10 or (op == 0x5B and data[pos + 1] == 0x82):
            start = pos + (1 if op == 0x10 else 2)
            pkg_end, p = pkg_length(data, start)
            name, p = name_string(data, p)
            path = name if name.startswith("\\") else f"{scope}.{name}"
            if op != 0x10:
                out[path] = "Device"
            walk(data, p, pkg_end, path, out)
            pos = pkg_end
        elif op == 0x08:
            name, p = name_string(data, pos + 1)
            out[f"{scope}.{name}"], pos = data_object(data, p)
        else:
            raise AssertionError(f"AML op {op:#x} at {pos}")
    assert pos == end


def resources(template: bytes) -> list[tuple[int, bytes]]:
    """(item name, contents) for every descriptor; the End Tag checksum checked."""
    out, pos = [], 0
    while True:
        tag = template[pos]
        if tag & 0x80:
            length, = struct.unpack_from("<H", template, pos + 1)
            out.append((tag, template[pos + 3 : pos + 3 + length]))
            pos += 3 + length
        else:
            length = tag & 0x7
            if tag >> 3 == 0x0F:  # End Tag
                assert pos + 2 == len(template) and sum8(template) == 0
                return out
            out.append((tag & 0xF8 | length, template[pos + 1 : pos + 1 + length]))
            pos += 1 + length


def dsdt_devices(dsdt: Table) -> dict[str, object]:
    names: dict[str, object] = {}
    walk(dsdt.body, 0, len(dsdt.body), "", names)
    return names


# --- tests ----------------------------------------------------------------------------------------


def test_tables_parse_back_with_checksums_and_pointers() -> None:
    layout, image = acpi.layout_acpi(3, VIRTIO, [COM1])
    tables = read_all(image, layout.rsdp)
    assert sorted(tables) == [b"APIC", b"DSDT", b"FACP", b"XSDT"]
    assert {t.signature: t.address for t in tables.values()} == {
        b"XSDT": layout.xsdt, b"FACP": layout.fadt, b"APIC": layout.madt, b"DSDT": layout.dsdt}
    assert all(t.address % 16 == 0 for t in tables.values())
    fadt = tables[b"FACP"]
    assert (fadt.revision, len(fadt.raw)) == (6, 276)
    flags, = struct.unpack_from("<I", fadt.raw, 112)
    assert flags == acpi.FADT_FLAG_HW_REDUCED_ACPI
    boot_arch, = struct.unpack_from("<H", fadt.raw, 109)
    assert boot_arch & acpi.IAPC_BOOT_ARCH_8042 and boot_arch & acpi.IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT
    assert fadt.raw[131] == acpi.FADT_MINOR_REVISION


@pytest.mark.parametrize("vcpus", [1, 2, 8, 255, 300])
def test_madt_one_enabled_local_apic_per_vcpu_the_ioapic_and_overrides(vcpus: int) -> None:
    overrides = [acpi.InterruptOverride(9, 9, 0xD)]
    layout, image = acpi.layout_acpi(vcpus, VIRTIO, overrides=overrides)
    madt = read_all(image, layout.rsdp)[b"APIC"]
    lapic_address, flags = struct.unpack_from("<II", madt.body)
    assert (lapic_address, flags) == (0xFEE0_0000, 1)
    entries = madt_entries(madt)
    assert len(entries) == vcpus + 1 + len(overrides) + 1  # + IOAPIC, + the LINT1 NMI entry
    cpus = []
    for kind, raw in entries:
        if kind == 0:
            _, _, uid, apic_id, cpu_flags = struct.unpack("<BBBBI", raw)
            cpus.append((uid, apic_id, cpu_flags))
        elif kind == 9:
            _, _, _, apic_id, cpu_flags, uid = struct.unpack("<BBHIII", raw)
            cpus.append((uid, apic_id, cpu_flags))
    assert cpus == [(i, i, 1) for i in range(vcpus)]
    assert sum(kind == 9 for kind, _ in entries) == max(0, vcpus - 255)
    (ioapic,) = [raw for kind, raw in entries if kind == 1]
    _, _, ioapic_id, _, address, gsi_base = struct.unpack("<BBBBII", ioapic)
    assert (address, gsi_base) == (0xFEC0_0000, 0)
    assert ioapic_id not in {i for i, _, _ in cpus} or vcpus > 254
    isos = [struct.unpack("<BBBBIH", raw)[2:] for kind, raw in entries if kind == 2]
    assert isos == [(0, 9, 9, 0xD)]


def test_dsdt_declares_each_virtio_device_and_com1() -> None:
    layout, image = acpi.layout_acpi(2, VIRTIO, [COM1])
    dsdt = read_all(image, layout.rsdp)[b"DSDT"]
    assert dsdt.revision == 2
    names = dsdt_devices(dsdt)
    for i, dev in enumerate(VIRTIO):
        path = f"\\_SB_.VR{i:02X}"
        assert names[path] == "Device"
        assert names[f"{path}._HID"] == "LNRO0005" and names[f"{path}._UID"] == i
        (mem_kind, mem), (irq_kind, irq) = resources(names[f"{path}._CRS"])
        assert (mem_kind, irq_kind) == (0x86, 0x89)
        assert struct.unpack("<BII", mem) == (1, dev.base, dev.size)  # read-write, base, length
        flags, count, gsi = struct.unpack("<BBI", irq)
        assert (flags, count, gsi) == (0b011, 1, dev.gsi)  # consumer, edge, active high, exclusive
    assert names["\\_SB_.COM1._HID"] == "PNP0501"
    (io_kind, io), (_, irq) = resources(names["\\_SB_.COM1._CRS"])
    assert io_kind == 0x47 and struct.unpack("<BHHBB", io) == (1, 0x3F8, 0x3F8, 1, 8)
    assert struct.unpack("<BBI", irq)[2] == 4
    assert sum(v == "Device" for v in names.values()) == len(VIRTIO) + 1


def test_dsdt_with_many_devices_needs_multibyte_package_lengths() -> None:
    many = [acpi.MmioDevice(0xD000_0000 + 0x1000 * i, 0x1000, 5 + i % 19) for i in range(200)]
    dsdt = read_all(acpi.layout_acpi(1, many)[1], acpi.ACPI_TABLES_START)[b"DSDT"]
    assert len(dsdt.body) > 4096  # the \_SB scope's PkgLength takes 2 bytes or more
    names = dsdt_devices(dsdt)
    assert [names[f"\\_SB_.VR{i:02X}._UID"] for i in range(200)] == list(range(200))


@given(st.integers(0, acpi.PKG_LENGTH_MAX - 4))
def test_pkg_length_round_trips_with_the_shortest_encoding(content: int) -> None:
    encoded = acpi.aml_pkg_length(content)
    data = encoded + bytes(8)
    end, after = pkg_length(data, 0)
    assert after == len(encoded) and end == len(encoded) + content
    # one byte up to 63 in all; n bytes carry 4 + 8 * (n - 1) bits
    shortest = 1 if content + 1 < 0x40 else next(n for n in (2, 3, 4) if content + n < 1 << (4 + 8 * (n - 1)))
    assert len(encoded) == shortest


def test_bad_input_is_a_firmware_table_error() -> None:
    with pytest.raises(acpi.FirmwareTableError):
        acpi.madt(0)
    with pytest.raises(acpi.FirmwareTableError):
        acpi.aml_name_seg("lower")
    with pytest.raises(acpi.FirmwareTableError):
        acpi.dsdt([VIRTIO[0]] * 257)
    with pytest.raises(acpi.FirmwareTableError):
        mptable.config_table(255)
    with pytest.raises(acpi.FirmwareTableError):
        acpi.aml_pkg_length(acpi.PKG_LENGTH_MAX)


def _iasl_disassemble(tmp_path: Path, name: str, raw: bytes) -> str:
    path = tmp_path / f"{name}.dat"
    path.write_bytes(raw)
    done = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return (tmp_path / f"{name}.dsl").read_text()


def test_iasl_disassembles_every_table(tmp_path: Path) -> None:
    # the Makefile's set-up installs it (`make test`); without it this check cannot be made
    assert shutil.which("iasl"), "iasl (Debian package acpica-tools) is not installed: run `make install`"
    layout, image = acpi.layout_acpi(2, VIRTIO, [COM1])
    tables = read_all(image, layout.rsdp)
    dsl = _iasl_disassemble(tmp_path, "dsdt", tables[b"DSDT"].raw)
    for i, dev in enumerate(VIRTIO):
        assert f"Device (VR{i:02X})" in dsl
        assert f"0x{dev.base:08X},         // Address Base" in dsl
        assert f"0x{dev.gsi:08X}," in dsl
    assert dsl.count('Name (_HID, "LNRO0005")') == len(VIRTIO)
    assert "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, )" in dsl
    assert 'Name (_HID, "PNP0501"' in dsl
    madt = _iasl_disassemble(tmp_path, "apic", tables[b"APIC"].raw)
    assert madt.count("[Processor Local APIC]") == 2 and madt.count("[I/O APIC]") == 1
    fadt = _iasl_disassemble(tmp_path, "facp", tables[b"FACP"].raw)
    assert "Hardware Reduced (V5) : 1" in fadt
    assert f"DSDT Address : {layout.dsdt:016X}" in fadt
    for text in (dsl, madt, fadt):
        assert "**** " not in text and "Invalid" not in text  # iasl's markers for what it could not decode


# --- MP table -------------------------------------------------------------------------------------


def read_mptable(mem: GuestMemory, start: int) -> list[bytes]:
    fp = mem.read(start, 16)
    assert fp[:4] == b"_MP_" and sum8(fp) == 0
    config, length, revision, _, feature1 = struct.unpack_from("<IBBBB", fp, 4)
    assert (length, revision, feature1) == (1, 4, 0)
    header = mem.read(config, 44)
    assert header[:4] == b"PCMP"
    base_length, = struct.unpack_from("<H", header, 4)
    table = mem.read(config, base_length)
    assert sum8(table) == 0
    count, lapic = struct.unpack_from("<HI", table, 34)
    assert lapic == 0xFEE0_0000
    entries, pos = [], 44
    for _ in range(count):
        size = 20 if table[pos] == 0 else 8
        entries.append(table[pos : pos + size])
        pos += size
    assert pos == base_length
    return entries


@pytest.mark.parametrize("vcpus", [1, 2, 254])
def test_mptable_checksums_and_entries(vcpus: int) -> None:
    mem = GuestMemory()
    mem.insert(MemoryRegion(0, 2 * MiB, slot=0))
    placed = mptable.write_mptable(mem, vcpus)
    entries = read_mptable(mem, placed.floating_pointer)
    assert len(entries) == placed.entries == vcpus + 1 + 1 + 24 + 2
    cpus = [e for e in entries if e[0] == 0]
    assert [(e[1], e[3]) for e in cpus] == [(i, 3 if i == 0 else 1) for i in range(vcpus)]  # BSP first
    (bus,) = [e for e in entries if e[0] == 1]
    assert bus[2:] == b"ISA   "
    (ioapic,) = [e for e in entries if e[0] == 2]
    assert ioapic[1] == vcpus and struct.unpack_from("<I", ioapic, 4)[0] == 0xFEC0_0000
    io_ints = [e for e in entries if e[0] == 3]
    assert [(e[5], e[6], e[7]) for e in io_ints] == [(i, vcpus, i) for i in range(24)]  # ISA IRQ n -> pin n
    assert [(e[1], e[7]) for e in entries if e[0] == 4] == [(3, 0), (1, 1)]  # ExtINT LINT0, NMI LINT1
    # entries in the order the spec recommends: processors, buses, I/O APICs, I/O then local interrupts
    assert [e[0] for e in entries] == sorted(e[0] for e in entries)


# --- in a VM --------------------------------------------------------------------------------------


def _reserved(mem: GuestMemory, start: int, end: int) -> bool:
    return any(kind == E820_RESERVED and base <= start and end <= base + size for base, size, kind in e820_map(mem))


def test_firmware_tables_in_guest_ram_where_e820_says_reserved(kvm: Kvm) -> None:
    virtio = VirtioConfig(console_out=lambda b: None, rng=True)
    machine = blank_machine(kvm, VmConfig(mem_size=64 * MiB, vcpus=2), virtio=virtio)
    try:
        placed = write_firmware_tables(machine)
        mem = machine.vm.memory
        assert _reserved(mem, placed.acpi.rsdp, placed.acpi.end)
        assert _reserved(mem, placed.mptable.floating_pointer, placed.mptable.end)
        assert placed.acpi.end <= placed.mptable.floating_pointer  # no overlap
        image = mem.read(placed.acpi.rsdp, placed.acpi.end - placed.acpi.rsdp)
        tables = read_all(image, placed.acpi.rsdp)
        assert sum(kind == 0 for kind, _ in madt_entries(tables[b"APIC"])) == 2
        names = dsdt_devices(tables[b"DSDT"])
        layout = virtio_layout(virtio.device_ids())
        assert [p.device_id for p in layout] == ["virtio-console0", "virtio-rng0"]
        for i, p in enumerate(layout):
            (_, mem_res), (_, irq_res) = resources(names[f"\\_SB_.VR{i:02X}._CRS"])
            assert struct.unpack("<BII", mem_res)[1:] == p.mmio[0]
            assert struct.unpack("<BBI", irq_res)[2] == p.irqs[0]
        assert len([e for e in read_mptable(mem, placed.mptable.floating_pointer) if e[0] == 0]) == 2
    finally:
        machine.stop()
        machine.vm.close()


def test_pci_root_and_mcfg_disassemble_with_iasl(tmp_path: Path) -> None:
    """A machine with PCI: MCFG gives the ECAM window for bus 0, the DSDT's PNP0A08 root its bus
    range, 0xCF8 ports, I/O and memory windows (the ECAM window left out, claimed by PNP0C02)
    and each device's INTA line; the FADT no longer says MSI is unsupported."""
    from hv.platform import pci_acpi

    bridge = pci_acpi.PciHostBridge(0xE000_0000, 0, (0xC000, 0x1_0000), (0xD000_0000, 0xFEC0_0000), ((1, 5), (2, 6)))
    layout, image = acpi.layout_acpi(2, [], [COM1], more_devices=pci_acpi.pci_root_device(bridge),
                                     more_tables=[pci_acpi.mcfg(bridge)], msi=True)
    tables = read_all(image, layout.rsdp)
    assert sorted(tables) == [b"APIC", b"DSDT", b"FACP", b"MCFG", b"XSDT"]
    base, segment, start, end = struct.unpack_from("<QHBB", tables[b"MCFG"].body, 8)
    assert (base, segment, start, end) == (0xE000_0000, 0, 0, 0)
    boot_arch, = struct.unpack_from("<H", tables[b"FACP"].raw, 109)
    assert not boot_arch & acpi.IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED
    mcfg = _iasl_disassemble(tmp_path, "mcfg", tables[b"MCFG"].raw)
    assert "Base Address : 00000000E0000000" in mcfg and "End Bus Number : 00" in mcfg
    dsl = _iasl_disassemble(tmp_path, "dsdt", tables[b"DSDT"].raw)
    assert 'Name (_HID, EisaId ("PNP0A08")' in dsl and 'Name (_CID, EisaId ("PNP0A03")' in dsl
    assert 'Name (_HID, EisaId ("PNP0C02")' in dsl
    assert "WordBusNumber (ResourceProducer" in dsl and "0x0CF8,             // Range Minimum" in dsl
    assert "0xC000,             // Range Minimum" in dsl
    for low, high in ((0xD000_0000, 0xDFFF_FFFF), (0xE010_0000, 0xFEBF_FFFF)):
        assert f"0x{low:08X},         // Range Minimum" in dsl and f"0x{high:08X},         // Range Maximum" in dsl
    assert "0x0001FFFF," in dsl and "0x0002FFFF," in dsl
    assert "**** " not in dsl and "Invalid" not in dsl
