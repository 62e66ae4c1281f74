"""What virtio-net's C engine (hv/binding/net.c) does with one chain, in Python: the
specification it is held to (tests/hv/test_net_engine.py runs both on random, also hostile,
chains and compares every byte of guest memory and every frame). `Virtqueue` (queue.py) is the
reference for the rings: the same checks, the same used-ring writes."""

from __future__ import annotations

from .errors import VirtioQueueError
from .queue import Virtqueue

HEADER_LEN = 12  # struct virtio_net_hdr with num_buffers (VERSION_1)
RX_HEADER = bytes(10) + (1).to_bytes(2, "little")  # no offloads; num_buffers 1


def transmit(queue: Virtqueue) -> bytes | None:
    """Consume the next transmit chain: the frame it carries after its header (None: no bytes
    past the header, nothing is sent), the chain used with 0 bytes written."""
    chain = queue.pop()
    if chain is None:
        return None
    frame = queue.read_chain(chain)[HEADER_LEN:]
    queue.push_used(chain.head, 0)
    return frame or None


def receive(queue: Virtqueue, frame: bytes) -> int:
    """Fill the next receive chain with the header and `frame` (cut to the room there is, as
    a tap cuts a frame read into a short buffer); returns the bytes used."""
    chain = queue.pop()
    if chain is None:
        return 0
    if chain.writable_len < HEADER_LEN:
        raise VirtioQueueError(queue.index, f"receive buffer of {chain.writable_len} bytes, under the header")
    written = queue.write_chain(chain, RX_HEADER + frame[: chain.writable_len - HEADER_LEN])
    queue.push_used(chain.head, written)
    return written
