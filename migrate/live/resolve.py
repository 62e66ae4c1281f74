"""Settling a hand-over left in doubt: `resolve(machine)` (`migrate resolve SOCK`); what a source
in doubt keeps (`InDoubt`), and, past the post-copy switch, `resume_postcopy(machine)`.

A source that sent Commit and heard nothing back keeps its guest paused and held
(`hv.vmm.owner`): the target may be running it. `resolve` asks the target, on a new connection
to its migration address, about the session it named (`Query` -> `Verdict`; protocol.py, point
6): "committed" -> the source stops its copy; "not-committed" (the target fenced the session:
it can never run it) -> the source resumes. Any other answer, or none, settles nothing; the
operator may then force it, and the force names what it risks:

- `Force.RESUME_SOURCE`: run the source's copy; if the target runs the guest, two copies run.
- `Force.STOP_SOURCE`: drop the source's copy; if the target does not run it, no copy runs.

The target is asked even when forcing: a definite answer wins over the force (it is then known
which copy is the guest), and the `Resolution` says so.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from hv.vmm.machine import Machine, RunState
from hv.vmm.owner import owner_of
from migrate.errors import MigrateError, MigrationFailed, MigrationInDoubt, SessionFenced, TransportError
from migrate.options import MigrationOptions
from migrate.stats import MigrationStats
from migrate.protocol import HandOver, Query, Verdict
from migrate.transport.connection import connect

log = logging.getLogger(__name__)

ASK_TIMEOUT = 10.0  # seconds to reach the target and hear its answer (at most the migration's timeout)


@dataclass(frozen=True)
class InDoubt:
    """What a source left in doubt keeps for whoever settles it (`migrate.live.resolve`): where the
    target was, the session it named, how to reach it again, and why it is in doubt."""

    target: str | None  # HOST:PORT (None: sent over a connection given to `send`; nobody to ask)
    session: bytes
    options: MigrationOptions  # the key, TLS and timeout to ask with
    reason: str
    was_running: bool = True  # what resuming the source goes back to
    postcopy: bool = False  # past the post-copy switch: the target may need this copy's pages
    resume: Callable[[], MigrationStats] | None = None  # post-copy: reconnect and serve on (`resume_postcopy`)


def resume_postcopy(machine: Machine) -> MigrationStats:
    """Reconnect a post-copy migration whose link stayed down past its reconnect window (the
    machine is held, in doubt, by it) and serve the target on; the machine stops once the target
    holds every page. `hv.vmm.owner.NotInDoubt` if nothing waits; `MigrationFailed` if the doubt
    is not a post-copy one (that is `migrate resolve`'s)."""
    with owner_of(machine).settling("post-copy resume") as lease:
        doubt = lease.hold.record
        if not isinstance(doubt, InDoubt) or doubt.resume is None:
            lease.leave_in_doubt(doubt)
            raise MigrationFailed("this VM's hand-over is in doubt, but not in post-copy: see migrate resolve",
                                  "paused here, in doubt")
        try:
            stats = doubt.resume()
        except (Exception, KeyboardInterrupt) as e:
            if isinstance(e, SessionFenced):
                restore_source(machine, doubt.was_running)  # the target never took Commit
                raise
            lease.leave_in_doubt(doubt)
            raise MigrationInDoubt(f"post-copy resume: {e}", "paused here after the post-copy switch") from e
        machine.set_throttle(0)
        machine.stop()  # the target holds every page now
        return stats


def restore_source(machine: Machine, was_running: bool) -> None:
    """The source's guest as it was before the migration: no throttle, no dirty log, running if it was."""
    machine.set_throttle(0)
    if machine.vm.dirty_logging:
        machine.vm.disable_dirty_log()
    if was_running and machine.state is RunState.PAUSED:
        machine.resume()



class SourceAction(enum.StrEnum):
    """What resolving did with the source's copy (the values are what the JSON says)."""

    STOPPED = "stopped"  # the target has the guest
    RESUMED = "resumed"  # the source has it


class Force(enum.StrEnum):
    RESUME_SOURCE = "resume-source"  # risks two running copies, if the target runs the guest
    STOP_SOURCE = "stop-source"  # risks losing the guest, if the target does not run it


class StillInDoubt(MigrateError):
    """The target could not say (unreachable, or no record of the session) and nothing was
    forced: the source's copy stays paused and held."""

    def __init__(self, target: str | None, session: bytes, asked: str) -> None:
        self.target, self.session, self.asked = target, session, asked
        super().__init__(f"still in doubt: {asked}; the source's copy stays paused. If you know where "
                         "the guest runs, force it: --force-stop-source (if the target runs it; if it does "
                         "not, no copy runs) or --force-resume-source (if it does not; if it does, two copies "
                         "run)")

    def facts(self) -> dict[str, object]:
        return {"target": self.target, "session": self.session.hex(), "asked": self.asked}


@dataclass(frozen=True)
class Resolution:
    hand_over: HandOver  # what the target said (UNKNOWN: it could not say)
    action: SourceAction
    asked: str  # how asking went, in words
    forced: Force | None = None  # the force that decided it (None: the target's answer did)

    def as_dict(self) -> dict[str, object]:
        return {"hand_over": self.hand_over.value, "action": self.action.value, "asked": self.asked,
                "forced": self.forced.value if self.forced else None}


def ask_target(doubt: InDoubt) -> tuple[HandOver, str]:
    """Ask the target about the doubt's session: its answer, and how asking went."""
    if doubt.target is None:
        return HandOver.UNKNOWN, "the migration went over a connection, not an address: there is nobody to ask"
    o = doubt.options
    timeout = min(ASK_TIMEOUT, o.timeout)
    try:
        conn = connect(doubt.target, o.key, timeout, o.tls)
    except TransportError as e:
        return HandOver.UNKNOWN, f"could not reach the target: {e}"
    try:
        conn.send(Query(doubt.session), timeout=timeout)
        verdict = conn.receive(timeout)
    except TransportError as e:
        return HandOver.UNKNOWN, f"the target did not answer: {e}"
    finally:
        conn.close()
    if not isinstance(verdict, Verdict) or verdict.session != doubt.session:
        return HandOver.UNKNOWN, f"the target answered with {type(verdict).__name__}, not a verdict on the session"
    try:
        answer = HandOver(verdict.hand_over)
    except ValueError:
        return HandOver.UNKNOWN, f"the target answered {verdict.hand_over!r}"
    said = {HandOver.COMMITTED: "the target took Commit: it has the guest",
            HandOver.NOT_COMMITTED: "the target never took Commit, and now never will",
            HandOver.UNKNOWN: "the target has no record of this migration (another process there?)"}[answer]
    return answer, said


def resolve(machine: Machine, force: Force | None = None) -> Resolution:
    """End `machine`'s in-doubt hand-over: ask the target, then stop or resume the source's copy;
    without an answer, as `force` says, or raise `StillInDoubt` (the doubt stays).
    `hv.vmm.owner.NotInDoubt` if there is no doubt to end."""
    with owner_of(machine).settling("resolve") as lease:
        doubt = lease.hold.record
        assert isinstance(doubt, InDoubt), doubt
        hand_over, asked = ask_target(doubt)
        decided_by = None
        if hand_over is HandOver.COMMITTED:
            stop = True
        elif hand_over is HandOver.NOT_COMMITTED:
            stop = False
        elif force is not None:
            stop, decided_by = force is Force.STOP_SOURCE, force
        else:
            raise StillInDoubt(doubt.target, doubt.session, asked)
        if stop:
            machine.stop()
        else:
            restore_source(machine, doubt.was_running)
        resolution = Resolution(hand_over, SourceAction.STOPPED if stop else SourceAction.RESUMED, asked, decided_by)
        log.warning("in-doubt migration to %s resolved: %s; the source's copy %s%s", doubt.target, asked,
                    resolution.action, f" (forced: {force.value})" if decided_by and force else "")
        return resolution
