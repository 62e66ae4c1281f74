"""A 16550A UART: transmit to the host, receive from the host, interrupts on an IRQ line.

The registers a driver programs (divisor, line and modem control, FIFO control, scratch) are
kept; the transmitter is instantaneous unless the host falls 16 KiB behind (then LSR says full
until it catches up). Interrupts as on a PC: the line is raised while an enabled condition is
pending (received data, transmitter empty) and OUT2 in MCR is set (the PC's gate between the UART
and the interrupt controller), and IIR reports the highest-priority one. Loopback (MCR bit 4)
routes THR back to RBR, as Linux's 8250 driver checks when it probes the port.

The model runs in C (hv/binding/uart.c; hv/devices/serial_reference.py is its specification in
Python), and so does everything the guest waits on: the vCPU loop handles the UART's port exits
without the interpreter (`native`), the IRQ is raised with KVM_IRQ_LINE, and the bytes the guest
sends go out on a C thread, raw, to a file descriptor (`attach_terminal`) and then to the Python
`output` callable on a thread of its own, which may lag without slowing the guest. While the
device is paused nothing moves: unsent output and unread input stay in the state that a snapshot
or a migration carries, so each byte is delivered once, by the side that runs the guest.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from hv.binding.ffi import ffi, lib
from hv.persist import U64, check_bits, check_bool, check_bytes, check_int, check_type

log = logging.getLogger(__name__)

COM1_PORT = 0x3F8
COM1_IRQ = 4
RX_BUFFER = lib.KVMIG_UART_RX  # bytes of host input held for the guest; more is dropped (counted)
TX_RING = lib.KVMIG_UART_TX  # bytes the guest sent that the host has not taken yet
HOST_RING = 1 << 20  # bytes kept for a lagging Python reader of the output; older ones are dropped

# register offsets
THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# the bits a register can hold after the guest wrote it (the masks a write applies)
REGISTER_BITS = {"ier": 0x0F, "lcr": 0xFF, "mcr": 0x1F, "fcr": 0xC9, "scr": 0xFF, "dll": 0xFF,
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
    tx: bytes = b""  # sent by the guest, not yet delivered to the host (delivered after restore)
    tx_overrun: int = 0  # bytes the guest wrote while LSR said the transmitter was full


@dataclass(frozen=True)
class Terminal:
    """Where a COM port meets the host, moved by the UART's C threads: every byte the guest
    sends, raw, to `out_fd`; `in_fd` read into the guest's receive buffer (None: not connected)."""

    out_fd: int | None = None
    in_fd: int | None = None


