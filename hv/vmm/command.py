"""What every kvmigrate command shares: the exit statuses and the table that maps errors to them,
the `-v/-q/--version` options, status lines on stderr printed literally, sizes as QEMU writes
them, and `dispatch` (parse, log, run, and turn an error into one line, or a JSON object, and
its exit status). Used by `hv` and `migrate`; migrate adds its errors' rows to the table."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from enum import IntEnum
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

from rich.console import Console
from rich.text import Text

from hv import errors

# emoji=False and Text, never markup, for anything that is not ours: `root:x:0` prints as
# typed, and a path holding `[/]` cannot raise MarkupError. soft_wrap: a long path stays on
# one line (a copied socket path must work).
status = Console(stderr=True, highlight=False, emoji=False, soft_wrap=True)
_quiet = False


class ExitStatus(IntEnum):
    """The process exit status of every kvmigrate command (documented in `--help` and the README)."""

    OK = 0  # done: the run ended as asked, the migration completed, the check passed
    FAILED = 1  # the guest or the VM failed (a guest error, a non-zero exit code, a fatal exit, KVM refused)
    USAGE = 2  # a bad command line: an unknown option, a value out of range, a missing file
    REFUSED = 3  # refused or incompatible: a corrupt snapshot, a target that cannot take the guest, busy
    TRANSPORT = 4  # the link or the control socket failed, or authentication did
    MIGRATION_FAILED = 5  # the migration failed or was cancelled; the guest runs on at the source
    IN_DOUBT = 6  # the link died after the hand-over began: the guest is paused at the source, ask the target
    OVERRAN = 7  # the migration completed, but its pause went past the downtime target


INTERRUPTED = 130  # Ctrl-C while waiting (the shell's 128 + SIGINT); a VM's run ends 0 on Ctrl-C

EXIT_STATUS_HELP = "exit status:\n" + "\n".join(
    f"  {s.value}  {line}" for s, line in zip(ExitStatus, (
        "done (the run ended as asked, the migration completed, the check passed)",
        "the guest or the VM failed (a guest error, an exit code other than 0, a fatal exit)",
        "usage: a bad option or argument",
        "refused or incompatible (a corrupt snapshot, a target that cannot take the guest, busy)",
        "transport or authentication (the link, the control socket)",
        "the migration failed or was cancelled; the guest runs on at the source",
        "in doubt: the link died during the hand-over; the guest is paused at the source",
        "the migration completed, but the guest was paused past the downtime target",
    ), strict=True)) + f"\n  {INTERRUPTED}  Ctrl-C while waiting (a VM stopped by Ctrl-C or SIGTERM ends 0)"

# (error types, status): the first row whose types the error is an instance of gives its status.
ExitRows = Sequence[tuple[type[BaseException] | tuple[type[BaseException], ...], ExitStatus]]


class UsageError(Exception):
    """A command line argparse refused (raised instead of argparse's exit, so --json can say it)."""


class ControlFailure(Exception):
    """A control command's error as the VM's process reported it: `kind` names its class there."""


HV_EXITS: ExitRows = (
    ((UsageError, errors.ConfigError, errors.ControlSocketError, FileNotFoundError, NotADirectoryError, IsADirectoryError),
     ExitStatus.USAGE),
    ((errors.BootError, errors.StateRestoreError, errors.MissingCapabilityError, errors.LifecycleError,
      errors.RamReservationError, errors.Busy),
     ExitStatus.REFUSED),
    ((ConnectionError, TimeoutError), ExitStatus.TRANSPORT),
    ((errors.HvError, OSError, MemoryError), ExitStatus.FAILED),
)

# Errors a control socket reports by name (hv.vmm.control), with no class on this side.
CONTROL_KINDS = {"BadRequest": ExitStatus.USAGE, "UnknownCommand": ExitStatus.REFUSED,
                 "Busy": ExitStatus.REFUSED, "NotMigrating": ExitStatus.REFUSED,
                 "NotInDoubt": ExitStatus.REFUSED, "InDoubt": ExitStatus.IN_DOUBT,
                 "StillInDoubt": ExitStatus.IN_DOUBT, "TooManyConnections": ExitStatus.TRANSPORT,
                 "ConnectionError": ExitStatus.TRANSPORT, "BadReply": ExitStatus.TRANSPORT,
                 "Timeout": ExitStatus.TRANSPORT, "NoMachine": ExitStatus.REFUSED, "NotWaiting": ExitStatus.REFUSED}


def exit_status(error: BaseException, rows: ExitRows) -> ExitStatus:
    """The exit status for `error`. A control socket's error (hv.vmm.control.ControlError) names
    its class: it gets the status of the class of that name under the rows' types, so a
    snapshot refused in the VM's process exits as it would have here."""
    kind = getattr(error, "kind", None)
    if isinstance(kind, str):
        if kind in CONTROL_KINDS:
            return CONTROL_KINDS[kind]
        for types, code in rows:
            for root in types if isinstance(types, tuple) else (types,):
                if any(c.__name__ == kind for c in _subclasses(root)):
                    return code
        return ExitStatus.FAILED
    return next((code for types, code in rows if isinstance(error, types)), ExitStatus.FAILED)


def _subclasses(root: type) -> Iterable[type]:
    yield root
    subclasses: list[type] = root.__subclasses__()
    for subclass in subclasses:
        yield from _subclasses(subclass)


def say(prog: str, message: str, style: str = "bold") -> None:
    """One status line on stderr, `prog: message`, the message printed literally; -q silences it."""
    if not _quiet:
        try:
            status.print(Text.assemble((prog, style), ": ", message))
        except OSError:
            pass  # stderr gone (its reader died): a status line is not worth a running guest


MAX_GUEST_RAM = 1 << 48  # 256 TiB: what a 4-level x86-64 guest can address, and far more than any host has
_SIZE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """A memory size -> bytes: '1G', '512M', '4096K', and a bare number in MiB, as QEMU's `-m`
    ('512' is 512 MiB). Binary units."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (a number of MiB, or with a K, M, G or T "
                                         "suffix: 512M, 1G)")
    shift = {"": 20, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]
    size = int(m.group(1)) << shift
    if not size or size > MAX_GUEST_RAM:
        raise argparse.ArgumentTypeError(f"not a guest RAM size: {text!r} (more than zero, at most "
                                         f"{MAX_GUEST_RAM >> 40} TiB)")
    return size


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, and shows defaults and the epilog as
    written. Subcommand parsers are of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # argparse's own, passed on
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written; every option that has a default says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, "", argparse.SUPPRESS) and action.option_strings
                and "default" not in text and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


def verbosity_options() -> Parser:
    """-v/-q as a parent parser: given to the main parser and every subcommand, so they work
    before or after the subcommand's name."""
    p = Parser(add_help=False)
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="log more to stderr: -v what the VMM does (info), -vv everything (debug)")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="only errors on stderr: no status lines, no progress")
    return p


