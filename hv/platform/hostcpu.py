"""Facts about the host CPUs from sysfs: frequencies, capacity, clusters and packages.

What a VMM uses to place vCPU threads (bind to a cluster, prefer big cores) and to describe the
host in reports. Any fact the kernel does not expose is None, never guessed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SYSFS_CPU = Path("/sys/devices/system/cpu")


@dataclass(frozen=True)
class HostCpu:
    cpu: int
    package_id: int | None
    die_id: int | None
    cluster_id: int | None
    core_id: int | None
    thread_siblings: tuple[int, ...]
    capacity: int | None  # relative compute capacity, 1024 = the biggest core
    min_khz: int | None
    max_khz: int | None
    cur_khz: int | None


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def host_cpu(cpu: int, root: Path = SYSFS_CPU) -> HostCpu:
    base = root / f"cpu{cpu}"
    topo, freq = base / "topology", base / "cpufreq"
    try:
        siblings = parse_cpu_list((topo / "thread_siblings_list").read_text())
    except OSError:
        siblings = (cpu,)
    return HostCpu(
        cpu=cpu,
        package_id=_read_int(topo / "physical_package_id"),
        die_id=_read_int(topo / "die_id"),
        cluster_id=_read_int(topo / "cluster_id"),
        core_id=_read_int(topo / "core_id"),
        thread_siblings=siblings,
        capacity=_read_int(base / "cpu_capacity"),
        min_khz=_read_int(freq / "cpuinfo_min_freq"),
        max_khz=_read_int(freq / "cpuinfo_max_freq"),
        cur_khz=_read_int(freq / "scaling_cur_freq"),
    )


def host_cpus(root: Path = SYSFS_CPU) -> tuple[HostCpu, ...]:
    """Every online CPU this process may run on."""
    try:
        online = set(parse_cpu_list((root / "online").read_text()))
    except OSError:
        online = set(range(os.cpu_count() or 1))
    allowed = os.sched_getaffinity(0) if root == SYSFS_CPU else online
    return tuple(host_cpu(c, root) for c in sorted(online & allowed))


def clusters(cpus: tuple[HostCpu, ...]) -> dict[tuple[int | None, int | None], tuple[int, ...]]:
    """CPUs grouped by (package, cluster): the units a vCPU group should stay within."""
    groups: dict[tuple[int | None, int | None], list[int]] = {}
    for c in cpus:
        groups.setdefault((c.package_id, c.cluster_id), []).append(c.cpu)
    return {k: tuple(v) for k, v in groups.items()}
