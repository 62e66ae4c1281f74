"""virtio-console (device ID 3): port 0 only, receiveq (0) and transmitq (1), no multiport.

Bytes the guest transmits go to `output` (as `Serial16550`'s do). Input from the host (`feed`)
waits in the device until the guest has made receive buffers available; what has not been
delivered yet is part of the saved state, so it survives a migration.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from hv.kvm.memory import GuestMemory
from hv.persist import check_bytes, check_type

from .mmio import VirtioMmio, VirtioMmioState
from .queue import Virtqueue

VIRTIO_ID_CONSOLE = 3
RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 64
MAX_PENDING_INPUT = 1 << 20  # input the guest has not taken yet; more is dropped
MAX_TRANSMIT = 1 << 20  # bytes taken from one transmit buffer


@dataclass(frozen=True)
class ConsoleState:
    pending_input: bytes = b""


@dataclass(frozen=True)
class VirtioConsoleState:
    transport: VirtioMmioState
    backend: ConsoleState


class ConsoleBackend:
    owner = "virtio"  # the device's KIND, set by the transport that owns this backend
    device_id = VIRTIO_ID_CONSOLE
    features = 0
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, output: Callable[[bytes], None]) -> None:
        self._output = output
        self.pending = bytearray()

    def config(self) -> bytes:
        return struct.pack("<HHII", 0, 0, 1, 0)  # cols, rows, max_nr_ports, emerg_wr

    def process(self, queue: Virtqueue) -> int:
        used = 0
        if queue.index == TRANSMITQ:
            while (chain := queue.pop()) is not None:
                data = queue.read_chain(chain, MAX_TRANSMIT)
                if data:
                    self._output(data)
                queue.push_used(chain.head, 0)
                used += 1
        else:
            while self.pending and (chain := queue.pop()) is not None:
                n = queue.write_chain(chain, self.pending)
                del self.pending[:n]
                queue.push_used(chain.head, n)
                used += 1
        return used

    def reset(self) -> None:
        pass  # pending input stays for the next driver

    def save(self) -> ConsoleState:
        return ConsoleState(bytes(self.pending))

    def restore(self, state: ConsoleState) -> None:
        check_type(self.owner, state, ConsoleState)
        check_bytes(self.owner, "backend.pending_input", state.pending_input, MAX_PENDING_INPUT)
        self.pending = bytearray(state.pending_input)

    def close(self) -> None:
        pass


class VirtioConsole(VirtioMmio):
    """A virtio console on virtio-mmio: guest output to `output`, host input through `feed`."""

    KIND: ClassVar[str] = "virtio-mmio-console"
    state_type: ClassVar[type] = VirtioConsoleState
    backend: ConsoleBackend

    def __init__(self, memory: GuestMemory, output: Callable[[bytes], None]) -> None:
        super().__init__(ConsoleBackend(output), memory)

    def feed(self, data: bytes) -> int:
        """Queue host input for the guest; returns how many bytes were accepted."""
        with self._cond:
            room = MAX_PENDING_INPUT - len(self.backend.pending)
            taken = data[: max(room, 0)]
            self.backend.pending += taken
        if taken:
            self.kick(RECEIVEQ)
        return len(taken)
