"""The `hv` and `migrate` commands as a user meets them: exit statuses per kind of failure, error
text printed literally, JSON errors, units, -v/-q anywhere, help, status and cancel of a running
migration from other processes, the plot, and the oracle (`migrate verify`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hv.guests import builtin as builtin_guest
from hv.guests.builtin import GuestParams
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.command import ExitStatus, exit_status, parse_size
from hv.vmm.control import ControlError, call
from hv.vmm.machine import discard
from migrate.errors import IncompatibleError, MigrationFailed, MigrationInDoubt, NotConverging, TransportError
from migrate.commands.exits import EXITS
from migrate.snapshot.snapshots import snapshot
from migrate.transport.listener import Listener

from tests.migrate.processes import run_together

HV = [sys.executable, "-m", "hv.vmm.cli"]
MIGRATE = [sys.executable, "-m", "migrate.cli"]


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _port() -> str:
    listener = Listener("127.0.0.1:0", b"")
    port = listener.address.rsplit(":", 1)[1]
    listener.close()
    return port


class Vmm:
    """A VM-running command (hv run, migrate recv) in its own process, with a control socket."""

    def __init__(self, argv: list[str], api: Path, wait_for_socket: bool = True) -> None:
        self.api = api
        self.early: list[str] = []
        self.proc = subprocess.Popen(argv + ["--api", str(api)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        if wait_for_socket:
            self.wait_for_socket()

    def wait_for_socket(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.api.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.proc.stderr.read()
            time.sleep(0.05)

    def wait_for_line(self, text: str) -> None:
        """Read its log until a line holds `text` (kept for `finish`)."""
        for line in self.proc.stderr:
            self.early.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} in {''.join(self.early)}")

    def finish(self, *, terminate: bool = True) -> tuple[int, str]:
        """The exit status and the log: SIGTERM first if `terminate`, else wait for it to end."""
        if terminate and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=30)
        return status, "".join(self.early) + self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Fatal Python error" not in text, text


# --- exit statuses ---------------------------------------------------------------------------------


USAGE_ERRORS = [
    [*HV, "run", "--bogus"],
    [*HV, "run", "--mem", "1x"],
    [*HV, "run", "--mem", "100000000T"],
    [*HV, "run", "--kernel", "/no/such/kernel"],
    [*MIGRATE, "send", "--api", "/tmp/x.sock", "--to", "127.0.0.1"],
    [*MIGRATE, "send", "--api", "/tmp/x.sock", "--to", "127.0.0.1:99999"],
    [*MIGRATE, "recv", "--listen", "127.0.0.1:99999"],
    [*MIGRATE],
]


@pytest.fixture(scope="module")
def usage_errors() -> dict[tuple[str, ...], subprocess.CompletedProcess]:
    """Each of USAGE_ERRORS run, all at once."""
    return {tuple(argv): done for argv, done in zip(USAGE_ERRORS, run_together(*USAGE_ERRORS), strict=True)}


@pytest.mark.parametrize("argv", USAGE_ERRORS)
def test_usage_errors_exit_2_in_one_line(usage_errors, argv: list[str]) -> None:
    done = usage_errors[tuple(argv)]
    assert done.returncode == ExitStatus.USAGE, done.stderr
    _assert_no_traceback(done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_guest_ram_that_cannot_be_reserved_is_a_clear_refusal() -> None:
    done = run([*HV, "run", "--mem", "100000G", "--timeout", "1"])
    assert done.returncode == ExitStatus.REFUSED, done.stderr
    assert "cannot reserve guest RAM" in done.stderr and "this host has" in done.stderr
    _assert_no_traceback(done.stderr)


def test_an_unreachable_control_socket_exits_4_with_a_json_error(tmp_path: Path) -> None:
    for done in run_together([*HV, "status", str(tmp_path / "none.sock"), "--json"],
                             [*MIGRATE, "status", str(tmp_path / "none.sock"), "--json"],
                             [*MIGRATE, "send", "--api", str(tmp_path / "none.sock"), "--to", "127.0.0.1:1",
                              "--json"]):
        assert done.returncode == ExitStatus.TRANSPORT, done.stderr
        error = json.loads(done.stdout)["error"]
        assert error["type"] == "ConnectionError" and error["exit_status"] == 4 and error["meaning"] == "transport"
        _assert_no_traceback(done.stderr)


def test_a_usage_error_with_json_is_a_json_object() -> None:
    done = run([*MIGRATE, "send", "--api", "x.sock", "--to", "127.0.0.1:99999", "--json"])
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["type"] == "UsageError"


def test_a_guest_error_exits_1(tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    # the built-in guest's CPU 1 writes to the disk and reads it back: read-only, it fails
    done = run([*HV, "run", "--mem", "64", "--ws", "4", "--cpus", "2", "--disk", f"{disk},ro", "--timeout", "30"])
    assert done.returncode == ExitStatus.FAILED, done.stderr
    assert "kvmig: error blk status" in done.stdout and "stopped (the guest failed)" in done.stderr


def test_a_kernel_that_exits_with_a_code_other_than_0_exits_1_and_says_the_code(tmp_path: Path) -> None:
    from tinyguest import exit_with, multiboot_elf

    kernels = {}
    for code in (0, 3, 255):
        kernels[code] = tmp_path / f"exit-{code}.elf"
        kernels[code].write_bytes(multiboot_elf(exit_with(code)))
    done = dict(zip(kernels, run_together(*([*HV, "run", "--kernel", str(k), "--timeout", "30"]
                                            for k in kernels.values())), strict=True))
    assert done[0].returncode == ExitStatus.OK, done[0].stderr
    assert "stopped (the guest exited with code 0)" in done[0].stderr
    for code in (3, 255):
        assert done[code].returncode == ExitStatus.FAILED, done[code].stderr
        assert f"stopped (the guest exited with code {code})" in done[code].stderr
        _assert_no_traceback(done[code].stderr)


def test_the_table_maps_each_kind_of_error_to_its_status() -> None:
    assert exit_status(MigrationInDoubt("link lost after Commit", "paused here"), EXITS) is ExitStatus.IN_DOUBT
    assert exit_status(MigrationFailed("target failed", "here"), EXITS) is ExitStatus.MIGRATION_FAILED
    assert exit_status(NotConverging(3, 1.0, 10, 50.0, 100.0, 30.0), EXITS) is ExitStatus.MIGRATION_FAILED
    assert exit_status(TransportError("reset"), EXITS) is ExitStatus.TRANSPORT
    # a control socket reports errors by class name: the same status as the class would have here
    assert exit_status(ControlError("MigrationInDoubt", "..."), EXITS) is ExitStatus.IN_DOUBT
    assert exit_status(ControlError("ChecksumError", "..."), EXITS) is ExitStatus.REFUSED
    assert exit_status(ControlError("Busy", "..."), EXITS) is ExitStatus.REFUSED
    assert exit_status(ControlError("ConnectionError", "..."), EXITS) is ExitStatus.TRANSPORT
    assert exit_status(RuntimeError("a fault of ours"), EXITS) is ExitStatus.FAILED
    assert len({s.value for s in ExitStatus}) == 8  # 7: completed past the downtime target (an outcome, not an error)


# --- error text, units, verbosity, help --------------------------------------------------------------


def test_error_text_prints_literally() -> None:
    done = run([*HV, "run", "--disk", "root:x:0[/]/[red]x"])
    assert done.returncode == ExitStatus.USAGE
    assert "root:x:0[/]/[red]x" in done.stderr  # no emoji, no markup, no MarkupError
    _assert_no_traceback(done.stderr)


@pytest.mark.parametrize("text, size", [("64", 64 << 20), ("64M", 64 << 20), ("1G", 1 << 30), ("4096K", 4 << 20),
                                        ("2GiB", 2 << 30), ("1t", 1 << 40)])
def test_sizes_are_mib_by_default_as_qemus_m(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_mem_without_a_unit_is_mib_on_the_command_line() -> None:
    done = run([*HV, "run", "--mem", "48", "--ws", "4", "--idle", "--timeout", "0.5"])
    assert done.returncode == 0, done.stderr
    assert "(48 MiB, 1 vCPU)" in done.stderr


def test_verbosity_options_go_anywhere_and_mean_something() -> None:
    vm = [*HV, "run", "--mem", "32", "--ws", "4", "--idle", "--timeout", "0.3"]
    quiet, before, verbose, plain = run_together([*vm, "-q"], [*HV, "-q", *vm[len(HV):]], [*vm, "-v"], vm)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert before.returncode == 0 and before.stderr == "", before.stderr
    assert verbose.returncode == 0 and "INFO hv.vmm.cli: running: 1 vCPU, 32 MiB" in verbose.stderr
    assert "INFO" not in plain.stderr and "hv: stopped" in plain.stderr


def _printed(main, argv: list[str]) -> str:
    """What `--help` or `--version` prints, the command run in this process: argparse prints it
    and exits 0, as the command does (the parsers, not a VM: no process of its own needed)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as ended:
        main(argv)
    assert ended.value.code in (0, None), argv
    return out.getvalue()


