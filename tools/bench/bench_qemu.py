"""The peer's figures: QEMU's live migration and snapshot-to-file on kvmigrate's built-in guest.

    .venv/bin/python tools/bench/bench_qemu.py [--quick | --runs N] [--json] [--only migrate|snapshot]
                                               [--scenario NAME ...]

Same guest image as tools/bench/bench_migrate.py (`hv.guests.builtin.guest_image()`, a Multiboot
ELF32 booted with `-kernel`), same command line (`ws=.. rate=.. every=1 tsc_khz=<host> fill=random`),
same scenario names (../shared/README.md), same result keys, so the two outputs line up.

Live migration: a source and a target `qemu-system-x86_64` on loopback (`-incoming tcp:...`), driven
over QMP. The source migrates once the guest printed `kvmig: pass 2`; `max-bandwidth` is lifted to
10 GiB/s and `downtime-limit` set to 300 ms (kvmigrate's default) unless the variant says otherwise.
A run that has not completed after 60 s is cancelled and counted as "no convergence". After
completion the target's serial log must show a new `kvmig: pass` line (the guest kept going), then
the target is stopped and its working set read with `pmemsave` and checked bit for bit by
`hv.guests.builtin.check_working_set` ("memory ok"). Variants: `+auto-converge`, and `@default-cap`
(QEMU's 128 MiB/s bandwidth cap kept; hot256-max@default-cap runs only when named, as it does not
converge). "pass ms" columns: the guest's own time per working-set pass, before and during the
migration (how much the migration slowed it).

Snapshot: the source is stopped, then migrated to `exec:cat > FILE` (QEMU 7.2 has no `file:`
transport); restore is a fresh QEMU with `-incoming "exec:cat FILE"`, timed from process start to
`query-status` running after `cont`. That includes QEMU's own start-up (reported alone as "QMP up":
process start to QMP answering, 50-100 ms here) and reads the file from the page cache. The
restored guest is checked the same way.

Numbers are printed, nothing is asserted. Each run holds at most one source and one target QEMU,
each a `qemu_driver.Qemu` (the process and its QMP client live there; this file measures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hv.guests import builtin as bg  # noqa: E402
from hv.kvm.units import GiB, MiB  # noqa: E402
from qemu_driver import (QEMU, BenchError, Qemu, WaitTimeoutError, Workload, free_port,  # noqa: E402
                         host_tsc_khz, wait_migration)

CONVERGENCE_TIMEOUT = 60.0  # seconds a live migration may take before it counts as not converging
LIFTED_BANDWIDTH = 10 * GiB  # bytes/s; QEMU 7.2's default cap is 128 MiB/s
DOWNTIME_LIMIT_MS = 300  # kvmigrate's default


@dataclass(frozen=True)
class MigrationConfig:
    max_bandwidth: int | None = LIFTED_BANDWIDTH  # None: keep QEMU's default cap
    auto_converge: bool = False


IDLE_1G, HOT256_100, HOT256_MAX, IDLE_4G = (Workload(1024, 1, 1), Workload(1024, 256, 100),
                                           Workload(1024, 256, 0), Workload(4096, 1, 1))

# name: (workload, migration settings); the first four are the shared scenario names
MIGRATION_SCENARIOS: dict[str, tuple[Workload, MigrationConfig]] = {
    "idle-1g": (IDLE_1G, MigrationConfig()),
    "hot256-100": (HOT256_100, MigrationConfig()),
    "hot256-max": (HOT256_MAX, MigrationConfig()),
    "idle-4g": (IDLE_4G, MigrationConfig()),
    "hot256-max+auto-converge": (HOT256_MAX, MigrationConfig(auto_converge=True)),
    "hot256-100@default-cap": (HOT256_100, MigrationConfig(max_bandwidth=None)),
    "hot256-max@default-cap": (HOT256_MAX, MigrationConfig(max_bandwidth=None)),
}
OPT_IN = {"hot256-max@default-cap"}  # run only when named with --scenario: it runs into the 60 s timeout

# named as bench_migrate.py's snapshots: memory and working set (rate 100 MiB/s when ws > 1)
SNAPSHOT_SCENARIOS: dict[str, Workload] = {
    "1g-ws1": Workload(1024, 1, 1),
    "1g-ws256": Workload(1024, 256, 100),
}



# --- helpers ------------------------------------------------------------------------------------



def _median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def pass_ms(passes: list[bg.Pass]) -> list[int]:
    """Per-pass times: the guest's `ms=` is time since its working set was ready, so take steps."""
    return [b.ms - a.ms for a, b in itertools.pairwise(passes) if b.number == a.number + 1]



