"""The 16550A model in Python: the specification hv/binding/uart.c implements (the property test
in tests/hv/test_serial.py runs both side by side on random register traffic). Its transmitter has no
ring: every byte goes to `output` at once, which the C model matches while its ring is drained.

A 16550A UART: transmit to a host callable, receive from the host, interrupts on an IRQ line.

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
from dataclasses import replace

from hv.devices.serial import RX_BUFFER, THR, SerialState

LCR_DLAB = 0x80
IER_RDA, IER_THRE = 0x01, 0x02
IIR_NO_INTERRUPT, IIR_THRE, IIR_RDA = 0x01, 0x02, 0x04
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX = 0x01, 0x02
MCR_OUT2, MCR_LOOP = 0x08, 0x10
LSR_DR = 0x01  # data ready
LSR_THRE = 0x20  # transmit holding register empty
LSR_TEMT = 0x40  # transmitter empty


class ReferenceSerial16550:
    """COM port model. `output` gets each byte the guest sends; `irq(level)` drives the line."""

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
