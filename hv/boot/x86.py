"""x86 entry states that boot protocols hand a kernel."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Any, cast

from hv.kvm.memory import GuestMemory
from hv.kvm.state import DescriptorTable, Regs, Segment, Sregs

FLAT_GDT_ADDRESS = 0x500
CODE32_SELECTOR = 0x10
DATA32_SELECTOR = 0x18
CODE64_SELECTOR = 0x20

# null, null, flat 32-bit code (exec/read), flat data (read/write), 64-bit code; 4 KiB granularity.
_FLAT_GDT = (0, 0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF, 0x00AF_9B00_0000_FFFF)

# Identity-mapped page tables for a 64-bit entry: 4 GiB with 2 MiB pages.
PML4_ADDRESS = 0x9000
PDPT_ADDRESS = 0xA000
PD_ADDRESS = 0xB000  # 4 page directories: 0xB000-0xEFFF

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

E820_RAM = 1
E820_RESERVED = 2
LOW_MEMORY_END = 0x9FC00  # top of conventional memory; the EBDA and BIOS area follow
HIGH_MEMORY_START = 0x100000


@dataclass(frozen=True)
class EntryState:
    """Registers for the boot vCPU; `apply` overlays them on its current sregs."""

    regs: Regs
    segments: dict[str, Segment]
    gdt: DescriptorTable
    cr0: int

    cr3: int = 0
    cr4: int = 0
    efer: int = 0

    def apply(self, sregs: Sregs) -> Sregs:
        # (each of `segments` is a segment field: mypy cannot match a ** to each field's type)
        return replace(sregs, **cast(dict[str, Any], self.segments), gdt=self.gdt, cr0=self.cr0, cr3=self.cr3, cr4=self.cr4,
                       efer=self.efer)


def _flat(selector: int, type_: int, long: bool = False) -> Segment:
    return Segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=0,
                   db=0 if long else 1, s=1, l=1 if long else 0, g=1, avl=0, unusable=0)


def e820_map(mem: GuestMemory) -> list[tuple[int, int, int]]:
    """(base, length, type): conventional memory, the BIOS hole, then every RAM region above 1 MiB.
    One map for every boot protocol (Multiboot mmap, PVH memmap, the zero page's e820)."""
    entries = [(0, LOW_MEMORY_END, E820_RAM),
               (LOW_MEMORY_END, HIGH_MEMORY_START - LOW_MEMORY_END, E820_RESERVED)]
    for region in mem.regions:
        start = max(region.guest_base, HIGH_MEMORY_START)
        if region.range.end > start:
            entries.append((start, region.range.end - start, E820_RAM))
    return entries


def _write_gdt(mem: GuestMemory) -> DescriptorTable:
    mem.write(FLAT_GDT_ADDRESS, struct.pack(f"<{len(_FLAT_GDT)}Q", *_FLAT_GDT))
    return DescriptorTable(FLAT_GDT_ADDRESS, len(_FLAT_GDT) * 8 - 1)


def protected_mode_entry(mem: GuestMemory, *, entry: int, eax: int, ebx: int) -> EntryState:
    """Flat 32-bit protected mode, paging off, interrupts off (Multiboot's machine state).

    A GDT describing the loaded segments is written to low memory so the selectors stay valid if
    the kernel reloads them before installing its own.
    """
    gdt = _write_gdt(mem)
    code, data = _flat(CODE32_SELECTOR, 0xB), _flat(DATA32_SELECTOR, 0x3)
    return EntryState(
        regs=Regs(rax=eax, rbx=ebx, rip=entry, rflags=0x2),
        segments={"cs": code, "ds": data, "es": data, "fs": data, "gs": data, "ss": data},
        gdt=gdt,
        cr0=CR0_PE | CR0_ET,
    )


def long_mode_entry(mem: GuestMemory, *, entry: int, rsi: int) -> EntryState:
    """64-bit mode with the first 4 GiB identity-mapped (2 MiB pages), interrupts off: the state
    Linux's 64-bit boot protocol asks for, with RSI pointing at boot_params."""
    gdt = _write_gdt(mem)
    mem.write(PML4_ADDRESS, struct.pack("<Q", PDPT_ADDRESS | 0x3) + bytes(4088))
    mem.write(PDPT_ADDRESS, struct.pack("<4Q", *(PD_ADDRESS + i * 4096 | 0x3 for i in range(4))) + bytes(4064))
    # 2048 entries of 2 MiB (present | writable | page size)
    pds = struct.pack("<2048Q", *((i << 21) | 0x83 for i in range(2048)))
    mem.write(PD_ADDRESS, pds)
    code, data = _flat(CODE64_SELECTOR, 0xB, long=True), _flat(DATA32_SELECTOR, 0x3)
    return EntryState(
        regs=Regs(rsi=rsi, rip=entry, rflags=0x2),
        segments={"cs": code, "ds": data, "es": data, "fs": data, "gs": data, "ss": data},
        gdt=gdt,
        cr0=CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3=PML4_ADDRESS,
        cr4=CR4_PAE,
        efer=EFER_LME | EFER_LMA,
    )
