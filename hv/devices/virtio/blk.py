"""virtio-blk (device ID 2): one request queue over a host file, 512-byte sectors.

A request is a chain: a 16-byte header (type u32, reserved u32, sector u64) readable by the
device, then data buffers (readable for OUT, writable for IN/GET_ID), then one writable status
byte, last. Data moves between the file and guest memory with preadv/pwritev on views of guest
RAM (no copy); pages filled by reads are marked dirty.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from hv.kvm.memory import GuestMemory
from hv.persist import U64, check_bool, check_equal, check_int, check_type

from .mmio import VirtioMmio, VirtioMmioState
from .queue import DescriptorChain, Virtqueue

VIRTIO_ID_BLOCK = 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SIZE = 512
ID_BYTES = 20
QUEUE_SIZE = 256
_HEADER = struct.Struct("<IIQ")


@dataclass(frozen=True)
class BlkState:
    """What the guest has seen of the disk; a restore checks the target's disk has the same.
    The path is the device's configuration (each host names its own), not part of the state."""

    read_only: bool
    capacity: int  # in 512-byte sectors


@dataclass(frozen=True)
class VirtioBlkState:
    transport: VirtioMmioState
    backend: BlkState


class BlkBackend:
    owner = "virtio"  # the device's KIND, set by the transport that owns this backend
    device_id = VIRTIO_ID_BLOCK
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE,)

    def __init__(self, path: Path, read_only: bool = False, *, fd: int | None = None) -> None:
        """The disk at `path`, or, with `fd`, the file already open there (the backend then owns
        `fd`; a VMM that checked the file before opening it passes it so it is not reopened)."""
        self.path = Path(path)
        self.read_only = read_only
        self._fd = fd if fd is not None else os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR)
                                                     | os.O_CLOEXEC)
        self.capacity = os.fstat(self._fd).st_size // SECTOR_SIZE
        self.features = VIRTIO_BLK_F_FLUSH | (VIRTIO_BLK_F_RO if read_only else 0)
        self.requests = 0

    def fileno(self) -> int:
        """The disk file's descriptor, still the backend's: for a caller that reads the file while
        the device is paused (a snapshot copying the disk), never to close."""
        return self._fd

    def config(self) -> bytes:
        # struct virtio_blk_config: capacity u64, size_max u32, seg_max u32, geometry (4 bytes),
        # blk_size u32; only capacity is meaningful without the features that enable the rest.
        return struct.pack("<QIIII", self.capacity, 0, 0, 0, SECTOR_SIZE)

    def process(self, queue: Virtqueue) -> int:
        used = 0
        while (chain := queue.pop()) is not None:
            written = self._request(queue, chain)
            queue.push_used(chain.head, written)
            used += 1
        return used

    def _request(self, queue: Virtqueue, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written into the chain (data and status)."""
        space = chain.writable_len
        if space < 1 or chain.readable_len < _HEADER.size:
            return 0  # no status byte to answer in: a malformed request, returned unanswered
        kind, _, sector = _HEADER.unpack(queue.read_chain(chain, _HEADER.size))
        self.requests += 1
        data_in = space - 1  # writable bytes before the status byte
        status, written = VIRTIO_BLK_S_OK, 0
        match kind:
            case 0:  # VIRTIO_BLK_T_IN
                if not self._in_range(sector, data_in):
                    status = VIRTIO_BLK_S_IOERR
                else:
                    views = queue.writable_views(chain, data_in)
                    try:
                        got = os.preadv(self._fd, views, sector * SECTOR_SIZE) if views else 0
                    except OSError:
                        got, status = 0, VIRTIO_BLK_S_IOERR
                    queue.mark_written(chain, got)
                    written = got
                    if got != data_in:
                        status = VIRTIO_BLK_S_IOERR
            case 1:  # VIRTIO_BLK_T_OUT
                length = chain.readable_len - _HEADER.size
                if self.read_only or not self._in_range(sector, length):
                    status = VIRTIO_BLK_S_IOERR
                else:
                    try:
                        done = os.pwritev(self._fd, queue.readable_views(chain, _HEADER.size),
                                          sector * SECTOR_SIZE) if length else 0
                    except OSError:
                        done = -1
                    if done != length:
                        status = VIRTIO_BLK_S_IOERR
            case 4:  # VIRTIO_BLK_T_FLUSH
                try:
                    os.fsync(self._fd)
                except OSError:
                    status = VIRTIO_BLK_S_IOERR
            case 8:  # VIRTIO_BLK_T_GET_ID
                ident = self.path.name.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0")
                written = queue.write_chain(chain, ident[: min(ID_BYTES, data_in)])
            case _:
                status = VIRTIO_BLK_S_UNSUPP
        queue.write_chain(chain, bytes((status,)), offset=space - 1)
        return written + 1

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= self.capacity * SECTOR_SIZE

    def reset(self) -> None:
        pass  # no device-side state besides the queues

    def save(self) -> BlkState:
        return BlkState(self.read_only, self.capacity)

    def restore(self, state: BlkState) -> None:
        """The disk must be the same size and mode; then there is nothing to apply."""
        check_type(self.owner, state, BlkState)
        check_bool(self.owner, "backend.read_only", state.read_only)
        check_int(self.owner, "backend.capacity", state.capacity, 0, U64)
        check_equal(self.owner, "backend.read_only", self.read_only, state.read_only)
        check_equal(self.owner, "backend.capacity", self.capacity, state.capacity)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class VirtioBlk(VirtioMmio):
    """A virtio-blk device on virtio-mmio, backed by the file at `path`."""

    KIND: ClassVar[str] = "virtio-mmio-blk"
    state_type: ClassVar[type] = VirtioBlkState
    backend: BlkBackend

    def __init__(self, memory: GuestMemory, path: Path, *, read_only: bool = False, fd: int | None = None) -> None:
        super().__init__(BlkBackend(path, read_only, fd=fd), memory)

    @property
    def path(self) -> Path:
        return self.backend.path

    @property
    def read_only(self) -> bool:
        return self.backend.read_only
