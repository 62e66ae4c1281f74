"""The hv error hierarchy: one root, one class per failing operation, the facts as fields."""

from __future__ import annotations

import errno as _errno
import os


class HvError(Exception):
    """Root of every error raised by the hv package."""


# --- the KVM interface -------------------------------------------------------------------------


class KvmUnavailableError(HvError):
    def __init__(self, path: str, errno: int) -> None:
        self.path, self.errno = path, errno
        super().__init__(f"cannot open {path}: {os.strerror(errno)} (errno {errno})")


class KvmApiVersionError(HvError):
    def __init__(self, expected: int, found: int) -> None:
        self.expected, self.found = expected, found
        super().__init__(f"KVM API version {found}, expected {expected}")


class KvmIoctlError(HvError):
    """An ioctl failed: which one, on which kind of fd, and the errno."""

    def __init__(self, ioctl: str, errno: int, target: str = "") -> None:
        self.ioctl, self.errno, self.target = ioctl, errno, target
        name = _errno.errorcode.get(errno, str(errno))
        where = f" on {target}" if target else ""
        super().__init__(f"{ioctl}{where} failed: {name} ({os.strerror(errno)})")


class MissingCapabilityError(HvError):
    def __init__(self, capability: str, needed_for: str) -> None:
        self.capability, self.needed_for = capability, needed_for
        super().__init__(f"KVM lacks {capability}, needed for {needed_for}")


# --- guest memory ------------------------------------------------------------------------------


class GuestMemoryError(HvError):
    pass


class RamReservationError(GuestMemoryError):
    """Guest RAM of `size` bytes could not be reserved (mapped) on this host."""

    def __init__(self, size: int, errno: int) -> None:
        self.size, self.errno = size, errno
        total = _host_ram()
        have = f"; this host has {total >> 20} MiB of RAM" if total else ""
        super().__init__(f"cannot reserve guest RAM (a region of {size >> 20} MiB): {os.strerror(errno)}{have}")


def _host_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


class GuestAddressError(GuestMemoryError):
    """An access [address, address+length) that no single memory region covers."""

    def __init__(self, address: int, length: int, detail: str = "not backed by guest RAM") -> None:
        self.address, self.length = address, length
        super().__init__(f"guest range [{address:#x}, {address + length:#x}) {detail}")


class SlotOverlapError(GuestMemoryError):
    def __init__(self, guest_addr: int, size: int, slot: int, slot_addr: int, slot_size: int) -> None:
        self.guest_addr, self.size, self.slot = guest_addr, size, slot
        super().__init__(
            f"memory [{guest_addr:#x}, {guest_addr + size:#x}) overlaps slot {slot} "
            f"[{slot_addr:#x}, {slot_addr + slot_size:#x})"
        )


class SlotError(GuestMemoryError):
    def __init__(self, slot: int, detail: str) -> None:
        self.slot = slot
        super().__init__(f"memory slot {slot}: {detail}")


class RamMoveError(GuestMemoryError):
    """The pages of one mapping could not be moved into a region (mremap, MREMAP_DONTUNMAP):
    the region's guest range, and the errno (EINVAL: a kernel before 5.13, for a file's pages)."""

    def __init__(self, address: int, length: int, errno: int) -> None:
        self.address, self.length, self.errno = address, length, errno
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"cannot move pages into guest range [{address:#x}, {address + length:#x}): "
                         f"{name} ({os.strerror(errno)})")


class UserfaultError(GuestMemoryError):
    """A userfaultfd operation over guest RAM failed: which one, its errno, and the guest range."""

    def __init__(self, operation: str, errno: int, address: int, length: int) -> None:
        self.operation, self.errno, self.address, self.length = operation, errno, address, length
        name = _errno.errorcode.get(errno, str(errno))
        super().__init__(f"{operation} on guest range [{address:#x}, {address + length:#x}) failed: "
                         f"{name} ({os.strerror(errno)})")


class UserfaultSetupError(UserfaultError):
    """The range could not be put under userfaultfd (open, UFFDIO_API, UFFDIO_REGISTER, thread)."""


class UserfaultResolveError(UserfaultError):
    """Pages could not be placed (UFFDIO_COPY, UFFDIO_ZEROPAGE) or the range unregistered."""


class UserfaultClosedError(UserfaultError):
    """The userfaultfd layer of this range was closed."""

    def __init__(self, address: int, length: int) -> None:
        super().__init__("userfaultfd (closed)", _errno.EBADF, address, length)


