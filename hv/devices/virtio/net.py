"""virtio-net (device ID 1, virtio 1.x section 5.1): receiveq (0), transmitq (1), controlq (2).

The backend of a transport (virtio-mmio: `VirtioNet`; virtio-pci: `hv.devices.pci.VirtioPciNet`,
the same backend), with a tap as its host end. rx and tx run in C (`binding/net.c`) on a thread
of their own, so packets never wait for the interpreter lock, and each signals the fd the
transport gives it (virtio-mmio's one irqfd; on PCI its queue's MSI-X vector); the control
queue, the configuration and the state are here.

Features offered: MAC (the address in the configuration), STATUS (link up, and ANNOUNCE),
CTRL_VQ and GUEST_ANNOUNCE. Not offered: checksum and segmentation offloads (a frame is at most
1514 bytes, so the 12-byte header the guest sees is always empty), and **MRG_RXBUF**: with no
offloads every frame fits one buffer of 1526 bytes, which is what every driver posts without
it, and a frame that always occupies exactly one chain keeps the engine's rule simple (a chain is
consumed only when a frame filled it) and the saved state exact (no frame split across chains
in flight). Neither multiqueue nor the control commands for rx modes, MAC tables and VLANs.

State (`NetState`): the MAC and the status the guest reads, and the frames the host took for the
guest and has not delivered (`pending_rx`): when the device is saved, paused, what the tap holds
is drained into it, so a migration carries those frames and the target delivers them; the
rings' positions are in the transport's queue states (the engine hands them back at every halt).
After a restore the device, once it runs, announces the guest (`resumed`): a RARP from its MAC in
5 rounds (at once, +50 ms, then 100 ms longer each round, as QEMU's announce-self), and, if the
driver negotiated GUEST_ANNOUNCE, the ANNOUNCE status bit with a configuration interrupt, so the
guest sends its own gratuitous ARPs; it acknowledges with VIRTIO_NET_CTRL_ANNOUNCE_ACK.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from hv.binding.ffi import ffi, lib
from hv.errors import ConfigError, StateRestoreError
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.persist import check_bytes, check_int, check_type

from .mmio import VirtioMmio, VirtioMmioState
from .queue import Virtqueue
from .tap import open_tap

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
RECEIVEQ, TRANSMITQ, CONTROLQ = 0, 1, 2
QUEUE_SIZE = 256
CONTROL_QUEUE_SIZE = 64

VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_MRG_RXBUF = 1 << 15  # not offered: see the module docstring
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_F_CTRL_VQ = 1 << 17
VIRTIO_NET_F_GUEST_ANNOUNCE = 1 << 21
FEATURES = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_GUEST_ANNOUNCE

VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1

ANNOUNCE_ROUNDS = 5
HEADER_LEN = 12  # struct virtio_net_hdr with num_buffers (VERSION_1)
PENDING_MAX = 256  # == KVMIG_NET_PENDING
FRAME_MAX = 65536  # == KVMIG_NET_FRAME_MAX
DEFAULT_MAC = bytes.fromhex("525400123456")  # QEMU's first NIC's


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; a multicast address is refused (no NIC has one)."""
    if not re.fullmatch(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", text):
        raise ConfigError("mac", text, "not six hex bytes separated by ':'")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ConfigError("mac", text, "a multicast address")
    return mac


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def rarp_announce(mac: bytes) -> bytes:
    """The frame QEMU's announce-self sends: a broadcast RARP request from `mac`, padded to 60
    bytes, so every switch on the way learns the port `mac` is behind now."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (b"\xff" * 6 + mac + struct.pack("!H", 0x8035) + arp).ljust(60, b"\0")


@dataclass(frozen=True)
class NetState:
    mac: bytes = DEFAULT_MAC
    status: int = VIRTIO_NET_S_LINK_UP
    pending_rx: tuple[bytes, ...] = ()  # frames taken from the tap, not yet given to the guest


@dataclass(frozen=True)
class VirtioNetState:
    transport: VirtioMmioState
    backend: NetState


@dataclass(frozen=True)
class NetStats:
    rx_packets: int
    rx_bytes: int
    tx_packets: int
    tx_bytes: int
    rx_truncated: int
    interrupts: int
    announces: int
    drained: int


def _queue_c(q: Virtqueue) -> object:
    s = q.state
    c = ffi.new("kvmig_net_queue *")
    if s.ready:
        c.num, c.desc, c.driver, c.device = s.num, s.desc, s.driver, s.device
        c.last_avail_idx, c.used_idx = s.last_avail_idx, s.used_idx
    return c


class NetBackend:
    """virtio-net over a tap: the control queue in Python, rx and tx in the C engine."""

    device_id = VIRTIO_ID_NET
    features = FEATURES
    queue_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE, CONTROL_QUEUE_SIZE)
    native_queues: tuple[int, ...] = (RECEIVEQ, TRANSMITQ)  # the engine's: the transport leaves them alone
    owner = "virtio-mmio-net"  # whose state a refusal names (the transport sets its KIND)

    def __init__(self, memory: GuestMemory, tap_fd: int, mac: bytes, kick_fds: tuple[int, int]) -> None:
        self.tap_fd = tap_fd
        self.mac = mac
        self.status = VIRTIO_NET_S_LINK_UP
        self.announce_pending = False  # set by a restore: announce once the guest runs
        self.error_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._memory = memory
        self._dirty: list[tuple[MemoryRegion, np.ndarray]] = []
        regions = ffi.new("kvmig_net_region[]", max(len(memory.regions), 1))
        for i, region in enumerate(memory.regions):
            words = np.zeros_like(region.vmm_dirty.words)
            region.native_dirty.append(words)
            self._dirty.append((region, words))
            regions[i].guest_base, regions[i].size = region.guest_base, region.size
            regions[i].host = ffi.cast("uint8_t *", region.host_address)
            regions[i].dirty = ffi.cast("uint64_t *", words.ctypes.data)
        self._engine = lib.kvmig_net_new(tap_fd, regions, len(memory.regions), kick_fds[0], kick_fds[1],
                                         self.error_fd, self._wake_fd)
        if self._engine == ffi.NULL:
            self._release()
            raise ConfigError("net", len(memory.regions), "the packet engine could not start (too many RAM regions?)")
        self._live = False

    # --- the transport's view -------------------------------------------------------------------

    def config(self) -> bytes:
        return self.mac + struct.pack("<HH", self.status, 1)  # mac, status, max_virtqueue_pairs

    def process(self, queue: Virtqueue) -> int:
        if queue.index != CONTROLQ:  # a notify that came as an MMIO exit: the engine's queue
            os.eventfd_write(self._wake_fd, 1)
            return 0
        used = 0
        while (chain := queue.pop()) is not None:
            request = queue.read_chain(chain, 4096)
            ack = VIRTIO_NET_ERR
            if request[:2] == bytes((VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK)):
                self.status &= ~VIRTIO_NET_S_ANNOUNCE
                ack = VIRTIO_NET_OK
            queue.push_used(chain.head, queue.write_chain(chain, bytes((ack,))))
            used += 1
        return used

    def go_live(self, queues: list[Virtqueue], irq_fds: tuple[int, ...], driver_features: int) -> bool:
        """Hand the rx and tx queues to the engine (the device went live), their interrupts to
        `irq_fds` (rx's, tx's). True when the configuration changed (an announce the guest
        should make): the transport interrupts."""
        rx_fd, tx_fd = irq_fds
        lib.kvmig_net_run(self._engine, _queue_c(queues[RECEIVEQ]), _queue_c(queues[TRANSMITQ]), rx_fd, tx_fd)
        self._live = True
        if not self.announce_pending:
            return False
        self.announce_pending = False
        frame = rarp_announce(self.mac)
        lib.kvmig_net_announce(self._engine, frame, len(frame), ANNOUNCE_ROUNDS)
        if driver_features & VIRTIO_NET_F_GUEST_ANNOUNCE:
            self.status |= VIRTIO_NET_S_ANNOUNCE
            return True
        return False

    def set_irq(self, irq_fds: tuple[int, ...]) -> None:
        lib.kvmig_net_set_irq(self._engine, *irq_fds)

    def halt(self, queues: list[Virtqueue]) -> int:
        """Take the queues back (their positions into `queues`); returns the InterruptStatus
        bits the engine raised, now the transport's to keep."""
        rx, tx = ffi.new("kvmig_net_queue *"), ffi.new("kvmig_net_queue *")
        lib.kvmig_net_halt(self._engine, rx, tx)
        self._live = False
        for q, c in ((queues[RECEIVEQ], rx), (queues[TRANSMITQ], tx)):
            if q.state.ready:
                q.state = replace(q.state, last_avail_idx=c.last_avail_idx, used_idx=c.used_idx)
        return int(lib.kvmig_net_isr(self._engine, 0xFFFF_FFFF))

    def native_isr(self, ack: int) -> int:
        return int(lib.kvmig_net_isr(self._engine, ack))

    def take_error(self) -> str | None:
        buf = ffi.new("char[]", 160)
        return ffi.string(buf).decode() if lib.kvmig_net_take_error(self._engine, buf, 160) else None

    def stats(self) -> NetStats:
        s = ffi.new("kvmig_net_stats *")
        lib.kvmig_net_stats_get(self._engine, s)
        return NetStats(s.rx_packets, s.rx_bytes, s.tx_packets, s.tx_bytes, s.rx_truncated, s.interrupts,
                        s.announces, s.drained)

    def reset(self) -> None:
        self.status &= ~VIRTIO_NET_S_ANNOUNCE  # frames pending stay for the next driver

    # --- state ----------------------------------------------------------------------------------

    def pending_rx(self) -> tuple[bytes, ...]:
        frames = []
        buf = ffi.new("uint8_t[]", FRAME_MAX)
        for i in range(lib.kvmig_net_pending_count(self._engine)):
            n = lib.kvmig_net_pending_get(self._engine, i, buf, FRAME_MAX)
            if n >= 0:
                frames.append(bytes(ffi.buffer(buf, n)))
        return tuple(frames)

    def save(self) -> NetState:
        if not self._live:  # paused: what the tap holds for the guest travels with the state
            lib.kvmig_net_drain(self._engine)
        return NetState(self.mac, self.status, self.pending_rx())

    def restore(self, state: NetState) -> None:
        kind = self.owner
        check_type(kind, state, NetState)
        check_bytes(kind, "backend.mac", state.mac, 6)
        if len(state.mac) != 6:
            raise StateRestoreError(kind, "backend.mac", "6 bytes", f"{len(state.mac)} bytes")
        if state.mac != self.mac:  # the guest's identity on the network: configuration, checked
            raise StateRestoreError(kind, "backend.mac", format_mac(self.mac), format_mac(state.mac))
        check_int(kind, "backend.status", state.status, 0, VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE)
        frames = state.pending_rx
        if type(frames) is not tuple or len(frames) > PENDING_MAX:
            raise StateRestoreError(kind, "backend.pending_rx", f"a tuple of at most {PENDING_MAX} frames",
                                    f"{len(frames)} frames" if type(frames) is tuple else frames)
        for i, frame in enumerate(frames):
            check_bytes(kind, f"backend.pending_rx[{i}]", frame, FRAME_MAX)
        self.status = state.status
        lib.kvmig_net_pending_clear(self._engine)
        for frame in frames:
            lib.kvmig_net_pending_add(self._engine, frame, len(frame))
        self.announce_pending = True

    def _release(self) -> None:
        for region, words in self._dirty:
            region.native_dirty[:] = [w for w in region.native_dirty if w is not words]
        self._dirty = []
        for fd in (self.error_fd, self._wake_fd, self.tap_fd):
            os.close(fd)

    def close(self) -> None:
        lib.kvmig_net_free(self._engine)
        self._engine = ffi.NULL
        self._release()


class VirtioNet(VirtioMmio):
    """A virtio network card on virtio-mmio whose host end is the tap `tap` (a name: opened, and
    created if absent, and made a port of `bridge` if given; or `tap_fd`, an open tap this
    device takes)."""

    KIND: ClassVar[str] = "virtio-mmio-net"
    state_type: ClassVar[type] = VirtioNetState
    backend: NetBackend

    def __init__(self, memory: GuestMemory, tap: str | None = None, *, mac: bytes = DEFAULT_MAC,
                 bridge: str | None = None, tap_fd: int | None = None) -> None:
        if (tap is None) == (tap_fd is None):
            raise ConfigError("net", tap, "give a tap name or an open tap descriptor, not both")
        self.tap, self.bridge = tap, bridge  # configuration (a migration target opens its own)
        fd = open_tap(tap, bridge) if tap is not None else tap_fd
        assert fd is not None
        kicks = (os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC), os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        try:
            backend = NetBackend(memory, fd, mac, kicks)
        except BaseException:
            for k in kicks:
                os.close(k)
            raise
        super().__init__(backend, memory, queue_fds=kicks)

    def stats(self) -> NetStats:
        return self.backend.stats()
