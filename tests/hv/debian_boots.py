"""Debian's stock kernel booted twice, in the background, while the rest of the suite runs.

Each boot of Debian's kernel here is ~60 s of emulated ring 0 to the emulator's stop, nearly all
of it fixed work (clearing the kernel's BSS a byte at a time, sorting the jump labels, the ORC
unwinder's lookup table), little of it the guest's RAM. Two boots: `hv run` by PVH to the
emulator's stop, which every PVH test reads, and the 64-bit protocol (this module run as a
script), stopped at the last line its tests read. They are started as the session's tests are
collected (`tests/conftest.py`), at a lower priority than the tests, and the tests that read
them run last: the minute of CPU they cost comes out of the suite's idle moments (tests that
wait on a guest, a socket, a process) instead of being a minute of its own. The bound only ends
a boot that has gone wrong, and is wide because a loaded host is several times slower.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]  # (run as a script, too)
from linux import initramfs  # noqa: E402
from linux.debian import debian_kernel  # noqa: E402

from hv.boot import linux  # noqa: E402
from hv.kvm.kvm import Kvm  # noqa: E402
from hv.kvm.memory import GuestMemory  # noqa: E402
from hv.kvm.units import MiB  # noqa: E402
from hv.kvm.vm import VmConfig  # noqa: E402
from hv.platform import acpi  # noqa: E402
from hv.vmm.builder import VirtioConfig, linux_machine  # noqa: E402

BOOT_TIMEOUT = 480
NICE = 10  # below the tests: the boots take what the tests leave
MEM = 128 * MiB
CMDLINE = "console=ttyS0 earlyprintk=serial,ttyS0,115200 kvmigrate.test=1"
E820_LINES = [
    "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
    "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
    f"BIOS-e820: [mem 0x0000000000100000-{MEM - 1:#018x}] usable",
]
# setup_arch prints the ACPI tables, the MP table and the MADT's entries, then (prefill_possible_map)
# this: the last line the 64-bit tests read
LAST_64BIT_LINE = b"smpboot: Allowing"


@dataclass(frozen=True)
class DebianBoot:
    """What one boot of Debian's kernel showed: 2 vCPUs, virtio-console and virtio-rng, our ACPI/MP
    tables. By PVH it is `hv run`'s boot: its exit status and status lines too."""

    protocol: str
    text: str  # the kernel's console
    acpi_lines: list[str]  # the table lines the kernel should print, read back from guest RAM
    initrd_range: tuple[int, int] | None
    seconds: float
    returncode: int | None = None  # hv run's
    status: str = ""  # hv run's stderr


class _Console:
    """The kernel's console bytes; `seen` is set once a whole line holding `marker` has come."""

    def __init__(self, marker: bytes) -> None:
        self.out, self.marker, self.seen = bytearray(), marker, threading.Event()

    def __call__(self, data: bytes) -> None:
        self.out.extend(data)
        at = self.out.find(self.marker)
        if at >= 0 and self.out.find(b"\n", at) >= 0:
            self.seen.set()


def debian_machine(kvm: Kvm, kernel: Path, initrd: Path | None, console=lambda b: None, prefer_pvh: bool = True):
    """The machine `hv run --kernel K --initrd I --mem MEM --cpus 2 --virtio-console --rng` builds."""
    return linux_machine(kvm, kernel, CMDLINE, initrd, config=VmConfig(mem_size=MEM, vcpus=2), console=console,
                         prefer_pvh=prefer_pvh, virtio=VirtioConfig(console_out=lambda b: None, rng=True))


def acpi_table_lines(mem: GuestMemory, rsdp: int) -> list[str]:
    """The lines ACPICA's acpi_tb_print_table_header prints for our tables, read back from guest
    RAM: RSDP, XSDT, then each table the XSDT lists (FACP, APIC) and the FADT's DSDT."""
    lines = [f"ACPI: RSDP 0x{rsdp:016X} 000024 (v02 KVMIG )"]
    xsdt = mem.read_u64(rsdp + 24)
    count = (mem.read_u32(xsdt + 4) - 36) // 8
    fadt = next(a for a in (mem.read_u64(xsdt + 36 + 8 * i) for i in range(count)) if mem.read(a, 4) == b"FACP")
    dsdt = mem.read_u64(fadt + 140)
    for address in (xsdt, *(mem.read_u64(xsdt + 36 + 8 * i) for i in range(count)), dsdt):
        signature, length, revision = mem.read(address, 4).decode(), mem.read_u32(address + 4), mem.read(address + 8, 1)[0]
        lines.append(f"ACPI: {signature} 0x{address:016X} {length:06X} (v{revision:02d} KVMIG  KVMIG{signature[:3]} "
                     f"00000001 KVMG 00000001)")
    return lines


