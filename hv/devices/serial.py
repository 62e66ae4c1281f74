"""A transmit-only 16550 UART: enough for a guest to print (the full UART is a later device).

The guest polls LSR for "transmitter empty" and writes bytes to THR; every register the guest can
program is kept, so its state survives save/restore even though nothing is emulated behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

COM1_PORT = 0x3F8
COM1_IRQ = 4

# register offsets
THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

LCR_DLAB = 0x80
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty
IIR_NO_INTERRUPT = 0x01


@dataclass(frozen=True)
class SerialTxState:
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    scr: int = 0
    dll: int = 0x0C  # 9600 baud, the usual power-on divisor
    dlm: int = 0


class SerialTx:
    """COM port that only transmits; `output` receives each byte the guest sends."""

    def __init__(self, output: Callable[[bytes], None]) -> None:
        self._output = output
        self._regs = SerialTxState()

    def read(self, offset: int, size: int) -> int:
        r = self._regs
        dlab = bool(r.lcr & LCR_DLAB)
        match offset:
            case 0:
                return r.dll if dlab else 0
            case 1:
                return r.dlm if dlab else r.ier
            case 2:
                return IIR_NO_INTERRUPT
            case 3:
                return r.lcr
            case 4:
                return r.mcr
            case 5:
                return LSR_THRE | LSR_TEMT
            case 7:
                return r.scr
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        r = self._regs
        dlab = bool(r.lcr & LCR_DLAB)
        match offset:
            case 0 if dlab:
                self._set(dll=value)
            case 0:
                self._output(bytes((value,)))
            case 1 if dlab:
                self._set(dlm=value)
            case 1:
                self._set(ier=value & 0x0F)
            case 3:
                self._set(lcr=value)
            case 4:
                self._set(mcr=value & 0x1F)
            case 7:
                self._set(scr=value)

    def _set(self, **changes: int) -> None:
        self._regs = replace(self._regs, **changes)

    def save(self) -> SerialTxState:
        return self._regs

    def restore(self, state: SerialTxState) -> None:
        self._regs = state
