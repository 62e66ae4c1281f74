"""The Linux boot path: PVH and the 64-bit protocol, on a tiny kernel and on Debian's stock one.

On hosts whose KVM emulates guest ring 0 (nested PVM, as on this project's machines), Debian's
kernel gets as far as memory init and then stops at an instruction the emulator cannot run. The
test asserts exactly that, so a machine with hardware virtualization shows the difference.
"""

from __future__ import annotations

import lzma
import re
import struct
from pathlib import Path

import pytest
from debian_boots import BACKGROUND_BOOTS, CMDLINE, E820_LINES, BackgroundBoots, DebianBoot, acpi_table_lines
from linux import initramfs  # tools/linux (debian_boots puts tools/ on the path)
from tinyguest import PVH_PRINT_CMDLINE, Recorder, pvh_elf64, wait_for

from hv.boot import linux
from hv.errors import BootError
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.kvm.vm import VmConfig
from hv.platform import acpi
from hv.vmm.builder import VirtioConfig, linux_machine

MiB = 1 << 20


def test_pvh_start_info_reaches_the_kernel(kvm: Kvm, write_image) -> None:
    out = bytearray()
    cmdline = "console=ttyS0 root=/dev/vda quiet"
    machine, booted = linux_machine(kvm, write_image(pvh_elf64(PVH_PRINT_CMDLINE), "pvh.elf"), cmdline,
                                    config=VmConfig(mem_size=64 * MiB), console=out.extend)
    done = Recorder()
    machine.io_bus.insert(0x501, 1, done, "done")
    try:
        assert booted.protocol == "pvh"
        machine.start()
        wait_for(lambda: done.writes)
        wait_for(lambda: len(out) >= len(cmdline))  # COM1's output arrives on the UART's thread
        assert out.decode() == cmdline
        assert done.writes == [(0, 1, 3)]  # low RAM, BIOS hole, RAM above 1 MiB
    finally:
        machine.stop()
        machine.vm.close()


def _bzimage(payload: bytes, version: int = 0x20F, xloadflags: int = 1) -> bytes:
    setup = bytearray(5 * 512)  # setup_sects = 4
    setup[0x1F1] = 4
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    struct.pack_into("<IH", setup, 0x202, 0x53726448, version)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<II", setup, 0x248, 0x40, len(payload))  # payload_offset, payload_length
    return bytes(setup) + bytes(0x40) + payload


def test_bzimage_payload_extracts_and_bad_images_are_refused() -> None:
    vmlinux = pvh_elf64(PVH_PRINT_CMDLINE)
    image = _bzimage(lzma.compress(vmlinux, format=lzma.FORMAT_XZ))
    assert linux.decompress_payload(linux.parse_bzimage(image).payload) == vmlinux
    cases = {
        "setup header magic": _bzimage(b"x")[:0x202] + b"XXXX" + _bzimage(b"x")[0x206:],
        "boot protocol version": _bzimage(b"x", version=0x200),
        "xloadflags": _bzimage(b"x", xloadflags=0),
    }
    for field, bad in cases.items():
        with pytest.raises(BootError) as err:
            linux.parse_bzimage(bad)
        assert err.value.field == field
    truncated = bytearray(image)
    struct.pack_into("<I", truncated, 0x24C, len(image))  # payload_length beyond the file
    with pytest.raises(BootError, match="payload"):
        linux.parse_bzimage(bytes(truncated))
    with pytest.raises(BootError, match="compression"):
        linux.decompress_payload(b"\x00" * 64)
    with pytest.raises(BootError, match="valid compressed"):
        linux.decompress_payload(b"\xfd7zXZ\x00" + b"\x00" * 64)
    with pytest.raises(BootError, match="ELF"):
        linux.decompress_payload(lzma.compress(b"not a kernel", format=lzma.FORMAT_XZ))


