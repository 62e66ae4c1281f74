"""Where a test sends the stdout of a VMM process it starts (`hv run`, `migrate recv`, `migrate
restore`): its guest's console. A file, never a pipe the test reads only at the end.

The built-in guest at full rate writes a line per pass, hundreds a second. A pipe holds 64 KiB;
once it is full the UART holds the guest back as a real one does (its transmitter stays busy
until the line drains), so the guest stops making passes. A test that waits for passes then
fails, and only on a host slow enough for the pipe to fill first (CI failed
test_postcopy_between_processes_at_full_dirty_rate_on_two_vcpus that way)."""

from __future__ import annotations

from pathlib import Path
from typing import IO


def console_log(directory: Path, name: str) -> IO[bytes]:
    """A new file `directory/name.console` for a process's stdout (Popen duplicates the
    descriptor: the caller may close its own)."""
    return open(directory / f"{name}.console", "wb")  # noqa: SIM115 - handed to Popen


def console_text(directory: Path, name: str) -> str:
    """What the process wrote there."""
    return (directory / f"{name}.console").read_text(errors="replace")
