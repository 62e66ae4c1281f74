"""Split virtqueues (virtio 1.x, 2.7) over guest memory, checked against a hostile driver.

    descriptor table  16 bytes each: addr u64, len u32, flags u16, next u16
    available ring    flags u16, idx u16, ring[num] u16            (the driver writes it)
    used ring         flags u16, idx u16, ring[num] {id u32, len u32} (the device writes it)

Every index, address and length the driver supplies is checked before use: indices against the
queue size, buffers through `GuestMemory` (which refuses anything outside guest RAM), chains for
loops and for a total length over 4 GiB. A violation is a `VirtioQueueError`, which the transport
turns into DEVICE_NEEDS_RESET. Device writes into guest memory go through `GuestMemory.write` or
`mark_dirty`, so live migration sees them. Neither indirect descriptors nor event-idx are offered.

The in-flight position is `last_avail_idx` (next available entry to consume) and `used_idx` (next
used entry to fill): both free-running 16-bit counters, as the spec has them. A chain is popped
and pushed back within one processing step, so a saved queue never has a chain half-done.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import Any, cast

from hv.errors import GuestMemoryError
from hv.kvm.memory import GuestMemory
from hv.persist import U32, U64

from .errors import VirtioQueueError

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1

DESC_SIZE = 16
MAX_CHAIN_BYTES = 1 << 32  # the spec's bound on a chain's total length
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


def ring_pending(avail_idx: int, last_avail_idx: int) -> int:
    """How many entries the driver has made available that the device has not consumed."""
    return (avail_idx - last_avail_idx) & 0xFFFF


def ring_slot(idx: int, num: int) -> int:
    """Ring position of free-running index `idx` (num is a power of two, so 2^16 wraps evenly)."""
    return idx & (num - 1)


def ring_sizes(num: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, available ring, used ring) for a queue of `num` entries,
    including the event-idx words a driver may lay out even when the feature is off."""
    return DESC_SIZE * num, 6 + 2 * num, 6 + 8 * num


@dataclass(frozen=True)
class QueueState:
    """One virtqueue as the driver configured it, and how far the device got."""

    num: int = 0  # size the driver chose (QueueNum)
    ready: bool = False
    desc: int = 0  # guest addresses of the three areas
    driver: int = 0
    device: int = 0
    last_avail_idx: int = 0
    used_idx: int = 0


# what each QueueState field can hold (a restore checks them; `check` then the ready ones' areas)
QUEUE_STATE_BOUNDS = {"num": (0, U32), "desc": (0, U64), "driver": (0, U64), "device": (0, U64),
                      "last_avail_idx": (0, 0xFFFF), "used_idx": (0, 0xFFFF)}


