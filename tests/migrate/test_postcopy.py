"""Post-copy live migration of the built-in guest on real KVM (userfaultfd): between processes
through the CLI at the guest's full dirty rate on 2 vCPUs, against a stranger on the fetch
channel, with the link cut at several points (reconnected, or resumed by hand) and with the source
killed after the switch. (With busy virtio devices: tests/migrate/test_busy_devices.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hv.guests import builtin as bg
from hv.kvm.dirty import DirtyBitmap
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.control import ControlError, call
from hv.vmm.machine import RunState
from migrate import MigrationOptions, ReceiveOptions, listen_and_receive, send
from migrate.errors import MigrationFailed, PostcopyFailed, ProtocolViolation
from migrate.events import PagesProgress, ProgressEvent
from migrate.live.postcopy.missing import decode_missing, encode_missing
from migrate.protocol import Channel
from migrate.transport.connection import connect
from migrate.transport.listener import Listener

from tests.console_log import console_log
from tests.migrate.running_source import a_pass_per_round

MiB = 1 << 20


def _free_port() -> str:
    listener = Listener("127.0.0.1:0", b"")
    port = listener.address.rsplit(":", 1)[1]
    listener.close()
    return port


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)


def _wait_passes(api: Path, passes: int, timeout: float = 30) -> None:
    """Until the guest behind `api` has made `passes` passes (its status page is not valid
    before its first fill: guest-check says so)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if call(api, "guest-check")["passes"] >= passes:
                return
        except ControlError:
            pass
        assert time.monotonic() < deadline, f"{api}: fewer than {passes} passes in {timeout} s"
        time.sleep(0.05)


def _running_guest(kvm: Kvm, ws_mib: int = 16):
    """A 64 MiB built-in guest dirtying `ws_mib` as fast as it can, past its second pass."""
    console = bg.GuestConsole()
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=ws_mib, rate_mib_s=0), VmConfig(mem_size=64 * MiB), console)
    machine.start()
    console.wait_pass(2, timeout=30)
    return machine


def _assert_carries_on(moved, console: bg.GuestConsole) -> None:
    """The migrated guest makes two more passes with a consistent working set; then it ends."""
    try:
        console.wait_pass(bg.read_status(moved.vm.memory).passes + 2, timeout=30)
        moved.pause()
        assert bg.check_memory(moved.vm.memory).ok
    finally:
        moved.stop()
        moved.vm.close()


def _end(listener: Listener, machine) -> None:
    listener.close()
    if machine.state is not RunState.STOPPED:
        machine.stop()
    machine.vm.close()


