"""The 16550 model (in C): registers as a driver sees them, the Python specification it matches,
its output and input threads, and interrupts a real guest takes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from hv.binding.ffi import ffi, lib
from hv.devices.serial import RX_BUFFER, TX_RING, Serial16550, SerialState, Terminal
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.devices.serial_reference import IIR_NO_INTERRUPT, IIR_RDA, IIR_THRE, ReferenceSerial16550

MiB = 1 << 20


def take_sent(uart: Serial16550) -> bytes:
    """What the guest sent and nobody took yet (a device that was never resumed keeps it all)."""
    buf = ffi.new("uint8_t[]", TX_RING)
    return bytes(ffi.buffer(buf, lib.kvmig_uart_take_tx(uart.native, buf, TX_RING)))


def level(uart: Serial16550) -> bool:
    return uart.save().irq_level


def test_received_data_interrupts_only_when_enabled_and_gated_by_out2() -> None:
    uart = Serial16550()
    uart.feed(b"ab")
    assert not level(uart) and uart.read(5, 1) & 1  # data ready, no interrupt asked for
    uart.write(1, 1, 0x01)  # IER: received data
    assert not level(uart)  # OUT2 still off: the PC gate keeps the line low
    uart.write(4, 1, 0x08)
    assert level(uart) and uart.read(2, 1) & 0x0F == IIR_RDA
    assert uart.read(0, 1) == ord("a") and level(uart)
    assert uart.read(0, 1) == ord("b") and not level(uart)
    assert uart.read(2, 1) & 0x0F == IIR_NO_INTERRUPT and not uart.read(5, 1) & 1


def test_transmitter_empty_interrupt_is_taken_by_reading_iir() -> None:
    uart = Serial16550()
    uart.write(4, 1, 0x08)
    uart.write(1, 1, 0x02)  # enabling THRE with the register empty raises it at once
    assert level(uart) and uart.read(2, 1) & 0x0F == IIR_THRE
    assert not level(uart)
    uart.write(0, 1, ord("x"))
    assert take_sent(uart) == b"x" and level(uart)


def test_received_data_outranks_transmitter_empty_and_loopback_echoes() -> None:
    uart = Serial16550()
    uart.write(4, 1, 0x18)  # OUT2 + loopback
    uart.write(1, 1, 0x03)
    uart.write(0, 1, 0x55)
    assert not take_sent(uart) and uart.read(2, 1) & 0x0F == IIR_RDA and uart.read(0, 1) == 0x55
    assert uart.read(6, 1) & 0xF0 == 0x80  # loopback: DCD follows OUT2


def test_divisor_latch_fifo_clear_overflow_and_state_round_trip() -> None:
    uart = Serial16550()
    uart.write(3, 1, 0x80)
    uart.write(0, 1, 0x01)
    uart.write(1, 1, 0x00)
    assert (uart.read(0, 1), uart.read(1, 1)) == (1, 0)  # 115200 baud
    uart.write(3, 1, 0x03)
    assert uart.feed(bytes(RX_BUFFER + 10)) == RX_BUFFER and uart.save().dropped == 10
    uart.write(2, 1, 0x03)  # FIFO on, clear receive
    assert not uart.read(5, 1) & 1 and uart.read(2, 1) & 0xC0 == 0xC0
    uart.feed(b"kept")
    uart.write(0, 1, ord("!"))  # sent, not yet delivered: part of the state
    twin = Serial16550()
    twin.restore(uart.save())
    assert twin.save() == uart.save() and twin.save().tx == b"!" and twin.read(0, 1) == ord("k")


def test_a_full_transmit_ring_says_so_in_lsr_and_gives_thre_back_when_taken() -> None:
    uart = Serial16550()
    uart.write(4, 1, 0x08)
    uart.write(1, 1, 0x02)
    for i in range(TX_RING):
        uart.write(0, 1, i & 0xFF)
    assert uart.read(5, 1) & 0x60 == 0 and not level(uart)  # full: no THRE, no interrupt
    uart.write(0, 1, 0xEE)
    assert uart.save().tx_overrun == 1
    sent = take_sent(uart)
    assert sent == bytes(i & 0xFF for i in range(TX_RING))
    assert uart.read(5, 1) & 0x60 == 0x60 and level(uart)  # room again: THRE, and its interrupt


# --- the C model against its specification -----------------------------------------------------

_OPS = st.one_of(
    st.tuples(st.just("read"), st.integers(0, 7)),
    st.tuples(st.just("write"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("feed"), st.binary(max_size=64)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_OPS, max_size=60))
def test_the_c_model_answers_as_the_python_specification(ops) -> None:
    """Every read, the bytes sent and the whole state (interrupt line included) agree after each
    step of random register traffic, with the transmit ring drained as the host would."""
    sent_ref = bytearray()
    ref, uart = ReferenceSerial16550(sent_ref.extend), Serial16550()
    sent = bytearray()
    for op in ops:
        match op:
            case ("read", offset):
                assert uart.read(offset, 1) == ref.read(offset, 1), op
            case ("write", offset, value):
                uart.write(offset, 1, value)
                ref.write(offset, 1, value)
            case ("feed", data):
                assert uart.feed(data) == ref.feed(data)
        sent += take_sent(uart)
        assert bytes(sent) == bytes(sent_ref)
        assert uart.save() == ref.save(), op


# --- the threads that move bytes ---------------------------------------------------------------


def test_output_goes_raw_to_a_descriptor_and_to_python_only_while_running(tmp_path) -> None:
    got = bytearray()
    uart = Serial16550(got.extend)
    r, w = os.pipe()
    try:
        uart.attach_terminal(Terminal(out_fd=w))
        for b in b"no newline":
            uart.write(0, 1, b)
        time.sleep(0.05)
        assert uart.save().tx == b"no newline" and not got  # paused: nothing moved
        uart.resume()
        assert uart.flush(2.0)
        assert os.read(r, 100) == b"no newline" and bytes(got) == b"no newline"
        uart.pause()
        uart.write(0, 1, ord("?"))
        uart.stop()  # stopped while paused: the byte stays with the state (it went elsewhere)
        assert uart.save().tx == b"?" and bytes(got) == b"no newline"
    finally:
        os.close(r)
        os.close(w)


def test_stopping_a_running_device_delivers_what_it_still_holds() -> None:
    got = bytearray()
    uart = Serial16550(got.extend)
    for b in b"last words\n":
        uart.write(0, 1, b)
    uart.resume()
    uart.stop()
    assert bytes(got) == b"last words\n" and uart.save().tx == b""


def test_input_is_read_from_a_descriptor_only_while_running() -> None:
    uart = Serial16550()
    r, w = os.pipe()
    try:
        uart.attach_terminal(Terminal(in_fd=r))
        os.write(w, b"typed\n")
        time.sleep(0.05)
        assert uart.save().rx == b""  # paused: the bytes wait in the pipe
        uart.resume()
        deadline = time.monotonic() + 2
        while uart.save().rx != b"typed\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert uart.save().rx == b"typed\n"
        uart.pause()
        os.write(w, b"later")
        time.sleep(0.05)
        assert uart.save().rx == b"typed\n"
    finally:
        uart.stop()
        os.close(r)
        os.close(w)


def test_restore_refuses_a_transmit_ring_larger_than_the_device_has() -> None:
    import pytest

    from hv.errors import StateRestoreError

    with pytest.raises(StateRestoreError, match="tx"):
        Serial16550().restore(SerialState(tx=bytes(TX_RING + 1)))


# --- a real guest ------------------------------------------------------------------------------


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
        # every COM1 access was served inside the vCPU loop, in C: none reached Python's bus
        stats = machine.stats[0]
        assert stats.fast_io_exits > 2 * sum(len(x) for x in console.lines)
        assert machine.io_bus.find(0x3F8) is not None and stats.io_exits < stats.fast_io_exits // 10
    finally:
        machine.stop()
        machine.vm.close()


def test_the_guest_console_keeps_up_while_another_thread_holds_the_interpreter(kvm: Kvm) -> None:
    """The guest's COM1 traffic does not wait for the interpreter lock: a Python thread that
    never releases it (a tight loop) runs beside the guest while the guest prints its lines."""
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1, rate_mib_s=0), VmConfig(mem_size=32 * MiB), console)
    stop = threading.Event()
    try:
        machine.start()
        console.wait_ready(timeout=20)
        before = machine.vcpus[0].fast_io_exits
        switch = sys.getswitchinterval()
        sys.setswitchinterval(5.0)  # the spinning thread keeps the lock for seconds at a time

        def spin() -> None:
            t = time.monotonic()
            while time.monotonic() - t < 1.0:
                pass

        spinner = threading.Thread(target=spin)
        spinner.start()
        spinner.join()
        sys.setswitchinterval(switch)
        assert machine.vcpus[0].fast_io_exits - before > 100  # the guest printed while we spun
    finally:
        stop.set()
        machine.stop()
        machine.vm.close()


def test_hv_run_forwards_the_terminal_to_com1() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "32M", "--ws", "4", "--rate", "20",
                             "--timeout", "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        proc.stdin.write("typed on stdin\n")
        proc.stdin.flush()
        echoed = next((line for line in proc.stdout if "uart-rx" in line), "")  # the guest read it: done
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert "kvmig: uart-rx irqs=1 text=typed on stdin" in echoed


def test_hv_run_can_send_the_console_to_a_file(tmp_path) -> None:
    log = tmp_path / "console.log"
    proc = subprocess.run([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "32M", "--ws", "4", "--passes", "3",
                           "--console", str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "kvmig:" not in proc.stdout
    assert "kvmig: done passes=3" in log.read_text()
