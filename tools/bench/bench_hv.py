"""hv benchmarks: numbers printed, nothing asserted.

    python tools/bench/bench_hv.py [--quick]

* VM exits handled per second (a guest looping on `out` to COM1, through the bus and the UART)
* pause and resume latency (busy guest), median / p99 / max over many cycles
* dirty log fetch + clear (KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG + VMM merge) for 1 GiB and
  4 GiB guests: with nothing dirty, and with the built-in guest's whole working set dirty
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "hv"))

from tinyguest import OUT_LOOP, multiboot_elf  # noqa: E402

from hv.kvm.kvm import Kvm  # noqa: E402
from hv.kvm.vm import VmConfig  # noqa: E402
from hv.vmm.builder import builtin_machine, multiboot_machine  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def bench_exits(kvm: Kvm, image: Path, seconds: float) -> None:
    machine = multiboot_machine(kvm, image, "", VmConfig(mem_size=16 * MiB), lambda b: None)
    machine.start()
    time.sleep(0.2)
    start_exits, t0 = machine.vcpus[0].fast_io_exits, time.perf_counter()
    time.sleep(seconds)
    exits, dt = machine.vcpus[0].fast_io_exits - start_exits, time.perf_counter() - t0
    machine.stop()
    machine.vm.close()
    print(f"exits: {exits / dt:,.0f} port-I/O exits/s handled (the UART in C, in the vCPU loop, {dt:.1f} s)")


def bench_pause(kvm: Kvm, image: Path, cycles: int) -> None:
    machine = multiboot_machine(kvm, image, "", VmConfig(mem_size=16 * MiB), lambda b: None)
    machine.start()
    pauses, resumes = [], []
    for _ in range(cycles):
        time.sleep(0.002)
        pauses.append(machine.pause() * 1e6)
        resumes.append(machine.resume() * 1e6)
    machine.stop()
    machine.vm.close()
    for name, v in (("pause", pauses), ("resume", resumes)):
        print(f"{name}: median {statistics.median(v):.0f} us, p99 {_pct(v, 0.99):.0f} us, "
              f"max {max(v):.0f} us over {cycles} cycles (busy guest)")


def _fetch_all(vm) -> tuple[float, int]:
    t0 = time.perf_counter()
    dirty = sum(bitmap.count() for _region, bitmap in vm.fetch_dirty_logs())
    return time.perf_counter() - t0, dirty


def bench_dirty(kvm: Kvm, mem: int, rounds: int) -> None:
    from hv.guests import builtin as builtin_guest

    ws_mib = min(mem, 3 * GiB) // MiB - 32  # below the MMIO hole, clear of the guest's own data
    params = builtin_guest.GuestParams(ws_mib=ws_mib, fill="zero")
    console = builtin_guest.GuestConsole()
    machine = builtin_machine(kvm, params, VmConfig(mem_size=mem), console)
    vm = machine.vm
    machine.start()
    console.wait_pass(1, timeout=120)
    deadline = time.monotonic() + 120
    vm.enable_dirty_log()
    _fetch_all(vm)
    busy, idle = [], []
    for _ in range(rounds):
        console.wait_pass(console.last_pass() + 2, timeout=max(1.0, deadline - time.monotonic()))
        machine.pause()
        busy.append(_fetch_all(vm))
        idle.append(_fetch_all(vm))  # nothing written since: the bare cost of the calls
        machine.resume()
    machine.stop()
    vm.close()
    name = f"{mem // GiB} GiB"
    b_ms = statistics.median(t for t, _ in busy) * 1e3
    i_ms = statistics.median(t for t, _ in idle) * 1e3
    print(f"dirty log {name}: fetch+clear with {busy[0][1]:,} pages dirty ({ws_mib} MiB working set): "
          f"{b_ms:.1f} ms; with none dirty: {i_ms:.2f} ms (median of {rounds})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs")
    args = ap.parse_args()
    kvm = Kvm()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "outloop.elf"
        image.write_bytes(multiboot_elf(OUT_LOOP))
        bench_exits(kvm, image, 1.0 if args.quick else 3.0)
        bench_pause(kvm, image, 50 if args.quick else 300)
    for mem in (1 * GiB, 4 * GiB):
        bench_dirty(kvm, mem, 3 if args.quick else 5)


if __name__ == "__main__":
    main()
