"""x86 entry states that boot protocols hand a kernel."""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from hv.memory import GuestMemory
from hv.state import DescriptorTable, Regs, Segment, Sregs

FLAT_GDT_ADDRESS = 0x500
CODE32_SELECTOR = 0x10
DATA32_SELECTOR = 0x18

# null, null, flat 32-bit code (exec/read), flat 32-bit data (read/write); granularity 4 KiB.
_FLAT_GDT = (0, 0, 0x00CF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF)

CR0_PE = 1 << 0
CR0_ET = 1 << 4


@dataclass(frozen=True)
class EntryState:
    """Registers for the boot vCPU; `apply` overlays them on its current sregs."""

    regs: Regs
    segments: dict[str, Segment]
    gdt: DescriptorTable
    cr0: int

    def apply(self, sregs: Sregs) -> Sregs:
        return replace(sregs, **self.segments, gdt=self.gdt, cr0=self.cr0, cr4=0, efer=0, cr3=0)


def _flat(selector: int, type_: int) -> Segment:
    return Segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=0,
                   db=1, s=1, l=0, g=1, avl=0, unusable=0)


def protected_mode_entry(mem: GuestMemory, *, entry: int, eax: int, ebx: int) -> EntryState:
    """Flat 32-bit protected mode, paging off, interrupts off (Multiboot's machine state).

    A GDT describing the loaded segments is written to low memory so the selectors stay valid if
    the kernel reloads them before installing its own.
    """
    mem.write(FLAT_GDT_ADDRESS, struct.pack("<4Q", *_FLAT_GDT))
    code, data = _flat(CODE32_SELECTOR, 0xB), _flat(DATA32_SELECTOR, 0x3)
    return EntryState(
        regs=Regs(rax=eax, rbx=ebx, rip=entry, rflags=0x2),
        segments={"cs": code, "ds": data, "es": data, "fs": data, "gs": data, "ss": data},
        gdt=DescriptorTable(FLAT_GDT_ADDRESS, len(_FLAT_GDT) * 8 - 1),
        cr0=CR0_PE | CR0_ET,
    )