def pass_wait_timeout(workload: Workload) -> float:
    # boot + first touch (~6 us/page) + a few passes at the guest's rate, generously
    per_pass = workload.ws_mib / workload.rate_mib_s if workload.rate_mib_s else 1.0
    return 60.0 + 4 * per_pass



# --- live migration -----------------------------------------------------------------------------


@dataclass
class MigrationRun:
    outcome: str  # "completed", "no convergence", "failed"
    total_ms: float | None = None  # QEMU's total-time
    downtime_ms: float | None = None
    setup_ms: float | None = None
    wall_ms: float | None = None  # migrate command to completed status seen, measured here
    rounds: int | None = None  # ram.dirty-sync-count
    sent_mib: float | None = None  # ram.transferred
    zero_pages: int | None = None  # ram.duplicate
    normal_pages: int | None = None  # ram.normal
    throttle_max: int = 0  # cpu-throttle-percentage, highest seen (auto-converge)
    pass_ms_before: float | None = None  # the guest's own pass times (ms per working-set pass)
    pass_ms_during: float | None = None  # ... on the source while it was being migrated
    guest_kept_going: bool | None = None
    memory_ok: bool | None = None  # the target's working set passed the guest's consistency check
    error: str | None = None


def migrate_once(image: Path, tsc_khz: int, workload: Workload, config: MigrationConfig) -> MigrationRun:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-qemu-") as tmp:
        workdir = Path(tmp)
        with (Qemu("source", workdir, image, workload, tsc_khz) as source,
              Qemu("target", workdir, image, workload, tsc_khz, incoming=f"tcp:127.0.0.1:{port}") as target):
            src = source.connect()
            target.connect()  # the target listens once its monitor is up
            source.wait_pass(2, pass_wait_timeout(workload))
            params = {"downtime-limit": DOWNTIME_LIMIT_MS}
            if config.max_bandwidth is not None:
                params["max-bandwidth"] = config.max_bandwidth
            src.execute("migrate-set-parameters", **params)
            if config.auto_converge:
                src.execute("migrate-set-capabilities",
                            capabilities=[{"capability": "auto-converge", "state": True}])
            before = source.passes()
            src.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            t0, throttle = time.perf_counter(), 0
            while True:
                info = src.execute("query-migrate")
                throttle = max(throttle, info.get("cpu-throttle-percentage", 0))
                status = info.get("status")
                if status in ("completed", "failed", "cancelled"):
                    break
                if time.perf_counter() - t0 > CONVERGENCE_TIMEOUT:
                    src.execute("migrate_cancel")
                    rounds = info.get("ram", {}).get("dirty-sync-count")
                    during = source.passes()[len(before):]
                    return MigrationRun("no convergence", rounds=rounds,
                                        sent_mib=info.get("ram", {}).get("transferred", 0) / MiB,
                                        throttle_max=throttle,
                                        pass_ms_before=_median(pass_ms(before)),
                                        pass_ms_during=_median(pass_ms(before[-1:] + during)))
                time.sleep(0.005)
            wall_ms = (time.perf_counter() - t0) * 1000
            during = source.passes()[len(before):]
            guest = {"pass_ms_before": _median(pass_ms(before)),
                     "pass_ms_during": _median(pass_ms(before[-1:] + during))}
            if status != "completed":
                return MigrationRun("failed", error=info.get("error-desc", status))
            ram = info["ram"]
            run = MigrationRun("completed", total_ms=info["total-time"], downtime_ms=info.get("downtime"),
                               setup_ms=info.get("setup-time"), wall_ms=wall_ms,
                               rounds=ram["dirty-sync-count"], sent_mib=ram["transferred"] / MiB,
                               zero_pages=ram["duplicate"], normal_pages=ram["normal"], throttle_max=throttle,
                               **guest)
            # the target starts the guest itself (no -S); it must print a pass line of its own
            target.wait_status({"running"}, timeout=30)
            per_pass = workload.ws_mib / workload.rate_mib_s if workload.rate_mib_s else 1.0
            try:
                target.wait_pass(1, timeout=5 + 3 * per_pass)
                run.guest_kept_going = True
            except WaitTimeoutError:
                run.guest_kept_going = False
            run.memory_ok = target.check_memory().ok
            return run


