"""Tiny Multiboot ELF32 images assembled in Python, for loader and exit-path tests.

Each is a multiboot header plus a few hand-encoded 32-bit instructions at 1 MiB; they run in the
(emulated) ring 0 with no setup, so keep them short.
"""

from __future__ import annotations

import struct

LOAD_ADDRESS = 0x100000
HEADER_FLAGS = 0x3  # page-align + memory info

# mov edx, 0x3f8 ; mov al, 'A' ; loop: out dx, al ; jmp loop
OUT_LOOP = bytes.fromhex("baf8030000" "b041" "ee" "ebfd")
# mov edx, PORT ; mov eax, ebx ; out dx, eax ; hlt-free spin: jmp $
REPORT_EBX = bytes.fromhex("ba00050000" "89d8" "ef" "ebfe")


def out_count(n: int, port: int = 0x3F8) -> bytes:
    """Write 'x' to `port` n times, then write 1 to port 0x501 and spin."""
    return (
        b"\xba" + struct.pack("<I", port)  # mov edx, port
        + b"\xb9" + struct.pack("<I", n)  # mov ecx, n
        + b"\xb0\x78"  # loop: mov al, 'x'
        + b"\xee"  # out dx, al
        + b"\x49"  # dec ecx
        + b"\x75\xfa"  # jnz loop (-6)
        + b"\xba\x01\x05\x00\x00"  # mov edx, 0x501
        + b"\xb0\x01\xee"  # mov al, 1 ; out dx, al
        + b"\xeb\xfe"  # jmp $
    )


def multiboot_elf(code: bytes, *, bss: int = 0, flags: int = HEADER_FLAGS) -> bytes:
    """An ELF32 with one PT_LOAD at 1 MiB: the multiboot header, then `code` (the entry)."""
    header = struct.pack("<III", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF)
    payload = header + code
    ehsize, phsize = 52, 32
    offset = 0x1000
    entry = LOAD_ADDRESS + len(header)
    ident = b"\x7fELF" + bytes([1, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIIIIIHHHHHH", ident, 2, 3, 1, entry, ehsize, 0, 0, ehsize, phsize, 1, 0, 0, 0)
    phdr = struct.pack("<IIIIIIII", 1, offset, LOAD_ADDRESS, LOAD_ADDRESS, len(payload),
                       len(payload) + bss, 5, 0x1000)
    image = ehdr + phdr
    # the multiboot header must sit in the first 8 KiB of the file: at 0x1000 it does
    return image + bytes(offset - len(image)) + payload


def exit_with(code: int, port: int = 0xF4) -> bytes:
    """Write `code` (dword) to the debug-exit port, as a test kernel under QEMU's isa-debug-exit
    ends its run, then spin."""
    return b"\xba" + struct.pack("<I", port) + b"\xb8" + struct.pack("<I", code) + b"\xef" + b"\xeb\xfe"


def store_then_report(addresses: list[int], value: int = 0xA5A5A5A5) -> bytes:
    """Store `value` (dword) at each address, write 1 to port 0x501, then spin.

    Spins with `pause; jmp` so the guest stays runnable (and thus pausable) without writing.
    """
    code = b"".join(b"\xc7\x05" + struct.pack("<II", a, value) for a in addresses)
    return code + b"\xba\x01\x05\x00\x00" + b"\xb0\x01\xee" + b"\xf3\x90\xeb\xfc"


class Recorder:
    """A bus device that records writes as (offset, size, value) and reads as `read_value`."""

    def __init__(self, read_value: int = 0) -> None:
        self.writes: list[tuple[int, int, int]] = []
        self.read_value = read_value

    def read(self, offset: int, size: int) -> int:
        return self.read_value

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))


def wait_for(cond, timeout: float = 10.0, what: str = "the guest") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def interrupt_reporter(vector: int, report_port: int = 0x502) -> bytes:
    """Enable the LAPIC, install an IDT whose `vector` handler writes `vector` to `report_port`
    and EOIs and spins; the main code does `sti; hlt` forever. Laid out for multiboot_elf (code starts at 1 MiB + 12)."""
    base = LOAD_ADDRESS + 12
    # fixed layout: [code 64 bytes][handler 32 bytes][IDTR 6 bytes, pad 2][IDT 256 * 8]
    handler_at, idtr_at, idt_at = base + 64, base + 96, base + 104
    code = (
        b"\xbc" + struct.pack("<I", 0x9_0000)  # mov esp, 0x90000: Multiboot leaves ESP undefined
        + b"\xc7\x05" + struct.pack("<II", 0xFEE000F0, 0x1FF)  # LAPIC SVR: software enable
        + b"\x0f\x01\x1d" + struct.pack("<I", idtr_at)  # lidt [idtr]
        + b"\xfb"  # sti
        + b"\xf4\xeb\xfd"  # spin: hlt ; jmp spin
    )
    handler = (
        b"\xba" + struct.pack("<I", report_port)  # mov edx, port
        + b"\xb0" + bytes([vector])  # mov al, vector
        + b"\xee"  # out dx, al
        + b"\xc7\x05" + struct.pack("<II", 0xFEE000B0, 0)  # LAPIC EOI
        + b"\xeb\xfe"  # jmp $ (iretd cannot be emulated in ring 0 on PVM hosts)
    )
    idt = bytearray(256 * 8)
    gate = struct.pack("<HHBBH", handler_at & 0xFFFF, 0x10, 0, 0x8E, handler_at >> 16)
    idt[vector * 8 : vector * 8 + 8] = gate
    return (code.ljust(64, b"\x90") + handler.ljust(32, b"\x90")
            + struct.pack("<HI", len(idt) - 1, idt_at) + b"\0\0" + bytes(idt))


# PVH: print the command line from hvm_start_info (EBX) to COM1, then write memmap_entries to
# port 0x501 and spin.
PVH_PRINT_CMDLINE = bytes.fromhex(
    "8b7318"  # 0: mov esi, [ebx+0x18]      (cmdline_paddr)
    "8a06"  # 3: loop: mov al, [esi]
    "84c0"  # 5: test al, al
    "7408"  # 7: jz done (17)
    "66baf803"  # 9: mov dx, 0x3f8
    "ee"  # 13: out dx, al
    "46"  # 14: inc esi
    "ebf2"  # 15: jmp loop
    "8b4330"  # 17: done: mov eax, [ebx+0x30]  (memmap_entries)
    "66ba0105"  # 20: mov dx, 0x501
    "ee"  # 24: out dx, al
    "ebfe"  # 25: jmp $
)


def pvh_elf64(code: bytes, entry_offset: int = 0) -> bytes:
    """An ELF64 x86-64 image with one PT_LOAD at 1 MiB and a Xen PVH entry note."""
    ehsize, phsize = 64, 56
    code_off = 0x1000
    note_desc = struct.pack("<I", LOAD_ADDRESS + entry_offset)
    note = struct.pack("<III", 4, len(note_desc), 18) + b"Xen\0" + note_desc
    note_off = ehsize + 2 * phsize
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, 0xFFFF_FFFF_8100_0000, ehsize, 0, 0,
                       ehsize, phsize, 2, 0, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_off, LOAD_ADDRESS, LOAD_ADDRESS, len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    head = ehdr + load + pnote + note
    return head + bytes(code_off - len(head)) + code
