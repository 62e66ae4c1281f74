"""The blackout benchmark's summaries and tables: medians with their spread, ratios kvmigrate/QEMU.

Used by tools/bench/bench_blackout.py; pure (it prints, nothing else).
"""

from __future__ import annotations

import statistics

# (header, key): each a median with its min-max spread; ratios kvmigrate/QEMU of the medians
SPREAD_COLUMNS = [("blackout ms", "blackout_ms"), ("self downtime ms", "downtime_ms"),
                  ("echo p50 ms", "during_p50_ms"), ("echo p99 ms", "during_p99_ms"),
                  ("steady p50 ms", "steady_p50_ms"), ("steady p99 ms", "steady_p99_ms"),
                  ("total ms", "total_ms")]
MEDIAN_KEYS = ["gap_ms", "steady_drift_ms", "lost", "carried", "strays", "target_p50_ms", "asked_to_completed_ms",
               "last_source_echo_ms", "first_target_echo_ms",
               # post-copy (kvmigrate's own figures): pages fetched on demand, fault latency, vCPU blocktime
               "fetched_pages", "fault_p50_ms", "fault_p99_ms", "vcpu_blocked_ms",
               # the guest's pass time (ms): before, the pass of the switch, while migrating, after
               "pass_ms_before", "pass_ms_switch", "pass_ms_during", "pass_ms_after"]
PAIRS = [("kvmigrate", "qemu"), ("kvmigrate-postcopy", "qemu-postcopy")]  # the ratios: ours / theirs


def spread(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: list[dict]) -> dict:
    done = [r for r in runs if "blackout_ms" in r]
    row: dict = {"runs": len(runs), "measured": len(done), "saturated": sum(r["saturated"] for r in done),
                 "outcomes": [r["outcome"] for r in runs]}
    errors = [r["error"] for r in runs if r.get("error")]
    if errors:
        row["errors"] = errors
    for key in [k for _, k in SPREAD_COLUMNS] + MEDIAN_KEYS:
        row[key] = spread([r.get(key) for r in done])
    return row


def ratios(summary: dict[str, dict]) -> dict[str, dict]:
    """"ours/theirs" -> the ratio of each column's medians, for each pair of `PAIRS` both run."""
    out = {}
    for ours_name, theirs_name in PAIRS:
        ours, theirs = summary.get(ours_name), summary.get(theirs_name)
        if not ours or not theirs:
            continue
        pair = {}
        for _, key in SPREAD_COLUMNS:
            a, b = ours.get(key), theirs.get(key)
            pair[key] = a["median"] / b["median"] if a and b and b["median"] else None
        out[f"{ours_name}/{theirs_name}"] = pair
    return out


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cell(figure: dict | None) -> str:
    if figure is None:
        return "-"
    return f"{figure['median']:.1f} ({figure['min']:.1f}-{figure['max']:.1f})"


def print_scenario(title: str, summary: dict[str, dict], ratio: dict) -> None:
    header = ["peer"] + [h for h, _ in SPREAD_COLUMNS] + ["measured", "lost pings"]
    table = [header]
    for peer, row in summary.items():
        lost = row["lost"]["median"] if row["lost"] else None
        marks = f" ({row['saturated']} saturated)" if row["saturated"] else ""
        table.append([peer] + [_cell(row[k]) for _, k in SPREAD_COLUMNS]
                     + [f"{row['measured']}/{row['runs']}{marks}", "-" if lost is None else f"{lost:.0f}"])
    for label, pair in ratio.items():
        table.append([label] + ["-" if pair[k] is None else f"{pair[k]:.2f}x" for _, k in SPREAD_COLUMNS]
                     + ["", ""])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for peer, row in summary.items():
        for error in row.get("errors", []):
            print(f"  {peer}: {error}")
        if row["saturated"]:
            print(f"  {peer}: in {row['saturated']} run(s) the steady latency grew while it was measured: the "
                  "pings came faster than the console answered them (a busy host, or a period too short); "
                  "those figures are not the VMM's")
    print("  the guest's pass time, ms (before / the pass of the switch / while migrating / after); "
          "post-copy's own figures where the peer reports them:")
    for peer, row in summary.items():
        passes = " / ".join(_cell(row.get(k)) for k in ("pass_ms_before", "pass_ms_switch", "pass_ms_during",
                                                         "pass_ms_after"))
        faults = ""
        if row.get("fault_p99_ms"):
            faults = (f"; faults p50 {_cell(row['fault_p50_ms'])} p99 {_cell(row['fault_p99_ms'])} ms, "
                      f"{_cell(row['fetched_pages'])} fetched, vCPUs blocked {_cell(row['vcpu_blocked_ms'])} ms")
        print(f"  {peer}: {passes}{faults}")


def scenario_title(name: str, mem_mib: int, ws_mib: int, rate_mib_s: int, poll_ms: float, runs: int,
                   period_ms: float) -> str:
    poll = f"every {poll_ms:.1f} ms" if poll_ms else "continuously"
    return (f"{name} ({mem_mib} MiB, working set {ws_mib} MiB at "
            f"{f'{rate_mib_s} MiB/s' if rate_mib_s else 'full speed'}); ping every {period_ms:g} ms "
            f"(figures good to ~{max(period_ms, poll_ms):g} ms; the guest polls COM1 {poll}); "
            f"median (min-max) of {runs} runs, peers interleaved run by run")
