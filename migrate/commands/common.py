"""What the `migrate` subcommands share: the result console, the key and TLS read from their files,
JSON out, the guest's console, the progress bar."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import Progress, ProgressColumn

from hv.guests import builtin as builtin_guest
from hv.vmm.cli import LineConsole
from hv.vmm.command import quiet, status
from migrate.transport.framing import parse_address

if TYPE_CHECKING:
    from migrate.transport.tls import Tls


results = Console(highlight=False, emoji=False, soft_wrap=True)  # stdout: tables and results

VERIFY_TIMEOUT = 600.0  # seconds: `verify` hashes all of a paused guest's memory
NUMBER: tuple[type, ...] = (int, float)
FieldTypes = dict[str, type | tuple[type, ...]]  # what `expect` checks a reply's fields against
# what `describe` reads of a migration's status, and as what
STATUS_FIELDS: FieldTypes = {"round": int, "round_pages_total": int, "round_pages_done": int, "dirty_rate_mib_s": NUMBER,
                 "bandwidth_mib_s": NUMBER, "throttle": NUMBER, "eta_seconds": (*NUMBER, type(None)),
                 "reason": (str, type(None))}


def address(text: str) -> str:
    """HOST:PORT, checked on the command line (the transport's own check: a port 0..65535)."""
    try:
        parse_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def progress_bar(*columns: str | ProgressColumn) -> Progress:
    """A transient bar on stderr; none with -q or when stderr is not a terminal."""
    return Progress(*columns, console=status, transient=True,
                    disable=quiet() or not status.is_terminal)


def read_key(path: str | None) -> bytes:
    if path:
        return Path(path).read_bytes().strip()
    return os.environ.get("KVMIGRATE_KEY", "").encode()


def tls_of(args: argparse.Namespace) -> Tls | None:
    from migrate.transport.tls import Tls

    given = [args.tls_cert, args.tls_key, args.tls_ca]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("TLS needs --tls-cert, --tls-key and --tls-ca together")
    return Tls(*(str(Path(p).resolve()) for p in given))


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def guest_console() -> tuple[LineConsole, builtin_guest.EndWatch]:
    """The guest's console on stdout; the built-in guest's end lines end the run."""
    watch = builtin_guest.EndWatch()
    return LineConsole(watch, echo=False), watch  # COM1's bytes reach stdout from C (run_machine)
