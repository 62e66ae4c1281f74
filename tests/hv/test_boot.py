"""Kernel loaders: Multiboot v1 (and its refusals), the shared ELF reader."""

from __future__ import annotations

import struct

import pytest
from tinyguest import LOAD_ADDRESS, OUT_LOOP, multiboot_elf

from hv.boot import elf, multiboot
from hv.errors import BootError
from hv.kvm.memory import GuestMemory, MemoryRegion

MiB = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory()
    m.insert(MemoryRegion(0, 16 * MiB, slot=0))
    return m


def test_multiboot_load_and_info(mem: GuestMemory) -> None:
    image = multiboot_elf(OUT_LOOP, bss=0x3000)
    entry = multiboot.boot(mem, image, "tiny.elf ws=8 rate=0", "tiny.elf")
    assert entry.regs.rax == multiboot.BOOTLOADER_MAGIC
    info = entry.regs.rbx
    flags, mem_lower, mem_upper = struct.unpack("<III", mem.read(info, 12))
    assert flags & multiboot.INFO_MEMORY and flags & multiboot.INFO_CMDLINE and flags & multiboot.INFO_MMAP
    assert (mem_lower, mem_upper) == (639, 15 * 1024)
    cmdline_at = struct.unpack("<I", mem.read(info + 16, 4))[0]
    assert mem.read(cmdline_at, 21) == b"tiny.elf ws=8 rate=0\0"
    mmap_len, mmap_at = struct.unpack("<II", mem.read(info + 44, 8))
    entries = [struct.unpack_from("<IQQI", mem.read(mmap_at, mmap_len), off) for off in range(0, mmap_len, 24)]
    assert [(base, length, kind) for _size, base, length, kind in entries] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x100000 - 0x9FC00, 2), (0x100000, 15 * MiB, 1)]
    assert mem.read(LOAD_ADDRESS + 12, len(OUT_LOOP)) == OUT_LOOP
    assert entry.regs.rip == LOAD_ADDRESS + 12
    assert entry.segments["cs"].db == 1 and entry.cr0 & 1


def _refused(mem: GuestMemory, image: bytes) -> BootError:
    before = mem.read(LOAD_ADDRESS, 64)
    with pytest.raises(BootError) as err:
        multiboot.boot(mem, image, "", "bad.elf")
    assert mem.read(LOAD_ADDRESS, 64) == before  # nothing written on refusal
    return err.value


def test_refusals_name_the_field(mem: GuestMemory) -> None:
    good = bytearray(multiboot_elf(OUT_LOOP))
    bad_checksum = bytearray(good)
    bad_checksum[0x1008] ^= 1
    assert "checksum" in _refused(mem, bytes(bad_checksum)).field
    assert _refused(mem, b"\0" * 9000).field == "multiboot header"
    video = multiboot_elf(OUT_LOOP, flags=0x7)
    assert "required flags" in _refused(mem, video).field
    huge_bss = multiboot_elf(OUT_LOOP, bss=64 * MiB)
    assert "segment" in _refused(mem, huge_bss).field
    truncated = bytes(good[:0x1000 + 20])
    err = _refused(mem, truncated)
    assert "segment" in err.field or "program headers" in err.field


def test_elf_reader_rejects_garbage() -> None:
    with pytest.raises(BootError):
        elf.parse(b"\x7fELF" + b"\xff" * 60, "x")
    with pytest.raises(BootError):
        elf.parse(b"MZ" + bytes(100), "x")
