"""The network blackout of a live migration, as a client in the network sees it (numbers, not
asserts): the built-in guest on virtio-net moves from host A to host B of the two-host rig
(tools/netrig.py), and a UDP client in the middle namespace (tools/net_observer.py, a process
of its own) sends it a datagram every millisecond and stamps every answer. The figures are over a
window from 0.5 s before `migrate send` starts to 1 s after it returns (CLOCK_MONOTONIC is one
clock for every process).

    .venv/bin/python tools/bench/bench_net_blackout.py [--runs N] [--scenario tiny-1g hot256-100]
                                                       [--rate-mbit 10000 1000] [--peer kvmigrate qemu]
                                                       [--transport mmio pci] [--json]

kvmigrate runs as its command-line tools, each in its host's namespace: `hv run --net
tap=..,bridge=br0[,transport=pci] --api SOCK` in A, `migrate recv --listen B:PORT --key-file K
--once` in B (the card's tap is opened there under the same name, on B's bridge), `migrate send
--api SOCK --to B:PORT --key-file K --json` in A, so the migration crosses the veth links (shaped
with `--rate-mbit`: a token bucket on each host's link).

QEMU runs the same image on the same rig (tools/bench/qemu_driver.py's `Qemu`, as
bench_blackout.py drives it for COM1): `-netdev tap,ifname=T -device virtio-net-pci,
disable-legacy=on` in A, the same with `-incoming tcp:B:PORT` in B, each on a persistent tap of
that name already a port of its host's bridge (as kvmigrate's `bridge=br0` makes it), and QMP
`migrate tcp:B:PORT` with bench_qemu's settings (downtime limit 300 ms, bandwidth cap lifted);
QEMU announces the guest itself when it runs on B (its announce-self rounds, and
VIRTIO_NET_S_ANNOUNCE, which the guest's driver answers). The guest's card is on PCI there
(QEMU's microvm, which has virtio-mmio, does not boot a Multiboot image). kvmigrate's is on
virtio-mmio by default: `--transport pci` runs it on PCI as QEMU's, and `--transport mmio pci`
runs both as cases of their own, interleaved with QEMU run by run (issue 24 compares the two).

The peers alternate run by run (kvmigrate, QEMU, kvmigrate, ...), each run on a fresh rig.
Figures per run: the observer's blackout (longest wait between two answers), the requests lost
(one run at most, at the switch-over) and duplicated (must be 0), echo p50/p99 over the whole
run, and the migration's own downtime and total time (`migrate send --json`; QEMU's
query-migrate).

On a loaded 2-core host the figures are noise: the guest's two vCPUs spin (CPU 0 dirties at
full rate in tiny-1g, CPU 1 polls the card), so the VMM's own threads, the observer and the
migration compete for what is left; read them on a quiet host, and never as a verdict.
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
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import bench_qemu as bq  # noqa: E402
from hv.guests import builtin as bg  # noqa: E402
import qemu_driver as qd  # noqa: E402
from tools.net_observer import Observation  # noqa: E402
from tools.netrig import GUEST_ADDRESS, HOST_ADDRESSES, NetRig, _ip, cleanup_leftovers  # noqa: E402

STEADY_NS = 500_000_000  # the window opens this long before `migrate send` starts
AFTER_NS = 1_000_000_000  # and closes this long after it returns

SCENARIOS = {"tiny-1g": ("1G", 1, 0), "hot256-100": ("1G", 256, 100), "idle-1g": ("1G", 1, 1)}
PORT = 7777
MIGRATION_PORT = 7380
GUEST_MAC = "52:54:00:12:34:56"  # kvmigrate's default card address (hv.devices.virtio.net.DEFAULT_MAC)
VENV_BIN = ROOT / ".venv" / "bin"


def _ns(ns: str, *cmd: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], cwd=ROOT, text=True, **kw)


def _end(processes: list[subprocess.Popen]) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in processes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


class KvmigrateMove:
    """`hv run` in A, `migrate recv` in B; `migrate()` is `migrate send` in A."""

    def __init__(self, rig: NetRig, tmp: Path, scenario: str, tap: str, transport: str) -> None:
        mem, ws, rate = SCENARIOS[scenario]
        self.rig, self.key, self.api = rig, tmp / "key", f"{tmp}/vm.sock"
        self.key.write_text(secrets.token_hex(32))
        self.processes = [
            _ns(rig.host("a"), str(VENV_BIN / "hv"), "run", "--mem", mem, "--cpus", "2", "--ws", str(ws),
                "--rate", str(rate), "--net", f"tap={tap},bridge=br0,transport={transport}", "--api", self.api,
                "--cmdline", f"net_ip={GUEST_ADDRESS} net_port={PORT}",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            _ns(rig.host("b"), str(VENV_BIN / "migrate"), "recv", "--listen", f"{HOST_ADDRESSES['b']}:{MIGRATION_PORT}",
                "--key-file", str(self.key), "--once", "--timeout", "120",
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]

    def wait_running(self, ws: int) -> None:
        time.sleep(2.0 + ws / 100)  # boot, fill the working set, settle (a benchmark may wait)

    def migrate(self) -> dict:
        sender = _ns(self.rig.host("a"), str(VENV_BIN / "migrate"), "send", "--api", self.api, "--to",
                     f"{HOST_ADDRESSES['b']}:{MIGRATION_PORT}", "--key-file", str(self.key), "--json",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = sender.communicate(timeout=300)
        stats = json.loads(out) if out.strip().startswith("{") else {"error": err[-400:]}
        return {"downtime_ms": stats.get("downtime_ms"), "total_s": stats.get("total_seconds"),
                "outcome": stats.get("outcome"), "error": stats.get("error")}

    def close(self) -> None:
        _end(self.processes)


class NetQemu(qd.Qemu):
    """qemu_driver's Qemu in a host's namespace, two vCPUs, virtio-net-pci on tap `tap`."""

    def __init__(self, role: str, workdir: Path, namespace: str, tap: str, workload: qd.Workload, tsc_khz: int,
                 incoming: str | None = None) -> None:
        super().__init__(role, workdir, bg.guest_image(), workload, tsc_khz, incoming)
        i = self.args.index("-append")
        self.args[i + 1] = self.args[i + 1].replace("cpus=1", "cpus=2") + f" net_ip={GUEST_ADDRESS} net_port={PORT}"
        assert "cpus=2" in self.args[i + 1]  # CPU 1 drives the card
        self.args[1:1] = ["-smp", "2", "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                          "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={GUEST_MAC}"]
        self.args[:0] = ["ip", "netns", "exec", namespace]


class QemuMove:
    """A QEMU in A, one waiting with `-incoming` in B; `migrate()` is QMP `migrate` over the rig."""

    def __init__(self, rig: NetRig, tmp: Path, scenario: str, tap: str, tsc_khz: int) -> None:
        mem, ws, rate = SCENARIOS[scenario]
        workload = qd.Workload(int(mem.rstrip("G")) * 1024, ws, rate)
        for side in ("a", "b"):  # persistent taps, already ports of each host's bridge
            _ip("tuntap", "add", "dev", tap, "mode", "tap", netns=rig.host(side))
            _ip("link", "set", tap, "master", "br0", "up", netns=rig.host(side))
        self.uri = f"tcp:{HOST_ADDRESSES['b']}:{MIGRATION_PORT}"
        self.stack = ExitStack()
        self.source = self.stack.enter_context(NetQemu("source", tmp, rig.host("a"), tap, workload, tsc_khz))
        self.target = self.stack.enter_context(NetQemu("target", tmp, rig.host("b"), tap, workload, tsc_khz,
                                                       incoming=self.uri))
        self.qmp = self.source.connect()
        self.target.connect()

    def wait_running(self, ws: int) -> None:
        self.source.wait_pass(1, 120)
        time.sleep(1.0)  # settle, as the kvmigrate peer does after its boot

    def migrate(self) -> dict:
        self.qmp.execute("migrate-set-parameters", **{"downtime-limit": bq.DOWNTIME_LIMIT_MS,
                                                      "max-bandwidth": bq.LIFTED_BANDWIDTH})
        self.qmp.execute("migrate", uri=self.uri)
        info, _ = qd.wait_migration(self.qmp, bq.CONVERGENCE_TIMEOUT)
        status = info.get("status")
        if status not in ("completed", "failed", "cancelled"):
            self.qmp.execute("migrate_cancel")
            status = "no convergence"
        total = info.get("total-time")
        return {"downtime_ms": info.get("downtime"), "total_s": total / 1e3 if total is not None else None,
                "outcome": status, "error": info.get("error-desc")}

    def close(self) -> None:
        self.stack.close()


def one_run(peer: str, scenario: str, rate_mbit: float | None, run: int, transport: str, tsc_khz: int) -> dict:
    ws = SCENARIOS[scenario][1]
    with NetRig(rate_mbit=rate_mbit) as rig, tempfile.TemporaryDirectory() as tmp:
        tap = f"kvb{os.getpid() % 10000}r{run}"
        move = (KvmigrateMove(rig, Path(tmp), scenario, tap, transport) if peer == "kvmigrate"
                else QemuMove(rig, Path(tmp), scenario, tap, tsc_khz))
        observer = subprocess.Popen([sys.executable, "-m", "tools.net_observer", "--ns", rig.network, "--to",
                                     f"{GUEST_ADDRESS}:{PORT}"], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert observer.stdout is not None and observer.stdout.readline().strip() == "ready"
            move.wait_running(ws)
            started = time.monotonic_ns()
            stats = move.migrate()
            ended = time.monotonic_ns()
            time.sleep(1.5)  # answers from host B
            observer.send_signal(signal.SIGINT)
            whole = Observation.from_json(json.loads(observer.communicate(timeout=30)[0].splitlines()[-1]))
        finally:
            _end([observer])
            move.close()
    move_window = whole.window(started - STEADY_NS, ended + AFTER_NS)
    steady = whole.window(started - STEADY_NS, started).latencies()
    during = whole.window(started, ended).latencies()
    gap, _, _ = move_window.blackout()
    seen = {"sent": len(move_window.sent), "answers": len(move_window.answers),
            "duplicates": len(move_window.duplicates()), "lost": len(move_window.lost(0)),
            "lost_runs": move_window.lost_runs(0), "blackout_ms": gap * 1e3,
            "echo_p50_steady_ms": _pct(steady, 50), "echo_p99_migrating_ms": _pct(during, 99)}
    return {"peer": peer, "scenario": scenario, "rate_mbit": rate_mbit, "observer": seen, **stats}


def _pct(values: list[float], p: int) -> float | None:
    return values[min(len(values) - 1, len(values) * p // 100)] * 1e3 if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3, help="runs per peer and case, interleaved")
    p.add_argument("--scenario", nargs="+", default=["tiny-1g", "hot256-100"], choices=sorted(SCENARIOS))
    p.add_argument("--rate-mbit", nargs="+", type=float, default=[10000, 1000])
    p.add_argument("--peer", nargs="+", default=["kvmigrate", "qemu"], choices=["kvmigrate", "qemu"])
    p.add_argument("--transport", nargs="+", default=["mmio"], choices=["mmio", "pci"],
                   help="kvmigrate's card (QEMU's is on PCI); both: each a case of its own, interleaved with "
                        "the others run by run (issue 24: the blackout on PCI against MMIO, same run)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    cleanup_leftovers()
    tsc_khz = qd.host_tsc_khz()
    rows = []
    med = (lambda xs: statistics.median([x for x in xs if x is not None] or [float("nan")]))
    for scenario in args.scenario:
        for rate in args.rate_mbit:
            # a case per peer, and per transport for kvmigrate (QEMU's card is on PCI)
            cases = [(peer, t) for peer in args.peer for t in (args.transport if peer == "kvmigrate" else ["pci"])]
            label = {(peer, t): peer if len(args.transport) == 1 or peer != "kvmigrate" else f"{peer}-{t}"
                     for peer, t in cases}
            runs: dict[str, list[dict]] = {label[case]: [] for case in cases}
            for i in range(args.runs):
                for peer, transport in cases:  # interleaved: the host's drift hits every case alike
                    runs[label[peer, transport]].append(one_run(peer, scenario, rate, i, transport, tsc_khz))
            rows.append(runs)
            for peer, done in runs.items():
                ok = [r for r in done if r["outcome"] == "completed"]
                blackouts = [r["observer"]["blackout_ms"] for r in ok]
                print(f"{scenario:11} {rate:7.0f} Mbit/s  {peer:13}  runs {len(ok)}/{len(done)}  "
                      f"blackout {med(blackouts):7.1f} ms [{min(blackouts, default=float('nan')):.1f}-"
                      f"{max(blackouts, default=float('nan')):.1f}]  "
                      f"own downtime {med([r['downtime_ms'] for r in ok]):6.1f} ms  "
                      f"total {med([r['total_s'] for r in ok]):5.2f} s  "
                      f"lost {med([r['observer']['lost'] for r in ok]):4.0f}  "
                      f"dup {max([r['observer']['duplicates'] for r in ok], default=0)}  "
                      f"echo p50 steady {med([r['observer']['echo_p50_steady_ms'] for r in ok]):5.2f} ms  "
                      f"p99 migrating {med([r['observer']['echo_p99_migrating_ms'] for r in ok]):5.2f} ms",
                      flush=True)
                for r in done:
                    if r["outcome"] != "completed":
                        print(f"    {peer} run failed: {r['outcome']} {r['error']}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
