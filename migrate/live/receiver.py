"""`migrate recv`'s server: one listening socket, many connections, one migration at a time.

Anyone who can reach the port can connect, so no connection may end the server or keep it from
the next one. Each connection is authenticated on a thread of its own, with a timeout (at most
`MAX_HANDSHAKES` at once and `MAX_PER_HOST` from one host), then sorted by its first message.
When a new connection finds its host's slots (or all of them) full, the oldest connection there
that has not yet authenticated is dropped to make room: a peer that answers its challenge takes
one round trip, so idle or slow connections cannot hold a real source off for their timeout.
Only authenticated connections (key holders, reading their first message) are never dropped;
when they fill the slots, the new connection is closed at once.

- `Hello`: a migration. They run one after the other (`receive`); one that is refused, fails,
  is cancelled or is a dry run is logged, and the receiver listens again (unless `once`). A Hello
  while another migration runs (past `handshake_timeout`), or once a guest has arrived, is refused
  with `Reject`.
- `Channel`: an extra page stream, or post-copy's fetch channel, of the migration running now
  (any other is closed); `Reconnect`: its post-copy source coming back after a lost link (for a
  session no longer running, answered with a `Verdict` as a Query is).
- `Query`: a source in doubt asks about a session; answered from the `SessionLedger`, which
  fences a session still waiting for its Commit (protocol.py, point 6). Answered for as long as
  the receiver runs, also after the guest arrived.
- anything else, or nothing within the timeout: a stray connection, logged and closed.

Authentication attempts are limited per host: after `FREE_FAILURES` wrong answers to the
challenge in a row (guesses at the key; a connection that answers nothing only times out), each new
connection from that host waits 1, 2, 4 ... up to `MAX_BACKOFF` seconds before its challenge (it
holds one of the host's few handshake slots meanwhile, so a guessing peer gets a handful of
tries a minute, and dropping one to make room gives it no try); a success clears the count.
Every refusal and every drop is logged (WARNING).
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

from hv.kvm.kvm import Kvm
from migrate.errors import AuthenticationFailed, PostcopyFailed, ProtocolViolation, TransportError
from migrate.protocol import Channel, Error, ErrorCode, Hello, Message, Query, Reconnect, Reject, Verdict
from migrate.live.ledger import SessionLedger
from migrate.live.target import Incoming, receive
from migrate.options import ReceiveOptions
from migrate.transport.connection import Connection
from migrate.transport.listener import Listener

SIGNAL_SLICE = 0.5  # seconds the main thread waits at a time for a connection (see `receive`)
log = logging.getLogger(__name__)

MAX_HANDSHAKES = 64  # connections being authenticated or read at once
MAX_PER_HOST = 16  # of those, from one host (loopback peers are all one host)
FREE_FAILURES = 3  # failed authentications in a row a host gets before it must wait
MAX_BACKOFF = 30.0  # the longest wait before a challenge (seconds)
HANDSHAKE_TIMEOUT = 10.0  # to authenticate and send a first message


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


@dataclass(eq=False)
class _Handshake:
    """A connection holding a handshake slot, from its accept until it is sorted (or ends)."""

    host: str
    peer: str
    handle: socket.socket  # a duplicate of its socket: shutting it down wakes the thread's read
    since: float = field(default_factory=time.monotonic)
    authenticated: bool = False
    dropped: threading.Event = field(default_factory=threading.Event)  # to make room, or closing

    def drop(self) -> None:
        """End it from another thread: its blocked read sees the link end, its backoff wait ends."""
        self.dropped.set()
        try:
            self.handle.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # it ended already


class Receiver:
    """Serves `listener` on a thread from construction until `close()`; `receive()` returns the
    first guest that arrives (or, with `once`, the end of the first connection), each taken as
    `options` say (`ReceiveOptions`: console, timeout, disk, ...)."""

    def __init__(self, listener: Listener, kvm: Kvm, options: ReceiveOptions | None = None, *, once: bool = False,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.listener, self.kvm, self.once = listener, kvm, once
        self.handshake_timeout = handshake_timeout
        self.options = options or ReceiveOptions()
        self.ledger = SessionLedger()
        self._hellos: queue.Queue[tuple[Connection, Hello] | BaseException] = queue.Queue()
        self._joins: queue.Queue[tuple[Connection, Channel | Reconnect]] = queue.Queue()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when a migration ends
        self._busy = False  # a migration is queued or running
        self._arrived = ""  # the source a guest came from, once one has
        self._handshakes: list[_Handshake] = []  # in the order they came
        self._failures: dict[str, _Failures] = {}
        self._closing = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        listener.sock.setblocking(False)
        self._thread = threading.Thread(target=self._accept_loop, name="recv-accept", daemon=True)
        self._thread.start()

    # --- migrations, one at a time ---------------------------------------------------------------

    def receive(self, timeout: float | None = None) -> Incoming:
        """The next guest that arrives, running here. Failed, refused and dry-run migrations are
        logged and waited past (with `once`: the first connection's end is returned or raised).
        `timeout`: seconds to wait for a guest in all (TransportError after)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # in slices: a Ctrl-C the kernel hands to another thread (the accept thread, say) only
            # sets Python's flag, and a main thread blocked in a lock never wakes to raise it
            left = SIGNAL_SLICE if deadline is None else min(SIGNAL_SLICE, max(0.0, deadline - time.monotonic()))
            try:
                item = self._hellos.get(timeout=left)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TransportError(f"no source connected to {self.listener.address} within {timeout}s") from None
                continue
            if isinstance(item, BaseException):
                raise item  # `once`: the first connection ended before any migration
            conn, hello = item
            incoming = None
            try:
                incoming = receive(conn, self.kvm, self.options, first=hello, joins=self._next_join,
                                   ledger=self.ledger)
            except Exception as e:
                stranded = isinstance(e, PostcopyFailed)  # half here: the caller holds it, no other comes
                log.warning("migration from %s did not arrive: %s: %s%s", conn.peer, type(e).__name__, e,
                            "" if self.once or stranded else "; listening for the next")
                if self.once or stranded:
                    raise
                continue
            finally:
                conn.close()
                self._drain_joins()
                with self._lock:
                    if incoming is not None and incoming.machine is not None:
                        self._arrived = incoming.source  # before another Hello can be let in
                    self._busy = False
                    self._idle.notify_all()
            if incoming.machine is None:
                log.warning("dry run from %s: this host would accept the guest%s", conn.peer,
                            "" if self.once else "; listening for the migration")
                if self.once:
                    return incoming
                continue
            return incoming

    def _next_join(self, timeout: float) -> tuple[Connection, Channel | Reconnect]:
        try:
            return self._joins.get(timeout=timeout)
        except queue.Empty:
            raise TransportError(f"a page stream the source announced did not join within {timeout}s") from None

    def _drain_joins(self) -> None:
        while True:
            try:
                conn, _ = self._joins.get_nowait()
            except queue.Empty:
                return
            conn.close()

    def close(self) -> None:
        """Stop accepting (the listener itself is the caller's to close)."""
        self._closing.set()
        with self._lock:
            for handshake in self._handshakes:
                handshake.dropped.set()  # a backoff wait ends; one that gets through is closed, not sorted
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self._drain_joins()
        while True:
            try:
                item = self._hellos.get_nowait()
            except queue.Empty:
                break
            if not isinstance(item, BaseException):
                item[0].close()
        self._wake_r.close()
        self._wake_w.close()

    # --- connections: accepted here, sorted on threads ---------------------------------------------

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener.sock, selectors.EVENT_READ, "listen")
            selector.register(self._wake_r, selectors.EVENT_READ, "wake")
            while not self._closing.is_set():
                for key, _ in selector.select():
                    if key.data == "wake":
                        return
                    self._accept_ready()

    def _accept_ready(self) -> None:
        while True:
            try:
                sock, address = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if not self._closing.is_set():
                    log.warning("accepting on %s: %s", self.listener.address, e)
                return
            host, peer = address[0], f"{address[0]}:{address[1]}"
            try:
                handle = sock.dup()
            except OSError as e:  # out of descriptors: this one is refused, the server goes on
                log.warning("refused a connection from %s: %s", peer, e)
                sock.close()
                continue
            handshake = _Handshake(host, peer, handle)
            with self._lock:
                if not self._make_room(handshake):
                    sock.close()
                    handle.close()
                    continue
                self._handshakes.append(handshake)
            sock.setblocking(True)
            threading.Thread(target=self._handshake, args=(sock, handshake), name="recv-handshake",
                             daemon=True).start()

    def _make_room(self, new: _Handshake) -> bool:
        """With the lock held: whether `new` may take a slot, after dropping the oldest connection
        not yet authenticated if its host's slots, or all of them, are full."""
        from_host = [h for h in self._handshakes if h.host == new.host]
        if len(from_host) >= MAX_PER_HOST:
            full = from_host
        elif len(self._handshakes) >= MAX_HANDSHAKES:
            full = self._handshakes
        else:
            return True
        oldest = next((h for h in full if not h.authenticated), None)
        if oldest is None:
            log.warning("refused a connection from %s: %d authenticated connections (%d from that host) are "
                        "being read", new.peer, len(self._handshakes), len(from_host))
            return False
        log.warning("dropped %s, not authenticated after %.1f s, to make room for %s (%d connections being "
                    "authenticated, %d from %s)", oldest.peer, time.monotonic() - oldest.since, new.peer,
                    len(self._handshakes), len(from_host), new.host)
        self._handshakes.remove(oldest)
        oldest.drop()
        return True

    def _backoff(self, host: str) -> float:
        with self._lock:
            failures = self._failures.get(host)
            if failures is None or failures.count < FREE_FAILURES:
                return 0.0
            wait = min(MAX_BACKOFF, 2.0 ** (failures.count - FREE_FAILURES))
            return max(0.0, failures.last + wait - time.monotonic())

    def _authenticated(self, host: str, ok: bool) -> int:
        with self._lock:
            if ok:
                self._failures.pop(host, None)
                return 0
            failures = self._failures.setdefault(host, _Failures())
            failures.count += 1
            failures.last = time.monotonic()
            return failures.count

    def _handshake(self, sock: socket.socket, handshake: _Handshake) -> None:
        host, peer = handshake.host, handshake.peer
        try:
            wait = self._backoff(host)
            if wait:
                log.warning("%s: waiting %.0f s before its challenge (failed authentications from %s)", peer,
                            wait, host)
                if handshake.dropped.wait(wait):
                    sock.close()
                    return
            try:
                conn = self.listener.secure(sock, peer, self.handshake_timeout)
            except AuthenticationFailed as e:  # a wrong answer: a guess at the key, counted
                count = self._authenticated(host, False)
                log.warning("refused %s: authentication failed (%s); %d in a row from %s", peer, e, count, host)
                self._ended_before_migrating(e)
                return
            except (TransportError, OSError) as e:  # no answer (a stray, a port scan): its slot is freed
                if handshake.dropped.is_set():
                    return  # dropped to make room (logged then): not the end of a source's attempt
                log.warning("refused %s: no authentication (%s)", peer, e)
                self._ended_before_migrating(e if isinstance(e, TransportError) else TransportError(str(e)))
                return
            with self._lock:
                handshake.authenticated = not handshake.dropped.is_set()
            if not handshake.authenticated:  # dropped as it answered: its link is shut already
                conn.close()
                return
            self._authenticated(host, True)
            try:
                first = conn.receive(self.handshake_timeout)
            except ProtocolViolation as e:  # an oversized or malformed first frame: the peer is told
                try:
                    conn.send(Error(ErrorCode.PROTOCOL, str(e)[:1000]))
                except (TransportError, OSError):
                    pass
                conn.close()
                log.warning("refused %s: %s", peer, e)
                self._ended_before_migrating(e)
                return
            except TransportError as e:
                conn.close()
                log.warning("stray connection from %s: %s", peer, e)
                self._ended_before_migrating(e)
                return
            self._sort(conn, first)
        except Exception:  # noqa: BLE001 - a connection's trouble must never end the server
            log.exception("connection from %s", peer)
            sock.close()
        finally:
            with self._lock:
                if handshake in self._handshakes:  # not dropped: its slot is freed here
                    self._handshakes.remove(handshake)
                handshake.handle.close()

    def _sort(self, conn: Connection, first: object) -> None:
        match first:
            case Hello():
                with self._lock:
                    # a migration that is ending (a dry run's Cancel being read) is waited for
                    self._idle.wait_for(lambda: not self._busy or self._arrived, self.handshake_timeout)
                    refusal = (f"this target already runs the guest it received from {self._arrived}"
                               if self._arrived else "this target is taking another migration" if self._busy
                               else "")
                    if not refusal:
                        self._busy = True
                        self._hellos.put((conn, first))
                        return
                log.warning("refused a migration from %s: %s", conn.peer, refusal)
                self._tell_and_close(conn, Reject((refusal,)))
            case Channel(session=session) | Reconnect(session=session) if self.ledger.is_open(session):
                self._joins.put((conn, first))  # a page stream, a fetch channel, a post-copy source back
            case Reconnect(session=session):  # its exchange is over here: say how it ended
                answer = self.ledger.query(session)
                log.warning("%s came back for session %s: %s", conn.peer, session.hex(), answer.value)
                self._tell_and_close(conn, Verdict(session, answer.value))
            case Query(session=session):
                answer = self.ledger.query(session)
                log.warning("%s asked about session %s: %s", conn.peer, session.hex(), answer.value)
                self._tell_and_close(conn, Verdict(session, answer.value))
            case _:
                log.warning("stray connection from %s: it opened with %s", conn.peer, type(first).__name__)
                conn.close()
                self._ended_before_migrating(TransportError(
                    f"{conn.peer} opened with {type(first).__name__}, not a migration"))

    @staticmethod
    def _tell_and_close(conn: Connection, message: Message) -> None:
        try:
            conn.send(message, timeout=HANDSHAKE_TIMEOUT)
            conn.close_after_telling()
        except TransportError:
            conn.close()

    def _ended_before_migrating(self, error: BaseException) -> None:
        """With `once`, a connection that ends before a migration ends the receiver too."""
        if self.once:
            with self._lock:
                if self._busy or self._arrived:
                    return
                self._busy = True
            self._hellos.put(error)


def listen_and_receive(listener: Listener, kvm: Kvm, options: ReceiveOptions | None = None, *,
                       accept_timeout: float | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> Incoming:
    """One shot: the first connection on `listener` is the migration (any failure of it raises).
    A `Receiver` without `once` is the server that keeps listening."""
    receiver = Receiver(listener, kvm, options, once=True, handshake_timeout=handshake_timeout)
    try:
        return receiver.receive(accept_timeout)
    finally:
        receiver.close()
