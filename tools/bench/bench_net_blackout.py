"""The network blackout of a live migration, as a client in the network sees it (numbers, not
asserts): the built-in guest on virtio-net moves from host A to host B of the two-host rig
(tools/netrig.py), and a UDP client in the middle namespace (tools/net_observer.py, a process
of its own) sends it a datagram every millisecond and stamps every answer. The figures are over a
window from 0.5 s before `migrate send` starts to 1 s after it returns (CLOCK_MONOTONIC is one
clock for every process).

    .venv/bin/python tools/bench/bench_net_blackout.py [--runs N] [--scenario tiny-1g hot256-100]
                                                       [--rate-mbit 10000 1000] [--json]

kvmigrate runs as its command-line tools, each in its host's namespace: `hv run --net
tap=..,bridge=br0 --api SOCK` in A, `migrate recv --listen B:PORT --key-file K --once` in B
(the card's tap is opened there under the same name, on B's bridge), `migrate send --api SOCK
--to B:PORT --key-file K --json` in A, so the migration crosses the veth links (shaped with
`--rate-mbit`: a token bucket on each host's link). Figures per run: the observer's blackout
(longest wait between two answers), the requests lost (one run at most, at the switch-over) and
duplicated (must be 0), echo p50/p99 over the whole run, and `migrate send`'s own downtime and
total time.

On a loaded 2-core host the figures are noise: the guest's two vCPUs spin (CPU 0 dirties at
full rate in tiny-1g, CPU 1 polls the card), so the VMM's own threads, the observer and the
migration compete for what is left; read them on a quiet host, and never as a verdict.

QEMU is not run here yet: `-device virtio-net-pci` needs the built-in guest's PCI driver (branch
`pci`), and QEMU's `microvm` machine, which has virtio-mmio, does not boot a Multiboot image.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tools.net_observer import Observation  # noqa: E402
from tools.netrig import GUEST_ADDRESS, HOST_ADDRESSES, NetRig, cleanup_leftovers  # noqa: E402

STEADY_NS = 500_000_000  # the window opens this long before `migrate send` starts
AFTER_NS = 1_000_000_000  # and closes this long after it returns

SCENARIOS = {"tiny-1g": ("1G", 1, 0), "hot256-100": ("1G", 256, 100), "idle-1g": ("1G", 1, 1)}
PORT = 7777
VENV_BIN = ROOT / ".venv" / "bin"


def _ns(ns: str, *cmd: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=ROOT, text=True, **kw)


def one_run(scenario: str, rate_mbit: float | None, run: int) -> dict:
    mem, ws, rate = SCENARIOS[scenario]
    with NetRig(rate_mbit=rate_mbit) as rig, tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "key"
        key.write_text(secrets.token_hex(32))
        api = f"{tmp}/vm.sock"
        tap = f"kvb{os.getpid() % 10000}r{run}"
        source = _ns(rig.host("a"), str(VENV_BIN / "hv"), "run", "--mem", mem, "--cpus", "2", "--ws", str(ws),
                     "--rate", str(rate), "--net", f"tap={tap},bridge=br0", "--api", api,
                     "--cmdline", f"net_ip={GUEST_ADDRESS} net_port={PORT}",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target = _ns(rig.host("b"), str(VENV_BIN / "migrate"), "recv", "--listen", f"{HOST_ADDRESSES['b']}:7380",
                     "--key-file", str(key), "--once", "--timeout", "120",
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        observer = subprocess.Popen([sys.executable, "-m", "tools.net_observer", "--ns", rig.network, "--to",
                                     f"{GUEST_ADDRESS}:{PORT}"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert observer.stdout is not None and observer.stdout.readline().strip() == "ready"
            time.sleep(2.0 + ws / 100)  # boot, fill the working set, settle (a benchmark may wait)
            started = time.monotonic_ns()
            sender = _ns(rig.host("a"), str(VENV_BIN / "migrate"), "send", "--api", api, "--to",
                         f"{HOST_ADDRESSES['b']}:7380", "--key-file", str(key), "--json",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = sender.communicate(timeout=300)
            ended = time.monotonic_ns()
            stats = json.loads(out) if out.strip().startswith("{") else {"error": err[-400:]}
            time.sleep(1.5)  # answers from host B
            observer.send_signal(signal.SIGINT)
            whole = Observation.from_json(json.loads(observer.communicate(timeout=30)[0].splitlines()[-1]))
        finally:
            for p in (observer, source, target):
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            for p in (observer, source, target):
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
    move = whole.window(started - STEADY_NS, ended + AFTER_NS)
    steady = whole.window(started - STEADY_NS, started).latencies()
    during = whole.window(started, ended).latencies()
    gap, _, _ = move.blackout()
    seen = {"sent": len(move.sent), "answers": len(move.answers), "duplicates": len(move.duplicates()),
            "lost": len(move.lost(0)), "lost_runs": move.lost_runs(0), "blackout_ms": gap * 1e3,
            "echo_p50_steady_ms": _pct(steady, 50), "echo_p99_migrating_ms": _pct(during, 99)}
    return {"scenario": scenario, "rate_mbit": rate_mbit, "observer": seen,
            "downtime_ms": stats.get("downtime_ms"), "total_s": stats.get("total_seconds"),
            "outcome": stats.get("outcome"), "error": stats.get("error")}


def _pct(values: list[float], p: int) -> float | None:
    return values[min(len(values) - 1, len(values) * p // 100)] * 1e3 if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--scenario", nargs="+", default=["tiny-1g", "hot256-100"], choices=sorted(SCENARIOS))
    p.add_argument("--rate-mbit", nargs="+", type=float, default=[10000, 1000])
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    cleanup_leftovers()
    rows = []
    for scenario in args.scenario:
        for rate in args.rate_mbit:
            runs = [one_run(scenario, rate, i) for i in range(args.runs)]
            rows.append(runs)
            ok = [r for r in runs if r["outcome"] == "completed"]
            med = (lambda xs: statistics.median([x for x in xs if x is not None] or [float("nan")]))
            print(f"{scenario:11} {rate:7.0f} Mbit/s  runs {len(ok)}/{len(runs)}  "
                  f"blackout {med([r['observer']['blackout_ms'] for r in ok]):7.1f} ms  "
                  f"own downtime {med([r['downtime_ms'] for r in ok]):6.1f} ms  "
                  f"total {med([r['total_s'] for r in ok]):5.2f} s  "
                  f"lost {med([r['observer']['lost'] for r in ok]):4.0f}  "
                  f"dup {max([r['observer']['duplicates'] for r in ok], default=0)}  "
                  f"echo p50 steady {med([r['observer']['echo_p50_steady_ms'] for r in ok]):5.2f} ms  "
                  f"p99 migrating {med([r['observer']['echo_p99_migrating_ms'] for r in ok]):5.2f} ms", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
