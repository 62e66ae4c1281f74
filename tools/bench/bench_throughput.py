"""Page throughput of a migration's first round against what loopback TCP carries (numbers, not
asserts).

    .venv/bin/python tools/bench/bench_throughput.py [--runs 5] [--ws 1024] [--streams 1 2] [--json]

Interleaved run by run: `iperf3` on loopback, one stream for 3 s (the link's ceiling, as the
issue's "37 Gbit/s measured there"), then a live migration of the built-in guest whose working set
(`--ws` MiB, fill=random: nothing to compress, nothing zero; then it halts) is sent in round 0 to a
`migrate recv` process, for each `--streams` count. Round 0's figure is the guest memory it
carried per second (its raw bytes over its time, as `migrate send --json` reports them), in
Gbit/s beside iperf3's, and the ratio. Medians and min-max of `--runs` runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_migrate import _free_address  # noqa: E402

from hv.guests import builtin as bg  # noqa: E402
from hv.kvm.kvm import Kvm  # noqa: E402
from hv.kvm.vm import VmConfig  # noqa: E402
from hv.vmm.builder import builtin_machine  # noqa: E402
from migrate import MigrationOptions, send  # noqa: E402
from migrate.transport.listener import Listener  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30


def iperf3_gbit_s(seconds: float = 3.0) -> float:
    listener = Listener("127.0.0.1:0", b"")
    port = listener.address.rsplit(":", 1)[1]
    listener.close()
    server = subprocess.Popen(["iperf3", "-s", "-1", "-p", port], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):  # until the server listens
            client = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", port, "-t", str(seconds), "-J"],
                                    capture_output=True, text=True)
            result = json.loads(client.stdout or "{}")
            if client.returncode == 0 and "error" not in result:
                return result["end"]["sum_received"]["bits_per_second"] / 1e9
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 failed: {client.stderr or client.stdout}")
    finally:
        server.kill()
        server.wait()


def round0_gbit_s(kvm: Kvm, ws_mib: int, streams: int) -> float:
    """Round 0 of a guest that filled its working set and then halts (`idle`): what is sent is
    exactly the working set, once, with nothing dirtied beside it."""
    address = _free_address()
    target = subprocess.Popen([sys.executable, "-m", "migrate.cli", "recv", "--listen", address, "--once",
                               "--accept-timeout", "120"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    console = bg.GuestConsole()
    params = bg.GuestParams(ws_mib=ws_mib, idle=True)
    machine = builtin_machine(kvm, params, VmConfig(mem_size=max(1 * GiB, params.min_mem + 64 * MiB)), console)
    try:
        machine.start()
        console.wait_ready(timeout=300)
        target.stderr.readline()  # "listening on ..."
        stats = send(machine, address, MigrationOptions(streams=streams, threads=max(2, streams)))
        if stats.outcome != "completed":
            raise RuntimeError(f"the migration did not complete: {stats.reason}")
        first = stats.rounds[0]
        return first.raw_bytes * 8 / first.seconds / 1e9
    finally:
        machine.stop()
        machine.vm.close()
        target.kill()
        target.wait()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--ws", type=int, default=1024, help="working set sent in round 0, MiB")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if shutil.which("iperf3") is None:
        sys.exit("iperf3 is not installed (make install adds it)")
    figures: dict[str, list[float]] = {"iperf3": [], **{f"round0 streams={n}": [] for n in args.streams}}
    with Kvm() as kvm:
        for run in range(args.runs):
            order = list(figures) if run % 2 == 0 else list(reversed(figures))  # A B, B A, ...
            for name in order:
                value = (iperf3_gbit_s() if name == "iperf3"
                         else round0_gbit_s(kvm, args.ws, int(name.rsplit("=", 1)[1])))
                figures[name].append(value)
                print(f"run {run + 1}/{args.runs} {name}: {value:.1f} Gbit/s", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"ws_mib": args.ws, "gbit_s": figures}, indent=2))
        return
    link = statistics.median(figures["iperf3"])
    print(f"\nloopback, round 0 of {args.ws} MiB of random pages; Gbit/s, median (min-max) of {args.runs} runs")
    for name, values in figures.items():
        ratio = "" if name == "iperf3" else f"   {statistics.median(values) / link:.0%} of iperf3"
        print(f"{name:20} {spread(values)}{ratio}")


if __name__ == "__main__":
    main()
