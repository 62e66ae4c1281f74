"""The migration protocol state machine: table coverage and the hand-over invariants."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrate.protocol import (
    MESSAGE_TYPES,
    TRANSITIONS,
    Accept,
    Cancel,
    Channel,
    Commit,
    Complete,
    Error,
    ErrorCode,
    Hello,
    LocalProtocolError,
    MessageKind,
    Outcome,
    Pages,
    Protocol,
    Query,
    Ready,
    Reject,
    RemoteProtocolError,
    Resumed,
    Role,
    RoundDone,
    S,
    State,
    Verdict,
)

SAMPLE = {
    MessageKind.HELLO: Hello(1, "1.0", "test", b"c", b"l", b"u"),
    MessageKind.ACCEPT: Accept(),
    MessageKind.REJECT: Reject(("memory size differs",)),
    MessageKind.PAGES: Pages(0, b"p"),
    MessageKind.ROUND_DONE: RoundDone(0, 1),
    MessageKind.STATE: State(b"s"),
    MessageKind.COMPLETE: Complete(b"e"),
    MessageKind.READY: Ready(),
    MessageKind.COMMIT: Commit(),
    MessageKind.RESUMED: Resumed(),
    MessageKind.CANCEL: Cancel("user"),
    MessageKind.ERROR: Error(ErrorCode.INTERNAL, "boom"),
    MessageKind.CHANNEL: Channel(b"session", 1),  # valid only as an extra stream's first message
    MessageKind.QUERY: Query(b"session"),  # a connection of its own: resolving a doubt
    MessageKind.VERDICT: Verdict(b"session", "committed"),
}

# The happy path, as (sender, message).
HAPPY = [
    (Role.SOURCE, SAMPLE[MessageKind.HELLO]),
    (Role.TARGET, Accept()),
    (Role.SOURCE, Pages(0, b"all")),
    (Role.SOURCE, RoundDone(0, 10)),
    (Role.SOURCE, Pages(1, b"dirty")),
    (Role.SOURCE, State(b"vcpus")),
    (Role.SOURCE, Complete(b"digest")),
    (Role.TARGET, Ready()),
    (Role.SOURCE, Commit()),
    (Role.TARGET, Resumed()),
]


def _pair() -> dict[Role, Protocol]:
    return {Role.SOURCE: Protocol(Role.SOURCE), Role.TARGET: Protocol(Role.TARGET)}


def _other(role: Role) -> Role:
    return Role.TARGET if role is Role.SOURCE else Role.SOURCE


def test_every_message_kind_has_a_type_and_zero_is_invalid() -> None:
    assert set(MESSAGE_TYPES) == set(MessageKind) - {MessageKind.INVALID}
    assert MessageKind.INVALID == 0


def test_happy_path_ends_with_the_target_owning_the_guest() -> None:
    sides = _pair()
    for sender, msg in HAPPY:
        sides[sender].send(msg)
        sides[_other(sender)].receive(msg)
    assert sides[Role.SOURCE].state is S.DONE and sides[Role.TARGET].state is S.DONE
    assert sides[Role.SOURCE].outcome() is Outcome.SOURCE_STOP
    assert sides[Role.TARGET].outcome() is Outcome.TARGET_RUN


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("direction", ["send", "recv"])
@pytest.mark.parametrize("kind", [k for k in MessageKind if k])
def test_every_state_input_pair_is_either_in_the_table_or_refused(role, state, direction, kind) -> None:
    proto = Protocol(role, state=state)
    msg = SAMPLE[kind]
    act = proto.send if direction == "send" else proto.receive
    if (role, state, direction, kind) in TRANSITIONS:
        assert act(msg) is TRANSITIONS[(role, state, direction, kind)]
    else:
        with pytest.raises(LocalProtocolError if direction == "send" else RemoteProtocolError):
            act(msg)
        assert proto.state is state  # a refused message changes nothing


def test_reject_carries_every_problem_back() -> None:
    sides = _pair()
    sides[Role.SOURCE].send(HAPPY[0][1])
    sides[Role.TARGET].receive(HAPPY[0][1])
    reject = Reject(("vcpus: 2 != 1", "device serial0 missing"))
    sides[Role.TARGET].send(reject)
    sides[Role.SOURCE].receive(reject)
    assert sides[Role.SOURCE].problems == reject.problems
    assert sides[Role.SOURCE].outcome() is Outcome.SOURCE_RESUME


def _running_copies(sides: dict[Role, Protocol]) -> tuple[int, bool]:
    src, tgt = sides[Role.SOURCE].outcome(), sides[Role.TARGET].outcome()
    running = (src is Outcome.SOURCE_RESUME) + (tgt is Outcome.TARGET_RUN)
    held = src is Outcome.SOURCE_HOLD
    return running, held


@pytest.mark.parametrize("cut", range(len(HAPPY) + 1))
@pytest.mark.parametrize("delivered", [True, False])
def test_a_cut_link_never_gives_two_copies_and_never_loses_the_guest(cut: int, delivered: bool) -> None:
    """Run the happy path up to message `cut`; that message is sent and either delivered or lost;
    then the link dies for both sides."""
    sides = _pair()
    for i, (sender, msg) in enumerate(HAPPY):
        if i > cut:
            break
        sides[sender].send(msg)
        if i < cut or delivered:
            sides[_other(sender)].receive(msg)
    for side in sides.values():
        side.connection_lost()
    running, held = _running_copies(sides)
    if sides[Role.SOURCE].state is S.DONE:
        assert running == 1
    else:
        assert running <= 1
        assert running == 1 or held, "the guest runs nowhere and the source does not hold it"


@given(st.integers(0, len(HAPPY) - 1), st.sampled_from([Role.SOURCE, Role.TARGET]),
       st.sampled_from([ErrorCode.INTERNAL, ErrorCode.DIGEST_MISMATCH, ErrorCode.TIMEOUT]))
def test_an_error_at_any_point_leaves_exactly_one_copy(step: int, who: Role, code: ErrorCode) -> None:
    sides = _pair()
    for sender, msg in HAPPY[:step]:
        sides[sender].send(msg)
        sides[_other(sender)].receive(msg)
    err = Error(code, "injected")
    try:
        sides[who].send(err)
    except LocalProtocolError:
        return  # this side may not fail here (the source after Commit): covered by the cut test
    sides[_other(who)].receive(err)
    running, held = _running_copies(sides)
    assert running == 1 and not held


def test_source_after_commit_cannot_cancel_or_fail() -> None:
    src = Protocol(Role.SOURCE, state=S.COMMITTED)
    for msg in (Cancel("late"), Error(ErrorCode.INTERNAL, "late")):
        with pytest.raises(LocalProtocolError):
            src.send(msg)
    assert src.connection_lost() is S.IN_DOUBT
    assert src.outcome() is Outcome.SOURCE_HOLD


def test_target_with_commit_runs_even_if_resumed_is_lost() -> None:
    tgt = Protocol(Role.TARGET, state=S.READY)
    tgt.receive(Commit())
    tgt.connection_lost()
    assert tgt.outcome() is Outcome.TARGET_RUN


def test_unknown_objects_are_remote_protocol_errors() -> None:
    with pytest.raises(RemoteProtocolError):
        Protocol(Role.TARGET).receive(object())  # type: ignore[arg-type]
