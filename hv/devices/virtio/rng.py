"""virtio-rng (device ID 4): one request queue whose writable buffers are filled from os.urandom."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from hv.kvm.memory import GuestMemory
from hv.persist import check_type

from .mmio import VirtioMmio, VirtioMmioState
from .queue import Virtqueue

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 64
MAX_REQUEST = 64 << 10  # bytes given per buffer chain: a huge guest buffer costs no huge urandom


@dataclass(frozen=True)
class RngState:
    """virtio-rng keeps nothing besides its queue."""


@dataclass(frozen=True)
class VirtioRngState:
    transport: VirtioMmioState
    backend: RngState


class RngBackend:
    owner = "virtio"  # the device's KIND, set by the transport that owns this backend
    device_id = VIRTIO_ID_RNG
    features = 0
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)

    def config(self) -> bytes:
        return b""

    def process(self, queue: Virtqueue) -> int:
        used = 0
        while (chain := queue.pop()) is not None:
            n = queue.write_chain(chain, os.urandom(min(chain.writable_len, MAX_REQUEST)))
            queue.push_used(chain.head, n)
            used += 1
        return used

    def reset(self) -> None:
        pass

    def save(self) -> RngState:
        return RngState()

    def restore(self, state: RngState) -> None:
        check_type(self.owner, state, RngState)  # nothing else to check, nothing to apply

    def close(self) -> None:
        pass


class VirtioRng(VirtioMmio):
    """A virtio entropy device on virtio-mmio."""

    KIND: ClassVar[str] = "virtio-mmio-rng"
    state_type: ClassVar[type] = VirtioRngState

    def __init__(self, memory: GuestMemory) -> None:
        super().__init__(RngBackend(), memory)
