"""Ctrl-C and SIGTERM turned into a call on an ordinary thread.

Why not a handler that sets a `threading.Event`: Python runs a signal handler in the main
thread between two bytecodes, and that may be while the main thread holds the very lock
`Event.set` takes (`Event.wait` holds its condition's plain `Lock` for a moment on the way in
and out). The handler then waits for a lock its own thread holds, for ever: a SIGTERM that
came as `hv run` began waiting left the guest running until the test killed it. Here the
Python handler does nothing; the C-level handler writes the signal's number to a pipe
(`signal.set_wakeup_fd`) and a small thread, blocked on that pipe (no polling), makes the
call, where taking a lock is safe.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import TracebackType

__all__ = ["CaughtSignals"]


class CaughtSignals:
    """For a `with` block (entered on the main thread): each of `signals` is caught, recorded
    in `caught` and passed to `on_signal(signum)` on the watcher thread. The handlers and the
    process's wakeup fd are restored on the way out."""

    def __init__(self, on_signal: Callable[[signal.Signals], object],
                 signals: Iterable[signal.Signals] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self._on_signal = on_signal
        self._signals = tuple(signals)
        self.caught: list[signal.Signals] = []
        self._previous: dict[signal.Signals, object] = {}
        self._previous_fd = -1
        self._read_fd = self._write_fd = -1
        self._thread: threading.Thread | None = None

    @property
    def first(self) -> signal.Signals | None:
        return self.caught[0] if self.caught else None

    def __enter__(self) -> CaughtSignals:
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._write_fd, False)  # set_wakeup_fd's condition: a signal never blocks
        self._thread = threading.Thread(target=self._watch, name="signals", daemon=True)
        self._thread.start()
        self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self._previous = {s: signal.signal(s, _nothing) for s in self._signals}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]  # what signal.signal gave back
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write_fd)  # the watcher reads its end and returns
        if self._thread is not None:
            self._thread.join()
        os.close(self._read_fd)

    def _watch(self) -> None:
        wanted = {int(s) for s in self._signals}
        while chunk := os.read(self._read_fd, 64):
            for signum in chunk:
                if signum in wanted:  # the wakeup fd hears of every signal with a Python handler
                    self.caught.append(signal.Signals(signum))
                    self._on_signal(signal.Signals(signum))


def _nothing(_signum: int, _frame: object) -> None:
    """The Python-level handler: the pipe carries the news (see the module's docstring)."""
