"""migrate's errors: one root, the facts in each.

Stream and file problems stay `formats.FormatError`s (a corrupt snapshot, a bad page run); VM
problems stay `hv.HvError`s. These are the failures of the migration itself; `error_code` is the
one table that turns any of them into the `ErrorCode` the other side is told.
"""

from __future__ import annotations

from collections.abc import Callable

from collections.abc import Sequence
from enum import StrEnum

from formats import DigestMismatch, FormatError, LayoutMismatch
from hv.errors import HvError
from migrate.protocol import ErrorCode


class MigrateError(Exception):
    """Root of migrate's errors."""


class StateError(MigrateError):
    """An operation asked of a machine in the wrong state (say, capture of a running one)."""


class IncompatibleError(MigrateError):
    """The target cannot take this guest: every reason, not just the first."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"{len(self.problems)} incompatibilities:\n  {lines}")


class SnapshotError(MigrateError):
    """A snapshot file set that does not hold together (missing memory file, wrong base)."""

    def __init__(self, path: object, detail: str) -> None:
        self.path, self.detail = path, detail
        super().__init__(f"{path}: {detail}")


class CorruptPage(SnapshotError):
    """A page of a lazily restored snapshot failed its check on its way in (a run's checksum, a
    zstd frame, a block's hash, the file ending early): `address` is the page (the one a thread
    faulted on, or the first of its block when the background loader found it), `first` and
    `pages` the run or block the failed check covers, `path` the file it was read from, `cause`
    the format error. The page is never placed."""

    def __init__(self, path: object, address: int, first: int, pages: int, cause: Exception) -> None:
        self.address, self.first, self.pages, self.cause = address, first, pages, cause
        super().__init__(path, f"page {address:#x} is corrupt (the check of the {pages} pages at {first:#x} failed: "
                               f"{cause})")


class TransportError(MigrateError):
    """The link to the peer failed (closed, timed out, a frame too large, authentication)."""


class CannotListen(TransportError):
    """The listening address cannot be bound: in use by another process, or not this host's."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


class AuthenticationFailed(TransportError):
    """The peer answered the challenge, wrongly: it does not hold the key (a guess, counted)."""


class ProtocolViolation(MigrateError):
    """The peer sent what the protocol does not allow here: a message out of order, a frame too
    large for its kind, an undecodable body, a section a message may not carry. The link still
    works, so the side that sees it tells the peer why (`ErrorCode.PROTOCOL`)."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"the peer broke the protocol: {detail}")


class StateShapeError(MigrateError):
    """A machine state whose structure does not fit its layout (a device missing, unknown or of
    another type, a vCPU count that differs): refused whole, before any of it is applied."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        lines = "\n  ".join(self.problems)
        super().__init__(f"the state does not fit its layout ({len(self.problems)} problems):\n  {lines}")


class DiskRefused(MigrateError):
    """A disk the stream names that this side will not open: no `--disk`/`--disk-dir` for it, a
    name that is not a plain file name, or a file that is not a regular file of that directory."""

    def __init__(self, name: object, detail: str) -> None:
        self.name, self.detail = name, detail
        super().__init__(f"disk {name!s}: {detail}")


class MigrationFailed(MigrateError):
    """A live migration ended without handing the guest over; says where the guest runs now."""

    def __init__(self, reason: str, guest_on: str, *, code: ErrorCode | None = None) -> None:
        self.reason, self.guest_on, self.code = reason, guest_on, code
        super().__init__(f"migration failed: {reason} (the guest is {guest_on})")


class MigrationInDoubt(MigrationFailed):
    """The link died after Commit with no answer: the guest is paused at the source and the
    target may be running it. Resume the source only once the target says it has no guest."""


class PostcopyFailed(MigrationFailed):
    """Post-copy stopped after the switch: the target's guest is paused with the pages it has
    (`missing` still at the source) and `machine` is kept, not discarded; the source keeps its
    copy as it was at the switch."""

    def __init__(self, reason: str, missing: int, machine: object = None,
                 discard: Callable[[], None] | None = None) -> None:
        self.missing, self.machine, self._discard = missing, machine, discard
        super().__init__(f"{reason}; {missing} pages are still only at the source",
                         "paused on the target with what it has")

    def discard(self) -> None:
        """Give the guest up: its missing pages released as zeros (a vCPU waiting for one runs
        no further than into the pause), the VM torn down."""
        if self._discard is not None:
            self._discard()


