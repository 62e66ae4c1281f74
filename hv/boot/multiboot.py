"""Multiboot (v1, spec 0.6.96) loader for ELF32 kernels, like GRUB's and QEMU's `-kernel`.

The image is untrusted input: every header field is checked against the file and against guest
RAM before anything is copied, and a refusal names the field. The machine state on entry is the
spec's: 32-bit protected mode, flat segments, paging off, EAX = 0x2BADB002, EBX = the info struct.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hv.boot import elf
from hv.boot.x86 import LOW_MEMORY_END, FLAT_GDT_ADDRESS, EntryState, e820_map, protected_mode_entry
from hv.errors import BootError, GuestAddressError
from hv.kvm.memory import GuestMemory

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
HEADER_SEARCH = 8192

# Header flags
FLAG_PAGE_ALIGN = 1 << 0
FLAG_MEMORY_INFO = 1 << 1
FLAG_VIDEO_MODE = 1 << 2
FLAG_AOUT_KLUDGE = 1 << 16
_SUPPORTED_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO  # bits 0-15 are "must honour"

# Info flags
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_BOOT_LOADER_NAME = 1 << 9

# Where the loader puts its own structures: conventional memory, clear of the image (>= 1 MiB).
INFO_ADDRESS = 0x9000
MMAP_ADDRESS = 0x9100
LOADER_NAME_ADDRESS = 0x9300
CMDLINE_ADDRESS = 0x9400
CMDLINE_MAX = 0x9F000 - CMDLINE_ADDRESS
IMAGE_MIN_ADDRESS = 0x100000


LOADER_NAME = b"kvmigrate\0"



@dataclass(frozen=True)
class MultibootHeader:
    offset: int  # in the file
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


@dataclass(frozen=True)
class LoadedSegment:
    guest_address: int
    file_size: int
    mem_size: int


@dataclass(frozen=True)
class MultibootImage:
    header: MultibootHeader
    entry: int
    segments: tuple[LoadedSegment, ...]


def is_multiboot(image: bytes) -> bool:
    """Whether `image` carries a Multiboot v1 header (else hv takes it for a Linux kernel)."""
    window = image[:HEADER_SEARCH]
    return any(struct.unpack_from("<I", window, off)[0] == HEADER_MAGIC
               for off in range(0, len(window) - 3, 4))


def find_header(image: bytes, name: str = "image") -> MultibootHeader:
    limit = min(len(image), HEADER_SEARCH) - 12
    for off in range(0, max(limit, 0) + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFF_FFFF:
            raise BootError(name, f"multiboot header checksum at offset {off:#x}", 0,
                            (magic + flags + checksum) & 0xFFFF_FFFF)
        unknown_required = flags & 0xFFFF & ~_SUPPORTED_REQUIRED
        if unknown_required:
            raise BootError(name, "multiboot required flags", f"subset of {_SUPPORTED_REQUIRED:#x}",
                            f"{flags & 0xFFFF:#x} (video mode and others are not supported)")
        if flags & FLAG_AOUT_KLUDGE:
            if off + 32 > len(image):
                raise BootError(name, "multiboot a.out address fields", "32 bytes", len(image) - off)
            fields = struct.unpack_from("<5I", image, off + 12)
            return MultibootHeader(off, flags, *fields)
        return MultibootHeader(off, flags)
    raise BootError(name, "multiboot header", f"magic {HEADER_MAGIC:#x} in the first 8 KiB", "none")


def _check_ram(mem: GuestMemory, address: int, size: int, name: str, what: str) -> None:
    if address < IMAGE_MIN_ADDRESS:
        raise BootError(name, what, f"address >= {IMAGE_MIN_ADDRESS:#x}", f"{address:#x}")
    try:
        mem.find(address, max(size, 1))
    except GuestAddressError:
        raise BootError(name, what, "a range inside guest RAM",
                        f"[{address:#x}, {address + size:#x})") from None


def _elf_segments(image: bytes, name: str) -> tuple[int, list[tuple[int, int, int, int]]]:
    parsed = elf.parse(image, name)
    if parsed.bits != 32 or parsed.machine != elf.EM_386:
        raise BootError(name, "ELF class/machine", f"ELF32 for EM_386 ({elf.EM_386})",
                        f"ELF{parsed.bits} machine {parsed.machine}")
    return parsed.entry, [(s.paddr, s.offset, s.filesz, s.memsz) for s in parsed.loadable]


def load(mem: GuestMemory, image: bytes, name: str = "image") -> MultibootImage:
    """Copy the kernel's segments into guest memory (bss zeroed); nothing is written on error."""
    header = find_header(image, name)
    if header.flags & FLAG_AOUT_KLUDGE:
        h = header
        if h.load_addr > h.header_addr:
            raise BootError(name, "multiboot load_addr", f"<= header_addr {h.header_addr:#x}", h.load_addr)
        if h.load_end_addr and h.load_end_addr < h.load_addr:
            raise BootError(name, "multiboot load_end_addr", f">= load_addr {h.load_addr:#x}", h.load_end_addr)
        file_start = header.offset - (h.header_addr - h.load_addr)
        file_end = len(image) if h.load_end_addr == 0 else file_start + (h.load_end_addr - h.load_addr)
        if file_start < 0 or file_end > len(image):
            raise BootError(name, "multiboot load range", "inside the file", f"[{file_start}, {file_end})")
        mem_end = max(h.bss_end_addr, h.load_addr + (file_end - file_start))
        plan = [(h.load_addr, file_start, file_end - file_start, mem_end - h.load_addr)]
        entry = h.entry_addr
    else:
        entry, plan = _elf_segments(image, name)
    for paddr, _off, _filesz, memsz in plan:
        _check_ram(mem, paddr, memsz, name, f"segment at {paddr:#x}")
    if not any(paddr <= entry < paddr + memsz for paddr, _o, _f, memsz in plan):
        raise BootError(name, "entry point", "inside a loaded segment", f"{entry:#x}")
    for paddr, off, filesz, memsz in plan:
        mem.write(paddr, memoryview(image)[off : off + filesz])
        if memsz > filesz:
            mem.fill(paddr + filesz, memsz - filesz, 0)
    segments = tuple(LoadedSegment(p, f, m) for p, _o, f, m in plan)
    return MultibootImage(header, entry, segments)


