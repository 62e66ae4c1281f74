"""QEMU's isa-debug-exit port: a guest writes an exit code and the VM stops.

The built-in guest ends its run this way, so the same image ends a QEMU run
(`-device isa-debug-exit,iobase=0xf4,iosize=4`) and an hv run the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from hv.persist import U32, check_int, check_type

DEBUG_EXIT_PORT = 0xF4


@dataclass(frozen=True)
class DebugExitState:
    code: int | None = None  # the last code written, if any


class DebugExit:
    """Calls `on_exit(code)` when the guest writes to the port; reads return 0."""

    KIND: ClassVar[str] = "debug-exit"

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit
        self._state = DebugExitState()

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        self._state = DebugExitState(value)
        self._on_exit(value)

    def save(self) -> DebugExitState:
        return self._state

    def restore(self, state: DebugExitState) -> None:
        check_type(self.KIND, state, DebugExitState)
        if state.code is not None:
            check_int(self.KIND, "code", state.code, 0, U32)  # at most a 4-byte write
        self._state = state