@dataclass(frozen=True)
class DescriptorChain:
    """A validated chain: its head index and its buffers, device-readable ones first."""

    head: int
    readable: tuple[tuple[int, int], ...]  # (guest address, length)
    writable: tuple[tuple[int, int], ...]

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class Virtqueue:
    """The device side of one split virtqueue."""

    def __init__(self, memory: GuestMemory, index: int, max_size: int) -> None:
        self.memory = memory
        self.index = index
        self.max_size = max_size
        self.state = QueueState()

    # --- configuration (transport registers) --------------------------------------------------

    def configure(self, **changes: int | bool) -> None:
        # (the fields are ints and bools: mypy cannot match a ** of either to each field's type)
        self.state = replace(self.state, **cast(dict[str, Any], changes))

    def reset(self) -> None:
        self.state = QueueState()

    def check(self) -> None:
        """The configuration is usable: a power-of-two size within the maximum, aligned areas
        wholly inside guest RAM. Raised at QueueReady, and again before a restored queue runs."""
        s = self.state
        if not 0 < s.num <= self.max_size or s.num & (s.num - 1):
            self._fail(f"size {s.num} is not a power of two in [1, {self.max_size}]")
        for name, address, length, align in zip(("descriptor table", "available ring", "used ring"),
                                                 (s.desc, s.driver, s.device), ring_sizes(s.num),
                                                 (16, 2, 4), strict=True):
            if address % align:
                self._fail(f"{name} at {address:#x} is not {align}-byte aligned")
            self._check_buffer(address, length, name)

    def _fail(self, detail: str) -> None:
        raise VirtioQueueError(self.index, detail)

    def _check_buffer(self, address: int, length: int, what: str) -> None:
        try:
            self.memory.find(address, length)
        except GuestMemoryError as e:
            raise VirtioQueueError(self.index, f"{what}: {e}") from None

    def _u16(self, address: int) -> int:
        try:
            return int.from_bytes(self.memory.read(address, 2), "little")  # in C, GIL released: post-copy
        except GuestMemoryError as e:
            raise VirtioQueueError(self.index, str(e)) from None

    # --- the rings ----------------------------------------------------------------------------

    def avail_idx(self) -> int:
        return self._u16(self.state.driver + 2)

    def interrupt_suppressed(self) -> bool:
        return bool(self._u16(self.state.driver) & VIRTQ_AVAIL_F_NO_INTERRUPT)

    def pending(self) -> int:
        s = self.state
        if not s.ready:
            return 0
        n = ring_pending(self.avail_idx(), s.last_avail_idx)
        if n > s.num:
            self._fail(f"available index runs {n} entries ahead of a {s.num}-entry queue")
        return n

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated; None when the driver has made none available."""
        if not self.pending():
            return None
        s = self.state
        head = self._u16(s.driver + 4 + 2 * ring_slot(s.last_avail_idx, s.num))
        chain = self._walk(head)
        self.state = replace(s, last_avail_idx=(s.last_avail_idx + 1) & 0xFFFF)
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        s = self.state
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        total = 0
        index = head
        for _ in range(s.num):  # a chain longer than the table has a loop
            if index >= s.num:
                self._fail(f"descriptor index {index} beyond the {s.num}-entry table")
            try:
                raw = self.memory.read(s.desc + DESC_SIZE * index, DESC_SIZE)
            except GuestMemoryError as e:
                raise VirtioQueueError(self.index, str(e)) from None
            address, length, flags, nxt = _DESC.unpack(raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                self._fail(f"descriptor {index} is indirect, a feature not offered")
            total += length
            if total > MAX_CHAIN_BYTES:
                self._fail(f"chain from {head} is longer than 4 GiB")
            if length:
                self._check_buffer(address, length, f"descriptor {index} buffer")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((address, length))
            elif writable:
                self._fail(f"descriptor {index} is device-readable after a device-writable one")
            else:
                readable.append((address, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable))
            index = nxt
        self._fail(f"chain from {head} loops (more than {s.num} descriptors)")
        raise AssertionError("unreachable")

    def push_used(self, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes written into it: the element
        first, then the index, so the driver never sees an index ahead of its element."""
        s = self.state
        element = s.device + 4 + 8 * ring_slot(s.used_idx, s.num)
        used_idx = (s.used_idx + 1) & 0xFFFF
        try:
            self.memory.write(element, _USED_ELEM.pack(head, written))
            self.memory.write(s.device + 2, used_idx.to_bytes(2, "little"))
        except GuestMemoryError as e:
            raise VirtioQueueError(self.index, str(e)) from None
        self.state = replace(s, used_idx=used_idx)

    # --- buffers ------------------------------------------------------------------------------

    def read_chain(self, chain: DescriptorChain, limit: int | None = None) -> bytes:
        """The chain's device-readable bytes, concatenated (at most `limit`)."""
        parts, left = [], chain.readable_len if limit is None else limit
        for address, length in chain.readable:
            if left <= 0:
                break
            n = min(length, left)
            parts.append(self.memory.read(address, n))
            left -= n
        return b"".join(parts)

    def write_chain(self, chain: DescriptorChain, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy `data` into the chain's device-writable buffers from byte `offset` of that space;
        returns how many bytes fitted. Marks the pages dirty."""
        data = memoryview(data)
        done, skip = 0, offset
        for address, length in chain.writable:
            if done == len(data):
                break
            if skip >= length:
                skip -= length
                continue
            n = min(length - skip, len(data) - done)
            self.memory.write(address + skip, data[done : done + n])
            done += n
            skip = 0
        return done

    def writable_views(self, chain: DescriptorChain, length: int) -> list[memoryview]:
        """Zero-copy views of the first `length` writable bytes (for preadv). NOT dirty-marked:
        call `mark_written` once they are filled."""
        views, left = [], length
        for address, n in chain.writable:
            if left <= 0:
                break
            views.append(self.memory.view(address, min(n, left)))
            left -= min(n, left)
        return views

    def mark_written(self, chain: DescriptorChain, length: int) -> None:
        left = length
        for address, n in chain.writable:
            if left <= 0:
                break
            self.memory.mark_dirty(address, min(n, left))
            left -= min(n, left)

    def readable_views(self, chain: DescriptorChain, skip: int) -> list[memoryview]:
        """Zero-copy views of the readable bytes after the first `skip` (for pwritev)."""
        views = []
        for address, n in chain.readable:
            if skip >= n:
                skip -= n
                continue
            views.append(self.memory.view(address + skip, n - skip))
            skip = 0
        return views
