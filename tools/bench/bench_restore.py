"""Restore to the guest's first instruction: from the command line and into a waiting VMM
(numbers, not asserts).

    .venv/bin/python tools/bench/bench_restore.py [--runs N] [--scenario NAME ...] [--kind zstd|mappable ...]
                                                  [--dir DIR] [--json]

Per scenario (../shared/README.md's names: idle-1g, a 1 GiB guest with a 1 MiB working set;
hot256, 1 GiB with 256 MiB; idle-16g) the built-in guest runs in this process until its first
pass and is snapshotted twice: compressed (zstd, level 1), restored checked as by default, and
mappable, restored by its fastest path (`--share-mem --no-verify`: the .mem mapped, not read).
Each snapshot is then restored, the two ways alternating run by run:

- command line: `migrate restore FILE --api SOCK --json` started as a new process; from just
  before this script starts it to the first KVM_RUN of the restored guest (its vCPU thread's own
  CLOCK_MONOTONIC, as `--json` reports it once `stop` ends the run);
- waiting: `migrate restore --wait --api SOCK --mem SIZE` started and ready (a VM of the guest's
  shape built ahead), then `restore` sent on its socket; from the request's arrival there to the
  first KVM_RUN (the VMM's own figure; what this script saw from its send is beside it).

"The first guest instruction" is when the last vCPU thread left its park for KVM_RUN after the
resume (`RestoreTimings`). Snapshots go to tmpfs by default: this measures kvmigrate, not a disk.
On a shared 2-core host the figures are noisy: medians and min-max over the runs, not one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.control import ControlError, call
from migrate.snapshot.snapshots import snapshot

MiB, GiB = 1 << 20, 1 << 30
SCENARIOS = {  # name: (memory, working set MiB, rate MiB/s)
    "idle-1g": (1 * GiB, 1, 1),
    "hot256": (1 * GiB, 256, 100),
    "idle-16g": (16 * GiB, 1, 1),
}
KINDS = {"zstd": [], "mappable": ["--share-mem", "--no-verify"]}  # the restore's options for each
TARGETS_MS = {1 * GiB: 3.0, 16 * GiB: 5.0}  # issue 26: into a waiting VMM, to the first guest instruction
MIGRATE = [sys.executable, "-m", "migrate.cli"]
PHASES = ("read_check_ms", "build_ms", "apply_ms", "resume_ms")


def _wait_for(api: Path, proc: subprocess.Popen, state: str, timeout: float = 120) -> None:
    """Until the control socket answers with `state`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if call(api, "status", timeout=10)["state"] == state:
                return
        except ControlError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args}: not {state} (exit {proc.poll()})")
        time.sleep(0.02)


def _last_json(text: str) -> dict:
    """The JSON object printed last, after the guest's console (whose last line a stop may have
    cut before its newline: the object's opening brace can end that line)."""
    at = len(text)
    while (at := text.rfind("{\n", 0, at)) >= 0:
        try:
            return json.loads(text[at:])
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON object at the end of: {text[-300:]!r}")


def from_command_line(workdir: Path, path: Path, options: list[str]) -> dict:
    api = workdir / "cli.sock"
    with open(workdir / "cli.out", "wb") as out, open(workdir / "cli.err", "wb") as err:
        started = time.monotonic_ns()
        proc = subprocess.Popen([*MIGRATE, "restore", str(path), "--api", str(api), "--json", *options],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        while not api.exists():  # claimed before the restore begins
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args}: exit {proc.poll()}")
            time.sleep(0.02)
        call(api, "stop", timeout=120)  # answered once the restored guest is attached: it runs
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    timings = _last_json((workdir / "cli.out").read_text(errors="replace"))
    timings["restore_to_first_kvm_run_ms"] = timings["first_kvm_run_ms"]  # (from the restore's start)
    timings["first_kvm_run_ms"] = (timings["first_kvm_run_ns"] - started) / 1e6  # from the process's start
    return timings


