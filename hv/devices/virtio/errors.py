"""Virtio errors: a guest that breaks the rules gets a device error (NEEDS_RESET), never a crash.

Every error here describes something the *guest* did (or a state that does not fit this device);
the transport turns a `VirtioQueueError` into the DEVICE_NEEDS_RESET status bit.
"""

from __future__ import annotations

from hv.errors import HvError


class VirtioError(HvError):
    """Root of the virtio device errors."""


class VirtioQueueError(VirtioError):
    """The driver put something invalid in a virtqueue (index, address, length, loop...)."""

    def __init__(self, queue: int, detail: str) -> None:
        self.queue, self.detail = queue, detail
        super().__init__(f"virtqueue {queue}: {detail}")


class VirtioStateError(VirtioError):
    """A saved state that cannot go into this device; checked before anything is applied."""

    def __init__(self, device: str, field: str, expected: object, found: object) -> None:
        self.device, self.field, self.expected, self.found = device, field, expected, found
        super().__init__(f"{device}: {field}: expected {expected!r}, found {found!r}")