def test_postcopy_between_processes_at_full_dirty_rate_on_two_vcpus(tmp_path: Path) -> None:
    """The guest dirties its 48 MiB working set as fast as it can on CPU 0 (CPU 1 runs its own
    loop): post-copy after round 0 completes, pages come both ways, the working set is consistent
    on the target and its passes go on."""
    source_api, target_api, port = tmp_path / "source.sock", tmp_path / "target.sock", _free_port()
    source = subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "128M", "--cpus", "2", "--ws",
                               "48", "--rate", "0", "--api", str(source_api)],
                              stdout=console_log(tmp_path, "source"), stderr=subprocess.PIPE, text=True)
    target = subprocess.Popen([sys.executable, "-m", "migrate.cli", "recv", "--listen", f"127.0.0.1:{port}",
                               "--api", str(target_api), "--accept-timeout", "60"],
                              stdout=console_log(tmp_path, "target"), stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(source_api, source)
        _wait_passes(source_api, 2)  # dirtying at full rate
        deadline = time.monotonic() + 30
        sent = subprocess.run([sys.executable, "-m", "migrate.cli", "send", "--api", str(source_api),
                               "--to", f"127.0.0.1:{port}", "--postcopy", "--json"], capture_output=True, text=True,
                              timeout=120)
        stats = json.loads(sent.stdout)
        assert sent.returncode == 0 and stats["outcome"] == "completed", sent.stderr
        pc = stats["postcopy"]
        assert pc["after_rounds"] == 1 and pc["missing_pages"] > 0
        assert pc["background_pages"] > 0 and pc["fetched_pages"] + pc["background_pages"] <= pc["missing_pages"]
        # the fault figures agree with the fetches: measured (a page over TCP takes microseconds at
        # least) exactly when the guest faulted on a missing page, and none otherwise
        if pc["fetched_pages"]:
            assert pc["fetch_requests"] > 0 and 0 < pc["fault_p50_us"] <= pc["fault_p99_us"], pc
        else:
            assert pc["fetch_requests"] == pc["fault_p50_us"] == pc["fault_p99_us"] == 0, pc
        assert stats["downtime_ms"] > 0 and "bitmap" in stats["downtime_phases_ms"]
        assert source.wait(timeout=20) == 0  # the source stops once the target holds every page
        _wait_for(target_api, target)
        passes_at = call(target_api, "guest-check")["passes"]
        while (check := call(target_api, "guest-check"))["passes"] < passes_at + 2:
            assert time.monotonic() < deadline + 60
            time.sleep(0.05)
        assert check["ok"] and check["cpus_up"] == 2, check
        call(target_api, "stop")
        assert target.wait(timeout=20) == 0
    finally:
        source.kill()
        target.kill()


def test_a_stranger_cannot_join_the_fetch_channel(kvm: Kvm, caplog, monkeypatch) -> None:
    """A connection claiming to be the fetch channel of another session is dropped as a stray; the
    real one joins and the migration completes."""
    from migrate.live.link import SourceLink

    machine = _running_guest(kvm, ws_mib=8)
    listener, console, result, thread = _receiving(kvm)
    open_fetch_channel = SourceLink.open_fetch_channel
    strangers = []

    def after_a_stranger(self, session: bytes) -> None:
        strangers.append(connect(listener.address, b""))
        strangers[-1].send(Channel(b"not-the-session", 1))  # index 1: a 1-stream migration's fetch channel
        open_fetch_channel(self, session)

    monkeypatch.setattr(SourceLink, "open_fetch_channel", after_a_stranger)
    try:
        stats = send(machine, listener.address, MigrationOptions(postcopy=True))
        thread.join(30)
        assert stats.outcome == "completed", stats.reason
        assert strangers and any("stray connection" in r.message and "Channel" in r.message for r in caplog.records)
        _assert_carries_on(result["incoming"].machine, console)
    finally:
        _end(listener, machine)


def _send_into_postcopy(source: subprocess.Popen, source_api: Path, port: str, bandwidth: float) -> subprocess.Popen:
    """`migrate send --postcopy` from the `hv run` behind `source_api`, the push held to
    `bandwidth` MiB/s; returned once the source says it is past the switch."""
    _wait_for(source_api, source)
    _wait_passes(source_api, 2)
    sender = subprocess.Popen([sys.executable, "-m", "migrate.cli", "send", "--api", str(source_api), "--to",
                               f"127.0.0.1:{port}", "--postcopy", "--bandwidth", str(bandwidth), "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while call(source_api, "migrate-status")["phase"] != "postcopy":
        assert time.monotonic() < deadline and sender.poll() is None, sender.stderr.read() if sender.poll() else ""
        time.sleep(0.02)
    return sender


def test_source_killed_after_the_switch_leaves_the_target_paused_with_what_it_has(kvm: Kvm, tmp_path: Path) -> None:
    """The source process dies while the push is under way (held to 8 MiB/s): the target says so,
    pauses the guest with the pages it has, and does not run on with holes."""
    source_api, port = tmp_path / "source.sock", _free_port()
    source = subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "128M", "--ws", "48", "--rate",
                               "0", "--api", str(source_api)], stdout=console_log(tmp_path, "source"),
                              stderr=subprocess.PIPE, text=True)
    listener = Listener(f"127.0.0.1:{port}", b"")
    console = bg.GuestConsole()
    result: dict = {}

    def serve() -> None:
        try:
            listen_and_receive(listener, kvm, ReceiveOptions(console=console, timeout=20, postcopy_wait=2),
                               accept_timeout=60)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            result["error"] = e

    thread = threading.Thread(target=serve)
    thread.start()
    sender = None
    try:
        sender = _send_into_postcopy(source, source_api, port, bandwidth=8)
        os.kill(source.pid, signal.SIGKILL)  # at once: 48 MiB at 8 MiB/s is seconds of push left
        source.wait(10)
        thread.join(60)
        error = result.get("error")
        assert isinstance(error, PostcopyFailed), error
        assert error.missing > 0 and "still only at the source" in str(error)
        moved = error.machine
        assert moved.state is RunState.PAUSED  # it runs no further on holes
        # its vCPUs' exits, not its status page, which may be one of the pages that never came
        # (reading it here would wait for it for ever)
        exits = lambda: sum(s.exits + s.fast_io_exits for s in moved.stats)  # noqa: E731
        stuck = exits()
        time.sleep(0.2)  # a window for a wrong run to show (a running guest exits on every COM1 line)
        assert exits() == stuck
        error.discard()  # the pages it waits for are not coming: released as zeros, the VM torn down
    finally:
        listener.close()
        source.kill()
        if sender is not None:
            sender.kill()


def test_the_missing_bitmap_round_trips_and_a_hostile_one_is_refused(kvm: Kvm) -> None:
    with kvm.create_vm(VmConfig(mem_size=16 * MiB)) as vm:
        memory: GuestMemory = vm.memory
        region = memory.regions[0]
        bits = DirtyBitmap(region.npages)
        bits.set_range(3, 70)
        bits.set_range(region.npages - 5, 5)
        missing = {region.guest_base: bits}
        decoded = decode_missing(encode_missing(missing), memory)
        assert decoded[region.guest_base] == bits
        good = encode_missing(missing)
        for hostile in (good[:-1], good + b"\0", good[:8] + (region.npages + 1).to_bytes(8, "little") + good[16:],
                        b"", (1 << 40).to_bytes(8, "little") + good[8:]):
            with pytest.raises(ProtocolViolation):
                decode_missing(hostile, memory)


class _CuttableLink:
    """A TCP relay to `upstream` whose current connections can be cut at once (both ends see the
    link end), while new ones are still relayed: a network that drops and comes back."""

    def __init__(self, upstream: str) -> None:
        import socket

        self.upstream = upstream
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.pairs: list[tuple] = []
        self.cuts = 0
        self.down = False  # while down, a new connection is cut as it comes
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket

        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            host, port = self.upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            with self._lock:
                self.pairs.append((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(2)
            except OSError:
                pass

    def cut(self) -> None:
        import socket

        with self._lock:
            pairs, self.pairs = self.pairs, []
            self.cuts += 1
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()
        self.cut()


def _target_behind_a_link(kvm: Kvm):
    """A target (on a thread, waiting up to 60 s for a source that lost its link) and a
    `_CuttableLink` to it; `result["incoming"]` once the guest arrived."""
    listener = Listener("127.0.0.1:0", b"")
    link = _CuttableLink(listener.address)
    console, result = bg.GuestConsole(), {}
    thread = threading.Thread(target=lambda: result.update(incoming=listen_and_receive(
        listener, kvm, ReceiveOptions(console=console, timeout=10, postcopy_wait=60), accept_timeout=20)))
    thread.start()
    return listener, link, console, result, thread


@pytest.mark.parametrize("cuts", [(0.0,), (0.5,), (0.0, 0.0)], ids=["at-the-switch", "mid-push", "again-once-back"])
def test_a_link_cut_during_postcopy_is_reconnected_and_completes(kvm: Kvm, cuts: tuple[float, ...]) -> None:
    """The link is cut (every connection: main and fetch) once the push has sent a share
    `cuts` of the missing pages (the second cut: as soon as the source is back); the guest runs
    on at the target meanwhile, the source comes back, and the migration completes with the
    memory checked."""
    machine = _running_guest(kvm)
    listener, link, target_console, result, thread = _target_behind_a_link(kvm)
    left = list(cuts)

    def cut_on_the_way(p: ProgressEvent) -> None:
        if isinstance(p, PagesProgress) and p.figures.phase == "postcopy" and left:
            total = max(p.figures.round_pages_total, 1)
            if p.figures.round_pages_done / total >= left[0]:
                left.pop(0)
                link.cut()

    try:
        stats = send(machine, link.address, MigrationOptions(postcopy=True, bandwidth_mib_s=24,
                                                             postcopy_reconnect_s=20), progress=cut_on_the_way)
        thread.join(60)
        assert stats.outcome == "completed", stats.reason
        assert link.cuts == len(cuts) and stats.postcopy.reconnects == len(cuts)
        assert machine.state is RunState.STOPPED
        _assert_carries_on(result["incoming"].machine, target_console)
    finally:
        link.close()
        _end(listener, machine)


def test_a_link_down_past_the_reconnect_window_waits_in_doubt_and_resumes_on_demand(kvm: Kvm) -> None:
    """The link goes down mid-push and stays down past the source's reconnect window: the source
    is left paused, in doubt, with its pages (a pause or resume of it is refused); the target's
    guest waits on. Once the link is back, `resume_postcopy` (`migrate send --resume`) completes it."""
    from hv.errors import Busy
    from migrate.errors import MigrationInDoubt
    from migrate.live.resolve import resume_postcopy

    machine = _running_guest(kvm)
    listener, link, target_console, result, thread = _target_behind_a_link(kvm)

    def cut_for_good(p: ProgressEvent) -> None:  # once: the resume reports through it too
        if isinstance(p, PagesProgress) and p.figures.phase == "postcopy" and not link.cuts:
            if p.figures.round_pages_done >= p.figures.round_pages_total // 3:
                link.down = True
                link.cut()

    try:
        with pytest.raises(MigrationInDoubt, match="--resume"):
            send(machine, link.address, MigrationOptions(postcopy=True, bandwidth_mib_s=24, postcopy_reconnect_s=1),
                 progress=cut_for_good)
        assert machine.state is RunState.PAUSED
        with pytest.raises(Busy):
            from hv.vmm.owner import owner_of
            owner_of(machine).check("resume")
        assert thread.is_alive()  # the target waits for its source
        link.down = False
        stats = resume_postcopy(machine)
        thread.join(60)
        assert stats.outcome == "completed" and stats.postcopy.reconnects >= 1, stats.reason
        assert machine.state is RunState.STOPPED
        _assert_carries_on(result["incoming"].machine, target_console)
    finally:
        link.close()
        _end(listener, machine)


@pytest.mark.parametrize("options, rounds", [
    # (final_copy_margin_ms: how fast a loaded host hands over is not these tests' subject)
    (MigrationOptions(postcopy=True, postcopy_after=2, downtime_ms=0, final_copy_margin_ms=60_000), 2),
    # the throttle is off: pre-copy would give up after 3 rounds
    (MigrationOptions(postcopy_auto=True, downtime_ms=0, auto_converge=False, max_rounds=3,
                      final_copy_margin_ms=60_000), 3),
], ids=["after-2-rounds", "auto"])
def test_the_switch_comes_after_n_rounds_or_when_precopy_would_not_converge(kvm: Kvm, options, rounds: int) -> None:
    """Structural, on any host: a downtime target of 0 ms is met only by a stop and copy with
    nothing dirty, and at the end of each round the source waits (in its progress callback, before
    it fetches the dirty log) for the guest to finish one more pass, so every round leaves pages
    dirty and pre-copy can never finish on its own: only the switch ends it."""
    machine = _running_guest(kvm)
    listener, console, result, thread = _receiving(kvm)
    try:
        stats = send(machine, listener.address, options, progress=a_pass_per_round(machine))
        thread.join(30)
        assert stats.outcome == "completed", stats.reason
        assert stats.postcopy is not None and stats.postcopy.after_rounds == len(stats.rounds) == rounds
        assert all(r.pages > 0 for r in stats.rounds[1:])  # each round had dirty pages to send
        _assert_carries_on(result["incoming"].machine, console)
    finally:
        _end(listener, machine)


def test_a_failure_at_the_switch_before_commit_leaves_the_guest_running_at_the_source(kvm: Kvm,
                                                                                      monkeypatch) -> None:
    """The target fails while it registers the missing pages (before Ready): it discards its copy
    and says why; the source, which never sent Commit, runs its guest on with its memory intact."""
    from migrate.live.postcopy.target import TargetPostcopy

    def failing_switch(self, missing: bytes, count: int) -> None:
        raise MigrationFailed("injected: userfaultfd refused", "nowhere yet")

    monkeypatch.setattr(TargetPostcopy, "switch", failing_switch)
    machine = _running_guest(kvm)
    listener = Listener("127.0.0.1:0", b"")
    errors: dict = {}

    def serve() -> None:
        try:
            listen_and_receive(listener, kvm, ReceiveOptions(timeout=10), accept_timeout=20)
        except BaseException as e:  # noqa: BLE001 - the test reads it
            errors["target"] = e

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        stats = send(machine, listener.address, MigrationOptions(postcopy=True))
        thread.join(30)
        assert stats.outcome == "failed" and "injected" in stats.reason, stats.reason
        assert isinstance(errors.get("target"), MigrationFailed)
        assert machine.state is RunState.RUNNING and not machine.vm.dirty_logging
        before = bg.read_status(machine.vm.memory).passes
        deadline = time.monotonic() + 20
        while bg.read_status(machine.vm.memory).passes <= before:  # it runs on
            assert time.monotonic() < deadline
            time.sleep(0.05)
        machine.pause()
        assert bg.check_memory(machine.vm.memory).ok
    finally:
        _end(listener, machine)


def test_migrate_recv_keeps_a_stranded_guest_paused_until_told(tmp_path: Path) -> None:
    """`migrate recv` whose source dies after the switch: past --postcopy-wait it says so, keeps
    the guest paused with what it has, and gives it up on SIGTERM with the in-doubt status."""
    source_api, port = tmp_path / "source.sock", _free_port()
    source = subprocess.Popen([sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "64M", "--ws", "16", "--rate",
                               "0", "--api", str(source_api)], stdout=console_log(tmp_path, "source"),
                              stderr=subprocess.PIPE, text=True)
    target = subprocess.Popen([sys.executable, "-m", "migrate.cli", "recv", "--listen", f"127.0.0.1:{port}",
                               "--accept-timeout", "60", "--postcopy-wait", "1"],
                              stdout=console_log(tmp_path, "target"), stderr=subprocess.PIPE, text=True)
    sender = None
    try:
        sender = _send_into_postcopy(source, source_api, port, bandwidth=4)
        deadline = time.monotonic() + 60
        os.kill(source.pid, signal.SIGKILL)
        said = ""
        while "kept paused" not in said:  # stderr, line by line
            line = target.stderr.readline()
            assert line and time.monotonic() < deadline + 30, said
            said += line
        assert "still only at the source" in said and target.poll() is None
        target.send_signal(signal.SIGTERM)
        assert target.wait(timeout=20) == 6  # ExitStatus.IN_DOUBT
    finally:
        for proc in (source, target, sender):
            if proc is not None:
                proc.kill()


def _receiving(kvm: Kvm) -> tuple[Listener, bg.GuestConsole, dict, threading.Thread]:
    """A target receiving on a thread: its listener, the moved guest's console, the result
    (`incoming`) and the thread."""
    listener = Listener("127.0.0.1:0", b"")
    console, result = bg.GuestConsole(), {}
    thread = threading.Thread(target=lambda: result.update(
        incoming=listen_and_receive(listener, kvm, ReceiveOptions(console=console, timeout=10), accept_timeout=20)))
    thread.start()
    return listener, console, result, thread


def _switch_on_request(kvm: Kvm, options: MigrationOptions, when) -> tuple:
    """Send with post-copy negotiated, `switch` set by `when(progress event)`; the stats, the
    pages the source held before it sent any, and the moved guest's console."""
    machine = _running_guest(kvm)
    listener, console, result, thread = _receiving(kvm)
    switch = threading.Event()
    try:
        touched = sum(r.populated_pages().count() for r in machine.vm.memory.regions)
        stats = send(machine, listener.address, options, switch=switch,
                     progress=lambda p: switch.set() if when(p) else None)
        thread.join(30)
        assert stats.outcome == "completed", stats.reason
        _assert_carries_on(result["incoming"].machine, console)  # every page there, checked by the guest
        return stats, touched
    finally:
        _end(listener, machine)


def test_pure_postcopy_switches_before_any_page(kvm: Kvm) -> None:
    stats, touched = _switch_on_request(kvm, MigrationOptions(postcopy=True, postcopy_after=0), lambda p: False)
    assert stats.rounds == [] and stats.postcopy.after_rounds == 0
    assert stats.postcopy.missing_pages >= touched  # all the guest had (and what it touched since)


def test_a_switch_asked_mid_round_breaks_the_round_off(kvm: Kvm) -> None:
    """migrate-start-postcopy's path: asked as round 0 begins (its first progress line), the
    switch comes after round 0's first message; the rest of round 0 is missing on the target."""
    stats, touched = _switch_on_request(kvm, MigrationOptions(postcopy_ready=True),
                                        lambda p: isinstance(p, PagesProgress) and p.figures.round == 0)
    assert len(stats.rounds) == 1 and stats.postcopy.after_rounds == 1
    sent = stats.rounds[0].pages
    assert 0 < sent < touched  # broken off after a message, short of a whole pass
    assert stats.postcopy.missing_pages >= touched - sent


def test_migrate_start_postcopy_on_the_control_socket_switches_a_running_precopy(kvm: Kvm, tmp_path: Path) -> None:
    """QEMU's migrate-start-postcopy: refused with no migration running; taken by one that
    negotiated post-copy (--postcopy-ready), which could not end otherwise (a 1 ms target never
    fits, no throttle, no round limit to speak of)."""
    from hv.vmm.control import ControlContext, ControlServer

    machine = _running_guest(kvm)
    listener, console, result, thread = _receiving(kvm)
    try:
        with ControlServer(tmp_path / "source.sock", ControlContext(machine)) as server:
            with pytest.raises(ControlError) as e:
                call(server.path, "migrate-start-postcopy", timeout=10)
            assert e.value.kind == "NotMigrating"
            options = {"postcopy_ready": True, "downtime_ms": 1, "auto_converge": False, "max_rounds": 10_000}
            sent = threading.Thread(target=lambda: result.update(
                stats=call(server.path, "migrate-send", timeout=60, to=listener.address, options=options)))
            sent.start()
            deadline = time.monotonic() + 30
            while call(server.path, "migrate-status", timeout=10).get("round", 0) < 2:  # pre-copy goes round
                assert time.monotonic() < deadline and sent.is_alive()
                time.sleep(0.01)
            assert call(server.path, "migrate-start-postcopy", timeout=10)["switching"] is True
            sent.join(60)
        thread.join(30)
        stats = result["stats"]
        assert stats["outcome"] == "completed" and stats["postcopy"]["after_rounds"] >= 2
        _assert_carries_on(result["incoming"].machine, console)
    finally:
        _end(listener, machine)
