"""A defensive ELF reader for kernel images: program headers and notes, ELF32 and ELF64.

Kernels are untrusted input: every offset and size is checked against the file before use, and a
refusal is a `BootError` naming the field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hv.errors import BootError

PT_LOAD = 1
PT_NOTE = 4
EM_386 = 3
EM_X86_64 = 62

_IDENT = struct.Struct("<4sBBB9x")
_EHDR32 = struct.Struct("<HHIIIIIHHHHHH")  # after e_ident
_EHDR64 = struct.Struct("<HHIQQQIHHHHHH")
_PHDR32 = struct.Struct("<IIIIIIII")  # type offset vaddr paddr filesz memsz flags align
_PHDR64 = struct.Struct("<IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    bits: int  # 32 or 64
    machine: int
    entry: int
    segments: tuple[Segment, ...]

    @property
    def loadable(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.type == PT_LOAD and s.memsz)


def is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def parse(data: bytes, name: str) -> ElfImage:
    if len(data) < 64 or not is_elf(data):
        raise BootError(name, "ELF magic", "7f 45 4c 46", data[:4].hex(" "))
    _magic, klass, endian, _version = _IDENT.unpack_from(data)
    if endian != 1 or klass not in (1, 2):
        raise BootError(name, "ELF class/data", "ELF32 or ELF64, little-endian", f"class {klass} data {endian}")
    if klass == 1:
        _t, machine, _v, entry, phoff, _sh, _f, _eh, phentsize, phnum, *_ = _EHDR32.unpack_from(data, 16)
        phdr = _PHDR32
    else:
        _t, machine, _v, entry, phoff, _sh, _f, _eh, phentsize, phnum, *_ = _EHDR64.unpack_from(data, 16)
        phdr = _PHDR64
    if phentsize != phdr.size or phoff + phnum * phentsize > len(data):
        raise BootError(name, "ELF program headers", "inside the file", f"{phnum} at {phoff:#x}")
    segments = []
    for i in range(phnum):
        fields = phdr.unpack_from(data, phoff + i * phentsize)
        if klass == 1:
            p_type, p_offset, _va, p_paddr, p_filesz, p_memsz, _fl, _al = fields
        else:
            p_type, _fl, p_offset, _va, p_paddr, p_filesz, p_memsz, _al = fields
        if p_type in (PT_LOAD, PT_NOTE) and (p_offset + p_filesz > len(data) or p_filesz > p_memsz):
            raise BootError(name, f"ELF segment {i}", "file bytes inside the file and <= memsz",
                            f"offset {p_offset:#x} filesz {p_filesz:#x} memsz {p_memsz:#x}")
        segments.append(Segment(p_type, p_offset, p_paddr, p_filesz, p_memsz))
    image = ElfImage(32 if klass == 1 else 64, machine, entry, tuple(segments))
    if not image.loadable:
        raise BootError(name, "ELF program headers", "at least one PT_LOAD", "none")
    return image


def notes(data: bytes, image: ElfImage) -> list[Note]:
    """Every note in the PT_NOTE segments (bounded by the segment; a torn note ends the walk)."""
    found = []
    for seg in image.segments:
        if seg.type != PT_NOTE:
            continue
        pos, end = seg.offset, seg.offset + seg.filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_at = pos + 12
            desc_at = name_at + _align4(namesz)
            nxt = desc_at + _align4(descsz)
            if nxt > end:
                break
            found.append(Note(data[name_at : name_at + namesz].rstrip(b"\0"), ntype,
                              data[desc_at : desc_at + descsz]))
            pos = nxt
    return found


def _align4(n: int) -> int:
    return (n + 3) & ~3
