"""The pause of a live migration, phase by phase, as the guest's RAM grows (numbers, not asserts).

    .venv/bin/python tools/bench/bench_pause.py [--mem 1,16] [--runs 5] [--json]

A guest with a 1 MiB working set dirtied at full rate (tiny-*: 1 and 16 GiB by default) migrates
on loopback to a `migrate recv` process (bench_migrate's `migrate_once`), and `migrate send`'s own
`downtime_phases_ms` give the timeline of the pause on both sides: the source's pause, dirty-log
fetch, last round, state, digest; the target's digest, apply and resume as it reports them; and
"link", what neither side accounts for (transit, the target reading the messages). The medians
per phase, the downtime, and the pause the source forecast before it stopped (issue 23: the
pause of a 16 GiB guest within 1 ms of a 1 GiB one).
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench_migrate import GiB, migrate_once

from hv.kvm.kvm import Kvm
from migrate import MigrationOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="1,16", help="guest sizes in GiB, comma-separated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    kvm, out = Kvm(), {}
    for gib in [float(x) for x in args.mem.split(",")]:
        runs = [migrate_once(kvm, int(gib * GiB), 1, 0, MigrationOptions()) for _ in range(args.runs)]
        done = [r for r in runs if r["outcome"] == "completed"]
        if not done:
            out[f"{gib:g}g"] = {"completed": 0}
            continue
        row = {"completed": len(done),
               "downtime_ms": statistics.median(r["downtime_ms"] for r in done),
               "forecast_ms": statistics.median(r["downtime_predicted_ms"] for r in done),
               "phases_ms": {k: round(statistics.median(r["downtime_phases_ms"][k] for r in done), 3)
                             for k in done[0]["downtime_phases_ms"]}}
        out[f"{gib:g}g"] = row
        if not args.json:
            print(f"{gib:g} GiB: downtime {row['downtime_ms']:.1f} ms (forecast {row['forecast_ms']:.1f}), "
                  f"{len(done)}/{args.runs} runs; " + ", ".join(f"{k} {v:.2f}" for k, v in row["phases_ms"].items()),
                  flush=True)
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
