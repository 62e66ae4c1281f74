"""Interrupt latency through MSI-X and irqfd, device thread to the guest's handler, as the guest
itself times it: kvmigrate's virtio-net-pci beside QEMU 7.2's, same image, runs interleaved
(numbers, not asserts).

    .venv/bin/python tools/bench/bench_irq_latency.py [--runs 5] [--rounds 2000] [--json]

The built-in guest, given `irq_bench=N` and a virtio-pci network card, sends N frames one at a
time before anything else (tools/guests/builtin/net.c, `net_irq_bench`): each is timed with the
guest's TSC from just before its notification to the first instruction of tx's MSI-X handler
(pci_irq.S keeps the TSC at which each vector's handler began). Between the two: the
notification (an ioeventfd, no exit to the VMM), the device thread waking (kvmigrate: the C
packet engine's; QEMU: its main loop), the frame written to the tap, the used buffer, and the
vector's message (kvmigrate: the engine writes the vector's irqfd; QEMU: its own MSI path) into
the vCPU that spins in ring 3. The TSC is turned into ns with the vCPU's TSC rate, which both
peers get on the command line (KVM's, the same for both). The guest reports p50, p99, min and
max over its N rounds; this tool prints, per peer, the median of each over the runs and their
spread (min-max across runs).

Both peers run as processes of their own in host A of the two-host rig (tools/netrig.py), on the
same persistent tap, up and a port of A's bridge: `hv run --net tap=T,transport=pci` and
`qemu-system-x86_64 -netdev tap,ifname=T,script=no,downscript=no -device virtio-net-pci,
disable-legacy=on`. On a loaded host the figures are noise; label them so.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hv.guests import builtin as bg  # noqa: E402
from hv.kvm.kvm import Kvm  # noqa: E402
from hv.kvm.vm import VmConfig  # noqa: E402
from tools.netrig import NetRig, _ip, cleanup_leftovers  # noqa: E402

PEERS = ("kvmigrate", "qemu")
FIGURES = ("p50_ns", "p99_ns", "min_ns", "max_ns")


def peer_command(peer: str, tap: str, rounds: int, tsc_khz: int) -> list[str]:
    """The command line of one peer, its COM1 on stdout."""
    guest = f"irq_bench={rounds}"
    if peer == "kvmigrate":
        return [str(ROOT / ".venv" / "bin" / "hv"), "run", "--mem", "64M", "--cpus", "2", "--ws", "4",
                "--net", f"tap={tap},transport=pci", "--cmdline", guest, "--timeout", "120"]
    return ["qemu-system-x86_64", "-enable-kvm", "-cpu", "max,-arch-capabilities", "-m", "64", "-smp", "2",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", "virtio-net-pci,netdev=n0,disable-legacy=on",
            "-kernel", str(bg.guest_image()), "-append", f"ws=4 cpus=2 tsc_khz={tsc_khz} {guest}"]


def one_run(rig: NetRig, peer: str, run: int, rounds: int, tsc_khz: int, timeout: float = 120.0) \
        -> bg.IrqLatency | str:
    """The guest's figures, or why there are none."""
    host = rig.host("a")
    tap = f"kvi{os.getpid() % 10000}r{run}{peer[0]}"
    _ip("tuntap", "add", "dev", tap, "mode", "tap", netns=host)  # persistent: both peers attach to it
    _ip("link", "set", tap, "master", "br0", "up", netns=host)
    proc = subprocess.Popen(["ip", "netns", "exec", host, *peer_command(peer, tap, rounds, tsc_khz)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([proc.stdout], [], [], 1.0)[0]:
                continue
            line = proc.stdout.readline()
            if not line:
                return f"exited {proc.wait()}: {''.join(tail[-5:])}"
            tail.append(line)
            event = bg.parse_line(line)
            if isinstance(event, bg.IrqLatency):
                return event
            if isinstance(event, (bg.GuestError, bg.Fault)):
                return str(event)
        return "timed out"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _ip("link", "del", tap, netns=host, check=False)


def summary(results: list[bg.IrqLatency]) -> dict[str, dict[str, float]]:
    """Per figure: the median over the runs and the spread (min, max), in µs."""
    return {f: {"median_us": statistics.median(getattr(r, f) for r in results) / 1e3,
                "min_us": min(getattr(r, f) for r in results) / 1e3,
                "max_us": max(getattr(r, f) for r in results) / 1e3} for f in FIGURES} if results else {}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per peer, interleaved (default 5)")
    p.add_argument("--rounds", type=int, default=2000, help="frames timed per run (default 2000, at most 4096)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    peers = [peer for peer in PEERS if peer != "qemu" or shutil.which("qemu-system-x86_64")]
    with Kvm() as kvm, kvm.create_vm(VmConfig(mem_size=1 << 20)) as vm:
        tsc_khz = vm.create_vcpu(0).fd.get_tsc_khz()
    cleanup_leftovers()
    results: dict[str, list[bg.IrqLatency]] = {peer: [] for peer in peers}
    failures: dict[str, list[str]] = {peer: [] for peer in peers}
    with NetRig() as rig:
        for run in range(args.runs):
            for peer in peers:  # interleaved: a host's drift hits both alike
                got = one_run(rig, peer, run, args.rounds, tsc_khz)
                (results[peer].append if isinstance(got, bg.IrqLatency) else failures[peer].append)(got)
    report = {"rounds": args.rounds, "runs": args.runs, "tsc_khz": tsc_khz,
              "peers": {peer: {"ok": len(results[peer]), "failures": failures[peer], **summary(results[peer])}
                        for peer in peers},
              "per_run": {peer: [asdict(r) for r in results[peer]] for peer in peers}}
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"MSI-X interrupt latency, notification -> tx's handler, guest TSC ({args.rounds} frames a run; "
          f"median over runs [min-max across runs], µs):")
    for peer in peers:
        s = report["peers"][peer]
        figures = "  ".join(f"{f[:-3]} {s[f]['median_us']:8.1f} [{s[f]['min_us']:.1f}-{s[f]['max_us']:.1f}]"
                            for f in FIGURES if f in s)
        print(f"  {peer:10} runs {s['ok']}/{args.runs}  {figures}")
        for why in s["failures"]:
            print(f"    failed: {why}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
