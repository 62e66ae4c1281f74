"""Linux x86-64 boot: bzImage or ELF vmlinux, PVH entry or the 64-bit boot protocol.

Paths, in the order `boot()` prefers them:
1. An ELF vmlinux with a PVH note (XEN_ELFNOTE_PHYS32_ENTRY): enter in 32-bit protected mode,
   EBX = `hvm_start_info` (command line, memory map, initrd as module 0). The kernel builds its own
   boot_params from it.
2. An ELF vmlinux without one: the 64-bit boot protocol as Firecracker does it: long mode with
   identity-mapped page tables, RSI = a zero page (boot_params) we fill, RIP = ELF entry.
3. A bzImage: its payload is extracted on the host (XZ, zstd, gzip, LZMA) and booted as 1/2.
   Guest-side decompression is also possible (`decompress_on_host=False`: the bzImage's own
   64-bit entry), but on hosts that emulate ring 0 it takes minutes.

Images are untrusted: header fields are checked against the file and guest RAM, decompression is
capped, and a refusal is a `BootError` naming the field.
"""

from __future__ import annotations

import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass

import zstandard

from hv.boot import elf
from hv.boot.x86 import EntryState, e820_map, long_mode_entry, protected_mode_entry
from hv.errors import BootError, GuestAddressError
from hv.kvm.memory import GuestMemory

# --- bzImage setup header (Documentation/arch/x86/boot.rst), at 0x1f1 ---------------------------

SETUP_HEADER_OFFSET = 0x1F1
_SETUP_FIELDS = (
    ("setup_sects", "B"), ("root_flags", "H"), ("syssize", "I"), ("ram_size", "H"),
    ("vid_mode", "H"), ("root_dev", "H"), ("boot_flag", "H"), ("jump", "H"), ("header", "I"),
    ("version", "H"), ("realmode_swtch", "I"), ("start_sys_seg", "H"), ("kernel_version", "H"),
    ("type_of_loader", "B"), ("loadflags", "B"), ("setup_move_size", "H"), ("code32_start", "I"),
    ("ramdisk_image", "I"), ("ramdisk_size", "I"), ("bootsect_kludge", "I"), ("heap_end_ptr", "H"),
    ("ext_loader_ver", "B"), ("ext_loader_type", "B"), ("cmd_line_ptr", "I"),
    ("initrd_addr_max", "I"), ("kernel_alignment", "I"), ("relocatable_kernel", "B"),
    ("min_alignment", "B"), ("xloadflags", "H"), ("cmdline_size", "I"), ("hardware_subarch", "I"),
    ("hardware_subarch_data", "Q"), ("payload_offset", "I"), ("payload_length", "I"),
    ("setup_data", "Q"), ("pref_address", "Q"), ("init_size", "I"), ("handover_offset", "I"),
    ("kernel_info_offset", "I"),
)
_SETUP = struct.Struct("<" + "".join(f for _, f in _SETUP_FIELDS))
_SETUP_OFF = {}
_off = SETUP_HEADER_OFFSET
for _name, _fmt in _SETUP_FIELDS:
    _SETUP_OFF[_name] = _off
    _off += struct.calcsize("<" + _fmt)

HDRS_MAGIC = 0x53726448  # "HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, 64-bit entry
XLF_KERNEL_64 = 1 << 0
LOADER_TYPE_UNDEFINED = 0xFF

# --- boot_params (zero page) offsets --------------------------------------------------------------
BP_ACPI_RSDP_ADDR = 0x070  # u64 (Documentation/arch/x86/zero-page.rst); read by any kernel that has it
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES_ZEROPAGE = 128

# --- PVH (xen/include/public/arch-x86/hvm/start_info.h) -------------------------------------------
XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
_START_INFO = struct.Struct("<IIIIQQQQII")  # magic version flags nr_modules modlist cmdline rsdp memmap n rsvd
START_INFO_RSDP_OFFSET = 0x20  # rsdp_paddr, u64
_MODLIST_ENTRY = struct.Struct("<QQQQ")
_MEMMAP_ENTRY = struct.Struct("<QQII")

