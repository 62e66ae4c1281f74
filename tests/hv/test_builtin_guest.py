"""The built-in guest on real KVM: it runs, its dirty log is exact, pause freezes it, and its
whole state moves to a second VM that carries on identically. The same image boots in QEMU."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator

import numpy as np
import pytest

from hv.devices.serial import Serial16550
from hv.errors import ConfigError
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine, multiboot_machine
from hv.vmm.machine import Machine, RunState

MiB = 1 << 20
CONFIG = VmConfig(mem_size=64 * MiB)


@pytest.fixture
def running(kvm: Kvm) -> Iterator[tuple[Machine, bg.GuestConsole]]:
    """An 8 MiB working set dirtied at 20 MiB/s (a pass takes 400 ms), past its fill."""
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=8, rate_mib_s=20), CONFIG, console)
    machine.start()
    try:
        console.wait_ready(timeout=20)
        yield machine, console
    finally:
        machine.stop()
        machine.vm.close()


def test_a_missing_image_is_an_error_naming_the_build_command(monkeypatch, tmp_path) -> None:
    # hv never builds the guest at run time: the image comes from `make install` / `make test`
    assert bg.guest_image().is_file()
    monkeypatch.setattr(bg, "GUEST_DIR", tmp_path)
    with pytest.raises(bg.GuestImageMissingError) as missing:
        bg.guest_image()
    assert missing.value.path == tmp_path / "build" / bg.IMAGE_NAME
    assert " ".join(bg.BUILD_COMMAND) in str(missing.value)


def _ram(machine: Machine) -> np.ndarray:
    (region,) = machine.vm.memory.regions
    return region.pages_array().copy()


def test_guest_runs_its_passes_and_ends_through_the_debug_exit(kvm: Kvm) -> None:
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=16, passes=12, every=3), CONFIG, console)
    try:
        machine.start()
        assert machine.wait(timeout=30) is RunState.STOPPED
        assert machine.stop_reason.source == "guest-exit" and "code 0" in machine.stop_reason.detail
        assert console.passes == [3, 6, 9, 12]
        boot = next(e for _, e in console.events if isinstance(e, bg.Boot))
        assert boot.fields["ws_mib"] == 16 and boot.fields["tsc_khz"] == machine.vcpus[0].fd.get_tsc_khz()
        assert any(isinstance(e, bg.Done) and e.passes == 12 for _, e in console.events)
        assert sum(s.io_exits + s.fast_io_exits for s in machine.stats) >= sum(len(line) for line in console.lines)
        status = bg.read_status(machine.vm.memory)
        assert status.valid and status.passes == 12 and status.ws_pages == 16 * 256
        check = bg.check_memory(machine.vm.memory)
        assert check.ok and check.split == 0, check
    finally:
        machine.vm.close()


def test_a_reset_through_the_i8042_stops_the_vm_cleanly(kvm: Kvm) -> None:
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=4, reset_after=3), CONFIG, console)
    try:
        machine.start()
        assert machine.wait(timeout=30) is RunState.STOPPED
        assert machine.stop_reason.source == "guest-reset" and machine.error is None
        assert console.passes == [1, 2, 3]
        assert machine.devices["i8042"].save().resets == 1
    finally:
        machine.vm.close()


def test_rate_paces_the_guest(running) -> None:
    machine, console = running
    console.wait_pass(2, timeout=10)
    # the pass time by the guest's own clock (the TSC), not by when the host read the line
    took = [e.ms for _, e in console.events if isinstance(e, bg.Pass)]
    assert 300 < took[1] - took[0] < 600  # ms since the workload began; 8 MiB at 20 MiB/s: 400 ms a pass


def test_dirty_log_reports_exactly_what_changed_plus_vmm_writes(running) -> None:
    machine, console = running
    vm, memory = machine.vm, machine.vm.memory
    (region,) = memory.regions
    vm.enable_dirty_log()
    machine.pause()
    vm.fetch_dirty_log(region)  # start the interval: everything before is forgotten
    before = _ram(machine)
    marked, written = 40 * MiB, 41 * MiB  # outside the guest's working set
    machine.resume()
    memory.mark_dirty(marked, 1)  # a device "wrote" without changing anything
    memory.write(written + 100, b"device data")
    passes = bg.read_status(memory).passes
    console.wait_pass(passes + 1, timeout=30)  # the guest wrote its working set in the interval
    machine.pause()
    dirty = set(vm.fetch_dirty_log(region).pages().tolist())
    after = _ram(machine)
    changed = set(np.flatnonzero((before != after).any(axis=1)).tolist())

    ws = set(range(bg.WS_ADDR // 4096, bg.WS_ADDR // 4096 + 8 * 256))
    # the interval caught some of the working set: usually part of a pass, but a guest that was
    # paused (the RAM copies above) is behind its TSC schedule and may catch up a whole pass
    assert 0 < len(changed & ws)
    assert changed <= dirty
    # Every working-set write changes its page, so the two agree, but for one page: KVM logs a
    # page when the guest's write faults, before the write is done; a pause that lands between
    # the two leaves the page the incrementer was at logged and not yet changed: the one after a
    # page it changed (cyclically: the interval may hold a whole pass and wrap around).
    assert changed & ws <= dirty & ws
    at = (dirty & ws) - changed
    assert len(at) <= 1, sorted(at)
    for page in at:
        assert (page - 1 if page - 1 in ws else max(ws)) in changed, page
    image = set(range(0x100000 // 4096, 0x200000 // 4096))  # stacks may be rewritten unchanged
    assert dirty - changed <= image | {bg.STATUS_ADDR // 4096, marked // 4096} | at
    assert {marked // 4096, written // 4096} <= dirty
    vm.disable_dirty_log()


def test_pause_freezes_memory_and_resume_continues(running) -> None:
    machine, console = running
    took = machine.pause()
    assert took < 0.05
    before, status = _ram(machine), bg.read_status(machine.vm.memory)
    time.sleep(0.3)  # a window for a wrong run to show; a right one passes on any host
    assert np.array_equal(before, _ram(machine))
    assert bg.read_status(machine.vm.memory) == status
    assert bg.check_memory(machine.vm.memory).ok
    machine.resume()
    console.wait_pass(status.passes + 1, timeout=5)


def test_checker_finds_a_corrupted_page(running) -> None:
    machine, _ = running
    machine.pause()
    memory = machine.vm.memory
    memory.write(bg.WS_ADDR + 77 * 4096 + 1000, b"\x5a")
    memory.write(bg.WS_ADDR + 1000 * 4096, bytes([memory.read(bg.WS_ADDR + 1000 * 4096, 1)[0] ^ 0x80]))
    check = bg.check_memory(memory)
    assert not check.ok
    assert check.bad_fill == (77,) and 1000 in check.bad_counters


def test_secondary_cpus_start_by_init_sipi_and_run_alongside(kvm: Kvm) -> None:
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=8, rate_mib_s=40), VmConfig(mem_size=64 * MiB, vcpus=3),
                              console)
    try:
        machine.start()
        console.wait_pass(2, timeout=20)
        ups = {e.cpu for _, e in console.events if isinstance(e, bg.CpuUp)}
        assert ups == {1, 2}
        first = bg.read_status(machine.vm.memory)
        console.wait_pass(first.passes + 1, timeout=5)
        later = bg.read_status(machine.vm.memory)
        assert later.cpus_up == 3
        assert all(b > a > 0 for a, b in zip(first.cpu_work[1:3], later.cpu_work[1:3], strict=True))
        machine.pause()  # every CPU dirties memory: CPU 0 its working set, the others 1 MiB each
        status = bg.read_status(machine.vm.memory)
        assert bg.check_memory(machine.vm.memory).ok
        for cpu in (1, 2):
            region = bg.WS_ADDR + 8 * MiB + (cpu - 1) * bg.CPU_WS_BYTES
            counters = machine.vm.memory.read(region, bg.CPU_WS_BYTES)[::4096]
            assert set(counters) <= {status.cpu_work[cpu] % 256, (status.cpu_work[cpu] + 1) % 256}
    finally:
        machine.stop()
        machine.vm.close()


@pytest.mark.parametrize("vcpus", [1, 2])
def test_state_moves_to_a_second_vm_which_carries_on_identically(kvm: Kvm, vcpus: int) -> None:
    params = bg.GuestParams(ws_mib=8, rate_mib_s=40, passes=8)
    config = VmConfig(mem_size=64 * MiB, vcpus=vcpus)
    source_console, target_console = bg.GuestConsole(), bg.GuestConsole()
    source = builtin_machine(kvm, params, config, source_console)
    target = builtin_machine(kvm, params, config, target_console)
    try:
        source.start()
        source_console.wait_pass(2, timeout=20)
        source.pause()
        # bytes the UART's output thread took before the pause reach the console first (it may
        # lag on a loaded host); what the guest sent after them is in the UART's state
        assert source.device("serial0", Serial16550).flush(timeout=10)
        cut = len(source_console.events)
        target_console(source_console.pending)  # the console line in flight moves too
        # the whole machine: RAM, in-kernel irqchip/PIT/clock, every vCPU, every device
        for src, dst in zip(source.vm.memory.regions, target.vm.memory.regions, strict=True):
            dst.view[:] = src.view
        target.vm.restore(source.vm.save())
        for src, dst in zip(source.vcpus, target.vcpus, strict=True):
            dst.restore(src.save())
        for device_id, device in source.devices.items():
            target.devices[device_id].restore(device.save())
        saved = bg.read_status(source.vm.memory)
        resumed_at = saved.passes

        target.start()
        source.resume()
        assert source.wait(timeout=30) is RunState.STOPPED
        assert target.wait(timeout=30) is RunState.STOPPED
        assert target.stop_reason.source == "guest-exit"
        after = [e.number for _, e in source_console.events[cut:] if isinstance(e, bg.Pass)]
        assert after == target_console.passes == list(range(resumed_at + 1, 9))
        for vm in (source.vm, target.vm):
            assert bg.check_memory(vm.memory).ok
        ws = slice(bg.WS_ADDR, bg.WS_ADDR + 8 * MiB)
        assert source.vm.memory.regions[0].view[ws] == target.vm.memory.regions[0].view[ws]
        if vcpus == 2:  # the secondary CPU carried on from where it was, too
            assert bg.read_status(target.vm.memory).cpu_work[1] > saved.cpu_work[1] > 0
    finally:
        for m in (source, target):
            m.stop()
            m.vm.close()


def test_bad_parameters_are_refused_by_the_host_and_by_the_guest(kvm: Kvm, tmp_path) -> None:
    with pytest.raises(ConfigError, match="mem_size"):
        builtin_machine(kvm, bg.GuestParams(ws_mib=100), CONFIG)
    console = bg.GuestConsole()
    machine = multiboot_machine(kvm, bg.guest_image(), "ws=100", CONFIG, console)  # past the host check
    try:
        machine.start()
        machine.wait(timeout=20)
        assert isinstance(console.failure(), bg.GuestError)
        assert "does not fit" in console.failure().message
        assert "code 2" in machine.stop_reason.detail
    finally:
        machine.vm.close()


def test_parse_line_reads_the_protocol_and_flags_garbage() -> None:
    assert bg.parse_line("kvmig: pass 7 ms=12") == bg.Pass(7, 12)
    assert bg.parse_line("kvmig: ready pages=256 touch_ms=3") == bg.Ready(256, 3)
    assert bg.parse_line("kvmig: fault vector=14 error=0x6 rip=0x10012a cs=0x23 cr2=0xdead000") == \
        bg.Fault(14, 6, 0x10012A, 0xDEAD000)
    assert bg.parse_line("hello") is None
    assert isinstance(bg.parse_line("kvmig: pass x"), bg.GuestError)


def test_the_same_image_boots_in_qemu() -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is not installed (`make test` installs it)")
    done = subprocess.run(
        [qemu, "-enable-kvm", "-cpu", "max,-arch-capabilities", "-m", "64", "-display", "none",
         "-monitor", "none", "-serial", "stdio", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-kernel", str(bg.guest_image()), "-append", "ws=8 passes=3 fill=random"],
        capture_output=True, text=True, timeout=60, check=False)
    events = [bg.parse_line(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1, done.stderr  # isa-debug-exit: (0 << 1) | 1
    assert [e.number for e in events if isinstance(e, bg.Pass)] == [1, 2, 3]
    assert any(isinstance(e, bg.Boot) and e.fields["mem_mib"] in (63, 64) for e in events)
