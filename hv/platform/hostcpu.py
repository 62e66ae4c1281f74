"""Facts about the host's CPUs, from sysfs: frequencies, capacity, clusters (crosvm's `LinuxArch`
host-CPU methods: get_host_cpu_frequencies_khz, get_host_cpu_max_freq_khz, get_host_cpu_capacity,
get_host_cpu_clusters).

A fact the kernel does not expose is never guessed: it is `Unknown(reason)`, which says which file
was missing or what it held. Which facts a host has depends on its kernel and whether it is itself
a VM: a guest kernel usually has no cpufreq driver (no frequencies), x86 reports a capacity only
with asymmetric cores (otherwise every CPU is 1024), and `topology/cluster_id` is 65535 (-1) where
the firmware describes no cluster (the CPUs of `cluster_cpus_list` then still group them).

Used by `hv info` and by a migration's dry run (the TSC/frequency check on the target).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

SYSFS_CPU = Path("/sys/devices/system/cpu")
NO_CLUSTER_ID = (0xFFFF, 0xFFFFFFFF, -1)  # what the kernel prints for an undescribed cluster
T = TypeVar("T")


@dataclass(frozen=True)
class Unknown:
    """A host fact this host does not give, and why (the file missing, or what it held)."""

    reason: str

    def __str__(self) -> str:
        return f"not known here, because {self.reason}"


@dataclass(frozen=True)
class CpuFrequencies:
    """One CPU's frequencies in kHz: the range cpufreq allows, and the steps it lists if any."""

    min_khz: int
    max_khz: int
    available_khz: tuple[int, ...] = ()  # scaling_available_frequencies, where the driver lists them

    @property
    def all_khz(self) -> tuple[int, ...]:
        """Every frequency known, ascending (crosvm's per-CPU frequency list)."""
        return tuple(sorted(set(self.available_khz) | {self.min_khz, self.max_khz}))


@dataclass(frozen=True)
class HostCpuFacts:
    """Per online CPU this process may run on: its frequencies, capacity and cluster."""

    cpus: tuple[int, ...]
    frequencies: dict[int, CpuFrequencies] | Unknown
    capacity: dict[int, int] | Unknown  # relative compute capacity, 1024 = the biggest core
    clusters: tuple[tuple[int, ...], ...] | Unknown

    @property
    def max_freq_khz(self) -> dict[int, int] | Unknown:
        if isinstance(self.frequencies, Unknown):
            return self.frequencies
        return {cpu: f.max_khz for cpu, f in self.frequencies.items()}

    def frequency_fact(self) -> str:
        """The host CPUs' maximum frequency, in words, for a check that reports a clock (a
        migration's TSC check): the range over the CPUs, or why it is not known."""
        highest = self.max_freq_khz
        if isinstance(highest, Unknown):
            return f"the host CPUs' frequency is {highest}"
        low, high = min(highest.values()), max(highest.values())
        return f"the host CPUs run at up to {high} kHz" + (f" ({low} kHz on the slowest)" if low != high else "")

    def as_dict(self) -> dict[str, object]:
        """For `hv info --json`: a fact, or {"unknown": reason}."""

        def fact(value: object) -> object:
            if isinstance(value, Unknown):
                return {"unknown": value.reason}
            if isinstance(value, dict):
                return {str(k): (v.all_khz if isinstance(v, CpuFrequencies) else v) for k, v in value.items()}
            return value

        return {"cpus": list(self.cpus), "frequencies_khz": fact(self.frequencies),
                "max_freq_khz": fact(self.max_freq_khz), "capacity": fact(self.capacity),
                "clusters": fact(self.clusters)}


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' -> (0, 1, 2, 3, 8, 10, 11)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(cpus)


def _read_ints(path: Path) -> tuple[int, ...] | Unknown:
    try:
        text = path.read_text()
    except OSError as e:
        return Unknown(f"{path} cannot be read ({e.strerror or e})")
    try:
        return tuple(int(word) for word in text.split())
    except ValueError:
        return Unknown(f"{path} holds {text.strip()!r}, not numbers")