def summarise_migration(runs: list[MigrationRun]) -> dict:
    done = [r for r in runs if r.outcome == "completed"]
    row: dict = {"runs": len(runs), "completed": len(done), "done": f"{len(done)}/{len(runs)}"}
    if done:
        for key in ("total_ms", "downtime_ms", "setup_ms", "wall_ms", "rounds", "sent_mib", "zero_pages",
                    "normal_pages", "pass_ms_before", "pass_ms_during"):
            row[key] = _median([getattr(r, key) for r in done])
        row["throttle_max"] = max(r.throttle_max for r in done)
        row["guest_kept_going"] = all(r.guest_kept_going for r in done)
        row["memory_ok"] = all(r.memory_ok for r in done)
    failed = [r.error for r in runs if r.outcome == "failed"]
    if failed:
        row["errors"] = failed
    row["outcomes"] = [r.outcome for r in runs]
    return row


# --- snapshot to file ---------------------------------------------------------------------------


@dataclass
class SnapshotRun:
    snapshot_ms: float  # QEMU's total-time for the migration to `exec:cat > FILE`
    snapshot_wall_ms: float  # migrate command to completed status seen, measured here
    file_mib: float
    restore_to_running_ms: float  # QEMU process start to `running` after `cont`
    restore_incoming_ms: float  # QEMU process start to the incoming migration done (status paused)
    restore_qmp_up_ms: float  # QEMU process start to its QMP answering: the start-up share
    guest_kept_going: bool
    memory_ok: bool  # the restored working set passed the guest's consistency check
    zero_pages: int = 0
    normal_pages: int = 0


def snapshot_once(image: Path, tsc_khz: int, workload: Workload) -> SnapshotRun:
    with tempfile.TemporaryDirectory(prefix="bench-qemu-") as tmp:
        workdir = Path(tmp)
        state = workdir / "state.bin"
        with Qemu("source", workdir, image, workload, tsc_khz) as source:
            src = source.connect()
            source.wait_pass(2, pass_wait_timeout(workload))
            src.execute("stop")
            src.execute("migrate-set-parameters", **{"max-bandwidth": LIFTED_BANDWIDTH})
            src.execute("migrate", uri=f"exec:cat > {state}")
            info, wall = wait_migration(src, CONVERGENCE_TIMEOUT)
            if info.get("status") != "completed":
                raise BenchError(f"snapshot to file did not complete: {info}")
        file_bytes = state.stat().st_size
        with Qemu("restored", workdir, image, workload, tsc_khz, incoming=f"exec:cat {state}") as restored:
            restored.connect()
            qmp_up_ms = (time.perf_counter() - restored.started) * 1000
            restored.wait_status({"paused", "running"}, timeout=60)  # the state says paused: -S not needed
            incoming_ms = (time.perf_counter() - restored.started) * 1000
            restored.qmp.execute("cont")
            restored.wait_status({"running"}, timeout=30)
            running_ms = (time.perf_counter() - restored.started) * 1000
            per_pass = workload.ws_mib / workload.rate_mib_s if workload.rate_mib_s else 1.0
            try:
                restored.wait_pass(1, timeout=5 + 3 * per_pass)
                kept_going = True
            except WaitTimeoutError:
                kept_going = False
            memory_ok = restored.check_memory().ok
        return SnapshotRun(snapshot_ms=info["total-time"], snapshot_wall_ms=wall * 1000,
                           file_mib=file_bytes / MiB, restore_to_running_ms=running_ms,
                           restore_incoming_ms=incoming_ms, restore_qmp_up_ms=qmp_up_ms, guest_kept_going=kept_going,
                           memory_ok=memory_ok,
                           zero_pages=info["ram"]["duplicate"], normal_pages=info["ram"]["normal"])


def summarise_snapshot(runs: list[SnapshotRun]) -> dict:
    row: dict = {"runs": len(runs)}
    for key in ("snapshot_ms", "snapshot_wall_ms", "file_mib", "restore_qmp_up_ms", "restore_incoming_ms", "restore_to_running_ms",
                "zero_pages", "normal_pages"):
        row[key] = _median([getattr(r, key) for r in runs])
    row["guest_kept_going"] = all(r.guest_kept_going for r in runs)
    row["memory_ok"] = all(r.memory_ok for r in runs)
    return row


# --- output -------------------------------------------------------------------------------------


def _fmt(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, columns: list[tuple[str, str, int]], rows: dict[str, dict]) -> None:
    """columns: (header, key, decimals); rows: scenario name -> summary."""
    table = [["scenario"] + [h for h, _, _ in columns]]
    for name, row in rows.items():
        if row.get("completed", 1) == 0:
            why = "no convergence in 60 s" if "no convergence" in row.get("outcomes", []) else "failed"
            table.append([name, row["done"], why] + [""] * (len(columns) - 2))
        else:
            table.append([name] + [_fmt(row.get(k), d) for _, k, d in columns])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    print(f"\n{title}")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


