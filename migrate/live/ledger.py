"""What a target did with each session it accepted: the record a source in doubt is answered
from (`Query`), and the fence that keeps the answer true (protocol.py, point 6). One ledger serves
every migration a receiver takes (`migrate.live.receiver`)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

from migrate.protocol import HandOver
from migrate.transport.connection import Connection


class SessionLedger:
    """What this target did with each session it accepted: the record a source in doubt is
    answered from (`Query`), and the fence that keeps the answer true (protocol.py, point 6).

    A session is open from Accept until its exchange ends. Commit and a Query exclude each
    other: `committing` holds the lock while the guest starts, so a Query hears "committed" only
    once the guest is started here, and "not-committed" only for a session that can never be."""

    KEEP = 256  # sessions remembered (a target takes one guest at a time; this is years of retries)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: OrderedDict[bytes, HandOver | None] = OrderedDict()  # None: open, undecided
        self._open: dict[bytes, Connection] = {}
        self._postcopy: set[bytes] = set()  # committed in post-copy, not finished

    def opened(self, session: bytes, conn: Connection) -> None:
        with self._lock:
            self._sessions[session] = None
            self._open[session] = conn
            while len(self._sessions) > self.KEEP:
                self._sessions.popitem(last=False)

    def is_open(self, session: bytes) -> bool:
        with self._lock:
            return session in self._open

    @contextmanager
    def committing(self, session: bytes, *, postcopy: bool = False) -> Iterator[bool]:
        """Yields whether this session may still commit (False: a Query fenced it); the block
        starts the guest, under the lock. If it raises, the session did not commit. A post-copy
        commit is pending until `postcopy_pending(session, False)`."""
        with self._lock:
            if self._sessions.get(session, None) is not None:
                yield False
                return
            try:
                yield True
            except BaseException:
                self._sessions[session] = HandOver.NOT_COMMITTED
                raise
            self._sessions[session] = HandOver.COMMITTED
            if postcopy:
                self._postcopy.add(session)

    def postcopy_finished(self, session: bytes) -> None:
        """A post-copy session holds every page now. Until then it is not "committed" to a source
        asking: that source's copy is still the only one of some pages, and must not stop
        (protocol.py, point 7)."""
        with self._lock:
            self._postcopy.discard(session)

    def closed(self, session: bytes) -> None:
        """The session's exchange ended; undecided means it never committed."""
        with self._lock:
            self._open.pop(session, None)
            if session in self._sessions and self._sessions[session] is None:
                self._sessions[session] = HandOver.NOT_COMMITTED

    def query(self, session: bytes) -> HandOver:
        """The answer to a source in doubt; an open, undecided session is fenced by asking."""
        with self._lock:
            if session not in self._sessions or session in self._postcopy:
                return HandOver.UNKNOWN
            state = self._sessions[session]
            if state is None:
                self._sessions[session] = state = HandOver.NOT_COMMITTED
                conn = self._open.get(session)
                if conn is not None:
                    conn.interrupt()  # its Target stops waiting for a Commit it may no longer take
            return state
