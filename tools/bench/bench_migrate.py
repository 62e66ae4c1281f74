"""kvmigrate's snapshot and live-migration figures on the built-in guest (numbers, not asserts).

    .venv/bin/python tools/bench/bench_migrate.py [--quick] [--json] [--only migrate|snapshot]

Live migration: the source runs in this process, the target is a `migrate recv` process on
loopback (as QEMU's source and target are two processes); scenarios from ../shared/README.md:
idle-1g, hot256-100, hot256-max, idle-4g. Snapshots: 1 GiB and 4 GiB guests, idle and with a
256 MiB working set, compressed and mappable; restore timed to a running guest. Compare with
tools/bench/bench_qemu.py, which runs the same guest image on QEMU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from hv.guests import builtin as bg
from hv.vmm.builder import builtin_machine
from hv.vmm.control import call
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from migrate import MigrationOptions, send
from migrate.snapshot.snapshots import restore, snapshot
from migrate.transport.listener import Listener

MiB, GiB = 1 << 20, 1 << 30
SCENARIOS = {  # name: (memory, working set MiB, rate MiB/s)
    "idle-1g": (1 * GiB, 1, 1),
    "hot256-100": (1 * GiB, 256, 100),
    "hot256-max": (1 * GiB, 256, 0),
    "idle-4g": (4 * GiB, 1, 1),
}


def _free_address() -> str:
    listener = Listener("127.0.0.1:0", b"")
    address = listener.address
    listener.close()
    return address


def migrate_once(kvm: Kvm, mem: int, ws: int, rate: int, options: MigrationOptions) -> dict:
    address, api = _free_address(), Path(tempfile.mkdtemp()) / "target.sock"
    target = subprocess.Popen([sys.executable, "-m", "migrate.cli", "recv", "--listen", address, "--api", str(api),
                               "--accept-timeout", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=ws, rate_mib_s=rate), VmConfig(mem_size=mem), console)
    try:
        machine.start()
        console.wait_pass(2, timeout=300)
        target.stderr.readline()  # "listening on ..."
        stats = send(machine, address, options)
        result = stats.as_dict()
        if stats.outcome == "completed":
            t = time.monotonic()
            while not api.exists() and time.monotonic() - t < 30:
                time.sleep(0.02)
            passes = call(api, "guest-check")["passes"]
            time.sleep(0.5)
            check = call(api, "guest-check")
            result["guest_kept_going"] = check["ok"] and check["passes"] >= passes
            call(api, "stop")
        return result
    finally:
        machine.stop()
        machine.vm.close()
        target.kill()
        target.wait()


def bench_migration(runs: int, as_json: bool, streams: int = 1, only: list[str] | None = None) -> dict:
    out = {}
    kvm = Kvm()
    for name, (mem, ws, rate) in SCENARIOS.items():
        if only and name not in only:
            continue
        results = [migrate_once(kvm, mem, ws, rate, MigrationOptions(streams=streams)) for _ in range(runs)]
        done = [r for r in results if r["outcome"] == "completed"]
        row = {"runs": runs, "completed": len(done)}
        if done:
            row.update({
                "total_ms": statistics.median(r["total_seconds"] * 1000 for r in done),
                "downtime_ms": statistics.median(r["downtime_ms"] for r in done),
                "rounds": statistics.median(len(r["rounds"]) for r in done),
                "sent_mib": statistics.median(r["sent_bytes"] / MiB for r in done),
                "zero_pages": statistics.median(r["zero_pages"] for r in done),
                "throttle_max": max(r["throttle_max"] for r in done),
                "guest_kept_going": all(r.get("guest_kept_going") for r in done),
            })
        out[name] = row
        if not as_json:
            print(f"migrate {name:11}: " + ", ".join(
                f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return out


def bench_snapshots(runs: int, as_json: bool, directory: str | None) -> dict:
    """Into tmpfs by default: this measures kvmigrate, not the disk (this machine's disk sustains
    ~340 MB/s with fsync, which then bounds any snapshot of a busy guest)."""
    out = {}
    kvm = Kvm()
    tmp = Path(tempfile.mkdtemp(prefix="kvmigrate-bench-", dir=directory))
    for mem in (1 * GiB, 4 * GiB):
        for ws in (1, 256):
            for mappable in (False, True):
                name = f"{mem // GiB}g-ws{ws}-{'mappable' if mappable else 'zstd'}"
                console = bg.GuestConsole()
                machine = builtin_machine(kvm, bg.GuestParams(ws_mib=ws, rate_mib_s=100 if ws > 1 else 1),
                                          VmConfig(mem_size=mem), console)
                machine.start()
                console.wait_pass(1, timeout=300)
                takes, restores, sizes = [], [], []
                for i in range(runs):
                    path = tmp / f"{name}-{i}"
                    info = snapshot(machine, path, mappable=mappable, level=1)
                    takes.append(info.seconds)
                    sizes.append(info.file_bytes)
                    t0 = time.perf_counter()
                    # mappable: mapped and not read up front (--share-mem --no-verify), as the
                    # README's restore figure is; by default a restore copies and checks the .mem
                    restored = restore(path, kvm, share_memory=mappable, verify_memory=not mappable)
                    restored.resume()
                    restores.append(time.perf_counter() - t0)
                    restored.stop()
                    restored.vm.close()
                    for p in tmp.glob(f"{name}-{i}*"):
                        p.unlink()
                machine.stop()
                machine.vm.close()
                snap_s = statistics.median(takes)
                row = {"snapshot_ms": snap_s * 1000, "guest_gb_per_s": info.raw_bytes / snap_s / 1e9,
                       "file_mib": statistics.median(sizes) / MiB,
                       "restore_to_running_ms": statistics.median(restores) * 1000}
                out[name] = row
                if not as_json:
                    print(f"snapshot {name:20}: snapshot {row['snapshot_ms']:.0f} ms "
                          f"({row['guest_gb_per_s']:.2f} GB/s of touched guest memory), file {row['file_mib']:.1f} MiB, "
                          f"restore to running {row['restore_to_running_ms']:.1f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run each")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--only", choices=("migrate", "snapshot"))
    ap.add_argument("--streams", type=int, default=1, help="page streams (connections) for migrations")
    ap.add_argument("--scenario", action="append", help="only these migration scenarios")
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                    help="where snapshot files go (default: tmpfs)")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    result = {}
    if args.only in (None, "migrate"):
        result["migrate"] = bench_migration(runs, args.json, args.streams, args.scenario)
    if args.only in (None, "snapshot"):
        result["snapshot"] = bench_snapshots(runs, args.json, args.dir)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
