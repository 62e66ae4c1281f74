"""virtio devices on the virtio-mmio transport (version 2), split virtqueues.

    VirtioBlk(memory, path, read_only=)   device ID 2   state VirtioBlkState
    VirtioConsole(memory, output)         device ID 3   state VirtioConsoleState
    VirtioRng(memory)                     device ID 4   state VirtioRngState

Each is a bus device (read/write on its 4 KiB window) with save()/restore(state) and the
pause()/resume()/stop() lifecycle `Machine` drives; `connect(vm, base, gsi)` wires the
ioeventfds and the irqfd. See DESIGN.md in this package.
"""

from .blk import BlkState, VirtioBlk, VirtioBlkState
from .console import ConsoleState, VirtioConsole, VirtioConsoleState
from .errors import VirtioError, VirtioQueueError, VirtioStateError
from .mmio import MAGIC_VALUE, MMIO_WINDOW, VirtioMmio, VirtioMmioState
from .queue import DescriptorChain, QueueState, Virtqueue
from .rng import RngState, VirtioRng, VirtioRngState

__all__ = [
    "MAGIC_VALUE", "MMIO_WINDOW", "BlkState", "ConsoleState", "DescriptorChain", "QueueState",
    "RngState", "VirtioBlk", "VirtioBlkState", "VirtioConsole", "VirtioConsoleState", "VirtioError",
    "VirtioMmio", "VirtioMmioState", "VirtioQueueError", "VirtioRng", "VirtioRngState",
    "VirtioStateError", "Virtqueue",
]
