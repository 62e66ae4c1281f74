"""virtio-blk request round trips of the built-in guest: kvmigrate's virtio-mmio, kvmigrate's
virtio-pci (MSI-X), and QEMU 7.2's virtio-blk-pci (MSI-X), same image, same run.

    .venv/bin/python tools/bench/bench_pci.py [--rounds N] [--json]

The guest's CPU 1 does device rounds: each round increments 256 pages of its own, then writes
4 KiB to the disk and reads it back (two requests, each: descriptors, a notification, the used
buffer; on PCI also the queue's MSI-X interrupt, which the driver waits for); every 256 rounds it
prints `kvmig: dev cpu=1 round=N ms=T` (its TSC). The figure is the guest's own time per round,
from the second such line on (the first includes start-up), as the median over the lines of the
run. On virtio-mmio the driver polls; on PCI each request also waits for its interrupt, so the
PCI figure includes the interrupt's path from the device thread to the guest's handler.

Numbers are printed, nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hv.guests import builtin as bg  # noqa: E402
from hv.kvm.kvm import Kvm  # noqa: E402
from hv.kvm.vm import VmConfig  # noqa: E402
from hv.vmm.builder import VirtioConfig, builtin_machine  # noqa: E402

MiB = 1 << 20
LINE_EVERY = 256  # rounds between the guest's `dev` lines


def _per_round_us(lines: list[bg.DeviceRound]) -> float | None:
    steps = [(b.ms - a.ms) * 1000 / (b.round - a.round) for a, b in zip(lines, lines[1:])]
    return statistics.median(steps) if steps else None


def run_kvmigrate(kvm: Kvm, disk: Path, pci: bool, rounds: int) -> float | None:
    console = bg.GuestConsole()
    virtio = VirtioConfig(disk, pci=("virtio-blk0",) if pci else ())
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=8, rate_mib_s=40), VmConfig(mem_size=64 * MiB, vcpus=2),
                              console, virtio=virtio)
    try:
        machine.start()
        console.wait_for(lambda: sum(isinstance(e, bg.DeviceRound) for _, e in console.events) >= rounds // LINE_EVERY,
                         300, "device rounds")
        return _per_round_us([e for _, e in console.events if isinstance(e, bg.DeviceRound)])
    finally:
        machine.stop()
        machine.vm.close()


def run_qemu(disk: Path, tsc_khz: int, rounds: int, workdir: Path) -> float | None:
    out = workdir / "com1.txt"
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-enable-kvm", "-cpu", "max,-arch-capabilities", "-m", "64", "-smp", "2",
         "-display", "none", "-monitor", "none", "-serial", f"file:{out}", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-drive", f"file={disk},if=none,id=d0,format=raw", "-device", "virtio-blk-pci,drive=d0,disable-legacy=on",
         "-kernel", str(bg.guest_image()), "-append", f"ws=8 rate=40 cpus=2 tsc_khz={tsc_khz}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            events = [bg.parse_line(line) for line in out.read_text().splitlines()] if out.exists() else []
            lines = [e for e in events if isinstance(e, bg.DeviceRound)]
            if len(lines) >= rounds // LINE_EVERY:
                return _per_round_us(lines)
            time.sleep(0.2)
        return None
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2048, help="device rounds per peer (default 2048)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with Kvm() as kvm, tempfile.TemporaryDirectory(prefix="bench-pci-") as tmp:
        workdir = Path(tmp)
        disk = workdir / "disk.img"
        disk.write_bytes(bytes(MiB))
        with kvm.create_vm(VmConfig(mem_size=MiB)) as vm:
            tsc_khz = vm.create_vcpu(0).fd.get_tsc_khz()
        result = {
            "rounds": args.rounds,
            "kvmigrate virtio-mmio (polled)": run_kvmigrate(kvm, disk, False, args.rounds),
            "kvmigrate virtio-pci (MSI-X)": run_kvmigrate(kvm, disk, True, args.rounds),
            "qemu virtio-blk-pci (MSI-X)": run_qemu(disk, tsc_khz, args.rounds, workdir)
            if shutil.which("qemu-system-x86_64") else None,
        }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"µs per device round (a 4 KiB write and read back), median over {args.rounds} rounds:")
        for name, value in result.items():
            if name != "rounds":
                print(f"  {name:34} {value:8.1f}" if value is not None else f"  {name:34}      n/a")
    return 0


if __name__ == "__main__":
    sys.exit(main())
