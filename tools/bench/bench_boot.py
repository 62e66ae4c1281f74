"""Boot-to-ready time and the host CPU an idle guest costs: hv and QEMU on the same image.

    .venv/bin/python tools/bench/bench_boot.py [--runs N] [--idle-seconds S] [--json]

Each run starts the VMM as a fresh process with the built-in guest (256 MiB RAM, 1 MiB working
set, `idle=1`: once ready, the guest halts its CPU) and times process start to the guest's
`kvmig: ready` line on the serial console; then it reads the process's CPU time (user + system,
/proc/PID/stat) over `--idle-seconds` of an idle guest. QEMU: `qemu-system-x86_64 -enable-kvm
-kernel guest.elf` (Multiboot), the same image and command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig

TICK = os.sysconf("SC_CLK_TCK")
CMDLINE = "ws=1 rate=0 idle=1"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def _tsc_khz() -> int:
    with Kvm() as kvm, kvm.create_vm(VmConfig(mem_size=1 << 20)) as vm:
        return vm.create_vcpu(0).fd.get_tsc_khz()


def _command(vmm: str, image: Path, tsc_khz: int) -> list[str]:
    if vmm == "hv":
        return [sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "256M", "--ws", "1", "--idle"]
    return ["qemu-system-x86_64", "-enable-kvm", "-cpu", "max,-arch-capabilities", "-m", "256", "-nodefaults",
            "-display", "none", "-serial", "stdio", "-no-reboot", "-kernel", str(image),
            "-append", f"{CMDLINE} tsc_khz={tsc_khz}"]


def run_once(vmm: str, image: Path, tsc_khz: int, idle_seconds: float) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(_command(vmm, image, tsc_khz), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        for line in proc.stdout:
            if isinstance(bg.parse_line(line.decode(errors="replace")), bg.Ready):
                break
        else:
            raise RuntimeError(f"{vmm} exited before the guest was ready")
        ready = time.perf_counter() - t0
        at_ready = _cpu_seconds(proc.pid)
        time.sleep(idle_seconds)
        idle_cpu = _cpu_seconds(proc.pid) - at_ready
        return {"boot_to_ready_ms": ready * 1000, "startup_cpu_s": at_ready,
                "idle_cpu_percent": idle_cpu / idle_seconds * 100}
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle-seconds", type=float, default=10.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    image, tsc_khz = bg.guest_image(), _tsc_khz()
    vmms = ["hv"] + (["qemu"] if shutil.which("qemu-system-x86_64") else [])
    result = {}
    for vmm in vmms:
        runs = [run_once(vmm, image, tsc_khz, args.idle_seconds) for _ in range(args.runs)]
        result[vmm] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        if not args.json:
            r = result[vmm]
            print(f"{vmm:5}: boot to ready {r['boot_to_ready_ms']:.0f} ms (process start included; "
                  f"{r['startup_cpu_s']:.2f} s CPU), idle guest {r['idle_cpu_percent']:.2f}% of a core "
                  f"over {args.idle_seconds:.0f} s (median of {args.runs})", flush=True)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