def test_initrd_goes_high_and_is_announced() -> None:
    mem = GuestMemory()
    mem.insert(MemoryRegion(0, 64 * MiB, slot=0))
    initrd = b"\x07" * 5000
    booted = linux.boot(mem, pvh_elf64(PVH_PRINT_CMDLINE), "x", initrd)
    base, size = booted.initrd_range
    assert size == 5000 and base % 4096 == 0 and base + size <= 64 * MiB and base >= booted.kernel_range[1]
    assert mem.read(base, size) == initrd
    magic, version, _flags, nr_modules, modlist = struct.unpack_from("<IIIIQ", mem.read(linux.START_INFO_ADDRESS, 24))
    assert (magic, version, nr_modules) == (linux.HVM_START_MAGIC, 1, 1)
    assert struct.unpack("<QQ", mem.read(modlist, 16)) == (base, size)


def _read_cpio(data: bytes) -> dict[str, bytes]:
    files, pos = {}, 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return files
        files[name] = data[pos : pos + size]
        pos += size + (-size % 4)


@pytest.fixture(scope="module")
def initrd(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("initrd") / "initramfs.cpio.gz"
    path.write_bytes(initramfs.build())
    return path


@pytest.fixture(scope="module")
def debian_boots(request, kvm: Kvm) -> dict[str, DebianBoot]:
    """Both boots of Debian's kernel (debian_boots.py): started in the background as the session
    was collected (tests/conftest.py), or here if this module is run some other way."""
    boots = request.config.stash.get(BACKGROUND_BOOTS, None)
    if boots is None:
        boots = request.config.stash[BACKGROUND_BOOTS] = BackgroundBoots()
    return boots.results(kvm)


@pytest.fixture
def pvh_boot(debian_boots: dict[str, DebianBoot]) -> DebianBoot:
    return debian_boots["pvh"]


@pytest.fixture
def boot_64bit(debian_boots: dict[str, DebianBoot]) -> DebianBoot:
    return debian_boots["64-bit"]


def test_initramfs_carries_busybox_and_virtio_modules_in_dependency_order(initrd: Path) -> None:
    import gzip

    files = _read_cpio(gzip.decompress(initrd.read_bytes()))
    assert files["init"].startswith(b"#!/bin/busybox sh")
    assert files["bin/busybox"][:4] == b"\x7fELF"
    order = files["etc/modules.order"].decode().split()
    for module in ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio-rng"):
        assert module in order and files[f"lib/modules/{module}.ko"][:4] == b"\x7fELF"
    for position, name in enumerate(order):  # each module after every module it depends on
        for dep in initramfs.module_depends(files[f"lib/modules/{name}.ko"]):
            assert dep in order[:position], f"{name} needs {dep} first"


@pytest.mark.slow
def test_debian_kernel_by_the_64bit_protocol_reads_our_zero_page(boot_64bit: DebianBoot) -> None:
    assert boot_64bit.protocol == "64-bit"
    assert f"Command line: {CMDLINE}" in boot_64bit.text
    for line in E820_LINES:
        assert line in boot_64bit.text


@pytest.mark.slow
def test_debian_kernel_by_pvh_boots_to_the_emulator_limit(pvh_boot: DebianBoot) -> None:
    assert pvh_boot.protocol == "pvh"
    text = pvh_boot.text
    assert f"Command line: {CMDLINE}" in text
    for line in E820_LINES:
        assert line in text
    assert pvh_boot.initrd_range is not None
    base, size = pvh_boot.initrd_range
    end = base + (size + 0xFFF & ~0xFFF) - 1  # setup.c prints the page-aligned end
    assert f"RAMDISK: [mem {base:#010x}-{end:#010x}]" in text  # found our initrd
    assert "Memory:" in text  # got through memory init
    # This host emulates guest ring 0 and cannot run `lock cmpxchg16b`: the typed stop, a
    # GuestFatalExit of an InternalError (emulation failure) with the instruction's bytes.
    # On a host with hardware virtualization the kernel goes on, and this assertion shows it.
    assert pvh_boot.returncode == 1 and "the VM failed" in pvh_boot.status, \
        f"the kernel kept running for {pvh_boot.seconds:.0f} s: {pvh_boot.status[-2000:]}"
    assert re.search(r"the VM failed: vCPU \d+: KVM internal error: emulation failure, instruction bytes f0 48 0f c7",
                     " ".join(pvh_boot.status.split())), pvh_boot.status[-2000:]


def test_linux_machine_points_the_kernel_at_its_acpi_tables(kvm: Kvm, write_image) -> None:
    """Both protocols carry the RSDP address; the tables describe every vCPU and virtio device."""
    image = write_image(pvh_elf64(PVH_PRINT_CMDLINE), "pvh.elf")
    for prefer_pvh in (True, False):
        machine, booted = linux_machine(kvm, image, "x", config=VmConfig(mem_size=64 * MiB, vcpus=2),
                                        prefer_pvh=prefer_pvh, virtio=VirtioConfig(rng=True))
        try:
            mem = machine.vm.memory
            if booted.protocol == "pvh":
                rsdp = mem.read_u64(linux.START_INFO_ADDRESS + linux.START_INFO_RSDP_OFFSET)
            else:
                rsdp = mem.read_u64(linux.ZERO_PAGE_ADDRESS + linux.BP_ACPI_RSDP_ADDR)
            assert rsdp == acpi.ACPI_TABLES_START and mem.read(rsdp, 8) == b"RSD PTR "
            assert [line.split()[1] for line in acpi_table_lines(mem, rsdp)] == ["RSDP", "XSDT", "FACP", "APIC", "DSDT"]
            (rng,) = [p for p in machine.device_layout() if p.device_id == "virtio-rng0"]
            area = mem.read(acpi.ACPI_TABLES_START, acpi.ACPI_TABLES_END - acpi.ACPI_TABLES_START)
            assert acpi.resource_template(acpi.res_memory32_fixed(*rng.mmio[0]), acpi.res_interrupt(rng.irqs[0])) in area
            assert mem.read(0xF0000, 4) == b"_MP_"
        finally:
            machine.stop()
            machine.vm.close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["pvh", "64-bit"])