class SessionFenced(MigrationFailed):
    """A post-copy source came back and heard that the target never took Commit (it fenced the
    session): no copy runs there, so this one may run on."""


class Cancelled(MigrateError):
    """The user (or the source, seen from the target) called the migration off."""


class NotConverging(MigrateError):
    """The guest dirties memory faster than the rounds can bring it down to the downtime target."""

    def __init__(self, rounds: int, seconds: float, dirty_pages: int, estimate_ms: float,
                 bandwidth_mib_s: float, downtime_ms: float) -> None:
        self.rounds, self.seconds, self.dirty_pages = rounds, seconds, dirty_pages
        self.estimate_ms, self.bandwidth_mib_s, self.downtime_ms = estimate_ms, bandwidth_mib_s, downtime_ms
        super().__init__(f"not converged after {rounds} rounds / {seconds:.1f} s: {dirty_pages} pages dirty, "
                         f"about {estimate_ms:.0f} ms to send at {bandwidth_mib_s:.0f} MiB/s, "
                         f"downtime target {downtime_ms:.0f} ms")


class MissingSections(MigrateError):
    """A stream that ended without sections a machine's state needs (CONFIG, LAYOUT, ...)."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__(f"no {', '.join(self.missing)} section")


# Why a side gave up, as the code the wire carries to the other side: the first entry whose type
# the error is. The one place a local failure becomes an `ErrorCode`, for either side.
ERROR_CODES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], ErrorCode], ...] = (
    ((Cancelled, KeyboardInterrupt), ErrorCode.CANCELLED),
    (NotConverging, ErrorCode.TIMEOUT),
    (DigestMismatch, ErrorCode.DIGEST_MISMATCH),
    ((LayoutMismatch, IncompatibleError, DiskRefused), ErrorCode.INCOMPATIBLE),
    ((FormatError, MissingSections, StateShapeError), ErrorCode.BAD_STREAM),
    (ProtocolViolation, ErrorCode.PROTOCOL),
    (HvError, ErrorCode.RESTORE_FAILED),  # KVM refused the state (on the target, the only HvError)
)


def error_code(error: BaseException) -> ErrorCode:
    """The `ErrorCode` that tells the peer why `error` ended the migration here."""
    return next((code for types, code in ERROR_CODES if isinstance(error, types)), ErrorCode.INTERNAL)


class Failure(StrEnum):
    """Why a migration did not complete, in the public words `MigrationStats.failure` and `migrate
    send --json` use (documented in the README)."""

    NONE = ""  # it completed (or was a dry run)
    CANCELLED = "cancelled"
    NOT_CONVERGING = "not-converging"
    IN_DOUBT = "in-doubt"
    POSTCOPY_FAILED = "postcopy-failed"
    PEER_FAILED = "peer-failed"
    PROTOCOL_VIOLATION = "protocol-violation"
    LINK_FAILED = "link-failed"
    DIGEST_MISMATCH = "digest-mismatch"
    INCOMPATIBLE = "incompatible"
    BAD_STREAM = "bad-stream"
    VM_FAILED = "vm-failed"
    REJECTED = "rejected"  # the target refused the guest in its handshake (no error on this side)
    INTERNAL = "internal"  # a fault of ours


# The failure an error means: the first entry whose type the error is.
FAILURES: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Failure], ...] = (
    ((Cancelled, KeyboardInterrupt), Failure.CANCELLED),
    (NotConverging, Failure.NOT_CONVERGING),
    (MigrationInDoubt, Failure.IN_DOUBT),
    (PostcopyFailed, Failure.POSTCOPY_FAILED),
    (MigrationFailed, Failure.PEER_FAILED),
    (ProtocolViolation, Failure.PROTOCOL_VIOLATION),
    (TransportError, Failure.LINK_FAILED),
    (DigestMismatch, Failure.DIGEST_MISMATCH),
    ((LayoutMismatch, IncompatibleError), Failure.INCOMPATIBLE),
    ((FormatError, MissingSections, StateShapeError), Failure.BAD_STREAM),
    (HvError, Failure.VM_FAILED),
)


def failure_word(error: BaseException) -> Failure:
    """The public word for why `error` ended a migration (INTERNAL: a fault of ours)."""
    return next((word for types, word in FAILURES if isinstance(error, types)), Failure.INTERNAL)