def add_version(parser: argparse.ArgumentParser) -> None:
    try:
        ours = version("kvmigrate")
    except PackageNotFoundError:  # run from a checkout that was never installed
        ours = "unknown"
    parser.add_argument("--version", action="version", version=f"%(prog)s (kvmigrate) {ours}")


def quiet() -> bool:
    return _quiet


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None, rows: ExitRows) -> int:
    """Parse, set up logging, run the chosen command. An error is one line on stderr (or, with
    --json, a JSON object on stdout) and the exit status `rows` give it, not a traceback."""
    global _quiet
    argv = sys.argv[1:] if argv is None else argv
    wants_json = "--json" in argv
    try:
        try:
            args = parser.parse_args(argv)
        except UsageError as e:
            return _fail(parser.prog, e, ExitStatus.USAGE, wants_json)
        _quiet = bool(getattr(args, "quiet", False))
        verbose = getattr(args, "verbose", 0)
        level = logging.ERROR if _quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
        logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s",
                            force=True)
        try:
            return int(args.func(args))
        except BrokenPipeError:  # stdout closed early (e.g. piped to head): not an error of ours
            return ExitStatus.OK
        except KeyboardInterrupt:  # Ctrl-C outside a VM's run (which handles its own): nothing half done
            say(parser.prog, "interrupted", "yellow")
            return INTERRUPTED
        except Exception as e:  # noqa: BLE001 - every error becomes a message and a status
            code = exit_status(e, rows)
            logging.getLogger(parser.prog).debug("the error in full", exc_info=True)
            return _fail(parser.prog, e, code, getattr(args, "json", False))
    finally:
        for stream in (sys.stdout, sys.stderr):  # everything out before the interpreter goes
            try:
                stream.flush()
            except (OSError, ValueError):
                pass


def error_kind(error: BaseException) -> str:
    """The public name of an error: its class's, or the one a control socket reported."""
    kind = getattr(error, "kind", None)
    return kind if isinstance(kind, str) else type(error).__name__


def error_message(error: BaseException) -> str:
    message = getattr(error, "message", None)
    return message if isinstance(message, str) else str(error)


def _fail(prog: str, error: BaseException, code: ExitStatus, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"error": {"type": error_kind(error), "message": error_message(error),
                                    "exit_status": int(code), "meaning": code.name.lower().replace("_", "-")}},
                         indent=2))
    status.print(Text.assemble((f"{prog}: {error_kind(error)}", "red"), ": ", error_message(error)))
    return code


def run_parser(prog: str, description: str, epilog: str = "") -> tuple[Parser, Callable[..., Parser]]:
    """The main parser (with --version, -v/-q) and a function adding a subcommand to it (which
    takes -v/-q too, and ends its help with `examples` and the exit statuses)."""
    common = verbosity_options()
    main = Parser(prog=prog, description=description, epilog=(epilog + "\n\n" if epilog else "") + EXIT_STATUS_HELP,
                  parents=[common])
    add_version(main)
    sub: argparse._SubParsersAction[Parser] = main.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, help: str, examples: str = "") -> Parser:
        epilog = (f"examples:\n{examples.rstrip()}\n\n" if examples else "") + EXIT_STATUS_HELP
        return sub.add_parser(name, help=help, description=help, epilog=epilog, parents=[common])

    return main, command