def write_info(mem: GuestMemory, cmdline: str) -> int:
    """Write the multiboot_info struct, memory map, loader name and command line; return its address."""
    raw_cmdline = cmdline.encode() + b"\0"
    if len(raw_cmdline) > CMDLINE_MAX:
        raise BootError("command line", "length", f"<= {CMDLINE_MAX - 1} bytes", len(raw_cmdline) - 1)
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in e820_map(mem))
    # mem_upper: KiB of contiguous RAM from 1 MiB up to the first hole.
    low_region, _ = mem.find(0x100000)
    mem_upper = (low_region.range.end - 0x100000) // 1024
    info = bytearray(88)
    struct.pack_into("<III", info, 0, INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_BOOT_LOADER_NAME,
                     LOW_MEMORY_END // 1024, mem_upper)
    struct.pack_into("<I", info, 16, CMDLINE_ADDRESS)
    struct.pack_into("<II", info, 44, len(mmap), MMAP_ADDRESS)
    struct.pack_into("<I", info, 64, LOADER_NAME_ADDRESS)
    mem.write(INFO_ADDRESS, bytes(info))
    mem.write(MMAP_ADDRESS, mmap)
    mem.write(LOADER_NAME_ADDRESS, LOADER_NAME)
    mem.write(CMDLINE_ADDRESS, raw_cmdline)
    return INFO_ADDRESS


def boot(mem: GuestMemory, image: bytes, cmdline: str, name: str = "image") -> EntryState:
    """Load `image`, write the info struct, and return the boot vCPU's entry state."""
    loaded = load(mem, image, name)  # segments start at >= 1 MiB, clear of the loader's data
    info = write_info(mem, cmdline)
    return protected_mode_entry(mem, entry=loaded.entry, eax=BOOTLOADER_MAGIC, ebx=info)


__all__ = ["boot", "load", "write_info", "find_header", "MultibootImage", "FLAT_GDT_ADDRESS"]
