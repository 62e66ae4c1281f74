"""What this host can take: the checks a target makes of HELLO's guest before any page moves (a
dry run answers with them too): the stream format's version, the RAM it can reserve, the guest's
TSC rate, how many vCPUs it takes. (The layout, the CPUID and the disk are checked by `Target`,
the disk by the disk policy: `migrate.disks`.)"""

from __future__ import annotations

import os

import formats
from hv.errors import RamReservationError
from hv.kvm.kvm import Kvm
from hv.kvm.memory import anonymous_ram
from hv.platform.hostcpu import host_cpu_facts
from migrate.state import MachineConfig


def host_reservable_memory() -> int:
    """The memory this host can give a guest now (MemAvailable: what the kernel says it can
    hand out without swapping); the default most guest RAM a target takes."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


TSC_TOLERANCE = 250e-6  # a rate within 250 ppm is the same clock (QEMU's tsc-frequency tolerance)


def host_problems(config: MachineConfig, kvm: Kvm) -> list[str]:
    """What this host lacks to run the guest CONFIG describes, checked before any page moves
    (a dry run answers with these too): guest RAM it can reserve, the guest's TSC rate. (The
    disk is the disk policy's: `migrate.disks`.)"""
    problems = []  # (more RAM than the target offers at all is `Target.problems`' `max_mem`)
    try:
        anonymous_ram(config.mem_size, huge_pages=False).close()  # reserved, never touched
    except RamReservationError as e:
        problems.append(str(e))
    if config.tsc_khz and not kvm.capabilities.tsc_control:
        here = kvm.vcpu_tsc_khz
        if here and abs(here - config.tsc_khz) > config.tsc_khz * TSC_TOLERANCE:
            cpus = host_cpu_facts().frequency_fact()  # what the operator weighs next: this host's CPUs
            problems.append(f"the guest's TSC runs at {config.tsc_khz} kHz, this host's at {here} kHz ({cpus}), "
                            "and its KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL)")
    return problems


def format_version_problem(version: object) -> str:
    """Why a HELLO's `format_version` ("major.minor" of the stream format) is not one this side
    reads; "" if it is. (The stream's own header says it again, and is checked as it is read.)"""
    major, dot, minor = str(version).partition(".")
    if not all(part.isascii() and part.isdigit() and len(part) < 6 for part in (major, minor)) or not dot:
        return f"format version {str(version)[:40]!r} is not MAJOR.MINOR"
    if int(major) not in formats.SUPPORTED_MAJORS:
        return (f"format version {int(major)}.{int(minor)}: this side reads "
                f"{', '.join(f'{m}.x' for m in formats.SUPPORTED_MAJORS)}")
    return ""


OVERCOMMIT = 4  # a target takes at most this many vCPUs per host CPU unless told otherwise


def default_max_vcpus(kvm: Kvm) -> int:
    """The most vCPUs (threads) a stream may make this target create unless `--max-vcpus` says:
    `OVERCOMMIT` per host CPU (KVM's recommended count, or the CPUs online), never past KVM's
    own limit (which `VmConfig.validate` also checks)."""
    caps = kvm.capabilities
    return min(caps.max_vcpus, OVERCOMMIT * max(caps.recommended_vcpus, os.cpu_count() or 1))