class Serial16550:
    """COM port model. `output` gets the bytes the guest sends (on the device's own thread);
    `irq_fd`/`irq`: the VM fd and the line that KVM_IRQ_LINE drives (-1: no interrupt controller).

    A `Lifecycle` device: it moves bytes only between `resume()` and `pause()`."""

    KIND: ClassVar[str] = "serial-16550"

    def __init__(self, output: Callable[[bytes], None] | None = None, *, irq_fd: int = -1,
                 irq: int = COM1_IRQ) -> None:
        self._output = output
        self.native: Any = ffi.gc(lib.kvmig_uart_new(irq_fd, irq), lib.kvmig_uart_free)
        if self.native == ffi.NULL:
            raise MemoryError("kvmig_uart_new")
        self._notify = os.eventfd(0, os.EFD_CLOEXEC) if output is not None else -1
        if lib.kvmig_uart_start_output(self.native, -1, HOST_RING if output else 0, self._notify) != 0:
            raise OSError("the UART's output thread did not start")
        self._stopped = False
        self._running = False
        self.terminal: Terminal | None = None
        self._drain_lock = threading.Lock()
        # what `_drain` takes the output into, under `_drain_lock` (allocated once, not per wake)
        self._take_buffer, self._take_dropped = ffi.new("uint8_t[]", 65536), ffi.new("uint64_t *")
        self._stop_lock = threading.Lock()
        self._delivered_dropped = 0
        self._reader: threading.Thread | None = None
        if output is not None:
            self._reader = threading.Thread(target=self._deliver, name="serial-out", daemon=True)
            self._reader.start()

    # --- host side ---

    def attach_terminal(self, terminal: Terminal) -> None:
        """Connect the host's side (once, before the guest runs: on a migration target, before
        the guest resumes there, so the rest of a line it began on the source reaches the same
        terminal). What a client of the guest sees then never waits for Python."""
        if self.terminal is not None:
            raise ValueError(f"the UART is attached to {self.terminal} already")
        self.terminal = terminal
        if terminal.out_fd is not None:
            lib.kvmig_uart_set_out_fd(self.native, terminal.out_fd)
        if terminal.in_fd is not None and lib.kvmig_uart_start_input(self.native, terminal.in_fd) != 0:
            raise OSError("the UART's input thread did not start")

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were taken."""
        return lib.kvmig_uart_feed(self.native, data, len(data))

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait until the bytes the guest sent have been delivered (raw copy and `output`): all of
        them while running; those the output thread took before a pause when paused."""
        if lib.kvmig_uart_flush(self.native, int(timeout * 1000)) != 0:
            return False
        return self._drain()

    def _deliver(self) -> None:
        while not self._stopped:
            try:
                os.eventfd_read(self._notify)
            except OSError:
                return
            self._drain()

    def _drain(self) -> bool:
        """Hand what the output thread left for Python to `output` (any thread may call it)."""
        if self._output is None:
            return True
        with self._drain_lock:  # `output` sees the bytes in order
            buf, dropped = self._take_buffer, self._take_dropped
            while n := lib.kvmig_uart_take_host(self.native, buf, len(buf), dropped):
                try:
                    self._output(bytes(ffi.buffer(buf, n)))
                except Exception:  # the reader's fault, not the guest's: the guest goes on
                    log.exception("serial: the console reader failed on %d bytes", n)
            if dropped[0] != self._delivered_dropped:
                log.warning("serial: %d output bytes dropped: the console reader fell behind",
                            dropped[0] - self._delivered_dropped)
                self._delivered_dropped = dropped[0]
        return True

    # --- bus side (exits the vCPU loop did not handle in C) ---

    def read(self, offset: int, size: int) -> int:
        return lib.kvmig_uart_read(self.native, offset)

    def write(self, offset: int, size: int, value: int) -> None:
        lib.kvmig_uart_write(self.native, offset, value & 0xFF)

    # --- lifecycle ---

    @property
    def paused(self) -> bool:
        return not self._running

    def resume(self) -> None:
        lib.kvmig_uart_set_running(self.native, 1)
        self._running = True

    def pause(self) -> None:
        """Returns once nothing is in flight: what the guest sent and the host did not take
        stays in the state."""
        lib.kvmig_uart_set_running(self.native, 0)
        self._running = False

    def stop(self) -> None:
        """End the device's threads; a running device first delivers what it still holds."""
        with self._stop_lock:  # a machine may be stopped from two threads at once
            if self._stopped:
                return
            lib.kvmig_uart_stop(self.native)
            self._drain()
            self._stopped = True
            if self._reader is not None:
                os.eventfd_write(self._notify, 1)
                if self._reader is not threading.current_thread():
                    self._reader.join(1.0)
                os.close(self._notify)

    # --- state ---

    def save(self) -> SerialState:
        regs = ffi.new("kvmig_uart_regs *")
        rx, tx = ffi.new("uint8_t[]", RX_BUFFER), ffi.new("uint8_t[]", TX_RING)
        lib.kvmig_uart_get(self.native, regs, rx, tx)
        return SerialState(
            ier=regs.ier, lcr=regs.lcr, mcr=regs.mcr, fcr=regs.fcr, scr=regs.scr, dll=regs.dll,
            dlm=regs.dlm, rx=bytes(ffi.buffer(rx, regs.rx_len)), thre_pending=bool(regs.thre_pending),
            irq_level=bool(regs.irq_level), dropped=regs.dropped, tx=bytes(ffi.buffer(tx, regs.tx_len)),
            tx_overrun=regs.tx_overrun)

    def restore(self, state: SerialState) -> None:
        """Check every register and both buffers first; then a raised line is raised again."""
        check_type(self.KIND, state, SerialState)
        check_bits(self.KIND, state, REGISTER_BITS)
        check_bytes(self.KIND, "rx", state.rx, RX_BUFFER)
        check_bytes(self.KIND, "tx", state.tx, TX_RING)
        check_bool(self.KIND, "thre_pending", state.thre_pending)
        check_bool(self.KIND, "irq_level", state.irq_level)
        check_int(self.KIND, "dropped", state.dropped, 0, U64)
        check_int(self.KIND, "tx_overrun", state.tx_overrun, 0, U64)
        regs = ffi.new("kvmig_uart_regs *", {
            "ier": state.ier, "lcr": state.lcr, "mcr": state.mcr, "fcr": state.fcr, "scr": state.scr,
            "dll": state.dll, "dlm": state.dlm, "thre_pending": state.thre_pending,
            "irq_level": state.irq_level, "rx_len": len(state.rx), "tx_len": len(state.tx),
            "dropped": state.dropped, "tx_overrun": state.tx_overrun})
        lib.kvmig_uart_set(self.native, regs, state.rx, state.tx)