def into_waiting(workdir: Path, path: Path, options: list[str], mem: int) -> dict:
    api = workdir / "waiting.sock"
    with open(workdir / "waiting.out", "wb") as out, open(workdir / "waiting.err", "wb") as err:
        proc = subprocess.Popen([*MIGRATE, "restore", "--wait", "--api", str(api), "--mem", f"{mem // MiB}M"],
                                stdout=out, stderr=err, stdin=subprocess.DEVNULL)
    try:
        _wait_for(api, proc, "waiting")
        time.sleep(0.2)  # its start-up's last threads settled, as a VMM waiting for minutes would be
        sent = time.monotonic_ns()
        timings = call(api, "restore", timeout=600, file=str(path), share_memory="--share-mem" in options,
                       verify_memory="--no-verify" not in options)
        timings["sent_to_first_kvm_run_ms"] = (timings["first_kvm_run_ns"] - sent) / 1e6
        call(api, "stop", timeout=60)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    return timings


def _cell(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _fmt(cell: dict) -> str:
    return f"{cell['median']:.2f} ({cell['min']:.2f}-{cell['max']:.2f})"


def bench(runs: int, scenarios: list[str], kinds: list[str], directory: str | None, as_json: bool) -> dict:
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": runs, "scenarios": {}}
    kvm = Kvm()
    for name in scenarios:
        mem, ws, rate = SCENARIOS[name]
        console = bg.GuestConsole()
        machine = builtin_machine(kvm, bg.GuestParams(ws_mib=ws, rate_mib_s=rate), VmConfig(mem_size=mem), console)
        with tempfile.TemporaryDirectory(prefix="bench-restore-", dir=directory) as tmp:
            workdir = Path(tmp)
            try:
                machine.start()
                console.wait_pass(1, timeout=300)
                paths = {kind: workdir / f"{name}-{kind}.snap" for kind in kinds}
                for kind, path in paths.items():
                    snapshot(machine, path, mappable=kind == "mappable", level=1)
            finally:
                machine.stop()
                machine.vm.close()
            rows = {}
            for kind, path in paths.items():
                done: dict[str, list[dict]] = {"command line": [], "waiting": []}
                for i in range(runs):
                    order = list(done) if i % 2 == 0 else list(done)[::-1]
                    for way in order:
                        if way == "command line":
                            done[way].append(from_command_line(workdir, path, KINDS[kind]))
                        else:
                            done[way].append(into_waiting(workdir, path, KINDS[kind], mem))
                        last = done[way][-1]
                        print(f"{name} {kind} run {i + 1}/{runs} {way}: first KVM_RUN "
                              f"{last['first_kvm_run_ms']:.2f} ms ({', '.join(f'{p} {last[p]:.2f}' for p in PHASES)}, "
                              f"built ahead {last['built_ahead']})", file=sys.stderr, flush=True)
                rows[kind] = {way: {"first_kvm_run_ms": _cell([r["first_kvm_run_ms"] for r in results]),
                                    **{p: _cell([r[p] for r in results]) for p in PHASES},
                                    "built_ahead": all(r["built_ahead"] for r in results), "runs": results}
                              for way, results in done.items()}
            out["scenarios"][name] = rows
        if not as_json:
            target = TARGETS_MS.get(mem)
            print(f"\n{name}: {mem // MiB} MiB guest, {ws} MiB working set; {runs} runs; ms, median (min-max)")
            print(f"{'kind':9} {'restore':13} {'to first KVM_RUN':>22} " + " ".join(f"{p:>20}" for p in PHASES))
            for kind, row in rows.items():
                for way, cell in row.items():
                    print(f"{kind:9} {way:13} {_fmt(cell['first_kvm_run_ms']):>22} "
                          + " ".join(f"{_fmt(cell[p]):>20}" for p in PHASES))
                if target is not None:
                    median = row["waiting"]["first_kvm_run_ms"]["median"]
                    verdict = "meets" if median <= target else f"misses by {median - target:.2f} ms"
                    print(f"{'':9} waiting into a {mem // GiB} GiB VM: target {target:g} ms, median {verdict}")
            print(flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default all")
    ap.add_argument("--kind", action="append", choices=sorted(KINDS), help="repeatable; default both")
    ap.add_argument("--dir", default="/dev/shm" if Path("/dev/shm").is_dir() else None,
                    help="where the snapshots go (default: tmpfs)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = bench(args.runs, args.scenario or list(SCENARIOS), args.kind or list(KINDS), args.dir, args.json)
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
