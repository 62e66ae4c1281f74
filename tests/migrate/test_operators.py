"""Careless operators and silent targets around a live migration: one owner of the source's run
state (an operator's resume during a hand-over is refused, the guest never runs on both sides),
"in doubt" a state of its own that only `migrate resolve` ends, a target that goes silent at each
step of the final copy (the source resumes within the final copy's limit, not the 30 s timeout),
and a `migrate recv` that no stray, failed, unauthenticated or dry-run connection can end."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.vmm.control import ControlContext, ControlError, ControlServer, call
from hv.vmm.machine import Machine, RunState
from migrate import MigrationOptions, ReceiveOptions, Receiver, send
from migrate.errors import MigrationFailed, TransportError
from migrate.events import RoundSent
from migrate.protocol import Accept, Commit, Complete, Hello, Pages, Query, Ready, State, Verdict
from migrate.transport.connection import Connection, connect
from migrate.transport.listener import Listener
import migrate.live.receiver
import migrate.live.source

from tests.migrate.running_source import CONFIG, MiB
from tests.migrate.running_source import running_source as _source


def _assert_runs_on(machine: Machine, console: bg.GuestConsole) -> None:
    """The guest runs here and its memory is consistent."""
    assert machine.state is RunState.RUNNING
    console.wait_pass(console.last_pass() + 1, timeout=20)
    machine.pause()
    assert bg.check_memory(machine.vm.memory).ok
    machine.resume()


class _Recv:
    """A `Receiver` (what `migrate recv` runs) on a thread, taking migrations until one arrives."""

    def __init__(self, kvm: Kvm, key: bytes = b"") -> None:
        self.listener = Listener("127.0.0.1:0", key)
        self.address = self.listener.address
        self.console = bg.GuestConsole()
        self.receiver = Receiver(self.listener, kvm, ReceiveOptions(console=self.console, timeout=30))
        self.incoming = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.incoming = self.receiver.receive(120)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.error = e

    def join(self, timeout: float = 60) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive()

    def close(self) -> None:
        self.receiver.close()
        self.listener.close()
        if self.incoming is not None and self.incoming.machine is not None:
            self.incoming.machine.stop()
            self.incoming.machine.vm.close()


def _control(machine: Machine, tmp_path: Path) -> ControlServer:
    """The source VM's control socket, with migrate's commands (as `hv run --api` serves it)."""
    return ControlServer(tmp_path / "source.sock", ControlContext(machine))


def _refused_busy(sock: Path, command: str, state: str) -> ControlError:
    with pytest.raises(ControlError) as e:
        call(sock, command, timeout=10)
    assert e.value.kind == "Busy", e.value
    assert e.value.facts["state"] == state and e.value.facts["owner"].startswith("migration to")
    return e.value


# --- one owner during the hand-over ---------------------------------------------------------------


def test_an_operators_resume_during_the_hand_over_is_refused(kvm: Kvm, tmp_path: Path, monkeypatch) -> None:
    machine, console = _source(kvm)
    verifying, go_on = threading.Event(), threading.Event()

    def hold_at_complete(conn: Connection) -> Connection:  # the target takes its time to verify
        real = conn.receive

        def receive(timeout=None):
            message = real(timeout)
            if isinstance(message, Complete):
                verifying.set()
                go_on.wait(60)
            return message

        conn.receive = receive
        return conn

    monkeypatch.setattr(migrate.live.receiver, "receive",
                        lambda conn, *a, real=migrate.live.receiver.receive, **k: real(hold_at_complete(conn), *a, **k))
    target = _Recv(kvm)
    result: dict = {}
    try:
        with _control(machine, tmp_path) as server:
            sock = server.path
            sender = threading.Thread(target=lambda: result.update(stats=send(
                machine, target.address, MigrationOptions(final_copy_margin_ms=60_000))))
            sender.start()
            assert verifying.wait(60)
            assert machine.state is RunState.PAUSED  # the final copy: the guest is the protocol's
            frozen = bg.read_status(machine.vm.memory)
            for command in ("resume", "stop", "pause", "guest-check"):
                _refused_busy(sock, command, "held")
            with pytest.raises(ControlError) as e:
                call(sock, "snapshot", timeout=10, out=str(tmp_path / "x.snap"))
            assert e.value.kind == "Busy"
            assert call(sock, "status", timeout=10)["held_by"]["owner"] == f"migration to {target.address}"
            go_on.set()
            sender.join(60)
        stats = result["stats"]
        assert stats.outcome == "completed", stats.reason
        assert machine.state is RunState.STOPPED
        assert bg.read_status(machine.vm.memory) == frozen  # it never ran again here
        target.join()
        target.console.wait_pass(frozen.passes + 1, timeout=20)  # it runs there, from where it stopped
        assert min(target.console.passes) > max(console.passes)  # no pass ran twice
    finally:
        go_on.set()
        target.close()
        machine.stop()
        machine.vm.close()


# --- in doubt, and resolving it -------------------------------------------------------------------


def _link_dies_at_commit(monkeypatch, *, deliver: bool) -> None:
    """The source's link to the target dies as it sends Commit: delivered or not, no answer."""
    real_connect = migrate.live.source.connect

    def connect_then_cut(*args, **kwargs):
        conn = real_connect(*args, **kwargs)
        real_send = conn.send

        def send_(message, timeout=None):
            if isinstance(message, Commit):
                if deliver:
                    real_send(message, timeout)
                conn.interrupt()
                raise TransportError("test: the link died at Commit")
            return real_send(message, timeout)

        conn.send = send_
        return conn

    monkeypatch.setattr(migrate.live.source, "connect", connect_then_cut)