MIGRATION_COLUMNS = [("done", "done", 0), ("total ms", "total_ms", 0), ("downtime ms", "downtime_ms", 0),
                     ("setup ms", "setup_ms", 0), ("rounds", "rounds", 0), ("sent MiB", "sent_mib", 1),
                     ("zero pages", "zero_pages", 0), ("normal pages", "normal_pages", 0),
                     ("throttle %", "throttle_max", 0),
                     ("pass ms before", "pass_ms_before", 0), ("pass ms during", "pass_ms_during", 0),
                     ("kept going", "guest_kept_going", 0),
                     ("memory ok", "memory_ok", 0)]
SNAPSHOT_COLUMNS = [("save ms", "snapshot_ms", 0), ("file MiB", "file_mib", 1),
                    ("QMP up ms", "restore_qmp_up_ms", 0),
                    ("incoming done ms", "restore_incoming_ms", 0),
                    ("restore-to-running ms", "restore_to_running_ms", 0), ("kept going", "guest_kept_going", 0),
                     ("memory ok", "memory_ok", 0)]


# --- main ---------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run each")
    ap.add_argument("--runs", type=int, default=3, help="runs per scenario; medians are reported")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the tables")
    ap.add_argument("--only", choices=("migrate", "snapshot"))
    ap.add_argument("--scenario", action="append", metavar="NAME",
                    choices=sorted(MIGRATION_SCENARIOS) + sorted(SNAPSHOT_SCENARIOS),
                    help="run only these scenarios (repeatable); "
                         f"{', '.join(sorted(OPT_IN))} run only when named")
    args = ap.parse_args()
    runs = 1 if args.quick else args.runs
    image, tsc_khz = bg.guest_image(), host_tsc_khz()
    version = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    result: dict = {"qemu": version, "tsc_khz": tsc_khz, "runs": runs, "image": str(image),
                    "settings": {"max_bandwidth": LIFTED_BANDWIDTH, "downtime_limit_ms": DOWNTIME_LIMIT_MS,
                                 "convergence_timeout_s": CONVERGENCE_TIMEOUT}}
    wanted = set(args.scenario or [])

    if args.only in (None, "migrate"):
        rows = {}
        for name, (workload, config) in MIGRATION_SCENARIOS.items():
            if (wanted and name not in wanted) or (not wanted and name in OPT_IN):
                continue
            done: list[MigrationRun] = []
            for i in range(runs):
                run = migrate_once(image, tsc_khz, workload, config)
                _progress(f"migrate {name} run {i + 1}/{runs}: {run.outcome}, total {_fmt(run.total_ms)} ms, "
                          f"downtime {_fmt(run.downtime_ms)} ms, rounds {_fmt(run.rounds)}, "
                          f"sent {_fmt(run.sent_mib, 1)} MiB, kept going {_fmt(run.guest_kept_going)}, "
                          f"memory ok {_fmt(run.memory_ok)}")
                done.append(run)
            rows[name] = summarise_migration(done) | {"raw": [asdict(r) for r in done],
                                                      "workload": asdict(workload), "config": asdict(config)}
        result["migrate"] = rows
        if not args.json:
            print_table(f"QEMU live migration ({version}; medians of {runs}; max-bandwidth "
                        f"{LIFTED_BANDWIDTH // GiB} GiB/s unless @default-cap, downtime-limit {DOWNTIME_LIMIT_MS} ms)",
                        MIGRATION_COLUMNS, rows)

    if args.only in (None, "snapshot"):
        rows = {}
        for name, workload in SNAPSHOT_SCENARIOS.items():
            if wanted and name not in wanted:
                continue
            done_s: list[SnapshotRun] = []
            for i in range(runs):
                run = snapshot_once(image, tsc_khz, workload)
                _progress(f"snapshot {name} run {i + 1}/{runs}: save {run.snapshot_ms:.0f} ms, "
                          f"file {run.file_mib:.1f} MiB, restore-to-running {run.restore_to_running_ms:.0f} ms")
                done_s.append(run)
            rows[name] = summarise_snapshot(done_s) | {"raw": [asdict(r) for r in done_s],
                                                       "workload": asdict(workload)}
        result["snapshot"] = rows
        if not args.json:
            print_table(f"QEMU snapshot to file (stopped guest, `exec:cat > FILE`; restore-to-running includes "
                        f"QEMU start-up; medians of {runs})", SNAPSHOT_COLUMNS, rows)

    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