def test_help_reads_like_a_man_page(monkeypatch) -> None:
    import hv.vmm.cli
    import migrate.cli

    monkeypatch.setenv("COLUMNS", "80")  # as on a pipe, whatever terminal runs the tests
    hv_main, migrate_main = hv.vmm.cli.main, migrate.cli.main
    for main in (hv_main, migrate_main):
        assert "(kvmigrate) " in _printed(main, ["--version"])
    for main, argv in ((hv_main, ["run"]), (hv_main, ["status"]), (migrate_main, ["send"]),
                       (migrate_main, ["recv"]), (migrate_main, ["status"]), (migrate_main, ["verify"]),
                       (migrate_main, ["plot"]), (migrate_main, ["snapshot"])):
        text = _printed(main, [*argv, "--help"])
        assert "examples:" in text and "exit status:" in text and "6  in doubt" in text, text
    send = _printed(migrate_main, ["send", "--help"])
    assert "(default: 300" in send and "MiB/s" in send
    run_help = _printed(hv_main, ["run", "--help"])
    assert "(default: 256M)" in run_help and "(default: 64)" in run_help


# --- status and cancel from other processes, the migration outliving its client, the plot -----------


def test_status_and_cancel_from_other_processes_while_a_migration_runs(tmp_path: Path) -> None:
    port = _port()
    target = Vmm([*MIGRATE, "recv", "--listen", f"127.0.0.1:{port}"], tmp_path / "target.sock", wait_for_socket=False)
    source = Vmm([*HV, "run", "--mem", "128", "--ws", "48", "--rate", "0"], tmp_path / "source.sock")
    try:
        assert json.loads(run([*MIGRATE, "status", str(source.api), "--json"]).stdout)["phase"] == "none"
        target.wait_for_line("listening on")
        # held to 20 MiB/s (paced from the start, whatever the host's speed): round 0's 48 MiB of
        # working set take seconds, long enough to watch and to time
        sender = subprocess.Popen([*MIGRATE, "send", "--api", str(source.api), "--to", f"127.0.0.1:{port}",
                                   "--bandwidth", "20", "--max-seconds", "600"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60  # watched through the socket `migrate status` reads, then by it
        while not (live := call(source.api, "migrate-status")).get("round_pages_total") or \
                live["round_pages_done"] < live["round_pages_total"] // 4:  # a quarter in: the rate is known
            assert time.monotonic() < deadline, live
            time.sleep(0.05)  # polling interval; the verdicts below do not rest on it
        asked_at = time.monotonic()
        live = call(source.api, "migrate-status")  # what `migrate status --json` prints (checked below)
        assert live["phase"] == "precopy" and live["round"] == 0, live
        for key in ("round_pages_total", "pages_done", "bytes_done", "remaining_pages", "remaining_bytes",
                    "dirty_rate_mib_s", "bandwidth_mib_s", "throttle", "eta_seconds", "elapsed_seconds"):
            assert key in live, key
        assert live["remaining_pages"] == live["round_pages_total"] - live["round_pages_done"] > 0
        # The ETA is right: in round 0 (no dirty rate known yet) it is the rest of the round at the
        # round's rate, which the pacing fixes; measured against when round 1 really began, within
        # 30% plus 0.5 s (the status is at most 50 ms old; the polling below adds 50 ms).
        while call(source.api, "migrate-status")["round"] == 0:
            assert time.monotonic() < deadline, "round 0 never ended"
            time.sleep(0.05)
        real = time.monotonic() - asked_at
        assert live["eta_seconds"] == pytest.approx(real, rel=0.3, abs=0.5), (json.dumps(live), real)
        sender.kill()  # the client goes: the migration does not
        sender.wait()
        live = call(source.api, "migrate-status")
        deadline = time.monotonic() + 60
        while (later := call(source.api, "migrate-status"))["pages_done"] <= live["pages_done"]:
            assert later["phase"] == "precopy" and time.monotonic() < deadline, later  # on without its client
            time.sleep(0.05)
        assert later["phase"] == "precopy", later
        shown = run([*MIGRATE, "status", str(source.api), "--json"])
        assert shown.returncode == 0 and json.loads(shown.stdout)["phase"] == "precopy", (shown.stdout, shown.stderr)
        text = run([*MIGRATE, "status", str(source.api)]).stdout
        assert text.startswith("round ") and "ETA" in text and "MiB/s" in text and "precopy" in text
        cancelled = run([*MIGRATE, "cancel", str(source.api)])
        assert cancelled.returncode == 0, cancelled.stderr
        after, again, vm = run_together([*MIGRATE, "status", str(source.api), "--json"],  # each only reads
                                        [*MIGRATE, "cancel", str(source.api), "--json"],
                                        [*HV, "status", str(source.api), "--json"])
        assert json.loads(after.stdout)["phase"] == "cancelled"
        assert again.returncode == ExitStatus.REFUSED
        assert json.loads(again.stdout)["error"]["type"] == "NotMigrating"
        vm = json.loads(vm.stdout)
        assert vm["state"] == "running" and vm["throttle"] == 0
        assert call(source.api, "guest-check")["ok"]
        for verb, state in (("pause", "paused"), ("resume", "running")):
            done = run([*HV, verb, str(source.api), "--json"])
            assert done.returncode == 0 and json.loads(done.stdout)["state"] == state
        assert run([*HV, "stop", str(source.api)]).returncode == 0
        status, log = source.finish(terminate=False)
        assert status == 0, log
        _assert_no_traceback(log)
        assert "stopped through the control socket" in log
    finally:
        source.kill()
        target.kill()


def test_send_plot_draws_the_rounds_and_migrate_plot_redraws_them(tmp_path: Path) -> None:
    port = _port()
    target = Vmm([*MIGRATE, "recv", "--listen", f"127.0.0.1:{port}"], tmp_path / "target.sock", wait_for_socket=False)
    source = Vmm([*HV, "run", "--mem", "64", "--ws", "16", "--rate", "40"], tmp_path / "source.sock")
    try:
        target.wait_for_line("listening on")
        png = tmp_path / "rounds.png"
        sent = run([*MIGRATE, "send", "--api", str(source.api), "--to", f"127.0.0.1:{port}", "--json",
                    "--plot", str(png)], timeout=120)
        assert sent.returncode == 0, sent.stderr
        stats = json.loads(sent.stdout)
        assert stats["outcome"] == "completed" and stats["failure"] == ""
        (tmp_path / "stats.json").write_text(sent.stdout)
        (tmp_path / "bad.json").write_text("[]")
        drawn, bad = run_together([*MIGRATE, "plot", str(tmp_path / "stats.json")],
                                  [*MIGRATE, "plot", str(tmp_path / "bad.json")])
        assert drawn.returncode == 0, drawn.stderr
        for picture in (png, tmp_path / "stats.png"):
            data = picture.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        assert bad.returncode == ExitStatus.USAGE
        target.wait_for_socket()
        assert run([*HV, "stop", str(target.api)]).returncode == 0
        assert target.finish(terminate=False)[0] == 0
    finally:
        source.kill()
        target.kill()


def _dry_run(source_api: Path, port: str) -> dict:
    refused = run([*MIGRATE, "send", "--api", str(source_api), "--to", f"127.0.0.1:{port}", "--dry-run", "--json"])
    assert refused.returncode == ExitStatus.REFUSED, refused.stderr
    stats = json.loads(refused.stdout)
    assert stats["outcome"] == "rejected" and stats["failure"] == "rejected", stats
    return stats


def _a_host_without_sse2_and_with_another_tsc() -> Kvm:
    """This host's KVM, as the target sees it, told it lacks SSE2 (leaf 1, edx bit 26: a feature
    every x86-64 guest has) and runs its TSC 1% off the guest's, with no TSC scaling: the facts the
    target checks, changed on this object only (the guest and the link are real)."""
    import dataclasses

    kvm = Kvm()
    cpuid, tsc_khz = kvm.guest_cpuid, kvm.vcpu_tsc_khz
    without = tuple(dataclasses.replace(e, edx=e.edx & ~(1 << 26)) if (e.function, e.index) == (1, 0) else e
                    for e in cpuid)
    kvm.__dict__["_probed_vcpu"] = (without, tsc_khz + tsc_khz // 100)
    kvm.capabilities = dataclasses.replace(kvm.capabilities, tsc_control=False)
    return kvm


def test_a_dry_run_checks_the_disk_memory_cpu_and_tsc_the_target_needs(tmp_path: Path) -> None:
    """Each problem a dry run finds, through `migrate send --dry-run`: a disk the target cannot
    open, more RAM than `recv --mem` offers, a CPU feature the target lacks and a TSC rate it
    cannot give; the source runs on after each."""
    import threading

    from migrate import ReceiveOptions, listen_and_receive

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    source = Vmm([*HV, "run", "--mem", "64", "--ws", "8", "--rate", "20", "--disk", str(disk)],
                 tmp_path / "source.sock")
    disk_port, mem_port = _port(), _port()
    no_disk = Vmm([*MIGRATE, "recv", "--listen", f"127.0.0.1:{disk_port}", "--disk", str(tmp_path / "missing.img")],
                  tmp_path / "t1.sock", wait_for_socket=False)
    small = Vmm([*MIGRATE, "recv", "--listen", f"127.0.0.1:{mem_port}", "--mem", "32M", "--disk", str(disk)],
                tmp_path / "t2.sock", wait_for_socket=False)
    listener, kvm = Listener("127.0.0.1:0", b""), _a_host_without_sse2_and_with_another_tsc()
    thread = threading.Thread(target=lambda: pytest.raises(IncompatibleError, listen_and_receive, listener, kvm,
                                                           ReceiveOptions(disk=str(disk)), accept_timeout=120),
                              daemon=True)
    try:
        no_disk.wait_for_line("listening on")
        problems = _dry_run(source.api, disk_port)["problems"]
        assert any("missing.img" in p and "No such file" in p for p in problems), problems
        small.wait_for_line("listening on")
        problems = _dry_run(source.api, mem_port)["problems"]
        assert any("64 MiB of RAM" in p and "at most 32 MiB" in p for p in problems), problems
        thread.start()
        problems = _dry_run(source.api, listener.address.rsplit(":", 1)[1])["problems"]
        assert any("leaf 0x1.0 edx" in p and f"{1 << 26:#x}" in p for p in problems), problems
        assert any("TSC" in p and "no KVM_CAP_TSC_CONTROL" in p for p in problems), problems
        assert len(problems) == 2, problems  # nothing else differs: the disk is there, the RAM fits
        thread.join(30)
        assert json.loads(run([*HV, "status", str(source.api), "--json"]).stdout)["state"] == "running"
    finally:
        listener.close()
        kvm.close()
        source.kill()
        no_disk.kill()
        small.kill()


# --- the oracle --------------------------------------------------------------------------------------


def test_verify_checks_digest_and_the_guests_rule(kvm: Kvm, tmp_path: Path) -> None:
    machine = builtin_machine(kvm, GuestParams(ws_mib=4, rate_mib_s=20), VmConfig(mem_size=32 << 20))
    try:
        machine.start()
        deadline = time.monotonic() + 30
        while not builtin_guest.read_status(machine.vm.memory).valid:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        good = tmp_path / "good.snap"
        snapshot(machine, good)
        machine.pause()
        ws = machine.vm.memory.view(builtin_guest.WS_ADDR, 4 << 20)
        ws[5 * 4096 + 100] ^= 0xFF  # the fill of page 5: the memory digest holds, the guest's rule does not
        bad = tmp_path / "bad.snap"
        snapshot(machine, bad)
    finally:
        discard(machine)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "corrupt.snap").write_bytes(data)
    ok, wrong, corrupt, none = run_together(
        [*MIGRATE, "verify", str(good), "--json"], [*MIGRATE, "verify", str(bad), "--json"],
        [*MIGRATE, "verify", str(tmp_path / "corrupt.snap"), "--json"], [*MIGRATE, "verify", str(tmp_path / "none")])
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["ok"] and result["digest"].startswith("verified") and result["guest"]["applies"]
    result = json.loads(wrong.stdout)
    assert wrong.returncode == ExitStatus.FAILED and not result["ok"] and result["guest"]["bad_fill"] == [5]
    assert corrupt.returncode == ExitStatus.REFUSED and json.loads(corrupt.stdout)["digest"] == "refused"
    assert none.returncode == ExitStatus.USAGE


def test_verify_a_running_vm_through_its_socket(tmp_path: Path) -> None:
    vm = Vmm([*HV, "run", "--mem", "32", "--ws", "4", "--rate", "20"], tmp_path / "vm.sock")
    try:
        deadline = time.monotonic() + 30
        while not (result := json.loads(run([*MIGRATE, "verify", str(vm.api), "--json"]).stdout))["guest"]["applies"]:
            assert time.monotonic() < deadline, result  # the guest is still filling its working set
            time.sleep(0.2)
        assert result["ok"] and result["guest"]["applies"] and result["memory_digest"].startswith("0x")
        assert json.loads(run([*HV, "status", str(vm.api), "--json"]).stdout)["state"] == "running"
    finally:
        vm.kill()
