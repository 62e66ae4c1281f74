"""Which host feature a test failure comes from, when it comes from the host and not the code.

The suite runs on whatever machine CI gets (CPU models differ; the nested KVM's emulator refuses
some ring-0 instructions): a failure caused by a missing KVM capability or by the emulator must
say so, naming the feature, rather than read like a bug."""

from __future__ import annotations

from hv.errors import GuestFatalExit, KvmUnavailableError, MissingCapabilityError
from hv.kvm.exits import InternalError


def host_feature_missing(error: BaseException) -> str | None:
    """A sentence naming the host feature behind `error` (or any error in its chain), else None."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, MissingCapabilityError):
            return f"this host's KVM lacks {cause.capability} (needed for {cause.needed_for})"
        if isinstance(cause, KvmUnavailableError):
            return f"this host has no usable {cause.path}"
        if isinstance(cause, GuestFatalExit) and isinstance(cause.exit, InternalError) \
                and cause.exit.suberror == InternalError.EMULATION:
            insn = cause.exit.instruction_bytes
            what = f"the instruction {insn.hex(' ')}" if insn else "an instruction"
            return f"this host's KVM cannot emulate {what} in guest ring 0 (vCPU {cause.vcpu_id})"
        cause = cause.__cause__ or cause.__context__
    return None
