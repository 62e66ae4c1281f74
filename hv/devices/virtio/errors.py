"""Virtio errors: a guest that breaks the rules gets a device error (NEEDS_RESET), never a crash.

Every error here describes something the *guest* did (or a worker that would not stop); the
transport turns a `VirtioQueueError` into the DEVICE_NEEDS_RESET status bit. A saved state that
does not fit a device is `hv.errors.StateRestoreError`, as for every other model.
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


class VirtioWorkerError(VirtioError):
    """A device's worker thread did not park within the time a pause allows."""

    def __init__(self, device: str, timeout: float) -> None:
        self.device, self.timeout = device, timeout
        super().__init__(f"{device}: the worker did not park within {timeout}s")
