"""The i8042 keyboard controller, as far as a VMM needs it: the guest's reset request.

Ports 0x60 (data) and 0x64 (status/command). Writing command 0xFE to 0x64 pulses the CPU reset
line: the machine stops with a "guest-reset" reason (as Firecracker's i8042 does). The self-test,
the command byte and the output port are kept so a guest (or Linux's i8042 driver) probing the
controller gets sane answers; there is no keyboard behind it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from hv.errors import StateRestoreError
from hv.persist import U64, check_bits, check_int, check_type

I8042_PORT = 0x60
I8042_PORTS = 5  # 0x60..0x64 (0x61, the speaker port, is KVM's in-kernel PIT's)
DATA, COMMAND = 0, 4

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04  # set after a successful self-test
CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_SELF_TEST = 0xAA
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_PULSE_RESET = 0xFE
SELF_TEST_OK = 0x55


@dataclass(frozen=True)
class I8042State:
    status: int = STATUS_SYSTEM_FLAG
    command_byte: int = 0x45  # translate, system flag, keyboard interrupt
    output: int | None = None  # byte waiting in the output buffer
    pending_command: int = 0  # a command that takes its argument from port 0x60
    resets: int = 0


class I8042:
    """Calls `on_reset()` when the guest asks the controller to reset the CPU."""

    KIND: ClassVar[str] = "i8042"

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._state = I8042State()

    def read(self, offset: int, size: int) -> int:
        s = self._state
        if offset == COMMAND:
            return s.status | (STATUS_OUTPUT_FULL if s.output is not None else 0)
        if offset == DATA and s.output is not None:
            self._state = replace(s, output=None)
            return s.output
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        s = self._state
        if offset == COMMAND:
            match value:
                case 0xFE:
                    self._state = replace(s, resets=s.resets + 1)
                    self._on_reset()
                case 0x20:
                    self._state = replace(s, output=s.command_byte)
                case 0xAA:
                    self._state = replace(s, output=SELF_TEST_OK, status=s.status | STATUS_SYSTEM_FLAG)
                case 0x60 | 0xD1:
                    self._state = replace(s, pending_command=value)
        elif offset == DATA:
            if s.pending_command == CMD_WRITE_COMMAND_BYTE:
                self._state = replace(s, command_byte=value, pending_command=0)
            elif s.pending_command == CMD_WRITE_OUTPUT_PORT:
                self._state = replace(s, pending_command=0)
                if not value & 1:  # output port bit 0 low: the reset line
                    self._state = replace(self._state, resets=s.resets + 1)
                    self._on_reset()

    def save(self) -> I8042State:
        return self._state

    def restore(self, state: I8042State) -> None:
        """Only what the controller can hold: bytes, and a pending command it knows."""
        check_type(self.KIND, state, I8042State)
        check_bits(self.KIND, state, {"status": 0xFF, "command_byte": 0xFF})
        if state.output is not None:
            check_int(self.KIND, "output", state.output, 0, 0xFF)
        check_int(self.KIND, "pending_command", state.pending_command, 0, 0xFF)
        if state.pending_command not in (0, CMD_WRITE_COMMAND_BYTE, CMD_WRITE_OUTPUT_PORT):
            raise StateRestoreError(self.KIND, "pending_command",
                                    f"0, {CMD_WRITE_COMMAND_BYTE:#x} or {CMD_WRITE_OUTPUT_PORT:#x}",
                                    state.pending_command)
        check_int(self.KIND, "resets", state.resets, 0, U64)
        self._state = state
