"""The migration protocol state machine: table coverage and the hand-over invariants."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrate.protocol import (
    MESSAGE_TYPES,
    RECONNECT_VERDICTS,
    GUARDED,
    TRANSITIONS,
    Accept,
    Applied,
    Cancel,
    Channel,
    Commit,
    Complete,
    Discard,
    Discarded,
    Error,
    ErrorCode,
    Fetch,
    Finished,
    HandOver,
    Missing,
    Postcopy,
    Reconnect,
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
    MessageKind.POSTCOPY: Postcopy(b"bitmap", 3),
    MessageKind.FETCH: Fetch(b"\0" * 8),  # valid only on the fetch channel
    MessageKind.FINISHED: Finished(),
    MessageKind.RECONNECT: Reconnect(b"session"),
    MessageKind.MISSING: Missing(b"bitmap", 2),
    MessageKind.DISCARD: Discard(b"bitmap", 2),
    MessageKind.DISCARDED: Discarded(),
    MessageKind.APPLIED: Applied(0),
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
@pytest.mark.parametrize("negotiated", [False, True], ids=["plain", "postcopy-and-acks-negotiated"])
def test_every_state_input_pair_is_either_in_the_table_or_refused(role, state, direction, kind, negotiated) -> None:
    proto = Protocol(role, state=state, postcopy=negotiated, round_acks=negotiated)
    msg = SAMPLE[kind]
    act = proto.send if direction == "send" else proto.receive
    key = (role, state, direction, kind)
    if key in TRANSITIONS and (key not in GUARDED or negotiated):  # a guarded one: only if HELLO negotiated it
        expected = TRANSITIONS[(role, state, direction, kind)]
        if state is S.RECONNECTING and direction == "recv" and kind is MessageKind.VERDICT:
            expected = RECONNECT_VERDICTS.get(msg.hand_over, expected)  # the one guarded transition
        assert act(msg) is expected
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
    held = src in (Outcome.SOURCE_HOLD, Outcome.SOURCE_SERVE)
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


# --- post-copy (protocol.py, point 7) -------------------------------------------------------------

POSTCOPY_HAPPY = [
    (Role.SOURCE, Hello(1, "1.0", "test", b"c", b"l", b"u", postcopy=True)),
    (Role.TARGET, Accept()),
    (Role.SOURCE, Pages(0, b"all")),
    (Role.SOURCE, RoundDone(0, 10)),
    (Role.SOURCE, Discard(b"bitmap", 3)),
    (Role.TARGET, Discarded()),
    (Role.SOURCE, State(b"vcpus")),
    (Role.SOURCE, Postcopy(b"bitmap", 4)),
    (Role.TARGET, Ready()),
    (Role.SOURCE, Commit()),
    (Role.TARGET, Resumed()),
    (Role.SOURCE, Pages(1, b"pushed")),
    (Role.SOURCE, Complete(b"digest")),
    (Role.TARGET, Finished()),
]


def _walk(path, sides=None) -> dict[Role, Protocol]:
    sides = sides or _pair()
    for sender, msg in path:
        sides[sender].send(msg)
        sides[_other(sender)].receive(msg)
    return sides


def _one_copy_and_none_lost(sides: dict[Role, Protocol]) -> None:
    """Never two running copies; never none while both sides live; a target that runs the guest
    in post-copy has a source that still holds the pages it may lack."""
    src, tgt = sides[Role.SOURCE], sides[Role.TARGET]
    running, held = _running_copies(sides)
    held = held or src.outcome() is Outcome.UNDECIDED  # mid-exchange before Commit: it is the source's
    assert running <= 1, (src.state, tgt.state)
    if src.state is S.DONE:
        assert running == 1
        return
    assert running == 1 or held, ("the guest runs nowhere and the source does not hold it", src.state, tgt.state)
    if tgt.outcome() is Outcome.TARGET_RUN and tgt.state is not S.DONE and tgt.state is not S.COMMITTED:
        assert src.outcome() is Outcome.SOURCE_SERVE, (src.state, tgt.state)


def test_postcopy_happy_path_ends_with_the_target_owning_the_guest_and_the_source_stopping() -> None:
    sides = _walk(POSTCOPY_HAPPY)
    assert sides[Role.SOURCE].state is S.DONE and sides[Role.TARGET].state is S.DONE
    assert sides[Role.SOURCE].outcome() is Outcome.SOURCE_STOP


def test_after_the_switchs_commit_the_source_never_resumes_before_finished() -> None:
    for step in range(POSTCOPY_HAPPY.index((Role.SOURCE, Commit())) + 1, len(POSTCOPY_HAPPY)):
        sides = _walk(POSTCOPY_HAPPY[:step])
        assert sides[Role.SOURCE].outcome() is Outcome.SOURCE_SERVE
        for msg in (Cancel("late"), Error(ErrorCode.INTERNAL, "late")):
            if sides[Role.SOURCE].state is S.SWITCH_COMMITTED:
                with pytest.raises(LocalProtocolError):
                    Protocol(Role.SOURCE, state=S.SWITCH_COMMITTED).send(msg)


@pytest.mark.parametrize("cut", range(len(POSTCOPY_HAPPY)))
@pytest.mark.parametrize("delivered", [True, False])
def test_a_cut_link_in_postcopy_holds_both_sides_and_a_reconnect_carries_on(cut: int, delivered: bool) -> None:
    sides = _walk(POSTCOPY_HAPPY[:cut])
    sender, msg = POSTCOPY_HAPPY[cut]
    sides[sender].send(msg)
    if delivered:
        sides[_other(sender)].receive(msg)
    for side in sides.values():
        side.connection_lost()
    _one_copy_and_none_lost(sides)
    src, tgt = sides[Role.SOURCE], sides[Role.TARGET]
    if src.state is not S.POSTCOPY_PAUSED:
        return
    # the source comes back on a new connection
    src.link_back()
    src.send(Reconnect(b"session"))
    if tgt.state is S.POSTCOPY_PAUSED:  # it took Commit: it runs the guest and lacks pages
        tgt.link_back()
        tgt.receive(Reconnect(b"session"))
        answer = Missing(b"bitmap", 1)
        tgt.send(answer)
        src.receive(answer)
        _walk([(Role.SOURCE, Pages(2, b"rest")), (Role.SOURCE, Complete(b"digest")), (Role.TARGET, Finished())],
              sides)
        assert src.state is S.DONE and tgt.state is S.DONE
    elif tgt.state is S.DONE:  # it finished; only its Finished was lost
        src.receive(Verdict(b"session", HandOver.COMMITTED))
        assert src.outcome() is Outcome.SOURCE_STOP
    else:  # it never took Commit: its receiver fences the session and says so
        assert tgt.outcome() is Outcome.TARGET_DISCARD
        src.receive(Verdict(b"session", HandOver.NOT_COMMITTED))
        assert src.outcome() is Outcome.SOURCE_RESUME
    _one_copy_and_none_lost(sides)


def test_a_reconnect_answered_unknown_settles_nothing() -> None:
    src = Protocol(Role.SOURCE, state=S.POSTCOPY_PAUSED)
    src.send(Reconnect(b"session"))
    src.receive(Verdict(b"session", HandOver.UNKNOWN))
    assert src.state is S.POSTCOPY_PAUSED and src.outcome() is Outcome.SOURCE_SERVE


@given(st.integers(POSTCOPY_HAPPY.index((Role.TARGET, Resumed())) + 1, len(POSTCOPY_HAPPY) - 1),
       st.sampled_from([Role.SOURCE, Role.TARGET]))
def test_an_error_after_the_switch_breaks_off_with_the_source_holding(step: int, who: Role) -> None:
    sides = _walk(POSTCOPY_HAPPY[:step])
    err = Error(ErrorCode.DIGEST_MISMATCH, "injected")
    sides[who].send(err)
    sides[_other(who)].receive(err)
    assert sides[Role.TARGET].outcome() is Outcome.TARGET_PAUSE
    assert sides[Role.SOURCE].outcome() is Outcome.SOURCE_HOLD
    _one_copy_and_none_lost(sides)


@settings(max_examples=300)
@given(st.lists(st.sampled_from(["deliver", "lose", "cut", "reconnect"]), max_size=40))
def test_any_walk_of_deliveries_losses_and_reconnects_keeps_one_copy(events: list[str]) -> None:
    """The post-copy path driven by random events: a message delivered, a message lost (then the
    link is cut), a cut, a reconnect. At every step: at most one running copy, never none while
    both sides live."""
    sides, step = _pair(), 0
    for event in events:
        src, tgt = sides[Role.SOURCE], sides[Role.TARGET]
        if event in ("deliver", "lose") and step < len(POSTCOPY_HAPPY) and not src._link_lost:
            sender, msg = POSTCOPY_HAPPY[step]
            try:
                sides[sender].send(msg)
            except LocalProtocolError:
                continue
            step += 1
            if event == "deliver":
                sides[_other(sender)].receive(msg)
            else:
                src.connection_lost(), tgt.connection_lost()
        elif event == "cut":
            src.connection_lost(), tgt.connection_lost()
        elif event == "reconnect" and src.state is S.POSTCOPY_PAUSED:
            src.link_back()
            src.send(Reconnect(b"s"))
            if tgt.state is S.POSTCOPY_PAUSED:
                tgt.link_back()
                tgt.receive(Reconnect(b"s"))
                tgt.send(Missing(b"b", 1))
                src.receive(Missing(b"b", 1))
                step = POSTCOPY_HAPPY.index((Role.SOURCE, Pages(1, b"pushed")))  # the push goes on
            else:
                verdict = {Outcome.TARGET_DISCARD: HandOver.NOT_COMMITTED, Outcome.TARGET_RUN: HandOver.COMMITTED}
                src.receive(Verdict(b"s", verdict.get(tgt.outcome(), HandOver.UNKNOWN)))
        _one_copy_and_none_lost(sides)


@pytest.mark.parametrize("switch", [Postcopy(b"bitmap", 3), Discard(b"bitmap", 3)])
def test_a_session_whose_hello_did_not_negotiate_postcopy_cannot_switch(switch) -> None:
    sides = _walk(HAPPY[:3])  # Hello (postcopy false), Accept, Pages
    for role, act, error in ((Role.SOURCE, "send", LocalProtocolError), (Role.TARGET, "receive", RemoteProtocolError)):
        with pytest.raises(error, match="postcopy was not negotiated"):
            getattr(sides[role], act)(switch)
        assert sides[role].state is S.TRANSFER
    assert _walk(POSTCOPY_HAPPY)[Role.TARGET].state is S.DONE  # negotiated: the same switch is taken


def test_round_acks_only_when_the_hello_asked_and_a_late_one_moves_nothing() -> None:
    """Applied answers a live round only in a session whose Hello asked for it; the source reads
    one in TRANSFER or, late (it paused without waiting), up to Ready, and its state stays."""
    hello = Hello(1, "1.0", "test", b"c", b"l", b"u", round_acks=True)
    plain = _walk(HAPPY[:4])  # Hello without round_acks, Accept, Pages, RoundDone
    with pytest.raises(LocalProtocolError, match="round_acks was not negotiated"):
        plain[Role.TARGET].send(Applied(0))
    with pytest.raises(RemoteProtocolError, match="round_acks was not negotiated"):
        plain[Role.SOURCE].receive(Applied(0))
    sides = _walk([(Role.SOURCE, hello), *HAPPY[1:4]])
    assert sides[Role.TARGET].send(Applied(0)) is S.TRANSFER
    assert sides[Role.SOURCE].receive(Applied(0)) is S.TRANSFER
    for sender, msg in HAPPY[4:7]:  # Pages, State, Complete: the source waits for Ready
        sides[sender].send(msg)
        sides[_other(sender)].receive(msg)
    assert sides[Role.SOURCE].receive(Applied(1)) is S.VERIFYING  # a late one
    with pytest.raises(LocalProtocolError):
        sides[Role.TARGET].send(Applied(1))  # past TRANSFER the target has none to send
    for sender, msg in HAPPY[7:]:
        sides[sender].send(msg)
        sides[_other(sender)].receive(msg)
    assert sides[Role.SOURCE].outcome() is Outcome.SOURCE_STOP and sides[Role.TARGET].outcome() is Outcome.TARGET_RUN
