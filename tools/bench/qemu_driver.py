"""QEMU for the benchmarks: one `qemu-system-x86_64` running kvmigrate's built-in guest, driven
over QMP (a minimal client), with the errors a run can end in. tools/bench/bench_qemu.py and
bench_blackout.py measure with it; it measures nothing itself.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.units import MiB
from hv.kvm.vm import VmConfig

QEMU = "qemu-system-x86_64"


@dataclass(frozen=True)
class Workload:
    mem_mib: int
    ws_mib: int
    rate_mib_s: int  # 0: as fast as the guest can

    def cmdline(self, tsc_khz: int) -> str:
        return bg.GuestParams(ws_mib=self.ws_mib, rate_mib_s=self.rate_mib_s, every=1, tsc_khz=tsc_khz,
                              fill="random").cmdline()


# --- errors -------------------------------------------------------------------------------------


class BenchError(Exception):
    """Root of this tool's errors."""


class QmpError(BenchError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QMP {command}: {error_class}: {desc}")
        self.command, self.error_class, self.desc = command, error_class, desc


class QmpClosedError(BenchError):
    """The QMP socket closed (QEMU exited) while a reply was awaited."""

    def __init__(self, command: str) -> None:
        super().__init__(f"QMP {command}: connection closed")
        self.command = command


class QemuExitedError(BenchError):
    def __init__(self, role: str, returncode: int, stderr: str) -> None:
        super().__init__(f"{role} QEMU exited with {returncode}: {stderr.strip()[-2000:]}")
        self.role, self.returncode, self.stderr = role, returncode, stderr


class GuestFailedError(BenchError):
    def __init__(self, role: str, event: bg.GuestEvent) -> None:
        super().__init__(f"guest on {role} QEMU failed: {event}")
        self.role, self.event = role, event


class WaitTimeoutError(BenchError):
    def __init__(self, what: str, seconds: float) -> None:
        super().__init__(f"timed out after {seconds:.0f} s waiting for {what}")
        self.what, self.seconds = what, seconds


# --- QMP ----------------------------------------------------------------------------------------


class Qmp:
    """A minimal QMP client: one JSON object per line; events are kept, not interpreted."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise
        self.reader = self.sock.makefile("rb")
        self.events: list[dict] = []
        self.greeting = self._read("greeting")
        self.execute("qmp_capabilities")

    def _read(self, command: str) -> dict:
        line = self.reader.readline()
        if not line:
            raise QmpClosedError(command)
        return json.loads(line)

    def execute(self, command: str, **arguments) -> dict | list:
        message = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        while True:
            reply = self._read(command)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                raise QmpError(command, reply["error"].get("class", "?"), reply["error"].get("desc", ""))
            elif "return" in reply:
                return reply["return"]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


# --- one QEMU process ---------------------------------------------------------------------------


class Qemu:
    """A QEMU running the built-in guest, its serial output in a file, QMP on a unix socket.

    Always used as a context manager: the process is killed (SIGKILL) on exit, whatever happened.
    """

    def __init__(self, role: str, workdir: Path, image: Path, workload: Workload, tsc_khz: int,
                 incoming: str | None = None) -> None:
        self.role = role
        self.serial = workdir / f"{role}.serial"
        self.qmp_path = workdir / f"{role}.qmp"
        self.stderr_path = workdir / f"{role}.stderr"
        args = [QEMU, "-enable-kvm", "-cpu", "max,-arch-capabilities", "-m", f"{workload.mem_mib}M",
                "-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults",
                "-serial", f"file:{self.serial}",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4",  # a failing guest ends QEMU
                "-kernel", str(image), "-append", workload.cmdline(tsc_khz),
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        if incoming is not None:
            args += ["-incoming", incoming]
        self.args = args
        self.proc: subprocess.Popen | None = None
        self.qmp: Qmp | None = None
        self.started = 0.0

    def __enter__(self) -> Qemu:
        self.started = time.perf_counter()
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=err)
        return self

    def __exit__(self, *exc) -> None:
        if self.qmp is not None:
            self.qmp.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise QemuExitedError(self.role, self.proc.returncode, self.stderr_path.read_text(errors="replace"))

    def connect(self, timeout: float = 30.0) -> Qmp:
        """Connects QMP, retrying while QEMU has not created its socket yet."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                self.qmp = Qmp(self.qmp_path)
                return self.qmp
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise WaitTimeoutError(f"{self.role} QMP socket", timeout) from None
                time.sleep(0.005)

    def guest_events(self) -> list[bg.GuestEvent]:
        try:
            text = self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return []
        events = [bg.parse_line(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
        return [e for e in events if e is not None]

    def passes(self) -> list[bg.Pass]:
        """Pass lines printed so far; raises if the guest reported an error or a fault."""
        passes = []
        for event in self.guest_events():
            match event:
                case bg.Pass():
                    passes.append(event)
                case bg.GuestError() | bg.Fault():
                    raise GuestFailedError(self.role, event)
        return passes

    def wait_pass(self, number: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(p.number >= number for p in self.passes()):
            self.check_alive()
            if time.monotonic() > deadline:
                raise WaitTimeoutError(f"`kvmig: pass {number}` from the {self.role} guest", timeout)
            time.sleep(0.02)

    def check_memory(self) -> bg.WorkingSetCheck:
        """Stops the guest and checks its working set bit for bit (status page and pages via pmemsave)."""
        self.qmp.execute("stop")
        status_file, ws_file = self.serial.with_suffix(".status"), self.serial.with_suffix(".ws")
        self.qmp.execute("pmemsave", val=bg.STATUS_ADDR, size=bg.PAGE_SIZE, filename=str(status_file))
        status = bg.GuestStatus.from_bytes(status_file.read_bytes())
        if not status.valid:
            raise GuestFailedError(self.role, bg.GuestError("status page not valid after restore"))
        self.qmp.execute("pmemsave", val=bg.WS_ADDR, size=status.ws_pages * bg.PAGE_SIZE, filename=str(ws_file))
        try:
            return bg.check_working_set(ws_file.read_bytes(), status.passes, status.fill_random)
        finally:
            ws_file.unlink()

    def wait_status(self, wanted: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            status = self.qmp.execute("query-status")["status"]
            if status in wanted:
                return status
            self.check_alive()
            if time.monotonic() > deadline:
                raise WaitTimeoutError(f"{self.role} status in {sorted(wanted)} (is {status})", timeout)
            time.sleep(0.002)


# --- helpers ------------------------------------------------------------------------------------


def host_tsc_khz() -> int:
    """The vCPU TSC rate KVM gives guests: what the guest needs to pace itself."""
    with Kvm() as kvm, kvm.create_vm(VmConfig(mem_size=1 * MiB)) as vm:
        return vm.create_vcpu(0).fd.get_tsc_khz()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_migration(qmp: Qmp, timeout: float) -> tuple[dict, float]:
    """Polls query-migrate until a final status; returns it and the wall time from now."""
    t0 = time.perf_counter()
    while True:
        info = qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info, time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            return info, time.perf_counter() - t0
        time.sleep(0.005)
