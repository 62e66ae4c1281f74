"""A hostile source that breaks what its own HELLO negotiated (issue 21, items 2 and 6): post-copy
messages in a session whose HELLO said `postcopy: false`, a format version this side does not
read, more vCPUs than this host or this target takes. Each is refused typed, told to the source,
with no VM left behind and no thread dying of an exception."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
from hostile import FakeSource, kvm_vm_fds, sample_state

from hv.kvm.dirty import DirtyBitmap
from hv.kvm.kvm import Kvm
from migrate.errors import IncompatibleError, ProtocolViolation
from migrate.live.postcopy.missing import encode_missing
from migrate.protocol import Accept, Discard, ErrorCode, Postcopy, Reject, State


@pytest.fixture(scope="module")
def state(kvm: Kvm):
    return sample_state(kvm)


@pytest.fixture
def thread_crashes():
    crashes: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook
    threading.excepthook = crashes.append
    try:
        yield crashes
    finally:
        threading.excepthook = previous


def _three_pages(state) -> bytes:
    missing = {}
    for r in state.layout.memory.ranges:
        bits = DirtyBitmap(r.size // 4096)
        if not missing:
            bits.set_range(16, 3)
        missing[r.address] = bits
    return encode_missing(missing)


@pytest.mark.parametrize("switch", ["postcopy", "discard"])
def test_postcopy_in_a_session_that_did_not_negotiate_it_is_a_protocol_violation(kvm: Kvm, state, switch: str,
                                                                                  thread_crashes) -> None:
    fake = FakeSource(kvm)
    fake.send(fake.hello(state, postcopy=False))
    assert isinstance(fake.receive(), Accept)
    fake.send(State(fake.state_payload(state)))
    fake.send(Postcopy(_three_pages(state), 3) if switch == "postcopy" else Discard(_three_pages(state), 3))
    told = fake.error_told()
    error = fake.finish()
    assert isinstance(error, ProtocolViolation), repr(error)
    assert told.code is ErrorCode.PROTOCOL and "not negotiated" in told.message, told
    assert fake.incoming is None  # no guest runs here with holes nobody fills
    assert kvm_vm_fds() == fake.vms_before
    assert not thread_crashes, thread_crashes


def test_a_format_version_this_side_does_not_read_is_rejected(kvm: Kvm, state) -> None:
    fake = FakeSource(kvm)
    fake.send(replace(fake.hello(state), format_version="9.0"))
    reply = fake.receive()
    assert isinstance(reply, Reject), reply
    assert any("format version 9.0" in p for p in reply.problems), reply.problems
    assert isinstance(fake.finish(), IncompatibleError)
    assert kvm_vm_fds() == fake.vms_before


@pytest.mark.parametrize("vcpus", [64, 4096])
def test_more_vcpus_than_this_target_takes_are_rejected_before_any_vm(kvm: Kvm, state, vcpus: int) -> None:
    many = replace(state, config=replace(state.config, vcpus=vcpus))
    fake = FakeSource(kvm, max_vcpus=8)
    threads = threading.active_count()
    fake.send(fake.hello(many))
    reply = fake.receive()
    assert isinstance(reply, Reject), reply
    assert any(f"{vcpus} vCPUs" in p for p in reply.problems), reply.problems
    assert isinstance(fake.finish(), IncompatibleError)
    assert kvm_vm_fds() == fake.vms_before
    assert threading.active_count() <= threads


@pytest.mark.parametrize("version, ok", [("2.0", True), ("2.7", True), ("9.0", False), ("\u00b2.0", False),
                                         ("2", False), ("", False), ("2.0.1", False), ("1" * 10 + ".0", False)])
def test_a_format_version_is_read_as_ascii_major_minor(version: str, ok: bool) -> None:
    from migrate.live.admission import format_version_problem

    assert (format_version_problem(version) == "") is ok  # never a ValueError ("²" is a digit to isdigit)
