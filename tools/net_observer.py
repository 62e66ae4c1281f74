"""The observer in the network: a UDP client that sends the guest a numbered datagram every
`period` seconds and stamps every answer, for the tests and the network blackout benchmark.

Each request carries (sequence u64, send time ns u64); the built-in guest echoes it with its
pass counter appended (tools/guests/builtin/net.c). The socket is made in the namespace given
(the rig's middle one), so it talks to the guest through the bridges like any client would.
`Observation` is the arithmetic: the blackout is the longest wait between two consecutive answers
(as a client feels it); a move may lose one run of consecutive requests (those that reached the
source's tap after its card was saved), and an answer duplicated, or lost anywhere else, is a fault.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from hv.vmm.signals import CaughtSignals
from tools.netrig import in_namespace

_REQUEST = struct.Struct("<QQ")
_ANSWER = struct.Struct("<QQQ")  # sequence, send time, the guest's pass counter


@dataclass(frozen=True)
class Answer:
    seq: int
    sent_ns: int
    received_ns: int
    passes: int


@dataclass
class Observation:
    """What the observer saw: every request's send time and every answer."""

    sent: dict[int, int] = field(default_factory=dict)  # seq -> send time (ns)
    answers: list[Answer] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict) -> Observation:
        return cls(dict((int(s), int(t)) for s, t in data["sent"]), [Answer(*map(int, a)) for a in data["answers"]])

    def window(self, start_ns: int, end_ns: int) -> Observation:
        """The requests sent in [start, end] and their answers (the move, not the boot)."""
        sent = {s: t for s, t in self.sent.items() if start_ns <= t <= end_ns}
        return Observation(sent, [a for a in self.answers if a.seq in sent])

    def duplicates(self) -> list[int]:
        seen: set[int] = set()
        dups = []
        for a in self.answers:
            if a.seq in seen:
                dups.append(a.seq)
            seen.add(a.seq)
        return dups

    def blackout(self) -> tuple[float, int, int]:
        """(longest wait between two consecutive answers in seconds, the last answer's time
        before it, the first one's after it), answers in arrival order."""
        times = sorted(a.received_ns for a in self.answers)
        if len(times) < 2:
            return 0.0, 0, 0
        gap, at = max((b - a, i) for i, (a, b) in enumerate(zip(times, times[1:])))
        return gap / 1e9, times[at], times[at + 1]

    def lost(self, settle_ns: int = 50_000_000) -> list[int]:
        """Requests never answered, but for those of the last `settle_ns` before the final send
        (their answers may still be on the way when the observer stopped)."""
        answered = {a.seq for a in self.answers}
        last = max(self.sent.values(), default=0)
        return sorted(s for s, t in self.sent.items() if s not in answered and t < last - settle_ns)

    def lost_runs(self, settle_ns: int = 50_000_000) -> list[tuple[int, int]]:
        """The lost requests as runs of consecutive sequence numbers (first, last). A move loses
        at most one run, those that reached the source's tap after its card was saved; the
        receive gaps alone cannot tell that window, since a client on a loaded host also waits
        when nothing is lost."""
        runs: list[tuple[int, int]] = []
        for s in self.lost(settle_ns):
            if runs and runs[-1][1] == s - 1:
                runs[-1] = (runs[-1][0], s)
            else:
                runs.append((s, s))
        return runs

    def latencies(self) -> list[float]:
        return sorted((a.received_ns - a.sent_ns) / 1e9 for a in self.answers)


class UdpObserver:
    """Sends every `period` s from namespace `ns` to (address, port) until `stop()`."""

    def __init__(self, ns: str, address: str, port: int, period: float = 0.001) -> None:
        self.target = (address, port)
        self.period = period
        self.observation = Observation()
        self._stop = threading.Event()
        self._sock = in_namespace(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self._sock.settimeout(0.05)
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._send, daemon=True, name="observer-send"),
                         threading.Thread(target=self._receive, daemon=True, name="observer-receive")]

    def __enter__(self) -> UdpObserver:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answered(self) -> int:
        with self._lock:
            return len(self.observation.answers)

    def wait_answers(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` answers more than now have arrived (an event, not a delay)."""
        goal = self.answered() + count
        deadline = time.monotonic() + timeout
        while self.answered() < goal:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.answered()} answers of {goal} after {timeout}s")
            time.sleep(0.005)

    def _send(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic_ns()
            with self._lock:
                self.observation.sent[seq] = now
            try:
                self._sock.sendto(_REQUEST.pack(seq, now), self.target)
            except OSError:
                pass  # no route or neighbour yet: counted as sent, not answered
            seq += 1
            next_at += self.period
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()  # behind (a loaded host): no burst to catch up

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(256)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            t = time.monotonic_ns()
            if len(data) >= _ANSWER.size:
                seq, sent, passes = _ANSWER.unpack_from(data)
                with self._lock:
                    self.observation.answers.append(Answer(seq, sent, t, passes))

    def stop(self) -> Observation:
        self._stop.set()
        for t in self._threads:
            if t.is_alive():
                t.join(2)
        self._sock.close()
        return self.observation


def main(argv: list[str] | None = None) -> int:
    """`python -m tools.net_observer --ns NS --to ADDR:PORT`: observe until SIGINT/SIGTERM, then
    print the observation as JSON (`Observation.from_json` reads it back): a process of its own,
    so no interpreter lock is shared with a VMM."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="net_observer")
    p.add_argument("--ns", required=True)
    p.add_argument("--to", required=True, metavar="ADDR:PORT")
    p.add_argument("--period", type=float, default=0.001)
    args = p.parse_args(argv)
    host, _, port = args.to.rpartition(":")
    done = threading.Event()
    with CaughtSignals(lambda _signum: done.set()), UdpObserver(args.ns, host, int(port), args.period) as observer:
        print("ready", flush=True)
        done.wait()
        seen = observer.stop()
    print(json.dumps({"sent": sorted(seen.sent.items()),
                      "answers": [[a.seq, a.sent_ns, a.received_ns, a.passes] for a in seen.answers]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
