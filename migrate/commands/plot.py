"""A picture of a migration's rounds: `migrate send --plot FILE.png`, `migrate plot STATS.json`.

From `MigrationStats.as_dict()` (what `migrate send --json` prints), on a time axis from the
first page: the pages each round sent, the guest's dirty rate against the link's bandwidth, the
throttle auto-converge applied, and the pause (stop and copy, then the hand-over), with its
phases. matplotlib is an optional extra (`pip install kvmigrate[plot]`), drawn headless (Agg).
"""

from __future__ import annotations

import json
from types import ModuleType
from pathlib import Path
from typing import Any


class PlotUnavailable(ImportError):
    """matplotlib is not installed: `pip install kvmigrate[plot]`."""


def load_stats(path: str | Path) -> dict[str, Any]:
    """A `migrate send --json` file; a ValueError that says what is wrong otherwise."""
    try:
        stats = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); expected the output of migrate send --json") from e
    if not isinstance(stats, dict) or not isinstance(stats.get("rounds"), list):
        raise ValueError(f"{path}: no 'rounds'; expected the output of migrate send --json")
    return stats


def require_matplotlib() -> ModuleType:
    """matplotlib, set to draw headless; PlotUnavailable (saying how to install it) without it."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable("drawing needs matplotlib: pip install 'kvmigrate[plot]'") from e
    return matplotlib


def plot_rounds(stats: dict[str, Any], out: str | Path) -> Path:
    """Draw `stats`' rounds into the PNG `out`; returns its path."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # headless: no display, no GUI toolkit
    from matplotlib import pyplot as plt

    rounds = stats["rounds"]
    starts, t = [], 0.0
    for r in rounds:
        starts.append(t)
        t += r["seconds"]
    widths = [r["seconds"] for r in rounds]
    pause_s = stats.get("downtime_ms", 0.0) / 1000
    last_start = starts[-1] if rounds and stats.get("outcome") == "completed" else None

    fig, (pages_ax, rate_ax, throttle_ax) = plt.subplots(3, 1, sharex=True, figsize=(9, 7.5))
    fig.suptitle(f"migration {stats.get('outcome', '?')}: {len(rounds)} rounds, "
                 f"{stats.get('total_seconds', 0) * 1000:.0f} ms total, downtime {stats.get('downtime_ms', 0):.1f} ms")
    pages_ax.bar(starts, [r["pages"] for r in rounds], width=widths, align="edge", color="tab:blue",
                 edgecolor="white", label="pages sent")
    for x, r in zip(starts, rounds, strict=True):
        pages_ax.annotate(str(r["round"]), (x, r["pages"]), fontsize=7, va="bottom")
    pages_ax.set_ylabel("pages sent")
    mids = [s + w / 2 for s, w in zip(starts, widths, strict=True)]
    # the dirty rate is measured from round 1 on (round 0 sends what was there; nothing to compare)
    rate_ax.plot(mids[1:], [r["dirty_rate_mib_s"] for r in rounds[1:]], "o-", color="tab:red",
                 label="guest dirty rate")
    rate_ax.plot(mids, [r["bandwidth_mib_s"] for r in rounds], "s-", color="tab:green", label="link bandwidth")
    rate_ax.set_ylabel("MiB/s")
    rate_ax.legend(loc="upper right", fontsize=8)
    throttle_ax.step(starts + [t], [r["throttle"] * 100 for r in rounds] + [rounds[-1]["throttle"] * 100 if rounds else 0],
                     where="post", color="tab:purple", label="throttle")
    throttle_ax.set_ylabel("throttle %")
    throttle_ax.set_ylim(0, 100)
    throttle_ax.set_xlabel("seconds since the first page")
    if last_start is not None and pause_s:
        phases = stats.get("downtime_phases_ms", {})
        label = f"pause {stats['downtime_ms']:.1f} ms" + (
            ": " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in phases.items()) if phases else "")
        for ax in (pages_ax, rate_ax, throttle_ax):
            ax.axvspan(last_start, last_start + max(pause_s, widths[-1]), color="tab:orange", alpha=0.25,
                       label="pause (stop and copy)" if ax is pages_ax else None)
        throttle_ax.text(last_start, 90, label, fontsize=7, va="top", ha="right", wrap=True)
    pages_ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
