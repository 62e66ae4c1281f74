"""What a snapshot costs a running guest, seen from outside it (numbers, not asserts).

    .venv/bin/python tools/bench/bench_snapshot.py [--runs N] [--scenario NAME ...]
                                                   [--peer kvmigrate-live|kvmigrate-paused|qemu-background ...]
                                                   [--period-ms 5] [--json]

The built-in guest (the same image and command line as bench_blackout.py's scenarios) runs under
each peer with an observer pinging its COM1 every `--period-ms` (tools/bench/echo_observer.py).
After a steady window the snapshot is taken:

- kvmigrate-live: `migrate snapshot --api SOCK --out FILE --live --json` (the guest paused only
  to capture its state and write-protect its RAM);
- kvmigrate-paused: the same without `--live` (paused for the whole write);
- kvmigrate-pause-resume: no snapshot, the control socket's `pause` then `resume` (what any
  pause costs this guest on this host: the floor under a live snapshot's figure);
- qemu-background: QEMU 7.2's `background-snapshot` capability and `migrate` to
  `exec:cat > FILE` (userfaultfd write-protect too; QEMU populates all RAM first).

`migrate snapshot` is started with the guest and told to go when the snapshot is due (its
interpreter's start-up is over by then, as QEMU's QMP client's is). Figures per run:
unreachable = the longest echo latency of a ping sent while the snapshot ran, less the steady
median latency (good to about one period); the guest's longest pass around the snapshot, by its
own clock (how long it stalled); the guest's pass rate while the snapshot ran as a share of its
rate in the steady window before (pass lines timed on arrival; `every=1`); the VMM's own pause and
total; the file's size. Peers alternate run by run; medians, min-max, and the p99 of `unreachable`
over the runs. Scenarios: bench_blackout's, and hot1g-16g (16 GiB, 1 GiB hot at full rate; QEMU
not run there by default: its background snapshot populates all of RAM first).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import bench_qemu as bq
import qemu_driver as qd
from bench_blackout import BIN, SCENARIOS, SEND_WHEN_TOLD, KvmigratePeer, ObservedQemu, Scenario
from echo_observer import Console, Observer
from echo_timeline import SOURCE, percentile

from hv.guests import builtin as bg
from hv.vmm.control import call

STEADY = 2.0  # seconds of pings and passes before the snapshot
AFTER = 0.5  # seconds observed after it
# bench_blackout's scenarios, and the large one: 16 GiB, a 1 GiB working set at full rate
SNAPSHOT_SCENARIOS = {**SCENARIOS, "hot1g-16g": Scenario(qd.Workload(16384, 1024, 0), every=1)}
HEADLINE = ["hot256-max", "hot1g-16g"]
# QEMU's background snapshot populates all of RAM first: 16 GiB of this 24 GiB host, not run there
DEFAULT_PEERS = {"hot1g-16g": ["kvmigrate-live", "kvmigrate-paused"]}


@dataclass
class Run:
    peer: str
    outcome: str
    unreachable_ms: float | None = None  # longest echo latency while snapshotting, less the steady median
    unreachable_at_ms: float | None = None  # when the ping that waited longest was sent, from "go"
    steady_p50_ms: float | None = None
    pass_rate_share: float | None = None  # passes/s while snapshotting over passes/s before
    passes_before: int = 0
    passes_during: int = 0
    guest_stall_ms: float | None = None  # the longest pass while snapshotting, by the guest's clock
    own_pause_ms: float | None = None  # what the VMM says the guest was paused
    total_ms: float | None = None  # the command, from "go" to its result
    file_mib: float | None = None
    saved_mib: float | None = None  # kvmigrate-live: the most held aside for pages written first
    error: str | None = None


def _is_pass(line: str) -> bool:
    try:
        return isinstance(bg.parse_line(line), bg.Pass)
    except ValueError:  # a line the pings' echoes interleaved with
        return False


def _passes(observer: Observer) -> list[tuple[float, bg.Pass]]:
    out = []
    for t, line in observer.lines[SOURCE]:
        if _is_pass(line):
            event = bg.parse_line(line)
            assert isinstance(event, bg.Pass)
            out.append((t, event))
    return out


def _figures(run: Run, observer: Observer, start: float, end: float) -> None:
    pings, echoes = observer.seen()
    latency: dict[int, float] = {}
    for echo in echoes:
        latency.setdefault(echo.seq, echo.received)
    sent = {p.seq: p.sent for p in pings}
    steady = [latency[s] - t for s, t in sent.items() if start - STEADY <= t < start and s in latency]
    during = [(latency.get(s, end + AFTER) - t, t) for s, t in sent.items() if start - observer.period <= t < end]
    run.steady_p50_ms = statistics.median(steady) * 1000 if steady else None
    if steady and during:
        longest, sent_at = max(during)
        run.unreachable_ms = max(0.0, (longest - statistics.median(steady)) * 1000)
        run.unreachable_at_ms = (sent_at - start) * 1000
    seen = _passes(observer)
    passes = [t for t, _ in seen]
    run.passes_before = sum(start - STEADY <= t < start for t in passes)
    run.passes_during = sum(start <= t < end for t in passes)
    near = [p for t, p in seen if start - 0.1 <= t <= end + AFTER]
    steps = [b.ms - a.ms for a, b in zip(near, near[1:]) if b.number == a.number + 1]
    run.guest_stall_ms = float(max(steps)) if steps else None
    if run.passes_before and end > start:
        run.pass_rate_share = (run.passes_during / (end - start)) / (run.passes_before / STEADY)


def _observe(console, period: float) -> Observer:
    observer = Observer(period)
    observer.attach(console)
    observer.wait_line(SOURCE, _is_pass, 120, "the first pass")
    observer.start_pinging()
    time.sleep(STEADY)
    return observer


def kvmigrate_once(workdir: Path, image: Path, scenario: Scenario, tsc_khz: int, period: float, peer: str) -> Run:
    run = Run(peer, "failed")
    live = peer == "kvmigrate-live"
    api, out = workdir / "vm.sock", workdir / "vm.snap"
    with ExitStack() as stack:
        def spawn(stack: ExitStack, role: str, argv: list[str]) -> subprocess.Popen:
            with open(workdir / f"{role}.stderr", "wb") as err:
                proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
            stack.callback(KvmigratePeer._end, proc)
            return proc

        source = spawn(stack, SOURCE, [str(BIN / "hv"), "run", "--kernel", str(image), "--mem",
                                       f"{scenario.mem_mib}M", "--cmdline", scenario.cmdline(tsc_khz),
                                       "--api", str(api)])
        command = spawn(stack, "snapshot", [sys.executable, "-c", SEND_WHEN_TOLD, "snapshot", "--api", str(api),
                                            "--out", str(out), "--json", *(["--live"] if live else [])])
        observer = _observe(Console(SOURCE, source.stdin.fileno(), source.stdout.fileno()), period)
        start = time.monotonic()
        if peer == "kvmigrate-pause-resume":
            call(api, "pause")
            paused = time.monotonic()
            call(api, "resume")
            end = time.monotonic()
            text = json.dumps({"pause_seconds": end - paused, "file_bytes": 0}).encode()
        else:
            command.stdin.write(b"go\n")
            command.stdin.flush()
            text = command.stdout.read()
            end = time.monotonic()
        command.kill()
        command.wait()
        time.sleep(AFTER)
        observer.stop()
        try:
            result = json.loads(text)
        except json.JSONDecodeError:
            run.error = (workdir / "snapshot.stderr").read_text(errors="replace")[-500:]
            return run
        run.outcome = "completed"
        run.own_pause_ms = result["pause_seconds"] * 1000
        run.total_ms = (end - start) * 1000
        run.file_mib = result["file_bytes"] / qd.MiB
        if result.get("live"):
            run.saved_mib = result["live"]["saved_peak_bytes"] / qd.MiB
        _figures(run, observer, start, end)
    return run


def qemu_once(workdir: Path, image: Path, scenario: Scenario, tsc_khz: int, period: float) -> Run:
    run = Run("qemu-background", "failed")
    out = workdir / "qemu.state"
    with ObservedQemu(SOURCE, workdir, image, scenario, tsc_khz) as qemu:
        qmp = qemu.connect()
        observer = _observe(qemu.connect_console(), period)
        qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "background-snapshot", "state": True}])
        qmp.execute("migrate-set-parameters", **{"max-bandwidth": bq.LIFTED_BANDWIDTH})
        start = time.monotonic()
        qmp.execute("migrate", uri=f"exec:cat > {out}")
        info, _ = qd.wait_migration(qmp, bq.CONVERGENCE_TIMEOUT)
        end = time.monotonic()
        time.sleep(AFTER)
        observer.stop()
        if info.get("status") != "completed":
            run.error = str(info.get("error-desc", info.get("status")))
            return run
        run.outcome = "completed"
        run.own_pause_ms = info.get("downtime")
        run.total_ms = (end - start) * 1000
        run.file_mib = out.stat().st_size / qd.MiB
        _figures(run, observer, start, end)
    return run


PEERS = ["kvmigrate-live", "kvmigrate-paused", "qemu-background", "kvmigrate-pause-resume"]


def once(peer: str, image: Path, scenario: Scenario, tsc_khz: int, period: float) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-snapshot-") as tmp:
        try:
            if peer == "qemu-background":
                return qemu_once(Path(tmp), image, scenario, tsc_khz, period)
            return kvmigrate_once(Path(tmp), image, scenario, tsc_khz, period, peer)
        except (qd.BenchError, OSError) as e:
            return Run(peer, "failed", error=str(e)[-500:])


def summarise(runs: list[Run]) -> dict:
    row: dict = {"runs": len(runs), "completed": sum(r.outcome == "completed" for r in runs)}
    for key in ("unreachable_ms", "guest_stall_ms", "pass_rate_share", "own_pause_ms", "total_ms", "file_mib",
                "saved_mib"):
        values = [getattr(r, key) for r in runs if getattr(r, key) is not None]
        if values:
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    unreachable = [r.unreachable_ms for r in runs if r.unreachable_ms is not None]
    if unreachable:
        row["unreachable_p99_ms"] = percentile(unreachable, 99)
    return row


def _fmt(cell: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not cell:
        return "-"
    return (f"{cell['median'] * scale:.{digits}f} ({cell['min'] * scale:.{digits}f}-"
            f"{cell['max'] * scale:.{digits}f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--scenario", action="append", choices=sorted(SNAPSHOT_SCENARIOS), metavar="NAME",
                    help=f"repeatable; default {', '.join(HEADLINE)}")
    ap.add_argument("--peer", action="append", choices=PEERS, help="repeatable; default the first three (but "
                    "QEMU on hot1g-16g)")
    ap.add_argument("--period-ms", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    image, tsc_khz = bg.guest_image(), qd.host_tsc_khz()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": args.runs,
                    "period_ms": args.period_ms, "scenarios": {}}
    for name in args.scenario or HEADLINE:
        scenario = Scenario(SNAPSHOT_SCENARIOS[name].workload, every=1)
        peers = args.peer or DEFAULT_PEERS.get(name, PEERS[:3])
        done: dict[str, list[Run]] = {p: [] for p in peers}
        for i in range(args.runs):
            order = peers if i % 2 == 0 else peers[::-1]
            for peer in order:
                run = once(peer, image, scenario, tsc_khz, args.period_ms / 1000)
                done[peer].append(run)
                print(f"{name} run {i + 1}/{args.runs} {peer}: {run.outcome} unreachable {run.unreachable_ms} ms "
                      f"(at {run.unreachable_at_ms} ms), guest's longest pass {run.guest_stall_ms} ms, "
                      f"pass rate {run.pass_rate_share}, own pause {run.own_pause_ms} ms, total {run.total_ms} ms"
                      + (f" ({run.error})" if run.error else ""), file=sys.stderr, flush=True)
        summary = {p: summarise(done[p]) for p in peers}
        result["scenarios"][name] = {"runs": {p: [asdict(r) for r in done[p]] for p in peers}, "summary": summary}
        if not args.json:
            w = scenario.workload
            print(f"\n{name}: {w.mem_mib} MiB, {w.ws_mib} MiB hot at {w.rate_mib_s or 'full'} rate; {args.runs} runs, "
                  f"ping every {args.period_ms:g} ms; median (min-max)")
            print(f"{'peer':18} {'unreachable ms':>22} {'p99':>7} {'longest pass ms':>20} {'pass rate':>16} "
                  f"{'own pause ms':>20} {'total ms':>20} {'file MiB':>10}")
            for p in peers:
                s = summary[p]
                print(f"{p:18} {_fmt(s.get('unreachable_ms')):>22} {s.get('unreachable_p99_ms', float('nan')):7.1f} "
                      f"{_fmt(s.get('guest_stall_ms'), 1, 0):>20} {_fmt(s.get('pass_rate_share'), 100, 0) + '%':>16} "
                      f"{_fmt(s.get('own_pause_ms')):>20} {_fmt(s.get('total_ms'), 1, 0):>20} "
                      f"{_fmt(s.get('file_mib'), 1, 0):>10}")
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
