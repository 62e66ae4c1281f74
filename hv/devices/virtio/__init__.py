"""virtio devices on the virtio-mmio transport (version 2), split virtqueues.

    VirtioBlk(memory, path, read_only=)   device ID 2   kind virtio-mmio-blk       VirtioBlkState
    VirtioConsole(memory, output)         device ID 3   kind virtio-mmio-console   VirtioConsoleState
    VirtioRng(memory)                     device ID 4   kind virtio-mmio-rng       VirtioRngState
    VirtioNet(memory, tap, mac=)          device ID 1   kind virtio-mmio-net       VirtioNetState (net.py)

Each is a bus device (read/write on its 4 KiB window) implementing `hv.persist.Persist` (the
state type above) and `hv.persist.Lifecycle` (pause()/resume()/stop(), which `Machine` drives);
`connect(vm, base, gsi)` wires the ioeventfds and the irqfd. See DESIGN.md in this package.
"""

from .blk import BlkState, VirtioBlk, VirtioBlkState
from .console import ConsoleState, VirtioConsole, VirtioConsoleState
from .errors import VirtioError, VirtioQueueError, VirtioWorkerError
from .mmio import MAGIC_VALUE, MMIO_WINDOW, VirtioMmio, VirtioMmioState
from .queue import DescriptorChain, QueueState, Virtqueue
from .rng import RngState, VirtioRng, VirtioRngState

__all__ = [
    "MAGIC_VALUE", "MMIO_WINDOW", "BlkState", "ConsoleState", "DescriptorChain", "QueueState",
    "RngState", "VirtioBlk", "VirtioBlkState", "VirtioConsole", "VirtioConsoleState", "VirtioError",
    "VirtioMmio", "VirtioMmioState", "VirtioQueueError", "VirtioRng", "VirtioRngState",
    "VirtioWorkerError", "Virtqueue",
]
