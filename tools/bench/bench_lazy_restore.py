"""Restore to the guest's first instruction, lazy against eager (numbers, not asserts).

    .venv/bin/python tools/bench/bench_lazy_restore.py [--runs 5] [--json] [--scenario hot256-max]

One snapshot of the built-in guest per kind (compressed, zstd level 1; mappable), taken while it
runs the scenario (../shared/README.md names: hot256-max is a 1 GiB guest dirtying a 256 MiB
working set at full rate), then restored in this process `--runs` times per way, the ways
interleaved run by run so that a busy moment of the host falls on all of them:

- eager: `restore()` reads and checks every page (and the memory digest) before the VM exists;
- eager-shared (mappable only): the `.mem` mapped MAP_PRIVATE, unchecked (`--share-mem
  --no-verify`): the restore that was lazy before this;
- lazy: `restore(lazy=True)`: no page read before the guest runs, each block checked as it
  comes in, by fault or by the background loader;
- lazy-recorded: the same from a copy of the snapshot into which one recording lazy restore
  (`record_ms`, `--record-ms`) stored the pages the guest touched first: those load first,
  from before the guest runs (`working_set_ms`: until they are all in).

Figures per way (median and [min-max] over the runs): `first_run_ms`, from the `restore` call
until the guest's vCPU left for KVM_RUN (`Machine.resume(wait_running=True)` returned: what
the guest waits for before its first instruction); for lazy also `resident_ms` (every block in,
the RAM unregistered), the faults, the pages loaded on demand, the fault latency p50/p99 of the
userfaultfd layer, and whether the guest's working-set check held after its next pass. Snapshot
files go to tmpfs by default: this measures the restore, not the disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.machine import Machine
from migrate.snapshot.lazy import lazy_restore_of
from migrate.snapshot.snapshots import restore, snapshot

MiB, GiB = 1 << 20, 1 << 30
SCENARIOS = {"hot256-max": (1 * GiB, 256, 0), "hot256-100": (1 * GiB, 256, 100), "tiny-1g": (1 * GiB, 1, 0),
             "idle-4g": (4 * GiB, 1, 1)}
WAYS = {"zstd": ("eager", "lazy", "lazy-recorded"), "mappable": ("eager", "eager-shared", "lazy", "lazy-recorded")}
LAZY_FIGURES = ("resident_ms", "working_set_ms", "faults", "fault_blocks", "pages_on_demand", "pages_by_loader",
                "preloaded_blocks", "fault_p50_us", "fault_p99_us", "table_ms", "recorded_pages")


def restore_once(kvm: Kvm, path: Path, way: str, check: bool, record_ms: int = 0) -> dict:
    console = bg.GuestConsole()
    t0 = time.perf_counter()
    machine: Machine = restore(path, kvm, console=console, lazy=way.startswith("lazy"),
                               share_memory=way == "eager-shared", verify_memory=way != "eager-shared",
                               record_ms=record_ms)
    pager = lazy_restore_of(machine)
    row: dict = {}
    try:
        if pager is None:
            machine.resume(wait_running=True)
            row["first_run_ms"] = (time.perf_counter() - t0) * 1000
        else:
            row["first_run_ms"] = pager.resume() * 1000
            stats = pager.wait_resident(120).as_dict()
            row.update({key: stats[key] for key in LAZY_FIGURES if stats[key] is not None})
        if check:  # its next pass done, the working set as the guest's own rule wants it
            console.wait_pass(console.last_pass() + 2 if console.passes else 2, timeout=120)
            machine.pause()
            row["working_set_ok"] = bg.check_memory(machine.vm.memory).ok
    finally:
        machine.stop()
        if pager is not None:
            pager.close()  # (a recording restore stores its set here, if it has not yet)
            row["working_set_stored"] = pager.stats().working_set_stored
        machine.vm.close()
    return row


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.1f} [{min(values):.1f}-{max(values):.1f}]"


def bench(scenario: str, runs: int, directory: str | None, as_json: bool, record_ms: int) -> dict:
    mem, ws, rate = SCENARIOS[scenario]
    kvm = Kvm()
    tmp = Path(tempfile.mkdtemp(prefix="kvmigrate-lazy-", dir=directory))
    console = bg.GuestConsole()
    source = builtin_machine(kvm, bg.GuestParams(ws_mib=ws, rate_mib_s=rate), VmConfig(mem_size=mem), console)
    source.start()
    try:
        console.wait_pass(2, timeout=300)
        for kind in WAYS:
            snapshot(source, tmp / kind, mappable=kind == "mappable", level=1)
    finally:
        source.stop()
        source.vm.close()
    out: dict = {}
    for kind, ways in WAYS.items():
        recorded = tmp / f"{kind}-recorded"  # (a mappable copy names the same .mem)
        shutil.copyfile(tmp / kind, recorded)
        recording = restore_once(kvm, recorded, "lazy", check=False, record_ms=record_ms)
        out[f"{scenario} {kind} recording"] = recording
        if not as_json:
            print(f"{scenario} {kind} recording {record_ms} ms: {recording['faults']} faults, "
                  f"{recording['recorded_pages']} pages recorded, stored {recording['working_set_stored']}", flush=True)
        paths = {way: recorded if way == "lazy-recorded" else tmp / kind for way in ways}
        rows: dict[str, list[dict]] = {way: [] for way in ways}
        for i in range(runs):
            for way in ways:
                rows[way].append(restore_once(kvm, paths[way], way, check=i == 0))
        for way, results in rows.items():
            name = f"{scenario} {kind} {way}"
            figures = {key: [r[key] for r in results] for key in results[0] if key not in ("working_set_ok",
                                                                                          "working_set_stored")}
            out[name] = {"runs": results, **{key: statistics.median(v) for key, v in figures.items()},
                         "working_set_ok": results[0].get("working_set_ok")}
            if not as_json:
                print(f"{name:35} first run ms {spread(figures['first_run_ms'])}" + (
                    f"  resident ms {spread(figures['resident_ms'])}" + (
                        f"  working set in ms {spread(figures['working_set_ms'])}" if "working_set_ms" in figures
                        else "") + f"  faults {spread(figures['faults'])}, blocks on demand "
                    f"{statistics.median(figures['fault_blocks']):.0f}, fault p50/p99 us "
                    f"{statistics.median(figures['fault_p50_us']):.0f}/{statistics.median(figures['fault_p99_us']):.0f}"
                    f", page table {statistics.median(figures['table_ms']):.1f} ms" if way.startswith("lazy") else "")
                    + f"  working set {'ok' if results[0].get('working_set_ok') else 'BROKEN'}", flush=True)
    for path in tmp.iterdir():
        path.unlink()
    tmp.rmdir()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="default: hot256-max")
    ap.add_argument("--record-ms", type=int, default=1000, help="the recording restore's window")
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                    help="where snapshot files go (default: tmpfs)")
    args = ap.parse_args()
    result = {}
    for scenario in args.scenario or ["hot256-max"]:
        result.update(bench(scenario, args.runs, args.dir, args.json, args.record_ms))
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