# --- where this loader puts things ----------------------------------------------------------------
ZERO_PAGE_ADDRESS = 0x7000
START_INFO_ADDRESS = 0x6000
MODLIST_ADDRESS = 0x6100
MEMMAP_ADDRESS = 0x6200
CMDLINE_ADDRESS = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_MIN_ADDRESS = 0x100000
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst: for protocol < 2.03, and a sane cap above it

DECOMPRESSED_MAX = 512 << 20  # a kernel is tens of MiB; anything bigger is refused


@dataclass(frozen=True)
class SetupHeader:
    fields: dict[str, int]

    def __getattr__(self, name: str) -> int:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass(frozen=True)
class BzImage:
    header: SetupHeader
    setup_bytes: int  # the real-mode part, (setup_sects + 1) * 512
    kernel: bytes  # the protected-mode part
    payload: bytes  # the compressed vmlinux inside it


@dataclass(frozen=True)
class LinuxBoot:
    """What the loader did: the entry state, and where it put what (for logs and tests)."""

    entry: EntryState
    protocol: str  # "pvh" or "64-bit"
    kernel_range: tuple[int, int]
    initrd_range: tuple[int, int] | None
    cmdline: str


def parse_bzimage(data: bytes, name: str = "bzImage") -> BzImage:
    if len(data) < SETUP_HEADER_OFFSET + _SETUP.size:
        raise BootError(name, "size", f">= {SETUP_HEADER_OFFSET + _SETUP.size} bytes", len(data))
    header = SetupHeader(dict(zip((n for n, _ in _SETUP_FIELDS), _SETUP.unpack_from(data, SETUP_HEADER_OFFSET))))
    if header.header != HDRS_MAGIC or header.boot_flag != BOOT_FLAG:
        raise BootError(name, "setup header magic", "HdrS and boot flag 0xaa55",
                        f"{header.header:#x}, {header.boot_flag:#x}")
    if header.version < MIN_PROTOCOL:
        raise BootError(name, "boot protocol version", f">= {MIN_PROTOCOL:#x}", f"{header.version:#x}")
    if not header.xloadflags & XLF_KERNEL_64:
        raise BootError(name, "xloadflags", "XLF_KERNEL_64 (a 64-bit entry point)", f"{header.xloadflags:#x}")
    setup_sects = header.setup_sects or 4  # boot.rst: 0 means 4
    setup_bytes = (setup_sects + 1) * 512
    if setup_bytes >= len(data):
        raise BootError(name, "setup_sects", f"< file size {len(data)}", setup_sects)
    kernel = data[setup_bytes:]
    end = header.payload_offset + header.payload_length
    if header.payload_length == 0 or end > len(kernel):
        raise BootError(name, "payload", f"inside the {len(kernel)}-byte kernel",
                        f"[{header.payload_offset:#x}, {end:#x})")
    return BzImage(header, setup_bytes, kernel, kernel[header.payload_offset : end])


def decompress_payload(payload: bytes, name: str = "bzImage") -> bytes:
    """The vmlinux inside a bzImage payload; every format Debian's kernels use, capped in size."""
    try:
        if payload[:6] == b"\xfd7zXZ\0":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload, DECOMPRESSED_MAX)
        elif payload[:4] == b"\x28\xb5\x2f\xfd":
            out = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
        elif payload[:2] == b"\x1f\x8b":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out = d.decompress(payload, DECOMPRESSED_MAX)
        elif payload[:3] == b"\x5d\x00\x00":
            out = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(payload, DECOMPRESSED_MAX)
        else:
            raise BootError(name, "payload compression", "xz, zstd, gzip or lzma", payload[:6].hex(" "))
    except (lzma.LZMAError, zstandard.ZstdError, zlib.error, gzip.BadGzipFile, EOFError) as e:
        raise BootError(name, "payload", "a valid compressed stream", str(e)) from None
    if len(out) >= DECOMPRESSED_MAX:
        raise BootError(name, "payload size", f"< {DECOMPRESSED_MAX >> 20} MiB decompressed", "more")
    if not elf.is_elf(out):
        raise BootError(name, "payload contents", "an ELF vmlinux", out[:4].hex(" "))
    return out


