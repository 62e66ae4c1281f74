"""The live-migration protocol: a sans-IO state machine for each side.

Everything that affects the protocol's state lives in this file: the messages, the states, and one
transition table. Sockets, threads, KVM and the byte encoding live elsewhere (`migrate.transport`,
`migrate.live.source`, `migrate.live.target`); they feed messages in and act on what comes out.

Why it is over 450 lines: the never-two-copies argument below is made of the messages' fields, the
states and the table's rows, and is checked by reading them side by side; split, a reviewer of a
change to one would have to hold the other two in mind across files. About a sixth of it is the
argument itself, the rest declarations (23 message types, 21 states, the table) and `Protocol`,
whose few short methods step the table.

    Source                                              Target
      | Hello(versions, config, layout, cpuid) ------------> |   check everything, list every mismatch
      | <------------------------ Accept  |  Reject(problems) |
      | Pages(round 0: all memory) ------------------------> |   written into the target's RAM
      | RoundDone(0) ...  Pages(round n: dirty) ... -------> |   (guest keeps running on the source)
      | <---------------------------- Applied(n) (acks)     |   round n is in the target's RAM
      |   -- source pauses the guest (downtime starts) --    |
      | Pages(final dirty) + State(vcpus, vm, devices) ----> |
      | Complete(memory digest, totals) -------------------> |   verify digest, totals, layout; build VM
      | <-------------------------------------------- Ready  |   (paused, not running)
      | Commit --------------------------------------------> |   the point of no return for the source
      | <------------------------------------------ Resumed  |   target runs the guest (downtime ends)
      |   source stops its copy                              |
    Either side may send Error(code, message) before Commit; the source may send Cancel.

With `Hello.round_acks` (and the Accept's consent) the target answers a live round's
RoundDone(ack) with Applied once the round is in its RAM, and the source waits for the last one
before it pauses: on a shared host the target may lag a round behind the sender, and whatever it
has not read yet it would read in the downtime. Applied changes no state (point 1 is unchanged:
it says nothing of a verified copy); a late one is read past.

Post-copy (`Hello.postcopy`; a fetch channel opens beside the page streams) takes another way
at the pause: the pages the target lacks stay behind and it runs the guest on what it has.

    Source                                              Target
      | Discard(pages dirtied since sent) -----------------> |   hash what it holds, give those back
      | <---------------------------------------- Discarded  |   (the guest still runs on the source)
      |   -- source pauses the guest (downtime starts) --    |
      | State + Postcopy(bitmap of the pages still missing) -> |   apply state, make those pages missing
      | <------------------------------------------- Ready  |   (userfaultfd registered; paused)
      | Commit --------------------------------------------> |
      | <------------------------------------------ Resumed  |   the guest runs here (downtime ends)
      | Pages(background push, faulted pages' neighbours first) -> | placed as they come
      |   fetch channel: <- Fetch(addresses) / Pages(them) -> |   a vCPU's fault, answered at once
      | Complete(the digest of the memory at the switch) --> |   every page in, digest checked
      | <----------------------------------------- Finished  |   the source stops its copy
      |   link lost after Commit: both wait; the source comes back with Reconnect(session) on a
      |   new connection, the target answers Missing(what it still lacks), the push goes on.

Never two running copies, never a lost guest. The hand-over is a two-phase commit with the source
as coordinator:
1. The target resumes the guest only after receiving Commit. The source sends Commit only after
   Ready, i.e. after the target holds a verified, complete copy.
2. Before sending Commit, the source may resume its own copy on any failure (Error, Cancel, a cut
   link, a timeout): the target has no Commit, so it cannot be running the guest — it discards its
   half-built VM. Exactly one copy runs: the source's.
3. After sending Commit, the source never resumes on its own: the target may have received Commit
   and be running. If `Resumed` arrives, the source stops for good (one copy: the target's). If the
   target reports Error after Commit, it promises it did not run the guest, so the source may
   resume. If the link drops after Commit with no answer, the source is IN_DOUBT: it keeps its copy
   paused and intact (at most one copy runs; none is lost) until an operator, or a later query to
   the target, settles it. No protocol over an unreliable link can avoid this last window (the
   two generals problem); it is as small as one message's flight, and it loses nothing.
4. A target that has Commit resumes even if its `Resumed` is lost: Commit made it the owner.
5. Nobody else moves the guest meanwhile. From Hello until the exchange ends, the source's
   migration owns its VM's run state (`hv.vmm.owner`): an operator's pause, resume or stop (the
   control socket) is refused with `Busy`, so no command can run the source's copy while the
   protocol holds it paused, nor start a second migration or snapshot of it. IN_DOUBT is a state
   of its own that outlives the migration: the VM stays paused and held, and only
   `migrate resolve` ends it.
7. Post-copy. Up to Ready the argument is 1-2 unchanged (Discard and Postcopy are more
   messages before Ready; the source resumes on any failure; once the target gave pages back
   after Discard, no PAGES may come: they would land where the switch counts pages missing). From Commit on the guest's memory lives in two
   places: the target runs the guest but faults on the pages it lacks, which only the source's
   paused copy holds. So after Commit the source never resumes and never discards its copy until
   `Finished` says the target holds every page (the digest checked): one running copy (the
   target's, or none yet if Commit was lost) and never none while both sides live. A link lost
   after Commit leaves both sides waiting (POSTCOPY_PAUSED): the target's vCPUs that touch a
   missing page wait in the kernel, the rest run on; the source holds its copy and comes back with
   `Reconnect(session)`, answered by `Missing` (what the target still lacks: the push resumes
   from there) or, if the target never took Commit, by a `Verdict` "not-committed" that fences the
   session: then the source resumes (a target without Commit never ran the guest, point 1), or
   "committed" once it finished (its Finished was lost: the source stops), or "unknown" (it
   cannot say: nothing is settled, the source holds on). A target says "committed" of a post-copy
   session only once it holds every page; until then its live exchange answers `Missing`. An
   Error after Commit in post-copy (a page that fails its checks, a digest mismatch) ends the
   exchange BROKEN: the target pauses its guest, the source keeps its copy as it was at the
   switch, and an operator chooses (the guest may have done I/O on the target since).
6. Resolving asks the target, on a new connection to its migration address: `Query(session)`,
   answered by one `Verdict`. The target answers atomically with respect to Commit: "committed"
   if it has taken Commit for that session (it runs, or ran, the guest: the source stops its
   copy), else it *fences* the session (a Commit that arrives later is refused and the half-built
   copy discarded) and answers "not-committed" (the source resumes: the target can never run it).
   A target that does not know the session ("unknown": another process, or one that forgot) or
   does not answer settles nothing: the doubt stays. Only the operator can then force it, and the
   flag says the risk: `--force-resume-source` (two running copies if the target runs it) or
   `--force-stop-source` (no running copy if it does not).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar, Union

PROTOCOL_VERSION = 1


# --- messages --------------------------------------------------------------------------------
# Kinds on the wire reserve 0 for "invalid", so a zeroed message means nothing.


class MessageKind(enum.IntEnum):
    INVALID = 0
    HELLO = 1
    ACCEPT = 2
    REJECT = 3
    PAGES = 4
    ROUND_DONE = 5
    STATE = 6
    COMPLETE = 7
    READY = 8
    COMMIT = 9
    RESUMED = 10
    CANCEL = 11
    ERROR = 12
    CHANNEL = 13  # first message on an extra page stream; not part of the exchange below
    QUERY = 14  # resolving a doubt: the only message of its own connection (point 6 above)
    VERDICT = 15  # the target's answer to QUERY
    POSTCOPY = 16  # the switch to post-copy: what the target still lacks
    FETCH = 17  # the fetch channel: pages a vCPU is waiting for
    FINISHED = 18  # post-copy: every page is in and the digest checked
    RECONNECT = 19  # post-copy, after a lost link: the first message of the source's new connection
    MISSING = 20  # the target's answer to RECONNECT: what it still lacks
    DISCARD = 21  # post-copy, before the pause: pages to give back now, not in the downtime
    DISCARDED = 22  # the target's answer to DISCARD
    APPLIED = 23  # the target's answer to ROUND_DONE(ack): that round is in its RAM


class ErrorCode(enum.IntEnum):
    """Why a side gave up: carried back so the other side can say why."""

    INVALID = 0
    INCOMPATIBLE = 1  # layout/config/CPU mismatch found late
    BAD_STREAM = 2  # a decode, checksum or range error in what was received
    DIGEST_MISMATCH = 3  # memory after the transfer is not what the source had
    RESTORE_FAILED = 4  # KVM refused the state
    RESUME_FAILED = 5  # the target could not start the guest (after Commit: guest never ran)
    AUTH_FAILED = 6
    TIMEOUT = 7
    INTERNAL = 8
    CANCELLED = 9
    PROTOCOL = 10  # the peer sent what the protocol does not allow (out of order, oversized, malformed)


@dataclass(frozen=True)
class Hello:
    kind = MessageKind.HELLO
    protocol_version: int
    format_version: str  # "major.minor" of the stream format
    producer: str
    config: bytes  # encoded VM config section
    layout: bytes  # encoded device + memory layout section
    cpuid: bytes  # encoded CPUID the guest sees
    dry_run: bool = False
    streams: int = 1  # page streams: this connection and streams - 1 more (`Channel`)
    postcopy: bool = False  # the source may switch to post-copy: a fetch channel (`Channel` index streams)
    round_acks: bool = False  # the source asks for Applied after a RoundDone(ack)


@dataclass(frozen=True)
class Accept:
    kind = MessageKind.ACCEPT
    session: bytes = b""  # what each extra page stream presents to join this exchange
    round_acks: bool = False  # the target will answer RoundDone(ack) with Applied (a Hello asked)


@dataclass(frozen=True)
class Reject:
    kind = MessageKind.REJECT
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Pages:
    kind = MessageKind.PAGES
    round: int
    payload: bytes | memoryview  # encoded page sections


@dataclass(frozen=True)
class RoundDone:
    kind = MessageKind.ROUND_DONE
    round: int
    pages: int
    ack: bool = False  # answer with Applied once the round is in RAM (a session with round_acks)


@dataclass(frozen=True)
class Applied:
    """Every page of round `round` (from every stream) is in the target's RAM: the answer to a
    RoundDone(ack) in a session that negotiated `round_acks`."""

    kind = MessageKind.APPLIED
    round: int


@dataclass(frozen=True)
class State:
    kind = MessageKind.STATE
    payload: bytes  # encoded vCPU / VM / device state sections


@dataclass(frozen=True)
class Complete:
    kind = MessageKind.COMPLETE
    payload: bytes  # encoded end section: memory digest and totals


@dataclass(frozen=True)
class Ready:
    """The target holds a verified copy, built and paused; how long it took, for the source's
    downtime breakdown (fields with defaults: a peer that sends none is still understood)."""

    kind = MessageKind.READY
    digest_us: int = 0  # the memory digest checked against END
    apply_us: int = 0  # vCPU, VM and device state applied after Complete (pre-copy: 0, applied as it came)


@dataclass(frozen=True)
class Commit:
    kind = MessageKind.COMMIT


@dataclass(frozen=True)
class Resumed:
    kind = MessageKind.RESUMED
    resume_us: int = 0  # from Commit until the target's vCPU threads left for KVM_RUN


@dataclass(frozen=True)
class Cancel:
    kind = MessageKind.CANCEL
    reason: str


@dataclass(frozen=True)
class Channel:
    """Opens an extra page stream (like QEMU's multifd channels): it carries only PAGES, each
    tagged with its round; the target applies a round's pages from every stream before the
    next round's (RoundDone on the main connection says how many there are)."""

    kind = MessageKind.CHANNEL
    session: bytes
    index: int


@dataclass(frozen=True)
class Error:
    kind = MessageKind.ERROR
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class Postcopy:
    """The switch: the guest is paused on the source, its state went before this; `missing` is
    the bitmap of the pages the target does not hold yet (`migrate.live.postcopy.missing.encode_missing`)."""

    kind = MessageKind.POSTCOPY
    missing: bytes
    pages: int  # how many bits `missing` has set


@dataclass(frozen=True)
class Discard:
    """Just before the switch, the guest still running on the source: the pages dirtied since
    they were sent (as `Postcopy.missing`), which the target gives back to the host now rather
    than in the pause, and answers `Discarded`. Postcopy's bitmap then holds all of them again."""

    kind = MessageKind.DISCARD
    missing: bytes
    pages: int


@dataclass(frozen=True)
class Discarded:
    kind = MessageKind.DISCARDED
    digest_us: int = 0  # the target hashed every page it holds meanwhile (not in the pause either)
    discard_us: int = 0


@dataclass(frozen=True)
class Fetch:
    """On the fetch channel: guest physical addresses (le64 each) of pages a thread waits for."""

    kind = MessageKind.FETCH
    addresses: bytes


@dataclass(frozen=True)
class Finished:
    """The target holds every page and the memory digest checks; what post-copy cost it."""

    kind = MessageKind.FINISHED
    fetched: int = 0  # pages fetched on demand (a fault waited for them)
    background: int = 0  # pages placed from the background push
    fault_p50_us: int = 0  # fault latency: the fault's event read until its page was placed
    fault_p99_us: int = 0
    blocked_us: int = 0  # the time vCPU threads spent waiting for pages, summed


@dataclass(frozen=True)
class Reconnect:
    kind = MessageKind.RECONNECT
    session: bytes


@dataclass(frozen=True)
class Missing:
    kind = MessageKind.MISSING
    missing: bytes  # as `Postcopy.missing`
    pages: int


class HandOver(enum.StrEnum):
    """What a target says of a session it is asked about (`Verdict.hand_over`)."""

    COMMITTED = "committed"  # it took Commit: the guest is the target's
    NOT_COMMITTED = "not-committed"  # it never took Commit, and now never will (fenced)
    UNKNOWN = "unknown"  # it has no record of the session


@dataclass(frozen=True)
class Query:
    """A source in doubt asks whether the target took Commit for `session` (its Accept's)."""

    kind = MessageKind.QUERY
    session: bytes


@dataclass(frozen=True)
class Verdict:
    kind = MessageKind.VERDICT
    session: bytes
    hand_over: str  # a `HandOver` value; anything else reads as UNKNOWN
    detail: str = ""


Message = Union[Hello, Accept, Reject, Pages, RoundDone, State, Complete, Ready, Commit, Resumed,
                Cancel, Error, Channel, Query, Verdict, Postcopy, Fetch, Finished, Reconnect, Missing,
                Discard, Discarded, Applied]
MESSAGE_TYPES: dict[MessageKind, type] = {
    m.kind: m for m in (Hello, Accept, Reject, Pages, RoundDone, State, Complete, Ready, Commit,
                        Resumed, Cancel, Error, Channel, Query, Verdict, Postcopy, Fetch, Finished,
                        Reconnect, Missing, Discard, Discarded, Applied)
}


# --- states ----------------------------------------------------------------------------------


class Role(enum.Enum):
    SOURCE = "source"
    TARGET = "target"


class S(enum.Enum):
    """Protocol states (shared names; each role uses its own subset)."""

    START = "start"
    HELLO = "hello"  # source: Hello sent; target: Hello received, deciding
    TRANSFER = "transfer"  # accepted: pages and state flow
    VERIFYING = "verifying"  # Complete sent/received, waiting for/deciding Ready
    READY = "ready"  # target verified; waiting for Commit
    COMMITTED = "committed"  # Commit sent/received
    DONE = "done"  # Resumed sent/received: the target owns the guest
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    FAILED = "failed"
    IN_DOUBT = "in-doubt"  # source only: link lost after Commit
    # post-copy (point 7)
    DISCARDING = "discarding"  # Discard sent/received: the target gives pages back
    SWITCH_PENDING = "switch-pending"  # Discarded: only the state and the switch may follow
    SWITCHING = "switching"  # Postcopy sent/received, waiting for/deciding Ready
    SWITCH_READY = "switch-ready"  # target built, missing pages registered; waiting for Commit
    SWITCH_COMMITTED = "switch-committed"  # Commit sent/received
    POSTCOPY = "postcopy"  # the guest runs on the target; pages still flow
    POSTCOPY_END = "postcopy-end"  # Complete sent/received: the last pages went, waiting for Finished
    POSTCOPY_PAUSED = "postcopy-paused"  # link lost after Commit: both sides hold on, waiting to reconnect
    RECONNECTING = "reconnecting"  # Reconnect sent/received
    BROKEN = "broken"  # an Error after Commit in post-copy: target pauses, source holds; an operator chooses


TERMINAL = frozenset({S.DONE, S.REJECTED, S.CANCELLED, S.FAILED, S.IN_DOUBT, S.BROKEN})

# (role, state, who sends, message kind) -> next state. Anything absent is a protocol error:
# a LocalProtocolError if we tried to send it, a RemoteProtocolError if the peer did.
SEND, RECV = "send", "recv"
K = MessageKind
TRANSITIONS: dict[tuple[Role, S, str, MessageKind], S] = {
    # source
    (Role.SOURCE, S.START, SEND, K.HELLO): S.HELLO,
    (Role.SOURCE, S.HELLO, RECV, K.ACCEPT): S.TRANSFER,
    (Role.SOURCE, S.HELLO, RECV, K.REJECT): S.REJECTED,
    (Role.SOURCE, S.TRANSFER, SEND, K.PAGES): S.TRANSFER,
    (Role.SOURCE, S.TRANSFER, SEND, K.ROUND_DONE): S.TRANSFER,
    (Role.SOURCE, S.TRANSFER, SEND, K.STATE): S.TRANSFER,
    (Role.SOURCE, S.TRANSFER, SEND, K.COMPLETE): S.VERIFYING,
    (Role.SOURCE, S.VERIFYING, RECV, K.READY): S.READY,
    (Role.SOURCE, S.READY, SEND, K.COMMIT): S.COMMITTED,
    (Role.SOURCE, S.COMMITTED, RECV, K.RESUMED): S.DONE,
    # target
    (Role.TARGET, S.START, RECV, K.HELLO): S.HELLO,
    (Role.TARGET, S.HELLO, SEND, K.ACCEPT): S.TRANSFER,
    (Role.TARGET, S.HELLO, SEND, K.REJECT): S.REJECTED,
    (Role.TARGET, S.TRANSFER, RECV, K.PAGES): S.TRANSFER,
    (Role.TARGET, S.TRANSFER, RECV, K.ROUND_DONE): S.TRANSFER,
    (Role.TARGET, S.TRANSFER, RECV, K.STATE): S.TRANSFER,
    (Role.TARGET, S.TRANSFER, RECV, K.COMPLETE): S.VERIFYING,
    (Role.TARGET, S.VERIFYING, SEND, K.READY): S.READY,
    (Role.TARGET, S.READY, RECV, K.COMMIT): S.COMMITTED,
    (Role.TARGET, S.COMMITTED, SEND, K.RESUMED): S.DONE,
}
# post-copy: the switch in place of Complete, then pages after Resumed, then Finished
for _role, _mine, _theirs in ((Role.SOURCE, SEND, RECV), (Role.TARGET, RECV, SEND)):
    TRANSITIONS |= {
        (_role, S.TRANSFER, _mine, K.DISCARD): S.DISCARDING,
        (_role, S.DISCARDING, _theirs, K.DISCARDED): S.SWITCH_PENDING,  # pages given back: no PAGES now
        (_role, S.SWITCH_PENDING, _mine, K.STATE): S.SWITCH_PENDING,
        (_role, S.SWITCH_PENDING, _mine, K.POSTCOPY): S.SWITCHING,
        (_role, S.TRANSFER, _mine, K.POSTCOPY): S.SWITCHING,
        (_role, S.SWITCHING, _theirs, K.READY): S.SWITCH_READY,
        (_role, S.SWITCH_READY, _mine, K.COMMIT): S.SWITCH_COMMITTED,
        (_role, S.SWITCH_COMMITTED, _theirs, K.RESUMED): S.POSTCOPY,
        (_role, S.POSTCOPY, _mine, K.PAGES): S.POSTCOPY,
        (_role, S.POSTCOPY, _mine, K.COMPLETE): S.POSTCOPY_END,
        (_role, S.POSTCOPY_END, _theirs, K.FINISHED): S.DONE,
        (_role, S.POSTCOPY_PAUSED, _mine, K.RECONNECT): S.RECONNECTING,
        (_role, S.RECONNECTING, _theirs, K.MISSING): S.POSTCOPY,
        # a target that is not in post-copy with this session answers a Verdict instead: receive()
        # reads "not-committed" as FAILED (fenced), "committed" as DONE (it finished), else no change
        (_role, S.RECONNECTING, _theirs, K.VERDICT): S.POSTCOPY_PAUSED,
    }
    for _state in (S.POSTCOPY, S.POSTCOPY_END, S.RECONNECTING):  # either side may give up: BROKEN
        TRANSITIONS[(_role, _state, SEND, K.ERROR)] = S.BROKEN
        TRANSITIONS[(_role, _state, RECV, K.ERROR)] = S.BROKEN
# Guarded transitions: taken only in a session whose handshake negotiated what they need (the
# Hello's field named), else refused as any pair absent from the table. Post-copy is entered only
# through Discard or Postcopy, so every later post-copy state is out of reach of a session whose
# HELLO said `postcopy: false` (a source that switched anyway would find a target with no fetch
# channel, and a guest with holes nobody fills).
GUARDED: dict[tuple[Role, S, str, MessageKind], str] = {
    key: "postcopy" for key in TRANSITIONS if key[3] in (K.DISCARD, K.POSTCOPY)}
# Applied: the target sends it in TRANSFER (answering a live round); the source reads it there or,
# late, in any state before Ready (it may have paused without waiting for it). It moves nothing.
TRANSITIONS[(Role.TARGET, S.TRANSFER, SEND, K.APPLIED)] = S.TRANSFER
for _state in (S.TRANSFER, S.DISCARDING, S.SWITCH_PENDING, S.VERIFYING, S.SWITCHING):
    TRANSITIONS[(Role.SOURCE, _state, RECV, K.APPLIED)] = _state
GUARDED |= {key: "round_acks" for key in TRANSITIONS if key[3] is K.APPLIED}
# The one transition that reads a field: a Verdict answering Reconnect (point 7); the table's
# POSTCOPY_PAUSED stands for any other answer ("unknown").
RECONNECT_VERDICTS: dict[str, S] = {  # keyed by `Verdict.hand_over`, a HandOver value
    HandOver.NOT_COMMITTED: S.FAILED,  # fenced: the target never took Commit, never ran the guest
    HandOver.COMMITTED: S.DONE,  # it finished: every page is there (its Finished was lost)
}
# Cancel (source only) and Error (either side) end the exchange from any live state before Commit.
_PRE_COMMIT = (S.START, S.HELLO, S.TRANSFER, S.VERIFYING, S.READY, S.DISCARDING, S.SWITCH_PENDING, S.SWITCHING,
               S.SWITCH_READY)
for _state in _PRE_COMMIT:
    TRANSITIONS[(Role.SOURCE, _state, SEND, K.CANCEL)] = S.CANCELLED
    TRANSITIONS[(Role.TARGET, _state, RECV, K.CANCEL)] = S.CANCELLED
    for _role in Role:
        TRANSITIONS[(_role, _state, SEND, K.ERROR)] = S.FAILED
        TRANSITIONS[(_role, _state, RECV, K.ERROR)] = S.FAILED
# After Commit only the target may still fail, and only by promising the guest never ran there.
for _state in (S.COMMITTED, S.SWITCH_COMMITTED):
    TRANSITIONS[(Role.TARGET, _state, SEND, K.ERROR)] = S.FAILED
    TRANSITIONS[(Role.SOURCE, _state, RECV, K.ERROR)] = S.FAILED
# After Commit in post-copy, a lost link holds both sides (point 7): states where that applies.
_HOLD_ON_LOSS = {Role.SOURCE: (S.SWITCH_COMMITTED, S.POSTCOPY, S.POSTCOPY_END, S.RECONNECTING),
                 Role.TARGET: (S.SWITCH_COMMITTED, S.POSTCOPY, S.POSTCOPY_END, S.RECONNECTING)}


class Outcome(enum.Enum):
    """What the side must do with its copy of the guest once the exchange is over."""

    SOURCE_RESUME = "source resumes its guest"  # nothing was handed over
    SOURCE_STOP = "source stops: the target runs the guest"
    SOURCE_HOLD = "source keeps its guest paused: the hand-over is in doubt"
    SOURCE_SERVE = "source keeps its paused copy: the target runs the guest on pages it still fetches"
    TARGET_PAUSE = "target pauses its guest: post-copy broke (an operator chooses)"
    TARGET_DISCARD = "target discards its copy"
    TARGET_RUN = "target runs the guest"
    UNDECIDED = "undecided"


class ProtocolError(Exception):
    verb: ClassVar[str]  # "send" or "receive": the subclass says
    def __init__(self, role: Role, state: S, message: object, detail: str = "") -> None:
        self.role, self.state, self.message = role, state, message
        name = type(message).__name__
        super().__init__(f"{role.value} in state {state.value} cannot {self.verb} {name}"
                         + (f": {detail}" if detail else ""))


class LocalProtocolError(ProtocolError):
    verb = "send"


class RemoteProtocolError(ProtocolError):
    verb = "receive"


@dataclass
class Protocol:
    """One side's view of the exchange. Call `send(msg)` before transmitting a message and
    `receive(msg)` for each message that arrives; `connection_lost()` when the link dies."""

    role: Role
    state: S = S.START
    history: list[tuple[str, MessageKind]] = field(default_factory=list)
    error: Error | None = None
    peer_error: Error | None = None
    problems: tuple[str, ...] = ()
    postcopy: bool = False  # negotiated: the HELLO said the source may switch to post-copy
    round_acks: bool = False  # the HELLO asked for Applied (a target that did not agree sends none)
    _link_lost: bool = False

    def _step(self, direction: str, message: Message) -> S:
        kind = getattr(message, "kind", MessageKind.INVALID)
        key = (self.role, self.state, direction, kind)
        err = LocalProtocolError if direction == SEND else RemoteProtocolError
        if key not in TRANSITIONS:
            raise err(self.role, self.state, message)
        if key in GUARDED and not getattr(self, GUARDED[key]):
            raise err(self.role, self.state, message, f"{GUARDED[key]} was not negotiated in HELLO")
        if isinstance(message, Hello):
            self.postcopy, self.round_acks = message.postcopy, message.round_acks
        self.state = TRANSITIONS[key]
        self.history.append((direction, kind))
        return self.state

    def send(self, message: Message) -> S:
        state = self._step(SEND, message)
        if isinstance(message, Error):
            self.error = message
        return state

    def receive(self, message: Message) -> S:
        was = self.state
        state = self._step(RECV, message)
        if was is S.RECONNECTING and isinstance(message, Verdict):  # point 7
            self.state = state = RECONNECT_VERDICTS.get(message.hand_over, state)
        if isinstance(message, Error):
            self.peer_error = message
        elif isinstance(message, Reject):
            self.problems = message.problems
        return state

    def connection_lost(self) -> S:
        """The link died (or timed out) with no further message."""
        self._link_lost = True
        if self.state in TERMINAL:
            return self.state
        if self.state in _HOLD_ON_LOSS[self.role]:
            self.state = S.POSTCOPY_PAUSED
        elif self.state is S.POSTCOPY_PAUSED:
            pass
        elif self.role is Role.SOURCE and self.state is S.COMMITTED:
            self.state = S.IN_DOUBT
        elif not (self.role is Role.TARGET and self.state is S.COMMITTED):
            self.state = S.FAILED
        return self.state

    def link_back(self) -> None:
        """A new connection is up after a lost link (post-copy): the exchange may go on from
        POSTCOPY_PAUSED; the first message on it must be Reconnect / its answer."""
        self._link_lost = False

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL or (self.role is Role.TARGET and self.state is S.COMMITTED
                                          and self._link_lost)

    def outcome(self) -> Outcome:
        """What to do with this side's copy of the guest, given where the exchange stands."""
        if self.role is Role.SOURCE:
            if self.state is S.DONE:
                return Outcome.SOURCE_STOP
            if self.state in (S.IN_DOUBT, S.BROKEN):
                return Outcome.SOURCE_HOLD
            if self.state in (S.SWITCH_COMMITTED, S.POSTCOPY, S.POSTCOPY_END, S.POSTCOPY_PAUSED,
                              S.RECONNECTING):
                return Outcome.SOURCE_SERVE
            if self.state in (S.REJECTED, S.CANCELLED, S.FAILED):
                return Outcome.SOURCE_RESUME  # a post-Commit Error promises the target never ran it
            return Outcome.UNDECIDED
        if self.state in (S.COMMITTED, S.DONE, S.SWITCH_COMMITTED, S.POSTCOPY, S.POSTCOPY_END,
                          S.POSTCOPY_PAUSED, S.RECONNECTING):
            return Outcome.TARGET_RUN
        if self.state is S.BROKEN:
            return Outcome.TARGET_PAUSE
        if self.state in (S.REJECTED, S.CANCELLED, S.FAILED):
            return Outcome.TARGET_DISCARD
        return Outcome.UNDECIDED
