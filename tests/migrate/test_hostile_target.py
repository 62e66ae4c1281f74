"""A hostile target against a real source: whatever it answers, the source's VM process is not
made to allocate without bound or to stall on the target's words, the migration fails with a
typed reason, and the guest runs on at the source."""

from __future__ import annotations

import resource
from collections.abc import Iterator

import msgpack
import pytest
from hostile import FakeTarget, empty_arrays, frame_of, raw_frame

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from hv.vmm.machine import Machine, RunState
from migrate import MigrationOptions, send
from migrate.protocol import Error, ErrorCode, MessageKind
from migrate.transport.framing import MAX_TEXT

MiB = 1 << 20


@pytest.fixture
def machine(kvm: Kvm) -> Iterator[Machine]:
    console = bg.GuestConsole()
    m = builtin_machine(kvm, bg.GuestParams(ws_mib=4, rate_mib_s=20), VmConfig(mem_size=64 * MiB), console)
    m.start()
    try:
        console.wait_pass(1, timeout=30)
        yield m
    finally:
        m.stop()
        m.vm.close()


def _send_to(machine: Machine, reply: bytes):
    target = FakeTarget(reply)
    stats = send(machine, target.address, MigrationOptions(timeout=10))
    target.join()
    assert stats.outcome == "failed", stats
    assert machine.state is RunState.RUNNING and not machine.vm.dirty_logging  # the guest runs on here
    return stats, target


def _told_back(target: FakeTarget) -> Error:
    errors = [m for m in target.got if isinstance(m, Error)]
    assert errors, target.got
    return errors[0]


def test_an_oversized_reply_is_refused_from_its_frame_header(machine: Machine) -> None:
    stats, target = _send_to(machine, raw_frame(MessageKind.ACCEPT, b"\0" * 24 * MiB))
    assert stats.failure == "protocol-violation" and "frame of kind 2" in stats.reason  # by its length alone


@pytest.mark.parametrize("kind", [MessageKind.REJECT, MessageKind.ERROR])
def test_a_msgpack_bomb_in_a_reply_is_refused_by_the_budget(machine: Machine, kind: MessageKind) -> None:
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    body = b"\x82" + msgpack.packb("problems" if kind is MessageKind.REJECT else "message") + empty_arrays(900 * 1024)
    body += msgpack.packb("code") + msgpack.packb(8)
    stats, target = _send_to(machine, raw_frame(kind, body))
    assert stats.failure == "protocol-violation" and "undecodable" in stats.reason
    assert _told_back(target).code is ErrorCode.PROTOCOL
    # ~1 M empty lists decoded would be ~64 MiB; refused, the peak does not move by that
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grew < 32, f"the source's peak RSS grew by {grew:.0f} MiB"


def test_a_huge_error_text_is_cut_before_it_is_decoded(machine: Machine) -> None:
    text = "é" * (450 * 1024)  # 900 KiB of UTF-8, under the ERROR frame's cap
    stats, _ = _send_to(machine, frame_of(MessageKind.ERROR, {"code": int(ErrorCode.INTERNAL), "message": text}))
    assert "the target failed: INTERNAL" in stats.reason
    kept = stats.reason.split("INTERNAL: ", 1)[1].removesuffix(" (the guest is here)")
    assert len(kept.encode()) <= MAX_TEXT and kept.startswith("é" * 100)


def test_an_error_text_over_the_frame_cap_is_refused_unread(machine: Machine) -> None:
    stats, _ = _send_to(machine, frame_of(MessageKind.ERROR, {"code": 8, "message": "x" * (8 * MiB)}))
    assert stats.failure == "protocol-violation" and "frame" in stats.reason


def test_a_reject_with_endless_problems_keeps_a_bounded_few(machine: Machine) -> None:
    target = FakeTarget(frame_of(MessageKind.REJECT, {"problems": ["p" * 3000] * 300}))
    stats = send(machine, target.address, MigrationOptions(timeout=10))
    target.join()
    assert stats.outcome == "rejected"
    assert len(stats.problems) == 256 and all(len(p) == 3000 for p in stats.problems)
    assert machine.state is RunState.RUNNING


@pytest.mark.parametrize("kind", [MessageKind.COMMIT, MessageKind.READY, MessageKind.HELLO])
def test_an_out_of_order_reply_is_a_protocol_violation_the_target_is_told(machine: Machine,
                                                                          kind: MessageKind) -> None:
    fields = {MessageKind.COMMIT: {}, MessageKind.READY: {}, MessageKind.HELLO: {
        "protocol_version": 1, "format_version": "2.0", "producer": "x", "config": b"", "layout": b"",
        "cpuid": b""}}[kind]
    stats, target = _send_to(machine, frame_of(kind, fields))
    assert stats.failure == "protocol-violation" and "cannot receive" in stats.reason
    assert _told_back(target).code is ErrorCode.PROTOCOL
