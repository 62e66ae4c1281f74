"""The 16550 model: registers as a driver sees them, and interrupts a real guest takes."""

from __future__ import annotations

import subprocess
import sys

from hv.devices.serial import (
    IIR_NO_INTERRUPT,
    IIR_RDA,
    IIR_THRE,
    RX_BUFFER,
    Serial16550,
)
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine

MiB = 1 << 20


class Line:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.levels.append(level)


def test_received_data_interrupts_only_when_enabled_and_gated_by_out2() -> None:
    sent, line = bytearray(), Line()
    uart = Serial16550(sent.extend, line)
    uart.feed(b"ab")
    assert line.levels == [] and uart.read(5, 1) & 1  # data ready, no interrupt asked for
    uart.write(1, 1, 0x01)  # IER: received data
    assert line.levels == []  # OUT2 still off: the PC gate keeps the line low
    uart.write(4, 1, 0x08)
    assert line.levels == [True] and uart.read(2, 1) & 0x0F == IIR_RDA
    assert uart.read(0, 1) == ord("a") and line.levels == [True]
    assert uart.read(0, 1) == ord("b") and line.levels == [True, False]
    assert uart.read(2, 1) & 0x0F == IIR_NO_INTERRUPT and not uart.read(5, 1) & 1


def test_transmitter_empty_interrupt_is_taken_by_reading_iir() -> None:
    sent, line = bytearray(), Line()
    uart = Serial16550(sent.extend, line)
    uart.write(4, 1, 0x08)
    uart.write(1, 1, 0x02)  # enabling THRE with the register empty raises it at once
    assert line.levels == [True] and uart.read(2, 1) & 0x0F == IIR_THRE
    assert line.levels == [True, False]
    uart.write(0, 1, ord("x"))
    assert bytes(sent) == b"x" and line.levels == [True, False, True]


def test_received_data_outranks_transmitter_empty_and_loopback_echoes() -> None:
    sent, line = bytearray(), Line()
    uart = Serial16550(sent.extend, line)
    uart.write(4, 1, 0x18)  # OUT2 + loopback
    uart.write(1, 1, 0x03)
    uart.write(0, 1, 0x55)
    assert not sent and uart.read(2, 1) & 0x0F == IIR_RDA and uart.read(0, 1) == 0x55
    assert uart.read(6, 1) & 0xF0 == 0x80  # loopback: DCD follows OUT2


def test_divisor_latch_fifo_clear_overflow_and_state_round_trip() -> None:
    uart = Serial16550(lambda b: None)
    uart.write(3, 1, 0x80)
    uart.write(0, 1, 0x01)
    uart.write(1, 1, 0x00)
    assert (uart.read(0, 1), uart.read(1, 1)) == (1, 0)  # 115200 baud
    uart.write(3, 1, 0x03)
    assert uart.feed(bytes(RX_BUFFER + 10)) == RX_BUFFER and uart.save().dropped == 10
    uart.write(2, 1, 0x03)  # FIFO on, clear receive
    assert not uart.read(5, 1) & 1 and uart.read(2, 1) & 0xC0 == 0xC0
    uart.feed(b"kept")
    twin = Serial16550(lambda b: None)
    twin.restore(uart.save())
    assert twin.save() == uart.save() and twin.read(0, 1) == ord("k")


def test_a_real_guest_takes_com1_interrupts_in_its_ring0_handler(kvm: Kvm) -> None:
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=4, rate_mib_s=20), VmConfig(mem_size=32 * MiB), console)
    try:
        machine.start()
        console.wait_ready(timeout=20)
        machine.devices["serial0"].feed(b"hello from the host\r\n")
        console.wait_for(lambda: any("text=hello from the host" in x for x in console.lines), 10, "the echo")
        machine.devices["serial0"].feed(b"again\n")
        console.wait_for(lambda: any("text=again" in x for x in console.lines), 10, "the second echo")
        echoes = [x for x in console.lines if x.startswith("kvmig: uart-rx")]
        assert echoes[0].startswith("kvmig: uart-rx irqs=1 ") and echoes[1].startswith("kvmig: uart-rx irqs=2 ")
        machine.pause()
        assert bg.check_memory(machine.vm.memory).ok
    finally:
        machine.stop()
        machine.vm.close()


def test_hv_run_forwards_the_terminal_to_com1() -> None:
    proc = subprocess.run([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "32M", "--ws", "4", "--rate", "20",
                           "--timeout", "3"], input="typed on stdin\n", capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kvmig: uart-rx irqs=1 text=typed on stdin" in proc.stdout


def test_hv_run_can_send_the_console_to_a_file(tmp_path) -> None:
    log = tmp_path / "console.log"
    proc = subprocess.run([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "32M", "--ws", "4", "--passes", "3",
                           "--console", str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kvmig:" not in proc.stdout
    assert "kvmig: done passes=3" in log.read_text()
