"""The XSAVE area as KVM's uABI gives it, and what it means architecturally.

KVM_GET_XSAVE/KVM_GET_XSAVE2 return the *standard* (non-compacted) XSAVE format: a 512-byte legacy
region (x87 and SSE), a 64-byte header whose first quadword is XSTATE_BV, then each extended
component at the offset and with the size CPUID leaf 0xD reports for it (sub-leaf i: EAX size,
EBX offset, ECX bit 0 set for supervisor components, which the uABI never carries).

Two blobs can differ byte for byte and hold the same state: a component whose XSTATE_BV bit is
clear is in its *init state*, whatever its bytes say, and KVM may save a component as "init" and
restore it as "in use" with its init value (seen: PKRU on Intel hosts). So blobs are compared by
meaning: each component is read as its init value when its bit is clear, as its bytes when set,
with the layout taken from CPUID (never fixed offsets: AVX-512, PKU, AMX... differ per CPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from hv.errors import HvError

LEGACY_SIZE = 512
HEADER_OFFSET = 512
HEADER_SIZE = 64
XSTATE_BV = slice(HEADER_OFFSET, HEADER_OFFSET + 8)
CPUID_XSAVE_LEAF = 0xD

# The x87/SSE fields of the legacy region (SDM Vol. 1, "FXSAVE Area"): byte ranges.
X87_CONTROL = slice(0, 24)  # FCW, FSW, abridged FTW, FOP, FIP, FDP
X87_REGISTERS = slice(32, 160)  # ST0-ST7 / MM0-MM7, 16 bytes each
MXCSR = slice(24, 28)
XMM_REGISTERS = slice(160, 416)  # XMM0-XMM15
# Bytes 28-31 (MXCSR_MASK) describe the CPU, not its state; 416-511 are reserved for software.

FCW_INIT = 0x037F  # x87 control word after FNINIT: all exceptions masked, 64-bit precision
MXCSR_INIT = 0x1F80  # all SIMD exceptions masked, round to nearest


class XFeature(IntEnum):
    """XSAVE state components by their XCR0/XSS bit (SDM Vol. 1, 13.1)."""

    X87 = 0
    SSE = 1
    AVX = 2
    BNDREGS = 3
    BNDCSR = 4
    OPMASK = 5
    ZMM_HI256 = 6
    HI16_ZMM = 7
    PT = 8
    PKRU = 9
    PASID = 10
    CET_U = 11
    CET_S = 12
    HDC = 13
    UINTR = 14
    LBR = 15
    HWP = 16
    XTILECFG = 17
    XTILEDATA = 18
    APX = 19


def feature_name(bit: int) -> str:
    try:
        return XFeature(bit).name.lower()
    except ValueError:
        return f"component {bit}"


class CpuidLeaf(Protocol):
    """One CPUID entry (`hv.kvm.state.CpuidEntry`, as KVM's struct kvm_cpuid_entry2 names it)."""

    # read-only (properties): a frozen dataclass's fields satisfy them
    @property
    def function(self) -> int: ...
    @property
    def index(self) -> int: ...
    @property
    def eax(self) -> int: ...
    @property
    def ebx(self) -> int: ...
    @property
    def ecx(self) -> int: ...
    @property
    def edx(self) -> int: ...


class XsaveFormatError(HvError):
    """An XSAVE blob that does not fit the layout it is read with."""

    def __init__(self, reason: str, *, component: int | None = None) -> None:
        where = f" ({feature_name(component)})" if component is not None else ""
        super().__init__(f"XSAVE area{where}: {reason}")
        self.reason, self.component = reason, component


@dataclass(frozen=True)
class XsaveComponent:
    """An extended state component: `size` bytes at `offset` in the standard format."""

    bit: int
    offset: int
    size: int

    @property
    def name(self) -> str:
        return feature_name(self.bit)


@dataclass(frozen=True)
class XsaveLayout:
    """The user state components a CPU supports (XCR0's possible bits) and where they sit."""

    supported: int  # bitmask of XCR0 components: 0 and 1 are the legacy region's
    components: tuple[XsaveComponent, ...]  # the extended ones (bit >= 2), by bit

    @classmethod
    def from_cpuid(cls, entries: Iterable[CpuidLeaf]) -> XsaveLayout:
        """From CPUID leaf 0xD: a vCPU's entries, or the host's KVM_GET_SUPPORTED_CPUID."""
        leaf = {e.index: e for e in entries if e.function == CPUID_XSAVE_LEAF}
        if 0 not in leaf:
            return cls(supported=0b11, components=())  # FXSAVE-only CPU: the legacy region alone
        supported = leaf[0].eax | (leaf[0].edx << 32)
        components = []
        for bit in range(2, 64):
            if not supported >> bit & 1:
                continue
            sub = leaf.get(bit)
            if sub is None or sub.ecx & 1:  # unlisted, or a supervisor (XSS) component
                supported &= ~(1 << bit)
                continue
            components.append(XsaveComponent(bit, offset=sub.ebx, size=sub.eax))
        return cls(supported=supported | 0b11, components=tuple(components))

    @property
    def size(self) -> int:
        """Bytes of the standard-format area holding every supported component."""
        ends = [c.offset + c.size for c in self.components]
        return max([LEGACY_SIZE + HEADER_SIZE, *ends])

    def architectural(self, blob: bytes) -> dict[str, bytes]:
        """Each component's state by name: its init value where XSTATE_BV says "init"."""
        if len(blob) < LEGACY_SIZE + HEADER_SIZE:
            raise XsaveFormatError(f"{len(blob)} bytes, shorter than the legacy region and header")
        in_use = int.from_bytes(blob[XSTATE_BV], "little")
        unknown = in_use & ~self.supported
        if unknown:
            raise XsaveFormatError(f"XSTATE_BV {in_use:#x} marks components this CPU lacks "
                                   f"({unknown:#x})", component=unknown.bit_length() - 1)
        out = {"x87": _x87(blob) if in_use & 1 else _X87_INIT,
               "sse": _sse(blob, in_use)}
        for c in self.components:
            if not in_use >> c.bit & 1:
                out[c.name] = bytes(c.size)  # every extended component's init state is all zeros
            elif c.offset + c.size > len(blob):
                raise XsaveFormatError(f"in use, but the {len(blob)}-byte blob ends before its "
                                       f"bytes {c.offset}-{c.offset + c.size}", component=c.bit)
            else:
                out[c.name] = bytes(blob[c.offset:c.offset + c.size])
        return out

    def differences(self, a: bytes, b: bytes) -> list[str]:
        """The components whose architectural state differs between two blobs, by name."""
        sa, sb = self.architectural(a), self.architectural(b)
        return [name for name in sa if sa[name] != sb[name]]


def _x87(blob: bytes) -> bytes:
    return bytes(blob[X87_CONTROL]) + bytes(blob[X87_REGISTERS])


def _sse(blob: bytes, in_use: int) -> bytes:
    # MXCSR is saved and loaded with either SSE or AVX (XSAVE/XRSTOR with RFBM[1] or RFBM[2]) and
    # the kernel's uABI copy gives its init value only when both are in their init state.
    sse, avx = in_use >> XFeature.SSE & 1, in_use >> XFeature.AVX & 1
    mxcsr = bytes(blob[MXCSR]) if sse or avx else MXCSR_INIT.to_bytes(4, "little")
    xmm = bytes(blob[XMM_REGISTERS]) if sse else bytes(XMM_REGISTERS.stop - XMM_REGISTERS.start)
    return mxcsr + xmm


_X87_INIT = FCW_INIT.to_bytes(2, "little") + bytes(X87_CONTROL.stop - 2) + \
    bytes(X87_REGISTERS.stop - X87_REGISTERS.start)
