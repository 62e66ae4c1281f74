"""Typed vCPU exits: a closed union of frozen dataclasses, handled with `match`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from hv.binding.ffi import lib


@dataclass(frozen=True)
class IoIn:
    """The guest reads `size` bytes, `count` times (rep ins), from `port`; answer with
    `Vcpu.set_io_result` before the next run."""

    port: int
    size: int
    count: int = 1


@dataclass(frozen=True)
class IoOut:
    port: int
    size: int
    data: bytes  # size * count bytes
    count: int = 1


@dataclass(frozen=True)
class MmioRead:
    address: int
    length: int


@dataclass(frozen=True)
class MmioWrite:
    address: int
    data: bytes


@dataclass(frozen=True)
class Hlt:
    """HLT with no in-kernel LAPIC to sleep in (with the irqchip, KVM sleeps instead)."""


@dataclass(frozen=True)
class Shutdown:
    """Triple fault or similar: the guest cannot continue."""


@dataclass(frozen=True)
class SystemEvent:
    type: int  # KVM_SYSTEM_EVENT_*
    data: tuple[int, ...] = ()


@dataclass(frozen=True)
class InternalError:
    """KVM could not continue the guest; `suberror` 1 is an emulation failure."""

    suberror: int
    data: tuple[int, ...]

    EMULATION = 1
    _FLAG_INSTRUCTION_BYTES = lib.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES

    @property
    def instruction_bytes(self) -> bytes:
        """The bytes KVM failed to emulate, when it reports them.

        api.rst, emulation_failure: data[0] is `flags`; with FLAG_INSTRUCTION_BYTES, the next 16
        bytes are `insn_size` (u8) then up to 15 instruction bytes.
        """
        if self.suberror != self.EMULATION or len(self.data) < 3:
            return b""
        if not self.data[0] & self._FLAG_INSTRUCTION_BYTES:
            return b""
        raw = b"".join(word.to_bytes(8, "little") for word in self.data[1:3])
        return raw[1 : 1 + min(raw[0], 15)]

    def __str__(self) -> str:
        insn = self.instruction_bytes
        what = "emulation failure" if self.suberror == self.EMULATION else f"suberror {self.suberror}"
        extra = f", instruction bytes {insn.hex(' ')}" if insn else ""
        return f"KVM internal error: {what}{extra} (data {[hex(d) for d in self.data]})"


@dataclass(frozen=True)
class FailEntry:
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class Interrupted:
    """KVM_RUN returned EINTR: the vCPU thread was kicked (pause, stop) or immediate_exit was set."""


@dataclass(frozen=True)
class DebugExit:
    pass


@dataclass(frozen=True)
class UnknownExit:
    exit_reason: int
    hardware_exit_reason: int = 0


VcpuExit = Union[
    IoIn, IoOut, MmioRead, MmioWrite, Hlt, Shutdown, SystemEvent, InternalError, FailEntry,
    Interrupted, DebugExit, UnknownExit,
]

FATAL_EXITS = (Shutdown, InternalError, FailEntry, UnknownExit)
