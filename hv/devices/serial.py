"""A 16550A UART: transmit to a host callable, receive from the host, interrupts on an IRQ line.

The registers a driver programs (divisor, line and modem control, FIFO control, scratch) are
kept; what is behind them is instantaneous (a byte written to THR is sent at once). Interrupts as
on a PC: the line is raised while an enabled condition is pending (received data, transmitter
empty) and OUT2 in MCR is set (the PC's gate between the UART and the interrupt controller), and
IIR reports the highest-priority one. Loopback (MCR bit 4) routes THR back to RBR, as Linux's
8250 driver checks when it probes the port.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from hv.persist import U64, check_bits, check_bool, check_bytes, check_int, check_type

COM1_PORT = 0x3F8
COM1_IRQ = 4
RX_BUFFER = 4096  # bytes of host input held for the guest; more is dropped (counted)

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
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NO_INTERRUPT, IIR_THRE, IIR_RDA = 0x01, 0x02, 0x04
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02
MCR_OUT2, MCR_LOOP = 0x08, 0x10
LSR_DR = 0x01  # data ready
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty
MSR_LOOP_BITS = 0xF0  # CTS, DSR, RI, DCD follow RTS, DTR, OUT1, OUT2 in loopback

# the bits a register can hold after the guest wrote it (the masks `write` applies)
_REGISTER_BITS = {"ier": 0x0F, "lcr": 0xFF, "mcr": 0x1F, "fcr": 0xC9, "scr": 0xFF, "dll": 0xFF,
                  "dlm": 0xFF}


@dataclass(frozen=True)
class SerialState:
    ier: int = 0
    lcr: int = 0
    mcr: int = 0
    fcr: int = 0
    scr: int = 0
    dll: int = 0x0C  # 9600 baud, the usual power-on divisor
    dlm: int = 0
    rx: bytes = b""  # received, not yet read by the guest
    thre_pending: bool = False  # a THRE interrupt not yet taken by an IIR read or a THR write
    irq_level: bool = False
    dropped: int = 0  # host input bytes dropped because the buffer was full


class Serial16550:
    """COM port model. `output` gets each byte the guest sends; `irq(level)` drives the line."""

    KIND: ClassVar[str] = "serial-16550"

    def __init__(self, output: Callable[[bytes], None], irq: Callable[[bool], None] | None = None) -> None:
        self._output = output
        self._irq = irq or (lambda level: None)
        self._state = SerialState()
        self._lock = threading.Lock()  # host input arrives on another thread than the vCPU's

    # --- host side ---

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken."""
        with self._lock:
            s = self._state
            room = RX_BUFFER - len(s.rx)
            taken = data[:max(room, 0)]
            self._state = replace(s, rx=s.rx + taken, dropped=s.dropped + len(data) - len(taken))
            self._update_irq()
        return len(taken)

    # --- bus side ---

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            s = self._state
            dlab = bool(s.lcr & LCR_DLAB)
            match offset:
                case 0 if dlab:
                    return s.dll
                case 0:
                    if not s.rx:
                        return 0
                    self._state = replace(s, rx=s.rx[1:])
                    self._update_irq()
                    return s.rx[0]
                case 1:
                    return s.dlm if dlab else s.ier
                case 2:
                    iir = self._iir()
                    if iir == IIR_THRE:  # reading IIR takes the THRE interrupt
                        self._state = replace(s, thre_pending=False)
                        self._update_irq()
                    return iir | (IIR_FIFO_ENABLED if s.fcr & FCR_ENABLE else 0)
                case 3:
                    return s.lcr
                case 4:
                    return s.mcr
                case 5:
                    return LSR_THRE | LSR_TEMT | (LSR_DR if s.rx else 0)
                case 6:
                    if s.mcr & MCR_LOOP:
                        m = s.mcr
                        return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
                    return 0xB0  # CTS, DSR, DCD: a cable with someone on the other end
                case 7:
                    return s.scr
            return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        s = self._state
        if offset == THR and s.thre_pending and not (s.lcr & LCR_DLAB or s.mcr & MCR_LOOP):
            self._output(bytes((value,)))  # the hot path: a byte out, nothing else changes
            return
        send = None
        with self._lock:
            s = self._state
            dlab = bool(s.lcr & LCR_DLAB)
            match offset:
                case 0 if dlab:
                    self._state = replace(s, dll=value)
                case 0:
                    if s.mcr & MCR_LOOP:
                        self._state = replace(s, rx=(s.rx + bytes((value,)))[-RX_BUFFER:], thre_pending=True)
                    else:
                        send = bytes((value,))
                        self._state = replace(s, thre_pending=True)  # sent at once: empty again
                case 1 if dlab:
                    self._state = replace(s, dlm=value)
                case 1:
                    # enabling THRE interrupts with the holding register empty raises one at once
                    became = bool(value & IER_THRE) and not s.ier & IER_THRE
                    self._state = replace(s, ier=value & 0x0F, thre_pending=s.thre_pending or became)
                case 2:
                    self._state = replace(s, fcr=value & 0xC9, rx=b"" if value & FCR_CLEAR_RX else s.rx)
                case 3:
                    self._state = replace(s, lcr=value)
                case 4:
                    self._state = replace(s, mcr=value & 0x1F)
                case 7:
                    self._state = replace(s, scr=value)
            self._update_irq()
        if send is not None:
            self._output(send)  # outside the lock: the console may be slow

    def _iir(self) -> int:
        s = self._state
        if s.ier & IER_RDA and s.rx:
            return IIR_RDA
        if s.ier & IER_THRE and s.thre_pending:
            return IIR_THRE
        return IIR_NO_INTERRUPT

    def _update_irq(self) -> None:
        s = self._state
        level = self._iir() != IIR_NO_INTERRUPT and bool(s.mcr & MCR_OUT2)
        if level != s.irq_level:
            self._state = replace(s, irq_level=level)
            self._irq(level)

    # --- state ---

    def save(self) -> SerialState:
        with self._lock:
            return self._state

    def restore(self, state: SerialState) -> None:
        """Check every register and the buffer first; then a raised line is raised again."""
        check_type(self.KIND, state, SerialState)
        check_bits(self.KIND, state, _REGISTER_BITS)
        check_bytes(self.KIND, "rx", state.rx, RX_BUFFER)
        check_bool(self.KIND, "thre_pending", state.thre_pending)
        check_bool(self.KIND, "irq_level", state.irq_level)
        check_int(self.KIND, "dropped", state.dropped, 0, U64)
        with self._lock:
            self._state = state
            if state.irq_level:
                self._irq(True)  # the interrupt controller's own state came with the VM's
