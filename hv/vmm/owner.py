"""Who owns a machine's run state: `owner_of(machine)`.

A migration or a snapshot pauses the guest, works on it, and resumes or stops it; nobody else may
pause, resume or stop it meanwhile (a `resume` from the control socket in the middle of a
hand-over would run the guest on both hosts). The one who does takes a `hold`; the control
socket's lifecycle commands `check` first and are refused with `Busy`, which names the holder and
since when.

A hold may end *in doubt* (a migration that sent Commit and heard nothing back): the guest is
kept paused and the hold stays, as a state of its own, after its holder is gone, until whoever
can settle it (`migrate resolve`) takes it over with `settling` and ends it. hv knows nothing of
migrations: the holder's own facts ride along in `Hold.record`, unread here.

The owner lives beside the machine (a weak map, not a field of `Machine`), so the VMM core keeps
one concern; every user of one machine finds the same owner.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from hv.errors import Busy, HvError
from hv.vmm.machine import Machine


@dataclass(frozen=True)
class Hold:
    owner: str  # who, in words: "migration to 10.0.0.2:7380", "snapshot to /x/vm.snap"
    since: float  # wall-clock time the hold began (time.time())
    in_doubt: bool = False
    record: object = None  # the holder's own facts (a migration's target and session); not read by hv
    settling: bool = False  # someone is settling the doubt right now

    def facts(self) -> dict[str, object]:
        return {"owner": self.owner, "since": self.since,
                "state": "in-doubt" if self.in_doubt else "held", "settling": self.settling}


class NotInDoubt(HvError):
    """`settling` asked of a machine whose hand-over is not in doubt."""

    def __init__(self, hold: Hold | None) -> None:
        self.hold = hold
        super().__init__("nothing to resolve: " + ("the VM's run state is held by " + hold.owner if hold
                                                     else "no hand-over of this VM is in doubt"))


class Lease:
    """What `RunStateOwner.hold` yields: the holder may leave the hold in doubt as it ends."""

    def __init__(self, owner: RunStateOwner, hold: Hold) -> None:
        self._owner, self.hold = owner, hold
        self.left_in_doubt = False

    def leave_in_doubt(self, record: object) -> None:
        """End this hold's work but keep the VM held, in doubt, with `record` for who settles it."""
        self.hold = replace(self.hold, in_doubt=True, record=record, since=time.time())
        self.left_in_doubt = True


class RunStateOwner:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hold: Hold | None = None

    @property
    def current(self) -> Hold | None:
        return self._hold

    def check(self, action: str) -> None:
        """Raise `Busy` if someone holds the run state (the control socket's pause/resume/stop)."""
        hold = self._hold
        if hold is not None:
            raise Busy(action, hold.owner, hold.since, hold.in_doubt)

    @contextmanager
    def hold(self, owner: str) -> Iterator[Lease]:
        """Own the run state for the block; `Busy` if someone else does (or a doubt is open)."""
        with self._lock:
            self.check(owner)
            lease = Lease(self, Hold(owner, time.time()))
            self._hold = lease.hold
        try:
            yield lease
        finally:
            with self._lock:
                self._hold = lease.hold if lease.left_in_doubt else None

    @contextmanager
    def settling(self, who: str) -> Iterator[Lease]:
        """Take over an in-doubt hold to end it. The block ends it by returning; if it calls
        `leave_in_doubt` again (the doubt could not be settled) or raises, the doubt stays."""
        with self._lock:
            hold = self._hold
            if hold is None or not hold.in_doubt:
                raise NotInDoubt(hold)
            if hold.settling:
                raise Busy(who, f"{hold.owner} (being resolved)", hold.since, True)
            self._hold = replace(hold, settling=True)
            lease = Lease(self, hold)
        settled = False
        try:
            yield lease
            settled = not lease.left_in_doubt
        finally:
            with self._lock:
                self._hold = None if settled else replace(lease.hold, in_doubt=True, settling=False)


_owners: weakref.WeakKeyDictionary[Machine, RunStateOwner] = weakref.WeakKeyDictionary()
_owners_lock = threading.Lock()


def owner_of(machine: Machine) -> RunStateOwner:
    """The one owner of `machine`'s run state, made on first use."""
    with _owners_lock:
        owner = _owners.get(machine)
        if owner is None:
            owner = _owners[machine] = RunStateOwner()
        return owner