def _send_into_doubt(machine: Machine, sock: Path, address: str) -> None:
    with pytest.raises(ControlError) as e:
        call(sock, "migrate-send", timeout=60, to=address, options={"final_copy_margin_ms": 10_000})
    assert e.value.kind == "MigrationInDoubt" and "in doubt" in e.value.message
    assert machine.state is RunState.PAUSED
    status = call(sock, "status", timeout=10)
    assert status["state"] == "in-doubt" and status["held_by"]["state"] == "in-doubt"
    for command in ("resume", "stop", "pause"):
        busy = _refused_busy(sock, command, "in-doubt")
        assert "migrate resolve" in busy.message
    with pytest.raises(ControlError) as e:  # nor may it be sent elsewhere: that could make two copies
        call(sock, "migrate-send", timeout=10, to=address)
    assert e.value.kind == "Busy"
    with pytest.raises(ControlError) as e:  # and there is nothing left to cancel
        call(sock, "migrate-cancel", timeout=10)
    assert e.value.kind == "InDoubt" and e.value.facts["state"] == "in-doubt"


def test_commit_lost_in_doubt_until_resolve_resumes_the_source(kvm: Kvm, tmp_path: Path, monkeypatch) -> None:
    machine, console = _source(kvm)
    target = _Recv(kvm)
    _link_dies_at_commit(monkeypatch, deliver=False)
    try:
        with _control(machine, tmp_path) as server:
            _send_into_doubt(machine, server.path, target.address)
            frozen = bg.read_status(machine.vm.memory)
            # the target still waits for Commit; asking fences it, so it can never run the guest
            result = call(server.path, "migrate-resolve", timeout=60)
            assert result == {"hand_over": "not-committed", "action": "resumed", "forced": None,
                              "asked": "the target never took Commit, and now never will"}
            _assert_runs_on(machine, console)
            assert bg.read_status(machine.vm.memory).passes > frozen.passes
            with pytest.raises(ControlError) as e:
                call(server.path, "migrate-resolve", timeout=10)
            assert e.value.kind == "NotInDoubt"
            assert target.incoming is None  # the target discarded its copy and listens on
            monkeypatch.undo()
            stats = call(server.path, "migrate-send", timeout=120, to=target.address)
            assert stats["outcome"] == "completed", stats["reason"]  # the same recv takes the next one
        target.join()
        target.console.wait_pass(1, timeout=20)
    finally:
        target.close()
        machine.stop()
        machine.vm.close()


