"""Host CPU facts (crosvm LinuxArch's get_host_cpu_*): from a made-up sysfs with every fact, one
with none, the real one, and where they are used: `hv info` and a migration's TSC check."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from hv.kvm.kvm import Kvm
from hv.platform import hostcpu
from hv.platform.hostcpu import CpuFrequencies, Unknown, host_cpu_facts, parse_cpu_list
from hv.vmm.builder import X8664Arch

SYSFS = hostcpu.SYSFS_CPU


def _fake_sysfs(root: Path, cpus: dict[int, tuple[int, int, tuple[int, ...], str]]) -> Path:
    """cpu -> (capacity, cluster id, cpufreq steps in kHz (none: no cpufreq), cluster_cpus_list)."""
    (root / "online").write_text(f"0-{max(cpus)}\n")
    for cpu, (capacity, cluster, steps, siblings) in cpus.items():
        base = root / f"cpu{cpu}"
        (base / "topology").mkdir(parents=True)
        (base / "topology" / "cluster_id").write_text(f"{cluster}\n")
        if siblings:
            (base / "topology" / "cluster_cpus_list").write_text(siblings + "\n")
        (base / "cpu_capacity").write_text(f"{capacity}\n")
        if steps:
            (base / "cpufreq").mkdir()
            (base / "cpufreq" / "cpuinfo_min_freq").write_text(f"{min(steps)}\n")
            (base / "cpufreq" / "cpuinfo_max_freq").write_text(f"{max(steps)}\n")
            (base / "cpufreq" / "scaling_available_frequencies").write_text(" ".join(map(str, steps)) + " \n")
    return root


def test_cpu_lists() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)
    assert parse_cpu_list("") == ()


def test_a_big_little_host_gives_every_fact(tmp_path: Path) -> None:
    little, big = (600_000, 1_200_000, 1_800_000), (800_000, 2_400_000, 3_000_000)
    root = _fake_sysfs(tmp_path, {0: (512, 0, little, "0-1"), 1: (512, 0, little, "0-1"),
                                  2: (1024, 1, big, "2-3"), 3: (1024, 1, big, "2-3")})
    facts = host_cpu_facts(root)
    assert facts.cpus == (0, 1, 2, 3)
    assert facts.frequencies == {0: CpuFrequencies(600_000, 1_800_000, little), 1: CpuFrequencies(600_000, 1_800_000, little),
                                 2: CpuFrequencies(800_000, 3_000_000, big), 3: CpuFrequencies(800_000, 3_000_000, big)}
    assert facts.max_freq_khz == {0: 1_800_000, 1: 1_800_000, 2: 3_000_000, 3: 3_000_000}
    assert facts.capacity == {0: 512, 1: 512, 2: 1024, 3: 1024}
    assert facts.clusters == ((0, 1), (2, 3))
    assert facts.frequency_fact() == "the host CPUs run at up to 3000000 kHz (1800000 kHz on the slowest)"


def test_a_host_without_the_files_says_why_not_what(tmp_path: Path) -> None:
    root = _fake_sysfs(tmp_path, {0: (1024, 65535, (), ""), 1: (1024, 65535, (), "")})
    (root / "cpu1" / "cpu_capacity").write_text("big\n")
    facts = host_cpu_facts(root)
    assert isinstance(facts.frequencies, Unknown) and "cpu0/cpufreq does not exist" in facts.frequencies.reason
    assert facts.max_freq_khz == facts.frequencies
    assert facts.capacity == Unknown(f"{root}/cpu1/cpu_capacity holds 'big', not numbers")
    assert isinstance(facts.clusters, Unknown) and "cluster_id is 65535" in facts.clusters.reason
    assert str(facts.capacity).startswith("not known here, because ")
    assert facts.as_dict()["capacity"] == {"unknown": facts.capacity.reason}


def test_cluster_ids_group_cpus_when_the_cpu_lists_are_missing(tmp_path: Path) -> None:
    root = _fake_sysfs(tmp_path, {0: (1024, 7, (), ""), 1: (1024, 9, (), ""), 2: (1024, 7, (), "")})
    assert hostcpu.clusters((0, 1, 2), root) == ((0, 2), (1,))


def test_this_host_and_linux_arch_agree() -> None:
    """Whatever this host gives (here: capacity and clusters; no cpufreq inside this VM), the
    LinuxArch methods return the same facts as `host_cpu_facts`, each a fact or an Unknown."""
    facts = host_cpu_facts()
    assert facts.cpus and set(facts.cpus) <= set(range(256))
    assert X8664Arch.get_host_cpu_capacity() == facts.capacity
    assert X8664Arch.get_host_cpu_clusters() == facts.clusters
    assert X8664Arch.get_host_cpu_max_freq_khz() == facts.max_freq_khz
    freqs = X8664Arch.get_host_cpu_frequencies_khz()
    if isinstance(facts.frequencies, Unknown):
        assert freqs == facts.frequencies
    else:
        assert freqs == {c: f.all_khz for c, f in facts.frequencies.items()}
    if not isinstance(facts.clusters, Unknown):
        assert sorted(c for group in facts.clusters for c in group) == list(facts.cpus)


def test_hv_info_shows_the_host_cpu_facts() -> None:
    facts = host_cpu_facts().as_dict()
    out = subprocess.run([sys.executable, "-m", "hv.vmm.cli", "info", "--json"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    shown = json.loads(out)
    assert shown["host_cpus"] == json.loads(json.dumps(facts))
    assert shown["kvm"]["vcpu_tsc_khz"] > 0
    text = subprocess.run([sys.executable, "-m", "hv.vmm.cli", "info"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    line = next(row for row in text.splitlines() if row.startswith("host_cpu_max_freq_khz"))
    max_freq = host_cpu_facts().max_freq_khz
    assert (str(max_freq) in line) if isinstance(max_freq, Unknown) else all(str(v) in line for v in max_freq.values())


def test_the_dry_run_tsc_check_names_the_host_cpus(kvm: Kvm) -> None:
    """A guest whose TSC ran 1% faster than this host's, on a host that cannot scale the TSC:
    the target's answer gives both rates and this host's CPU frequency fact."""
    from migrate.state import MachineConfig
    from migrate.live.admission import host_problems

    here = kvm.vcpu_tsc_khz
    config = MachineConfig(mem_size=16 << 20, vcpus=1, irqchip=True, pit=True, cpuid_digest=0,
                           tsc_khz=here + here // 100)
    problems = host_problems(config, kvm)
    if kvm.capabilities.tsc_control:
        assert problems == []  # KVM scales the guest's TSC to its rate: nothing to refuse
        return
    tsc, = (p for p in problems if "TSC" in p)
    assert f"{config.tsc_khz} kHz" in tsc and f"{here} kHz" in tsc
    assert host_cpu_facts().frequency_fact() in tsc
    assert host_problems(replace(config, tsc_khz=here), kvm) == []