def pvh_entry(data: bytes, image: elf.ElfImage) -> int | None:
    for note in elf.notes(data, image):
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY and len(note.desc) >= 4:
            return int.from_bytes(note.desc[:8] if len(note.desc) >= 8 else note.desc[:4], "little")
    return None


def _load_elf(mem: GuestMemory, data: bytes, image: elf.ElfImage, name: str) -> tuple[int, int]:
    if image.bits != 64 or image.machine != elf.EM_X86_64:
        raise BootError(name, "ELF class/machine", "ELF64 x86-64", f"ELF{image.bits} machine {image.machine}")
    for seg in image.loadable:
        if seg.paddr < KERNEL_MIN_ADDRESS:
            raise BootError(name, f"segment at {seg.paddr:#x}", f">= {KERNEL_MIN_ADDRESS:#x}", seg.paddr)
        try:
            mem.find(seg.paddr, seg.memsz)
        except GuestAddressError:
            raise BootError(name, f"segment at {seg.paddr:#x}", "inside guest RAM",
                            f"[{seg.paddr:#x}, {seg.paddr + seg.memsz:#x})") from None
    for seg in image.loadable:
        mem.write(seg.paddr, memoryview(data)[seg.offset : seg.offset + seg.filesz])
        if seg.memsz > seg.filesz:
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz, 0)
    lo = min(s.paddr for s in image.loadable)
    hi = max(s.paddr + s.memsz for s in image.loadable)
    return lo, hi


def _place_initrd(mem: GuestMemory, initrd: bytes, kernel_end: int, addr_max: int, name: str) -> tuple[int, int]:
    low_region, _ = mem.find(KERNEL_MIN_ADDRESS)
    top = min(low_region.range.end, addr_max + 1)
    base = (top - len(initrd)) & ~0xFFF  # as high as allowed, page aligned, like GRUB and QEMU
    if base < kernel_end:
        raise BootError(name, "initrd size", f"<= {top - kernel_end} bytes above the kernel", len(initrd))
    mem.write(base, initrd)
    return base, len(initrd)


def _write_cmdline(mem: GuestMemory, cmdline: str) -> None:
    raw = cmdline.encode() + b"\0"
    if len(raw) > CMDLINE_MAX:
        raise BootError("command line", "length", f"<= {CMDLINE_MAX - 1} bytes", len(raw) - 1)
    mem.write(CMDLINE_ADDRESS, raw)


def write_start_info(mem: GuestMemory, cmdline: str, initrd: tuple[int, int] | None, rsdp: int = 0) -> int:
    _write_cmdline(mem, cmdline)
    memmap = e820_map(mem)
    mem.write(MEMMAP_ADDRESS, b"".join(_MEMMAP_ENTRY.pack(b, n, t, 0) for b, n, t in memmap))
    if initrd:
        mem.write(MODLIST_ADDRESS, _MODLIST_ENTRY.pack(initrd[0], initrd[1], 0, 0))
    info = _START_INFO.pack(HVM_START_MAGIC, 1, 0, 1 if initrd else 0, MODLIST_ADDRESS if initrd else 0,
                            CMDLINE_ADDRESS, rsdp, MEMMAP_ADDRESS, len(memmap), 0)
    mem.write(START_INFO_ADDRESS, info)
    return START_INFO_ADDRESS


