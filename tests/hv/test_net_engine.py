"""virtio-net's C engine (hv/binding/net.c) against its Python reference
(hv/devices/virtio/net_reference.py over queue.py's `Virtqueue`): random chains, hostile ones
included (buffers outside RAM, loops, indices past the table, indirect descriptors, readable after
writable), one transmitted or received by each; every byte of guest memory afterwards, the frame
sent, and whether the device refused the chain must agree. The tap is a datagram socket pair
here (the engine only reads and writes frames on a descriptor), so no KVM and no root is needed."""

from __future__ import annotations

import os
import socket
import struct
import time

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hv.devices.virtio import net_reference
from hv.devices.virtio.errors import VirtioQueueError
from hv.devices.virtio.net import DEFAULT_MAC, RECEIVEQ, TRANSMITQ, NetBackend
from hv.devices.virtio.queue import QueueState, Virtqueue
from hv.kvm.memory import GuestMemory, MemoryRegion

RAM = 256 << 10
NUM = 8
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000
BUFFERS = 0x10000
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4

CORRUPTIONS = (None, None, None, "outside RAM", "loop", "index past the table", "indirect", "readable after writable")


@st.composite
def chains(draw, queue: int) -> list[tuple[int, int, int, int]]:
    """A well-formed chain (readable buffers, then writable ones) of 1-6 descriptors, with one
    corruption or none; mostly of the direction `queue` uses."""
    n = draw(st.integers(1, 6))
    usual = n if queue == TRANSMITQ else 0
    readable = draw(st.one_of(st.just(usual), st.just(usual), st.integers(0, n)))
    out = []
    for i in range(n):
        addr = draw(st.integers(BUFFERS, BUFFERS + 0x20000))
        length = draw(st.one_of(st.integers(0, 40), st.integers(40, 2000), st.integers(40, 2000)))
        flags = (F_NEXT if i + 1 < n else 0) | (0 if i < readable else F_WRITE)
        out.append([addr, length, flags, i + 1 if i + 1 < n else 0])
    corruption = draw(st.sampled_from(CORRUPTIONS))
    at = draw(st.integers(0, n - 1))
    if corruption == "outside RAM":
        out[at][0], out[at][1] = RAM - 8, max(out[at][1], 16)
    elif corruption == "loop":
        out[-1][2] |= F_NEXT
        out[-1][3] = at
    elif corruption == "index past the table":
        out[-1][2] |= F_NEXT
        out[-1][3] = NUM + at
    elif corruption == "indirect":
        out[at][2] |= F_INDIRECT
    elif corruption == "readable after writable" and n > 1:
        out[0][2] |= F_WRITE
        out[-1][2] &= ~F_WRITE
    return [tuple(d) for d in out]


def _setup(descriptors: list[tuple[int, int, int, int]]) -> tuple[GuestMemory, bytes]:
    memory = GuestMemory()
    memory.insert(MemoryRegion(0, RAM, slot=0))
    for i, (addr, length, flags, nxt) in enumerate(descriptors):
        memory.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
    memory.write(AVAIL, struct.pack("<HHH", 0, 1, 0))  # one chain, head 0
    memory.write(BUFFERS, bytes(range(256)) * 0x200)  # recognisable bytes to transmit
    return memory, bytes(memory.read(0, RAM))


def _queues(memory: GuestMemory) -> list[Virtqueue]:
    queues = [Virtqueue(memory, i, 256) for i in range(3)]
    for q in queues[:2]:
        q.state = QueueState(num=NUM, ready=True, desc=DESC, driver=AVAIL, device=USED)
    return queues


def _engine(memory: GuestMemory, queue: int, frame: bytes | None) -> tuple[bytes, bytes | None, bool]:
    """Run the C engine on the chain: (guest memory after, the frame it sent, refused?)."""
    host, device = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    device.setblocking(False)
    kicks = (os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK))
    backend = NetBackend(memory, os.dup(device.fileno()), DEFAULT_MAC, kicks)
    device.close()
    queues = _queues(memory)
    if queue == TRANSMITQ:  # no receive buffers: only the transmit chain moves
        queues[RECEIVEQ].state = QueueState()
    else:
        queues[TRANSMITQ].state = QueueState()
        host.send(frame or b"")
    try:
        backend.go_live(queues, (-1, -1), 0)
        deadline = time.monotonic() + 5
        refused = None
        while refused is None and memory.read(USED + 2, 2) == b"\0\0":  # an event: used or refused
            refused = backend.take_error()
            assert time.monotonic() < deadline, "the engine neither used nor refused the chain"
            time.sleep(0.0005)
        backend.halt(queues)
        host.setblocking(False)
        try:
            sent = host.recv(1 << 16)
        except BlockingIOError:
            sent = None
        return bytes(memory.read(0, RAM)), sent, refused is not None
    finally:
        backend.close()
        host.close()
        for k in kicks:
            os.close(k)


def _reference(memory: GuestMemory, initial: bytes, queue: int, frame: bytes | None) -> tuple[bytes, bytes | None, bool]:
    memory.write(0, initial)
    q = _queues(memory)[queue]
    try:
        sent = net_reference.transmit(q) if queue == TRANSMITQ else (net_reference.receive(q, frame or b""), None)[1]
        refused = False
    except VirtioQueueError as e:
        event(f"why: {e.detail.split(' ')[0:3]}")
        sent, refused = None, True
        memory.write(0, initial)  # a refused chain: the reference may have read only
    return bytes(memory.read(0, RAM)), sent, refused


@settings(max_examples=100, deadline=None)
@given(st.data(), st.sampled_from([TRANSMITQ, RECEIVEQ]), st.binary(min_size=1, max_size=1600))
def test_the_engine_does_to_every_chain_what_the_reference_does(data, queue, frame) -> None:
    descriptors = data.draw(chains(queue))
    memory, initial = _setup(descriptors)
    c_memory, c_sent, c_refused = _engine(memory, queue, frame if queue == RECEIVEQ else None)
    py_memory, py_sent, py_refused = _reference(memory, initial, queue, frame)
    event(f"{'tx' if queue == TRANSMITQ else 'rx'} {'refused' if py_refused else 'used'}"
          f"{'' if py_sent is None else ', a frame sent'}")
    assert c_refused == py_refused
    assert c_sent == py_sent
    if c_refused:
        assert c_memory == initial  # a refused chain is left as it was: nothing written
    else:
        assert c_memory == py_memory


@pytest.mark.parametrize("descriptors", [
    [(65536, 7, 3, 1), (65536, 6, 2, 0)],  # hypothesis found it: the second buffer is the first
    [(65536, 4, 3, 1), (65538, 64, 2, 0)],  # overlapping by a part, the frame over the header
])
def test_a_receive_chain_whose_buffers_overlap_ends_as_one_sequential_write_leaves_it(descriptors) -> None:
    """The header and the frame go into the chain in their order (the engine once wrote the frame
    first and the header over it)."""
    memory, initial = _setup(descriptors)
    c_memory, _, c_refused = _engine(memory, RECEIVEQ, b"\x01\x02\x03")
    py_memory, _, py_refused = _reference(memory, initial, RECEIVEQ, b"\x01\x02\x03")
    assert not c_refused and not py_refused
    assert c_memory == py_memory