def _one_int(path: Path) -> int | Unknown:
    values = _read_ints(path)
    if isinstance(values, Unknown):
        return values
    if len(values) != 1:
        return Unknown(f"{path} holds {len(values)} numbers, not one")
    return values[0]


def online_cpus(root: Path = SYSFS_CPU) -> tuple[int, ...]:
    """The online CPUs (of those this process may use, when reading the real sysfs)."""
    try:
        online = set(parse_cpu_list((root / "online").read_text()))
    except OSError:
        online = set(range(os.cpu_count() or 1))
    if root == SYSFS_CPU:
        online &= os.sched_getaffinity(0)
    return tuple(sorted(online))


def _per_cpu(cpus: tuple[int, ...], read: Callable[[int], T | Unknown]) -> dict[int, T] | Unknown:
    """read(cpu) for every CPU, or the first CPU's Unknown (a fact only some CPUs have is not
    a fact about the host)."""
    found: dict[int, T] = {}
    for cpu in cpus:
        value = read(cpu)
        if isinstance(value, Unknown):
            return value
        found[cpu] = value
    return found


def frequencies_khz(cpus: tuple[int, ...], root: Path = SYSFS_CPU) -> dict[int, CpuFrequencies] | Unknown:
    """crosvm get_host_cpu_frequencies_khz: each CPU's frequencies from its cpufreq directory."""

    def read(cpu: int) -> CpuFrequencies | Unknown:
        freq = root / f"cpu{cpu}" / "cpufreq"
        if not freq.is_dir():
            return Unknown(f"{freq} does not exist (no cpufreq driver is loaded; a VM's kernel usually has none)")
        low, high = _one_int(freq / "cpuinfo_min_freq"), _one_int(freq / "cpuinfo_max_freq")
        if isinstance(high, Unknown):
            return high
        steps = _read_ints(freq / "scaling_available_frequencies")
        return CpuFrequencies(high if isinstance(low, Unknown) else low, high,
                              () if isinstance(steps, Unknown) else steps)

    return _per_cpu(cpus, read)


def capacity(cpus: tuple[int, ...], root: Path = SYSFS_CPU) -> dict[int, int] | Unknown:
    """crosvm get_host_cpu_capacity: each CPU's relative capacity (cpu_capacity, 1024 the most)."""
    def read(cpu: int) -> int | Unknown:
        return _one_int(root / f"cpu{cpu}" / "cpu_capacity")

    return _per_cpu(cpus, read)


def clusters(cpus: tuple[int, ...], root: Path = SYSFS_CPU) -> tuple[tuple[int, ...], ...] | Unknown:
    """crosvm get_host_cpu_clusters: the CPUs grouped by cluster (CPUs sharing an L2 on x86, a
    cluster of cores on Arm), each group once, ordered by its first CPU."""
    groups: dict[tuple[int, ...], None] = {}
    for cpu in cpus:
        topo = root / f"cpu{cpu}" / "topology"
        try:
            members = parse_cpu_list((topo / "cluster_cpus_list").read_text())
        except OSError as e:
            cluster_id = _one_int(topo / "cluster_id")
            if isinstance(cluster_id, Unknown) or cluster_id in NO_CLUSTER_ID:
                why = cluster_id.reason if isinstance(cluster_id, Unknown) else f"cluster_id is {cluster_id}"
                return Unknown(f"{topo / 'cluster_cpus_list'} cannot be read ({e.strerror or e}) and {why}")
            members = tuple(c for c in cpus if _one_int(root / f"cpu{c}" / "topology" / "cluster_id") == cluster_id)
        groups[tuple(c for c in members if c in cpus) or (cpu,)] = None
    return tuple(sorted(groups, key=lambda g: g[0]))


def host_cpu_facts(root: Path = SYSFS_CPU) -> HostCpuFacts:
    cpus = online_cpus(root)
    return HostCpuFacts(cpus, frequencies_khz(cpus, root), capacity(cpus, root), clusters(cpus, root))