def write_zero_page(mem: GuestMemory, cmdline: str, initrd: tuple[int, int] | None,
                    header: SetupHeader | None, rsdp: int = 0) -> int:
    """boot_params for the 64-bit protocol: the bzImage's setup header (or a minimal one for an
    ELF vmlinux), command line, initrd, e820, the ACPI RSDP's address (0: none given)."""
    _write_cmdline(mem, cmdline)
    zp = bytearray(4096)
    if header is not None:
        struct.pack_into("<" + "".join(f for _, f in _SETUP_FIELDS), zp, SETUP_HEADER_OFFSET,
                         *(header.fields[n] for n, _ in _SETUP_FIELDS))
    else:
        struct.pack_into("<H", zp, _SETUP_OFF["boot_flag"], BOOT_FLAG)
        struct.pack_into("<I", zp, _SETUP_OFF["header"], HDRS_MAGIC)
        struct.pack_into("<I", zp, _SETUP_OFF["kernel_alignment"], 0x100_0000)
    struct.pack_into("<B", zp, _SETUP_OFF["type_of_loader"], LOADER_TYPE_UNDEFINED)
    struct.pack_into("<I", zp, _SETUP_OFF["cmd_line_ptr"], CMDLINE_ADDRESS)
    struct.pack_into("<I", zp, _SETUP_OFF["cmdline_size"], CMDLINE_MAX - 1)
    if initrd:
        struct.pack_into("<II", zp, _SETUP_OFF["ramdisk_image"], initrd[0] & 0xFFFF_FFFF, initrd[1] & 0xFFFF_FFFF)
        struct.pack_into("<II", zp, BP_EXT_RAMDISK_IMAGE, initrd[0] >> 32, initrd[1] >> 32)
    struct.pack_into("<Q", zp, BP_ACPI_RSDP_ADDR, rsdp)
    e820 = e820_map(mem)[:E820_MAX_ENTRIES_ZEROPAGE]
    struct.pack_into("<B", zp, BP_E820_ENTRIES, len(e820))
    for i, (base, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", zp, BP_E820_TABLE + 20 * i, base, size, kind)
    mem.write(ZERO_PAGE_ADDRESS, bytes(zp))
    return ZERO_PAGE_ADDRESS


def boot(mem: GuestMemory, kernel: bytes, cmdline: str = "", initrd: bytes | None = None,
         name: str = "kernel", *, decompress_on_host: bool = True, prefer_pvh: bool = True,
         rsdp: int = 0) -> LinuxBoot:
    """Load a Linux kernel (bzImage or vmlinux) and return the boot vCPU's entry state. `rsdp`:
    where the ACPI tables' root pointer is (`hv.platform.acpi.write_acpi`), handed over as PVH's
    `rsdp_paddr` or the zero page's `acpi_rsdp_addr`; 0 leaves the kernel to scan for one."""
    header: SetupHeader | None = None
    if elf.is_elf(kernel):
        vmlinux = kernel
    else:
        bz = parse_bzimage(kernel, name)
        header = bz.header
        if not decompress_on_host:
            return _boot_bzimage_in_guest(mem, bz, cmdline, initrd, name, rsdp)
        vmlinux = decompress_payload(bz.payload, name)
    image = elf.parse(vmlinux, name)
    pvh = pvh_entry(vmlinux, image) if prefer_pvh else None
    lo, hi = _load_elf(mem, vmlinux, image, name)
    addr_max = header.initrd_addr_max if header and header.initrd_addr_max else DEFAULT_INITRD_ADDR_MAX
    placed = _place_initrd(mem, initrd, hi, addr_max, name) if initrd else None
    if pvh is not None:
        info = write_start_info(mem, cmdline, placed, rsdp)
        entry = protected_mode_entry(mem, entry=pvh, eax=0, ebx=info)
        return LinuxBoot(entry, "pvh", (lo, hi), placed, cmdline)
    zero_page = write_zero_page(mem, cmdline, placed, header, rsdp)
    return LinuxBoot(long_mode_entry(mem, entry=image.entry, rsi=zero_page), "64-bit", (lo, hi), placed, cmdline)


def _boot_bzimage_in_guest(mem: GuestMemory, bz: BzImage, cmdline: str, initrd: bytes | None,
                           name: str, rsdp: int) -> LinuxBoot:
    h = bz.header
    load_at = h.pref_address if h.pref_address >= KERNEL_MIN_ADDRESS else 0x100_0000
    size = max(len(bz.kernel), h.init_size)
    try:
        mem.find(load_at, size)
    except GuestAddressError:
        raise BootError(name, "kernel size", "room in guest RAM at its preferred address",
                        f"[{load_at:#x}, {load_at + size:#x})") from None
    mem.write(load_at, bz.kernel)
    placed = _place_initrd(mem, initrd, load_at + size, h.initrd_addr_max, name) if initrd else None
    zero_page = write_zero_page(mem, cmdline, placed, h, rsdp)
    # boot.rst: the 64-bit entry is 0x200 past the start of the protected-mode kernel.
    entry = long_mode_entry(mem, entry=load_at + 0x200, rsi=zero_page)
    return LinuxBoot(entry, "64-bit", (load_at, load_at + size), placed, cmdline)
