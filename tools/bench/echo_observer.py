"""An observer outside the guest: pings the built-in guest's COM1 and timestamps its echoes.

Each VMM's console is a pair of file descriptors, whatever is behind them (the stdin/stdout pipes
of `hv run` and `migrate recv`, a QEMU `-chardev socket`): the observer is the same for every VMM
and needs nothing from either beyond a console it can write to and read.

A ping is `p<seq>\\n`; the guest prints it back from its workload loop as
`kvmig: uart-rx irqs=N text=p<seq>`, so each echo names its ping. One thread writes a ping every
`period` seconds on an absolute monotonic schedule (a late ping does not make the next one
early); one thread per console blocks in read() and stamps each chunk with the monotonic clock
the moment it arrives.

Pings go to the source. Once `arm_target` is called (the migration started), the next
`max_pending` also go to the target, where they wait in its console until the guest runs there:
the first echo is then not held back by the observer having to notice the source's silence
(that is why the blackout takes off one steady latency, the time a waiting ping takes to come
back). No more until the target answers: a guest that resumes must not find a burst of them
(the processing would delay its first echo, and its receive ring holds 256 bytes). While the source
is quiet (its oldest unanswered ping older than `quiet_after`), a target that has not answered
gets one more ping a second, in case it lost the first ones. Once the target
answers, its pings flow like the source's, `max_pending` unanswered at most.
"""

from __future__ import annotations

import bisect
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from echo_timeline import SOURCE, TARGET, Echo, Ping

RETRY_AFTER = 1.0  # seconds: how long a target that has not answered waits for another ping
ECHO = re.compile(rb"^kvmig: uart-rx irqs=\d+ text=p(\d+)\r?$")


@dataclass(frozen=True)
class Console:
    side: str  # SOURCE or TARGET
    write_fd: int
    read_fd: int


class ObserverTimeoutError(Exception):
    def __init__(self, what: str, seconds: float, lines: list[str]) -> None:
        tail = "\n".join(lines[-10:])
        super().__init__(f"timed out after {seconds:.0f} s waiting for {what}; last console lines:\n{tail}")
        self.what, self.seconds, self.lines = what, seconds, lines


class Observer:
    def __init__(self, period: float, max_pending: int = 3) -> None:
        self.period, self.max_pending = period, max_pending
        self._cond = threading.Condition()
        self._consoles: dict[str, Console] = {}
        self._dead: set[str] = set()  # consoles whose write failed (the process went away)
        self.pings: list[Ping] = []
        self.echoes: list[Echo] = []
        self.lines: dict[str, list[tuple[float, str]]] = {SOURCE: [], TARGET: []}  # the guest's other lines
        self._answered = {SOURCE: -1, TARGET: -1}  # highest seq echoed per side
        self._sent = {SOURCE: ([], []), TARGET: ([], [])}  # per side: seqs and send times, in order
        self._quiet_after, self._armed_at = 0.0, None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- consoles and reading ---

    def attach(self, console: Console) -> None:
        self._consoles[console.side] = console
        reader = threading.Thread(target=self._read_loop, args=(console,), name=f"observe-{console.side}",
                                  daemon=True)
        reader.start()
        self._threads.append(reader)

    def _read_loop(self, console: Console) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(console.read_fd, 65536)
            except OSError:
                chunk = b""
            arrived = time.monotonic()
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            with self._cond:
                for raw in lines:
                    self._take(console.side, raw, arrived)
                self._cond.notify_all()

    def _take(self, side: str, raw: bytes, arrived: float) -> None:
        if m := ECHO.match(raw):
            seq = int(m.group(1))
            self.echoes.append(Echo(seq, arrived, side))
            if seq < len(self.pings):  # a garbled number must not answer pings not sent yet
                self._answered[side] = max(self._answered[side], seq)
        else:
            self.lines[side].append((arrived, raw.decode(errors="replace").rstrip("\r")))

    def wait_line(self, side: str, wanted: Callable[[str], bool], timeout: float, what: str) -> str:
        """The first guest line on `side` for which `wanted` is true (echoes excluded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for _, line in self.lines[side]:
                    if wanted(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ObserverTimeoutError(what, timeout, [line for _, line in self.lines[side]])
                self._cond.wait(left)

    def wait_echo(self, side: str, timeout: float) -> bool:
        """Whether `side` echoed a ping within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: any(e.side == side for e in self.echoes), timeout)

    # --- pinging ---

    def start_pinging(self) -> None:
        pinger = threading.Thread(target=self._ping_loop, name="observe-ping", daemon=True)
        pinger.start()
        self._threads.append(pinger)

    def arm_target(self, quiet_after: float) -> None:
        """From now on, pings also go to the target (see the module's docstring)."""
        with self._cond:
            self._quiet_after, self._armed_at = quiet_after, time.monotonic()

    def _ping_loop(self) -> None:
        seq, due = 0, time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
                continue
            self._ping(seq, time.monotonic())
            seq += 1
            due += self.period
            if due < now:  # fell behind (the host was busy): keep the period, skip the missed slots
                due = now + self.period

    def _pending(self, side: str) -> tuple[int, float | None]:
        """How many pings sent to `side` are newer than its highest echo, and when the oldest of
        them was sent."""
        seqs, times = self._sent[side]
        first = bisect.bisect_right(seqs, self._answered[side])
        return len(seqs) - first, times[first] if first < len(seqs) else None

    def _to_target(self, now: float) -> bool:
        if self._armed_at is None or TARGET not in self._consoles or TARGET in self._dead:
            return False
        seqs, times = self._sent[TARGET]
        if self._answered[TARGET] >= 0:  # the guest runs there: pings flow as to the source
            return self._pending(TARGET)[0] < self.max_pending
        if len(seqs) < self.max_pending:  # the first batch, sent as the migration starts
            return True
        # a ping a second while the source is quiet, in case the target lost the batch
        _, oldest = self._pending(SOURCE)
        quiet = SOURCE in self._dead or (oldest is not None and now - oldest > self._quiet_after)
        return quiet and now - times[-1] > RETRY_AFTER

    def _ping(self, seq: int, now: float) -> None:
        with self._cond:
            sides = {SOURCE} - self._dead
            if self._to_target(now):
                sides.add(TARGET)
            self.pings.append(Ping(seq, now, frozenset(sides)))
            for side in sides:
                seqs, times = self._sent[side]
                seqs.append(seq)
                times.append(now)
        data = b"p%d\n" % seq
        for side in sides:
            try:
                os.write(self._consoles[side].write_fd, data)
            except OSError:  # the VMM exited (a source after a completed migration)
                with self._cond:
                    self._dead.add(side)

    def seen(self) -> tuple[tuple[Ping, ...], tuple[Echo, ...]]:
        """The pings sent and the echoes read so far (a consistent copy while the threads go on)."""
        with self._cond:
            return tuple(self.pings), tuple(self.echoes)

    def stop(self) -> tuple[tuple[Ping, ...], tuple[Echo, ...]]:
        """Stops pinging; returns what was seen (the readers end with their consoles)."""
        self._stop.set()
        for thread in self._threads:
            if thread.name == "observe-ping":
                thread.join()
        return self.seen()