def test_debian_kernel_reads_our_acpi_tables_and_allows_two_cpus(debian_boots: dict[str, DebianBoot],
                                                                 protocol: str) -> None:
    """Debian's kernel, 2 vCPUs and two virtio devices: setup_arch prints our table list (given as
    start_info.rsdp_paddr or boot_params.acpi_rsdp_addr), parses the MADT and sizes the
    possible-CPU map from it."""
    boot = debian_boots["pvh" if protocol == "pvh" else "64-bit"]
    assert boot.protocol == protocol
    text = boot.text
    for line in boot.acpi_lines:
        assert text.count(line) == 1, line
    assert "found SMP MP-table at [mem 0x000f0000-0x000f000f]" in text  # our floating pointer
    assert "ACPI: LAPIC_NMI (acpi_id[0xff] dfl dfl lint[0x1])" in text
    assert "ACPI: Using ACPI (MADT) for SMP configuration information" in text
    assert "IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23" in text
    assert "smpboot: Allowing 2 CPUs, 0 hotplug CPUs" in text


@pytest.mark.slow
def test_hv_run_boots_debians_bzimage_with_initrd_and_two_cpus_to_a_clear_end(pvh_boot: DebianBoot) -> None:
    """The command line path end to end: bzImage extracted, initrd placed, ACPI/MP tables for
    2 vCPUs; on this host the kernel then stops at the emulator's limit, reported as a typed
    error with the instruction bytes and exit status 1, not a hang or a traceback."""
    stdout, stderr = pvh_boot.text, pvh_boot.status
    assert f"Command line: {CMDLINE}" in stdout
    assert "smpboot: Allowing 2 CPUs" in stdout
    assert "RAMDISK: [mem" in stdout
    assert pvh_boot.returncode == 1, stderr[-2000:]
    assert "the VM failed" in stderr and "emulation failure" in stderr.lower()
    assert "f0 48 0f c7" in stderr.replace("\n", " ")  # lock cmpxchg16b
    assert "Traceback" not in stderr