def boot_64bit(kvm: Kvm, vmlinux: Path) -> DebianBoot:
    """By the 64-bit protocol, until setup_arch's last line the tests read."""
    console = _Console(LAST_64BIT_LINE)
    machine, booted = debian_machine(kvm, vmlinux, None, console, prefer_pvh=False)
    try:
        t0 = time.monotonic()
        machine.start()
        threading.Thread(target=lambda: (machine.wait(), console.seen.set()), daemon=True).start()
        if not console.seen.wait(BOOT_TIMEOUT):
            raise TimeoutError("timed out waiting for setup_arch on the early console")
        return DebianBoot(booted.protocol, console.out.decode(errors="replace"),
                          acpi_table_lines(machine.vm.memory, acpi.ACPI_TABLES_START), None,
                          time.monotonic() - t0)
    finally:
        machine.stop()
        machine.vm.close()


def _nicer() -> None:
    os.nice(NICE)


class BackgroundBoots:
    """Both boots, started now, each its own process; `results` waits for them."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="debian-boots-"))
        self.initrd = self.dir / "initramfs.cpio.gz"
        self.initrd.write_bytes(initramfs.build())
        vmlinux = self.dir / "vmlinux"
        vmlinux.write_bytes(linux.decompress_payload(linux.parse_bzimage(debian_kernel().read_bytes()).payload))
        self._files = {name: open(self.dir / name, "w+") for name in ("pvh.out", "pvh.err", "64.err")}
        self.t0 = time.monotonic()
        self.pvh = subprocess.Popen(
            [sys.executable, "-m", "hv.vmm.cli", "run", "--kernel", str(debian_kernel()), "--initrd", str(self.initrd),
             "--mem", f"{MEM >> 20}M", "--cpus", "2", "--virtio-console", "--rng", "--cmdline", CMDLINE,
             "--timeout", str(BOOT_TIMEOUT)],
            stdout=self._files["pvh.out"], stderr=self._files["pvh.err"], stdin=subprocess.DEVNULL, text=True,
            cwd=ROOT, preexec_fn=_nicer)
        self.by_64bit = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), str(vmlinux), str(self.dir / "64.json")],
            stdout=subprocess.DEVNULL, stderr=self._files["64.err"], stdin=subprocess.DEVNULL, cwd=ROOT,
            preexec_fn=_nicer)
        self._results: dict[str, DebianBoot] | None = None

    def results(self, kvm: Kvm) -> dict[str, DebianBoot]:
        """{"pvh": ..., "64-bit": ...}, once both have ended."""
        if self._results is None:
            returncode = self.pvh.wait(timeout=BOOT_TIMEOUT + 60)
            seconds = time.monotonic() - self.t0
            status_64 = self.by_64bit.wait(timeout=BOOT_TIMEOUT + 60)
            err_64 = self._read("64.err")
            assert status_64 == 0, f"the 64-bit boot failed ({status_64}): {err_64[-3000:]}"
            boot_64 = DebianBoot(**json.loads((self.dir / "64.json").read_text()))
            text, status = self._read("pvh.out"), self._read("pvh.err")
            # what hv run's machine held, read from its twin built the same way (never run): the
            # tables and the initrd's place are fixed when the machine is built
            twin, booted = debian_machine(kvm, debian_kernel(), self.initrd)
            try:
                acpi_lines = acpi_table_lines(twin.vm.memory, acpi.ACPI_TABLES_START)
            finally:
                twin.vm.close()
            protocol = re.search(r"Linux by the (\S+) entry", status)
            pvh = DebianBoot(protocol.group(1) if protocol else f"none: {status[-2000:]}", text, acpi_lines,
                             booted.initrd_range, seconds, returncode, status)
            self._results = {"pvh": pvh, "64-bit": boot_64}
        return self._results

    def _read(self, name: str) -> str:
        f = self._files[name]
        f.flush()
        f.seek(0)
        return f.read()

    def close(self) -> None:
        for proc in (self.pvh, self.by_64bit):
            proc.kill()
            proc.wait()
        for f in self._files.values():
            f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


BACKGROUND_BOOTS = pytest.StashKey[BackgroundBoots]()  # the session's, in config.stash


if __name__ == "__main__":  # the 64-bit boot, in a process of its own: vmlinux, then where its JSON goes
    with Kvm() as kvm_:
        result = boot_64bit(kvm_, Path(sys.argv[1]))
    Path(sys.argv[2]).write_text(json.dumps(asdict(result)))
