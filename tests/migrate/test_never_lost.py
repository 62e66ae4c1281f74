"""Never a lost guest after Commit (issue 21, item 1), through the commands as a user runs them:
a `migrate recv --api P` claims P before it says Ready, so `migrate send` reports "completed"
only when the target's guest runs with its control socket bound; and a bad `--api` fails
`hv run`, `migrate restore` and `migrate recv` before anything boots, restores or is accepted."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from hv.vmm.command import ExitStatus
from hv.vmm.control import SOCKET_PATH_MAX

from tests.migrate.processes import run_together
from tests.migrate.test_cli import HV, MIGRATE, Vmm, _assert_no_traceback, _port, run


def _path_of_length(directory: Path, length: int, suffix: str = ".sock") -> Path:
    room = length - len(os.fsencode(directory)) - 1 - len(suffix)
    assert room > 0, directory
    path = directory / ("p" * room + suffix)
    assert len(os.fsencode(path)) == length
    return path


def test_a_guest_migrated_to_a_long_api_path_runs_there_with_its_socket(tmp_path: Path) -> None:
    """The issue's by-hand case: P is 100 bytes (AF_UNIX takes it; the old staging name, ~25
    bytes longer, did not), and someone tries to put a file at P after recv started. Before,
    recv bound P only after Commit, failed, and the guest was lost while send said completed."""
    port = _port()
    api = _path_of_length(tmp_path, 100)
    target = Vmm([*MIGRATE, "recv", "--listen", f"127.0.0.1:{port}", "--once"], api, wait_for_socket=False)
    source = Vmm([*HV, "run", "--mem", "64", "--ws", "8"], tmp_path / "source.sock")
    try:
        target.wait_for_line("listening on")
        assert api.is_socket()  # claimed when recv started, not after Commit
        try:
            api.write_text("x\n")  # another user's file at P: a socket cannot be opened as one
        except OSError:
            pass
        sent = run([*MIGRATE, "send", "--api", str(source.api), "--to", f"127.0.0.1:{port}", "--json"])
        assert sent.returncode == ExitStatus.OK, sent.stderr
        assert json.loads(sent.stdout)["outcome"] == "completed"
        target.wait_for_line("control socket")
        there = run([*HV, "status", str(api), "--json"])
        assert there.returncode == 0, there.stderr
        assert json.loads(there.stdout)["state"] == "running"  # the one copy, reachable at P
        assert run([*HV, "stop", str(api)]).returncode == 0
        status, log = target.finish(terminate=False)
        assert status == 0, log
        _assert_no_traceback(log)
        assert not api.exists()  # removed at the end: it was ours
    finally:
        source.kill()
        target.kill()


def test_a_bad_api_fails_before_anything_boots_restores_or_is_accepted(tmp_path: Path) -> None:
    too_long = str(_path_of_length(tmp_path, SOCKET_PATH_MAX + 1))
    a_file = tmp_path / "file.sock"
    a_file.write_text("not a socket")
    live = tmp_path / "live.sock"  # another VM's: it answers
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(live))
        other.listen()
        port = _port()
        done = run_together(*([*HV, "run", "--mem", "64", "--timeout", "30", "--api", str(api)]
                              for api in (too_long, live)),
                            *([*MIGRATE, "recv", "--listen", f"127.0.0.1:{port}", "--api", str(api)]
                              for api in (a_file, live)),
                            [*MIGRATE, "restore", str(tmp_path / "none.snap"), "--api", too_long])
    for result in done:
        assert result.returncode == ExitStatus.USAGE, (result.args, result.stderr)
        _assert_no_traceback(result.stderr)
        assert "ControlSocketError" in result.stderr, result.stderr
        assert "booting" not in result.stderr and "listening on" not in result.stderr, result.stderr
    assert a_file.read_text() == "not a socket"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging name left behind


def test_a_request_before_the_machine_waits_for_it_then_is_told_no_machine(tmp_path: Path) -> None:
    from hv.vmm.control import ControlContext, ControlError, ControlServer, call

    api = tmp_path / "t.sock"
    with ControlServer(api, load_extensions=False, attach_wait=0.2) as server:  # claimed, no machine yet
        try:
            call(api, "status", timeout=10)
        except ControlError as e:
            assert e.kind == "NoMachine", e
        else:
            raise AssertionError("answered without a machine")
        server.register("echo", lambda _ctx, args, _p: {"echo": args})
        server.attach_wait = 30.0  # whether it comes before the attach or after, it is answered
        asked = threading.Thread(target=lambda: answers.append(call(api, "echo", timeout=10, x=1)))
        answers: list[dict] = []
        asked.start()
        server.attach(ControlContext(machine=None))  # type: ignore[arg-type]
        asked.join(10)
        assert answers == [{"echo": {"x": 1}}]


def test_the_restore_path_claims_before_it_restores(tmp_path: Path) -> None:
    # an unreadable snapshot with a good --api: the restore's refusal, and the socket gone after
    api = tmp_path / "r.sock"
    snap = tmp_path / "bad.snap"
    snap.write_bytes(b"not a snapshot")
    done = run([*MIGRATE, "restore", str(snap), "--api", str(api)])
    assert done.returncode == ExitStatus.REFUSED, done.stderr
    assert not api.exists()
    _assert_no_traceback(done.stderr)


def test_a_run_prepared_for_migration_after_failed_migration_holds_no_more_threads(kvm) -> None:
    """A target prepares each machine's run before Ready; machines whose migration then failed
    (discarded) leave no waiting thread behind, so a peer failing migration after migration
    costs no thread more than the one run it may have."""
    from hv.guests import builtin as bg
    from hv.kvm.vm import VmConfig
    from hv.vmm.builder import builtin_machine
    from hv.vmm.cli import MachineRun
    from hv.vmm.machine import discard

    watch = bg.EndWatch()
    counts = []
    with MachineRun(None) as prepared:
        for _ in range(4):
            machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=32 << 20))
            machine.start(paused=True)
            prepared.prepare(machine, watch=watch)
            discard(machine)  # its migration failed after the target prepared
            counts.append(threading.active_count())
    # (each discarded machine's waiters end; the last context's one ends with the next prepare)
    deadline = time.monotonic() + 10
    while threading.active_count() > counts[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() <= counts[0], counts