# --- vCPUs and VM state ------------------------------------------------------------------------


class VcpuError(HvError):
    pass


class VcpuIdError(VcpuError):
    def __init__(self, vcpu_id: int, vcpu_count: int) -> None:
        self.vcpu_id, self.vcpu_count = vcpu_id, vcpu_count
        super().__init__(f"vCPU id {vcpu_id} out of range: the VM is configured for {vcpu_count}")


class VcpuStateError(VcpuError):
    """A vCPU state could not be read or applied; `part` names the piece (e.g. 'msrs')."""

    def __init__(self, vcpu_id: int, part: str, detail: str) -> None:
        self.vcpu_id, self.part = vcpu_id, part
        super().__init__(f"vCPU {vcpu_id} {part}: {detail}")


class GuestFatalExit(VcpuError):
    """The guest stopped in a way it cannot continue from (emulation failure, failed entry, ...)."""

    def __init__(self, vcpu_id: int, exit: object) -> None:
        self.vcpu_id, self.exit = vcpu_id, exit
        super().__init__(f"vCPU {vcpu_id}: {exit}")


class DeviceFault(VcpuError):
    """A device model raised while handling a guest access; the VM cannot trust its state."""

    def __init__(self, vcpu_id: int, exit: object, cause: BaseException) -> None:
        self.vcpu_id, self.exit, self.cause = vcpu_id, exit, cause
        super().__init__(f"vCPU {vcpu_id}: device failed on {exit}: {type(cause).__name__}: {cause}")


# --- saved state --------------------------------------------------------------------------------


class StateRestoreError(HvError):
    """A saved state that does not fit what restores it (wrong type, a value out of range, a size
    this model does not have); raised before any of the state is applied. `owner` is who
    restores: a device's declared kind ("serial-16550"), "vcpu 3" or "vm"."""

    def __init__(self, owner: str, field: str, expected: object, found: object) -> None:
        self.owner, self.field, self.expected, self.found = owner, field, expected, found
        super().__init__(f"{owner}: {field}: expected {expected}, found {found!r}"[:1000])


# --- lifecycle and boot ------------------------------------------------------------------------


class LifecycleError(HvError):
    """`requested` is not possible in state `current`; `why`: what put it there, when the state
    alone would mislead (a running VM whose guest has just asked to stop)."""

    def __init__(self, current: object, requested: str, why: str = "") -> None:
        self.current, self.requested, self.why = current, requested, why
        super().__init__(f"cannot {requested} a VM that is {getattr(current, 'value', current)}"
                         + (f": {why}" if why else ""))


class ConfigError(HvError):
    def __init__(self, field: str, value: object, detail: str) -> None:
        self.field, self.value = field, value
        super().__init__(f"{field}={value!r}: {detail}")


class BootError(HvError):
    """A kernel image was refused by a loader: which field, what was expected, what was found."""

    def __init__(self, image: str, field: str, expected: object, found: object) -> None:
        self.image, self.field, self.expected, self.found = image, field, expected, found
        super().__init__(f"{image}: {field}: expected {expected}, found {found}")


class Busy(HvError):
    """A change of a VM's run state (pause, resume, stop, a second snapshot or migration) asked
    while someone else owns it: a migration or snapshot in progress, or a hand-over in doubt that
    only `migrate resolve` ends. `facts()` is what the control socket sends with it."""

    def __init__(self, action: str, owner: str, since: float, in_doubt: bool = False) -> None:
        self.action, self.owner, self.since, self.in_doubt = action, owner, since, in_doubt
        held = ("in doubt after " + owner + ": only `migrate resolve` ends it" if in_doubt
                else "held by " + owner)
        super().__init__(f"{action} refused: the VM's run state is {held} (since {_clock(since)})")

    def facts(self) -> dict[str, object]:
        return {"action": self.action, "owner": self.owner, "since": self.since,
                "state": "in-doubt" if self.in_doubt else "held"}


def _clock(wall: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(wall))


class ControlSocketError(HvError):
    """A control socket path (`--api PATH`) that cannot be ours: a file that is not a socket, a
    socket a running VM answers on, or a directory that does not exist."""

    def __init__(self, path: object, detail: str) -> None:
        self.path, self.detail = path, detail
        super().__init__(f"--api {path}: {detail}")