def test_resumed_lost_in_doubt_until_resolve_stops_the_source(kvm: Kvm, tmp_path: Path, monkeypatch) -> None:
    machine, console = _source(kvm)
    target = _Recv(kvm)
    _link_dies_at_commit(monkeypatch, deliver=True)
    try:
        with _control(machine, tmp_path) as server:
            _send_into_doubt(machine, server.path, target.address)
            target.join()  # the target took Commit: the guest runs there
            moved = target.incoming.machine
            assert moved.state is RunState.RUNNING
            frozen = bg.read_status(machine.vm.memory)
            result = call(server.path, "migrate-resolve", timeout=60)
            assert result["hand_over"] == "committed" and result["action"] == "stopped"
            assert machine.state is RunState.STOPPED and server.ctx.finished.is_set()
            assert bg.read_status(machine.vm.memory) == frozen  # never ran here again
            target.console.wait_pass(frozen.passes + 1, timeout=20)
            moved.pause()
            assert bg.check_memory(moved.vm.memory).ok
            moved.resume()
    finally:
        target.close()
        machine.stop()
        machine.vm.close()


def test_an_unreachable_target_leaves_the_doubt_until_the_operator_forces_it(kvm: Kvm, tmp_path: Path,
                                                                            monkeypatch) -> None:
    machine, console = _source(kvm)
    target = _Recv(kvm)
    _link_dies_at_commit(monkeypatch, deliver=False)
    try:
        with _control(machine, tmp_path) as server:
            _send_into_doubt(machine, server.path, target.address)
            target.receiver.close()
            target.listener.close()  # the target host is gone
            with pytest.raises(ControlError) as e:
                call(server.path, "migrate-resolve", timeout=60)
            assert e.value.kind == "StillInDoubt" and "could not reach the target" in e.value.facts["asked"]
            assert "--force-resume-source" in e.value.message and "two copies" in e.value.message
            _refused_busy(server.path, "resume", "in-doubt")  # still held
            proc = subprocess.run([sys.executable, "-m", "migrate.cli", "resolve", str(server.path)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 6 and "still in doubt" in proc.stderr, proc.stderr  # the CLI says so
            proc = subprocess.run([sys.executable, "-m", "migrate.cli", "resolve", str(server.path),
                                   "--force-resume-source", "--json"], capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert '"forced": "resume-source"' in proc.stdout and '"action": "resumed"' in proc.stdout
            _assert_runs_on(machine, console)
    finally:
        target.close()
        machine.stop()
        machine.vm.close()


# --- a target that goes silent during the final copy ----------------------------------------------


class _SilentTarget:
    """A protocol-speaking fake target: it takes the migration as a real one would, then goes
    silent (keeps the connection open, reads and says nothing) at `phase` of the final copy."""

    def __init__(self, source: Machine, phase: str) -> None:
        self.source, self.phase = source, phase
        self.listener = Listener("127.0.0.1:0", b"")
        self.address = self.listener.address
        self.silent_at: float | None = None
        self.release = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _silence(self) -> None:
        self.silent_at = time.monotonic()
        self.release.wait(120)

    def _run(self) -> None:
        conn = self.listener.accept(60)
        try:
            assert isinstance(conn.receive(30), Hello)
            conn.send(Accept(b"fake-session-16b"))
            while True:
                message = conn.receive(30)
                if self.phase == "final-pages" and isinstance(message, Pages) and \
                        self.source.state is RunState.PAUSED:
                    return self._silence()  # the last round's pages stop being read
                if self.phase == "state" and isinstance(message, State):
                    return self._silence()  # the devices' and vCPUs' state is never taken in
                if isinstance(message, Complete):
                    # (final-pages: a guest starved of CPU on a busy host may dirty nothing between
                    # the last fetch and the pause, and its final round sends no page; the
                    # silence then starts here, still before Commit)
                    if self.phase in ("ready", "final-pages"):
                        return self._silence()  # no Ready
                    conn.send(Ready())
                if isinstance(message, Commit):
                    return self._silence()  # no Resumed
        except TransportError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.release.set()
        self.thread.join(30)
        self.listener.close()


@pytest.mark.parametrize("phase", ["final-pages", "state", "ready"])
def test_a_target_silent_before_commit_costs_the_guest_the_final_copys_limit_not_the_timeout(
        kvm: Kvm, phase: str) -> None:
    machine, console = _source(kvm, ws=32, rate=0)  # busy: the final round has pages to send
    target = _SilentTarget(machine, phase)
    options = MigrationOptions(timeout=30, auto_converge=False, max_rounds=3, finish_anyway=True)
    try:
        stats = send(machine, target.address, options)
        back = time.monotonic()
        assert stats.outcome == "failed" and "final copy" in stats.reason, stats.reason
        assert target.silent_at is not None
        # resumed once the final copy's limit was spent, long before the 30 s timeout would have
        assert stats.final_copy_limit_ms < options.timeout * 1000 / 2
        assert back - target.silent_at < options.timeout / 2
        _assert_runs_on(machine, console)
        assert not machine.vm.dirty_logging and machine.throttle == 0
    finally:
        target.close()
        machine.stop()
        machine.vm.close()


def test_a_target_silent_after_commit_leaves_the_source_in_doubt_quickly(kvm: Kvm, tmp_path: Path) -> None:
    machine, console = _source(kvm)
    target = _SilentTarget(machine, "resumed")
    try:
        with _control(machine, tmp_path) as server:
            t0 = time.monotonic()
            with pytest.raises(ControlError) as e:
                call(server.path, "migrate-send", timeout=60, to=target.address)
            assert "in doubt" in e.value.message
            assert time.monotonic() - target.silent_at < 15  # the final copy's limit, not the 30 s timeout
            assert time.monotonic() - t0 < 60
            _refused_busy(server.path, "resume", "in-doubt")
            target.listener.close()  # nobody there to ask now
            result = call(server.path, "migrate-resolve", timeout=60, force="resume-source")
            assert result["action"] == "resumed" and result["forced"] == "resume-source"
            _assert_runs_on(machine, console)
    finally:
        target.close()
        machine.stop()
        machine.vm.close()


def test_a_send_to_a_peer_that_never_reads_ends_at_its_timeout() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    client = Connection(socket.create_connection(server.getsockname()), "silent peer")
    peer, _ = server.accept()  # accepted, never read
    try:
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="not taken within"):
            client.send_pages(0, [bytes(48 * MiB)], timeout=0.5)
        assert time.monotonic() - t0 < 20  # the deadline, not a blocked send
        with pytest.raises(TransportError, match="not taken within"):
            for _ in range(64):  # the buffers are full: a message cannot go either
                client.send(Pages(0, bytes(MiB)), timeout=0.2)
    finally:
        client.close()
        peer.close()
        server.close()


def test_an_extra_page_stream_to_a_peer_that_never_reads_is_waited_for_with_a_limit() -> None:
    from migrate.live.streams import OutgoingStream

    server = socket.create_server(("127.0.0.1", 0))
    stream = OutgoingStream(Connection(socket.create_connection(server.getsockname()), "silent peer"))
    peer, _ = server.accept()  # accepted, never read
    try:
        stream.queue.put((0, [bytes(48 * MiB)]))
        assert stream.wait_sent(0.5) is False  # the final copy gives up on it at its deadline ...
        t0 = time.monotonic()
        stream.close()  # ... and closing wakes the blocked send instead of waiting out its timeout
        assert time.monotonic() - t0 < 5 and not stream.thread.is_alive()
        assert isinstance(stream.error, TransportError)
    finally:
        peer.close()
        server.close()


# --- migrate recv survives what it is sent --------------------------------------------------------


def test_recv_survives_strays_a_dry_run_and_a_failure_then_takes_the_migration(kvm: Kvm, caplog) -> None:
    machine, console = _source(kvm)
    target = _Recv(kvm)
    try:
        socket.create_connection(target.listener.sock.getsockname()).close()  # connects, says nothing
        with socket.create_connection(target.listener.sock.getsockname()) as s:  # garbage for an answer
            s.recv(32)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(40))
        conn = connect(target.address, b"")  # authenticated, but not a migration
        conn.send(Ready())
        conn.close()
        conn = connect(target.address, b"")  # a Query about a session nobody knows
        conn.send(Query(b"no such session!"))
        assert conn.receive(10) == Verdict(b"no such session!", "unknown")
        conn.close()
        assert send(machine, target.address, MigrationOptions(dry_run=True)).outcome == "dry-run"
        cancel = threading.Event()
        stats = send(machine, target.address, MigrationOptions(bandwidth_mib_s=64),
                     progress=lambda p: cancel.set() if isinstance(p, RoundSent) else None, cancel=cancel)
        assert stats.outcome == "cancelled"
        assert target.incoming is None and target.error is None  # none of them ended it
        stats = send(machine, target.address, MigrationOptions())
        assert stats.outcome == "completed", stats.reason
        target.join()
        target.console.wait_pass(1, timeout=20)
        # and once a guest has arrived, another is refused (the queries are still answered)
        other, other_console = _source(kvm)
        try:
            stats = send(other, target.address, MigrationOptions())
            assert stats.outcome == "rejected" and "already runs" in stats.problems[0]
            _assert_runs_on(other, other_console)
        finally:
            other.stop()
            other.vm.close()
    finally:
        target.close()
        machine.stop()
        machine.vm.close()
    logged = " | ".join(r.message for r in caplog.records)
    for words in ("no authentication", "stray connection", "opened with Ready", "dry run from",
                  "did not arrive", "asked about session"):
        assert words in logged, words


def test_failed_authentications_are_slowed_and_logged_but_the_real_source_gets_in(kvm: Kvm, caplog) -> None:
    machine, console = _source(kvm)
    target = _Recv(kvm, key=b"the right key")
    try:
        for _ in range(4):
            with pytest.raises(TransportError):
                connect(target.address, b"a guess", timeout=10)
        # the guesser hears its refusal before the receiver counts it: the real source (whose
        # success clears the count) comes once the fourth is counted, as a later source would
        deadline = time.monotonic() + 30
        while not any("4 in a row" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stats = send(machine, target.address, MigrationOptions(key=b"the right key"))
        assert stats.outcome == "completed", stats.reason
        target.join()
    finally:
        target.close()
        machine.stop()
        machine.vm.close()
    logged = " | ".join(r.message for r in caplog.records)
    assert "4 in a row" in logged and "waiting" in logged and "before its challenge" in logged

def _close_all(idle: list, receiver, listener, machine) -> None:
    for conn in idle:
        conn.close()
    receiver.close()
    listener.close()
    machine.stop()
    machine.vm.close()


def test_migrate_recv_keeps_listening_after_a_stray_unless_once(kvm: Kvm, tmp_path: Path) -> None:
    listener = Listener("127.0.0.1:0", b"")
    address = listener.address
    listener.close()
    host, port = address.rsplit(":", 1)

    def recv(*extra: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "migrate.cli", "recv", "--listen", address, *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert "listening on" in proc.stderr.readline()
        return proc

    once = recv("--once")
    try:
        socket.create_connection((host, int(port))).close()
        assert once.wait(timeout=30) != 0  # one shot: the stray was its one connection
    finally:
        once.kill()

    machine, console = _source(kvm)
    api = tmp_path / "target.sock"
    target = recv("--api", str(api))
    try:
        socket.create_connection((host, int(port))).close()
        assert send(machine, address, MigrationOptions(dry_run=True)).outcome == "dry-run"
        assert target.poll() is None
        stats = send(machine, address, MigrationOptions())
        assert stats.outcome == "completed", stats.reason
        deadline = time.monotonic() + 30
        while not api.exists():
            assert time.monotonic() < deadline and target.poll() is None
            time.sleep(0.05)
        assert call(api, "status", timeout=10)["state"] == "running"
        target.send_signal(signal.SIGTERM)
        _, err = target.communicate(timeout=30)
        err = " ".join(err.split())
        assert target.returncode == 0 and "no authentication" in err and "dry run from" in err, err
        assert not api.exists()
    finally:
        target.kill()
        machine.stop()
        machine.vm.close()


def test_idle_connections_past_the_hosts_share_are_dropped_or_time_out(kvm: Kvm, caplog) -> None:
    from migrate.live.receiver import MAX_PER_HOST

    machine, console = _source(kvm)
    listener = Listener("127.0.0.1:0", b"")
    receiver = Receiver(listener, kvm, ReceiveOptions(timeout=30), handshake_timeout=1.0)
    idle = [socket.create_connection(listener.sock.getsockname()) for _ in range(MAX_PER_HOST + 1)]
    try:
        for s in idle:  # each is dropped (the oldest, to make room) or, never answering, closed at its timeout
            s.settimeout(30)
            while s.recv(64):
                pass
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(incoming=receiver.receive(60)))
        thread.start()
        stats = send(machine, listener.address, MigrationOptions())
        thread.join(60)
        assert stats.outcome == "completed", stats.reason
        moved = result["incoming"].machine
        moved.stop()
        moved.vm.close()
    finally:
        _close_all(idle, receiver, listener, machine)
    logged = " | ".join(r.message for r in caplog.records)
    assert "to make room for" in logged and "no authentication" in logged
    assert "before its challenge" not in logged  # silence is not a guess: no backoff for the real source


def _challenged(address: tuple[str, int]) -> socket.socket:
    """A connection that holds a handshake slot and never answers: it has its challenge."""
    from migrate.transport.connection import CHALLENGE_BYTES

    s = socket.create_connection(address)
    s.settimeout(30)
    got = b""
    while len(got) < CHALLENGE_BYTES:
        part = s.recv(CHALLENGE_BYTES - len(got))
        assert part, "the receiver closed a connection it had room for"
        got += part
    return s


def _still_open(s: socket.socket) -> bool:
    """Nothing to read and no end: the receiver still holds it (it was sent nothing more)."""
    s.setblocking(False)
    try:
        return s.recv(1) != b""  # data would be a surprise too: not an idle connection's end
    except BlockingIOError:
        return True
    finally:
        s.setblocking(True)



def test_a_real_source_gets_in_while_idle_connections_hold_every_slot_of_its_host(kvm: Kvm, caplog) -> None:
    """A local peer holds all of this host's handshake slots with connections that never answer
    their challenge (and would hold them for the whole handshake timeout): the real source's
    connections, main and page stream, each take the slot of the oldest idle one; the rest
    stay held."""
    from migrate.live.receiver import MAX_PER_HOST

    machine, console = _source(kvm)
    listener = Listener("127.0.0.1:0", b"")
    receiver = Receiver(listener, kvm, ReceiveOptions(timeout=30), handshake_timeout=120)
    idle = [_challenged(listener.sock.getsockname()) for _ in range(MAX_PER_HOST)]
    try:
        result: dict = {}
        thread = threading.Thread(target=lambda: result.update(incoming=receiver.receive(60)))
        thread.start()
        stats = send(machine, listener.address, MigrationOptions(streams=2))
        thread.join(60)
        assert stats.outcome == "completed", stats.reason
        moved = result["incoming"].machine
        assert moved.state is RunState.RUNNING
        moved.stop()
        moved.vm.close()
        assert not _still_open(idle[0])  # the oldest made room
        assert _still_open(idle[-1]) and _still_open(idle[-2])  # the newest are held yet
    finally:
        _close_all(idle, receiver, listener, machine)
    logged = " | ".join(r.message for r in caplog.records)
    assert "to make room for" in logged and "not authenticated after" in logged


def test_authenticated_connections_are_never_dropped_to_make_room(kvm: Kvm) -> None:
    """Slots full of key holders still reading their first message: a new connection is closed at
    once (before any challenge), and none of theirs is dropped for it."""
    from migrate.live.receiver import MAX_PER_HOST

    listener = Listener("127.0.0.1:0", b"")
    receiver = Receiver(listener, kvm, handshake_timeout=120)
    held = [connect(listener.address, b"", timeout=30) for _ in range(MAX_PER_HOST)]
    try:
        deadline = time.monotonic() + 30  # the receiver marks each authenticated just after it says so
        while not all(h.authenticated for h in receiver._handshakes) or len(receiver._handshakes) < MAX_PER_HOST:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        late = socket.create_connection(listener.sock.getsockname())
        late.settimeout(30)
        assert late.recv(64) == b""  # closed, no challenge
        late.close()
        assert all(_still_open(c.sock) for c in held)
    finally:
        for c in held:
            c.close()
        receiver.close()
        listener.close()


def test_recv_and_restore_refuse_a_bad_api_path_before_anything_else(tmp_path: Path) -> None:
    regular = tmp_path / "notes.txt"
    regular.write_text("mine")
    for argv in (["recv", "--listen", "127.0.0.1:0", "--api", str(tmp_path / "missing" / "t.sock")],
                 ["recv", "--listen", "127.0.0.1:0", "--api", str(regular)],
                 ["restore", str(tmp_path / "no.snap"), "--api", str(regular)]):
        proc = subprocess.run([sys.executable, "-m", "migrate.cli", *argv], capture_output=True, text=True,
                              timeout=60)
        err = " ".join(proc.stderr.split())
        assert proc.returncode == 2 and "ControlSocketError" in err and "Traceback" not in err, err
        assert "listening on" not in err
    assert regular.read_text() == "mine"
