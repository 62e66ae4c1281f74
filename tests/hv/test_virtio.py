"""virtio-mmio devices against real KVM guest memory, the test acting as the guest's driver.

The driver side (descriptors, available ring, register writes through the MMIO bus) is written
here into the VM's memory; notifications go through the queue eventfds KVM holds (the worker
path), through a plain MMIO write (the inline path), and once from a real guest store.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinyguest import multiboot_elf, store_then_report, wait_for

from hv.vmm.builder import (
    VirtioConfig,
    add_virtio_devices,
    blank_machine,
    multiboot_machine,
    standard_layout,
    virtio_layout,
)
from hv.devices.virtio import (
    MAGIC_VALUE,
    VirtioBlkState,
    VirtioConsole,
    VirtioConsoleState,
    VirtioMmio,
    VirtioMmioState,
    VirtioRngState,
    Virtqueue,
)
from hv.devices.virtio import mmio as regs
from hv.devices.virtio.blk import (
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
)
from hv.devices.virtio.queue import ring_pending, ring_slot
from hv.kvm.dirty import PAGE_SIZE
from hv.errors import StateRestoreError
from hv.kvm.kvm import Kvm
from hv.vmm.machine import Machine, RunState
from hv.kvm.memory import GuestMemory, MemoryRegion
from hv.kvm.vm import VmConfig

MiB = 1 << 20
SLOT0 = 0xD000_0000
F_NEXT, F_WRITE = 1, 2
RINGS = 0x20_0000  # queue areas from here, 64 KiB per queue
BUFFERS = 0x40_0000  # data buffers from here


# --- the driver side -------------------------------------------------------------------------


@dataclass
class DriverQueue:
    """One split virtqueue as a guest driver keeps it."""

    mem: GuestMemory
    index: int
    num: int
    desc: int
    avail: int
    used: int
    next_desc: int = 0
    avail_idx: int = 0
    seen_used: int = 0

    def add(self, buffers: list[tuple[int, int, bool]]) -> int:
        """Chain (address, length, device-writable) buffers; publish the head; returns it."""
        ids = [(self.next_desc + i) % self.num for i in range(len(buffers))]
        self.next_desc = (self.next_desc + len(buffers)) % self.num
        for i, (addr, length, writable) in enumerate(buffers):
            last = i == len(buffers) - 1
            flags = (0 if last else F_NEXT) | (F_WRITE if writable else 0)
            self.write_desc(ids[i], addr, length, flags, 0 if last else ids[i + 1])
        self.publish(ids[0])
        return ids[0]

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(self.desc + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self.seen_used != self.used_idx():
            slot = self.used + 4 + 8 * (self.seen_used % self.num)
            out.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out


@dataclass
class Driver:
    """Brings a device up through its registers on the machine's MMIO bus."""

    machine: Machine
    base: int
    queues: list[DriverQueue] = field(default_factory=list)

    def r(self, off: int) -> int:
        return self.machine.mmio_bus.read(self.base + off, 4)

    def w(self, off: int, value: int) -> None:
        self.machine.mmio_bus.write(self.base + off, 4, value)

    def features(self) -> int:
        self.w(regs.DEVICE_FEATURES_SEL, 0)
        low = self.r(regs.DEVICE_FEATURES)
        self.w(regs.DEVICE_FEATURES_SEL, 1)
        return low | self.r(regs.DEVICE_FEATURES) << 32

    def init(self, nqueues: int, num: int = 16, rings: int = RINGS) -> None:
        mem = self.machine.vm.memory
        self.w(regs.STATUS, 0)
        self.w(regs.STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER)
        feats = self.features()
        for sel in (0, 1):
            self.w(regs.DRIVER_FEATURES_SEL, sel)
            self.w(regs.DRIVER_FEATURES, (feats >> (32 * sel)) & 0xFFFF_FFFF)
        self.w(regs.STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER | regs.STATUS_FEATURES_OK)
        assert self.r(regs.STATUS) & regs.STATUS_FEATURES_OK
        for i in range(nqueues):
            area = rings + i * 0x10000
            q = DriverQueue(mem, i, num, area, area + 0x4000, area + 0x8000)
            mem.write(area, bytes(0xC000))
            self.w(regs.QUEUE_SEL, i)
            assert self.r(regs.QUEUE_NUM_MAX) >= num and self.r(regs.QUEUE_READY) == 0
            self.w(regs.QUEUE_NUM, num)
            for lo, addr in ((regs.QUEUE_DESC_LOW, q.desc), (regs.QUEUE_DRIVER_LOW, q.avail),
                             (regs.QUEUE_DEVICE_LOW, q.used)):
                self.w(lo, addr & 0xFFFF_FFFF)
                self.w(lo + 4, addr >> 32)
            self.w(regs.QUEUE_READY, 1)
            assert self.r(regs.QUEUE_READY) == 1
            self.queues.append(q)
        self.w(regs.STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER | regs.STATUS_FEATURES_OK
               | regs.STATUS_DRIVER_OK)

    def notify_mmio(self, queue: int) -> None:
        self.w(regs.QUEUE_NOTIFY, queue)


def kick(dev: VirtioMmio, queue: int) -> None:
    """What KVM does on a guest QueueNotify write: signal the queue's (registered) eventfd."""
    os.eventfd_write(dev.queue_fds[queue], 1)


def wait_used(q: DriverQueue, count: int) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    wait_for(lambda: (got.extend(q.take_used()), len(got) >= count)[1], 5.0, "the device")
    return got


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 * MiB))
    return path


@pytest.fixture
def make_machine(kvm: Kvm) -> Iterator:
    made: list[Machine] = []

    def make(**virtio) -> Machine:
        machine = blank_machine(kvm, VmConfig(mem_size=64 * MiB), virtio=VirtioConfig(**virtio))
        made.append(machine)
        return machine

    yield make
    for m in made:
        m.stop()
        m.vm.close()


def blk_request(q: DriverQueue, kind: int, sector: int, data: bytes | int, at: int) -> tuple[int, int]:
    """Lay out a blk request at `at`: header, data (bytes to write, or a length to read), status.
    Returns (head, status address)."""
    mem = q.mem
    mem.write(at, struct.pack("<IIQ", kind, 0, sector))
    bufs = [(at, 16, False)]
    data_at = at + PAGE_SIZE
    if isinstance(data, bytes):
        mem.write(data_at, data)
        half = len(data) // 2  # two data descriptors: chains really are followed
        bufs += [(data_at, half, False), (data_at + half, len(data) - half, False)]
        status_at = data_at + len(data)
    else:
        bufs += [(data_at, data, True)] if data else []
        status_at = data_at + data
    mem.write(status_at, b"\xee")
    bufs.append((status_at, 1, True))
    return q.add(bufs), status_at


# --- identification and negotiation ----------------------------------------------------------


def test_placement_follows_the_guest_contract(make_machine, disk: Path) -> None:
    machine = make_machine(disk=disk, console_out=lambda b: None, rng=True)
    ids = []
    for i in range(8):
        if machine.mmio_bus.read(SLOT0 + i * 0x1000, 4) == MAGIC_VALUE:
            assert machine.mmio_bus.read(SLOT0 + i * 0x1000 + regs.VERSION, 4) == 2
            ids.append(machine.mmio_bus.read(SLOT0 + i * 0x1000 + regs.DEVICE_ID, 4))
    assert ids == [2, 3, 4]
    assert machine.device_layout() == standard_layout(("virtio-blk0", "virtio-console0", "virtio-rng0"))
    assert [p.irqs for p in virtio_layout(("virtio-rng0", "virtio-blk0"))] == [(5,), (6,)]
    assert [p.mmio for p in virtio_layout(("virtio-rng0",))] == [((SLOT0, 0x1000),)]


def test_default_machine_has_no_virtio(kvm: Kvm) -> None:
    machine = blank_machine(kvm, VmConfig(mem_size=16 * MiB))
    try:
        assert machine.device_layout() == standard_layout()
        assert machine.mmio_bus.ranges() == []
    finally:
        machine.vm.close()


def test_features_version_1_offered_and_required(make_machine, disk: Path) -> None:
    machine = make_machine(disk=disk, disk_readonly=True)
    drv = Driver(machine, SLOT0)
    feats = drv.features()
    assert feats & (1 << 32) and feats & VIRTIO_BLK_F_RO
    assert drv.r(regs.CONFIG) == 2048 and drv.r(regs.CONFIG + 4) == 0  # capacity in sectors
    drv.w(regs.STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER)
    drv.w(regs.DRIVER_FEATURES_SEL, 1)
    drv.w(regs.DRIVER_FEATURES, 0)  # no VERSION_1: a legacy driver is refused
    drv.w(regs.STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER | regs.STATUS_FEATURES_OK)
    assert not drv.r(regs.STATUS) & regs.STATUS_FEATURES_OK
    drv.w(regs.STATUS, 0)
    assert drv.r(regs.STATUS) == 0


# --- virtio-blk --------------------------------------------------------------------------------


def test_blk_write_read_flush_get_id(make_machine, disk: Path) -> None:
    machine = make_machine(disk=disk)
    dev = machine.devices["virtio-blk0"]
    dev.resume()
    drv = Driver(machine, SLOT0)
    drv.init(1)
    q = drv.queues[0]
    data = os.urandom(3 * 512)
    head, status = blk_request(q, 1, 5, data, BUFFERS)
    kick(dev, 0)
    assert wait_used(q, 1) == [(head, 1)]
    assert machine.vm.memory.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert disk.read_bytes()[5 * 512 : 8 * 512] == data

    head, status = blk_request(q, 0, 5, len(data), BUFFERS + 0x10000)
    drv.notify_mmio(0)  # the inline path: processed before the write returns
    assert q.take_used() == [(head, len(data) + 1)]
    assert machine.vm.memory.read(BUFFERS + 0x10000 + PAGE_SIZE, len(data)) == data

    head, status = blk_request(q, 4, 0, 0, BUFFERS + 0x20000)
    head2, _ = blk_request(q, 8, 0, 20, BUFFERS + 0x30000)
    head3, status3 = blk_request(q, 99, 0, 0, BUFFERS + 0x40000)
    kick(dev, 0)
    assert wait_used(q, 3) == [(head, 1), (head2, 21), (head3, 1)]
    mem = machine.vm.memory
    assert mem.read(status, 1)[0] == VIRTIO_BLK_S_OK
    assert mem.read(BUFFERS + 0x30000 + PAGE_SIZE, 20).rstrip(b"\0") == b"disk.img"
    assert mem.read(status3, 1)[0] == VIRTIO_BLK_S_UNSUPP
    assert dev.interrupts >= 2 and drv.r(regs.INTERRUPT_STATUS) & 1
    drv.w(regs.INTERRUPT_ACK, 1)
    assert drv.r(regs.INTERRUPT_STATUS) == 0

    # past the end of the disk, and not whole sectors: an I/O error, the device carries on
    for i, (sector, length) in enumerate(((2047, 1024), (0, 100))):
        head, status = blk_request(q, 0, sector, length, BUFFERS + 0x50000 + i * 0x10000)
        drv.notify_mmio(0)
        assert q.take_used()[0][0] == head
        assert mem.read(status, 1)[0] == VIRTIO_BLK_S_IOERR
    assert not drv.r(regs.STATUS) & regs.STATUS_NEEDS_RESET


def test_blk_read_only_refuses_writes(make_machine, disk: Path) -> None:
    disk.write_bytes(b"\x5a" * MiB)
    machine = make_machine(disk=disk, disk_readonly=True)
    dev = machine.devices["virtio-blk0"]
    dev.resume()
    drv = Driver(machine, SLOT0)
    drv.init(1)
    q = drv.queues[0]
    _, status = blk_request(q, 1, 0, b"\x00" * 512, BUFFERS)
    _, status2 = blk_request(q, 0, 0, 512, BUFFERS + 0x10000)
    kick(dev, 0)
    wait_used(q, 2)
    assert machine.vm.memory.read(status, 1)[0] == VIRTIO_BLK_S_IOERR
    assert machine.vm.memory.read(status2, 1)[0] == VIRTIO_BLK_S_OK
    assert machine.vm.memory.read(BUFFERS + 0x10000 + PAGE_SIZE, 512) == b"\x5a" * 512
    assert disk.read_bytes() == b"\x5a" * MiB


def test_dirty_bitmap_marks_exactly_the_pages_the_device_wrote(make_machine, disk: Path) -> None:
    disk.write_bytes(os.urandom(MiB))
    machine = make_machine(disk=disk)
    dev = machine.devices["virtio-blk0"]
    dev.resume()
    drv = Driver(machine, SLOT0)
    drv.init(1)
    q = drv.queues[0]
    at = BUFFERS + 0x10_0000
    # a 3-page read into a buffer starting mid-page: it touches 4 pages, then the status byte
    # sits on its own page further on
    mem = machine.vm.memory
    dev.pause()  # DRIVER_OK kicked the worker: nothing may run before the bitmaps are cleared
    mem.write(at, struct.pack("<IIQ", 0, 0, 8))
    data_at = at + 5 * PAGE_SIZE + 0x800
    status_at = at + 20 * PAGE_SIZE
    head = q.add([(at, 16, False), (data_at, 3 * PAGE_SIZE, True), (status_at, 1, True)])
    region = mem.regions[0]
    region.take_vmm_dirty()
    machine.vm.fetch_dirty_log(region)  # and KVM's log, for the fetch below
    dev.resume()
    assert wait_used(q, 1) == [(head, 3 * PAGE_SIZE + 1)]
    expected = {p >> 12 for p in range(data_at, data_at + 3 * PAGE_SIZE, PAGE_SIZE)}
    expected |= {(data_at + 3 * PAGE_SIZE - 1) >> 12, status_at >> 12, q.used >> 12}
    assert set(machine.vm.fetch_dirty_log(region).pages().tolist()) == expected
    assert mem.read(data_at, 3 * PAGE_SIZE) == disk.read_bytes()[8 * 512 : 8 * 512 + 3 * PAGE_SIZE]


# --- virtio-rng and virtio-console ---------------------------------------------------------------


def _rng_on_one_queue(make_machine):
    """A machine with virtio-rng running, a test driver that set up its queue."""
    machine = make_machine(rng=True)
    dev = machine.devices["virtio-rng0"]
    dev.resume()
    drv = Driver(machine, SLOT0)
    drv.init(1)
    return machine, dev, drv, machine.vm.memory


def test_rng_fills_buffers(make_machine) -> None:
    machine, dev, drv, mem = _rng_on_one_queue(make_machine)
    q = drv.queues[0]
    heads = [q.add([(BUFFERS + i * PAGE_SIZE, 64, True), (BUFFERS + i * PAGE_SIZE + 64, 64, True)])
             for i in range(3)]
    kick(dev, 0)
    assert wait_used(q, 3) == [(h, 128) for h in heads]
    blobs = [mem.read(BUFFERS + i * PAGE_SIZE, 128) for i in range(3)]
    assert len(set(blobs)) == 3 and all(b.count(0) < 16 for b in blobs)


def test_console_transmits_and_receives(make_machine) -> None:
    out = bytearray()
    machine = make_machine(console_out=out.extend)
    dev: VirtioConsole = machine.devices["virtio-console0"]
    assert dev.feed(b"hello guest") == 11  # waits for the driver's buffers
    dev.resume()
    drv = Driver(machine, SLOT0)
    drv.init(2)
    rx, tx = drv.queues
    mem = machine.vm.memory
    mem.write(BUFFERS, b"hello ")
    mem.write(BUFFERS + 0x100, b"host\n")
    head = tx.add([(BUFFERS, 6, False), (BUFFERS + 0x100, 5, False)])
    kick(dev, 1)
    assert wait_used(tx, 1) == [(head, 0)]
    assert bytes(out) == b"hello host\n"
    h1 = rx.add([(BUFFERS + 0x1000, 8, True)])
    h2 = rx.add([(BUFFERS + 0x2000, 8, True)])
    kick(dev, 0)
    assert wait_used(rx, 2) == [(h1, 8), (h2, 3)]
    assert mem.read(BUFFERS + 0x1000, 8) + mem.read(BUFFERS + 0x2000, 3) == b"hello guest"
    h3 = rx.add([(BUFFERS + 0x3000, 8, True)])
    dev.feed(b"more")  # input arriving while a buffer waits is delivered at once
    assert wait_used(rx, 1) == [(h3, 4)]


# --- a hostile driver ----------------------------------------------------------------------------

RAM_END = 64 * MiB


def _hostile_cases():
    def outside_ram(q):
        q.add([(RAM_END - 8, 16, True)])

    def past_4g(q):
        q.add([(0xFFFF_FFFF_FFFF_FF00, 0x1000, True)])

    def length_overflow(q):
        q.add([(BUFFERS, 0xFFFF_FFFF, True), (BUFFERS, 0xFFFF_FFFF, True), (BUFFERS, 4, True)])

    def chain_loop(q):
        q.write_desc(0, BUFFERS, 8, F_NEXT | F_WRITE, 1)
        q.write_desc(1, BUFFERS, 8, F_NEXT | F_WRITE, 0)
        q.publish(0)

    def next_beyond_table(q):
        q.write_desc(0, BUFFERS, 8, F_NEXT | F_WRITE, 400)
        q.publish(0)

    def head_beyond_table(q):
        q.publish(16)

    def avail_idx_runs_ahead(q):
        q.mem.write(q.avail + 2, struct.pack("<H", 1000))

    def indirect(q):
        q.write_desc(0, BUFFERS, 16, 4, 0)
        q.publish(0)

    def readable_after_writable(q):
        q.add([(BUFFERS, 8, True), (BUFFERS + 8, 8, False)])

    return [outside_ram, past_4g, length_overflow, chain_loop, next_beyond_table, head_beyond_table,
            avail_idx_runs_ahead, indirect, readable_after_writable]


@pytest.mark.parametrize("attack", _hostile_cases(), ids=lambda f: f.__name__)
@pytest.mark.parametrize("path", ["worker", "inline"])
def test_hostile_descriptors_give_needs_reset(make_machine, attack, path: str) -> None:
    machine, dev, drv, mem = _rng_on_one_queue(make_machine)
    q = drv.queues[0]
    before = mem.read(BUFFERS, 64)
    attack(q)
    if path == "worker":
        kick(dev, 0)
        wait_for(lambda: drv.r(regs.STATUS) & regs.STATUS_NEEDS_RESET, 5.0, "NEEDS_RESET")
    else:
        drv.notify_mmio(0)  # on the vCPU thread: must not raise either
    assert drv.r(regs.STATUS) & regs.STATUS_NEEDS_RESET
    assert drv.r(regs.INTERRUPT_STATUS) & regs.INT_CONFIG_CHANGE
    assert dev.last_error
    assert q.used_idx() == 0 and mem.read(BUFFERS, 64) == before
    assert dev._worker.is_alive()
    # a reset brings the device back
    drv.queues.clear()
    drv.init(1, rings=RINGS + 0x100000)
    assert not drv.r(regs.STATUS) & regs.STATUS_NEEDS_RESET
    q = drv.queues[0]
    head = q.add([(BUFFERS, 32, True)])
    kick(dev, 0)
    assert wait_used(q, 1) == [(head, 32)]


@pytest.mark.parametrize("bad", [{"num": 12}, {"num": 1024}, {"desc": RAM_END}, {"driver": 0x20_0001},
                                 {"device": 0xF000_0000}])
def test_unusable_queue_config_gives_needs_reset(make_machine, bad: dict) -> None:
    machine = make_machine(rng=True)
    drv = Driver(machine, SLOT0)
    drv.w(regs.STATUS, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER)
    values = {"num": 16, "desc": RINGS, "driver": RINGS + 0x4000, "device": RINGS + 0x8000} | bad
    drv.w(regs.QUEUE_SEL, 0)
    drv.w(regs.QUEUE_NUM, values["num"])
    for lo, name in ((regs.QUEUE_DESC_LOW, "desc"), (regs.QUEUE_DRIVER_LOW, "driver"),
                     (regs.QUEUE_DEVICE_LOW, "device")):
        drv.w(lo, values[name] & 0xFFFF_FFFF)
        drv.w(lo + 4, values[name] >> 32)
    drv.w(regs.QUEUE_READY, 1)
    assert drv.r(regs.QUEUE_READY) == 0
    assert drv.r(regs.STATUS) & regs.STATUS_NEEDS_RESET


# --- lifecycle and state -------------------------------------------------------------------------


def test_pause_really_stops_the_worker(make_machine) -> None:
    machine = make_machine(rng=True)
    dev = machine.devices["virtio-rng0"]
    assert dev.paused  # a device starts paused; the machine resumes it with its vCPUs
    dev.resume()
    drv = Driver(machine, SLOT0)
    drv.init(1)
    q = drv.queues[0]
    dev.pause()
    assert dev.worker_parked
    q.add([(BUFFERS, 16, True)])
    kick(dev, 0)
    drv.notify_mmio(0)
    time.sleep(0.2)  # a window for a wrong run to show; a right one passes on any host
    assert q.used_idx() == 0, "a paused device processed a queue"
    dev.resume()
    assert len(wait_used(q, 1)) == 1


def test_save_mid_operation_restores_into_a_second_machine(make_machine, disk: Path) -> None:
    import formats

    src = make_machine(disk=disk, console_out=lambda b: None, rng=True)
    devs = {k: src.devices[k] for k in ("virtio-blk0", "virtio-console0", "virtio-rng0")}
    for d in devs.values():
        d.resume()
    blk_drv = Driver(src, SLOT0)
    blk_drv.init(1, num=8, rings=RINGS)
    rng_drv = Driver(src, SLOT0 + 0x2000)
    rng_drv.init(1, num=8, rings=RINGS + 0x40000)
    con_drv = Driver(src, SLOT0 + 0x1000)
    con_drv.init(2, num=8, rings=RINGS + 0x80000)
    q = blk_drv.queues[0]
    # some traffic first, so the indices are not at zero (and the ring wraps below)
    for i in range(6):  # one at a time: 4 descriptors each in an 8-entry table
        blk_request(q, 1, i, bytes([i]) * 512, BUFFERS + i * 0x2000)
        blk_drv.notify_mmio(0)
    assert len(q.take_used()) == 6
    for d in devs.values():
        d.pause()
    # requests made available while the device is paused: in flight at the save
    data = os.urandom(1024)
    h_out, s_out = blk_request(q, 1, 100, data, BUFFERS + 0x20000)
    h_in, s_in = blk_request(q, 0, 3, 512, BUFFERS + 0x30000)
    h_rng = rng_drv.queues[0].add([(BUFFERS + 0x40000, 32, True)])
    h_rx = con_drv.queues[0].add([(BUFFERS + 0x50000, 16, True)])
    blk_drv.notify_mmio(0)
    devs["virtio-console0"].feed(b"typed")
    time.sleep(0.1)  # a window for a wrong run to show; a right one passes on any host
    assert q.used_idx() == 6 and rng_drv.queues[0].used_idx() == 0

    registry = formats.SchemaRegistry()
    for cls, name in ((VirtioBlkState, "blk"), (VirtioConsoleState, "console"), (VirtioRngState, "rng")):
        registry.register(cls, f"test.virtio.{name}")
    saved = {k: registry.decode(registry.encode(d.save())) for k, d in devs.items()}
    assert saved["virtio-blk0"] == devs["virtio-blk0"].save()
    assert saved["virtio-blk0"].transport.queues[0].last_avail_idx == 6
    assert saved["virtio-console0"].backend.pending_input == b"typed"

    dst = make_machine(disk=disk, console_out=lambda b: None, rng=True)
    for base, view in src.vm.memory.dump_all():
        dst.vm.memory.write(base, view)
    for k, state in saved.items():
        dst.devices[k].restore(state)
    for k in saved:
        dst.devices[k].resume()
    dq = DriverQueue(dst.vm.memory, 0, 8, q.desc, q.avail, q.used, seen_used=6)
    assert wait_used(dq, 2) == [(h_out, 1), (h_in, 513)]
    m = dst.vm.memory
    assert m.read(s_out, 1)[0] == VIRTIO_BLK_S_OK and m.read(s_in, 1)[0] == VIRTIO_BLK_S_OK
    assert disk.read_bytes()[100 * 512 : 102 * 512] == data
    assert m.read(BUFFERS + 0x30000 + PAGE_SIZE, 512) == bytes([3]) * 512
    rq = rng_drv.queues[0]
    assert wait_used(DriverQueue(m, 0, 8, rq.desc, rq.avail, rq.used), 1) == [(h_rng, 32)]
    cq = con_drv.queues[0]
    assert wait_used(DriverQueue(m, 0, 8, cq.desc, cq.avail, cq.used), 1) == [(h_rx, 5)]
    assert m.read(BUFFERS + 0x50000, 5) == b"typed"
    assert src.vm.memory.read(s_out, 1) == b"\xee", "the paused source processed a request"


def test_restore_validates_first(make_machine, disk: Path, tmp_path: Path) -> None:
    machine = make_machine(disk=disk, rng=True)
    blk, rng = machine.devices["virtio-blk0"], machine.devices["virtio-rng0"]
    state = blk.save()
    with pytest.raises(StateRestoreError) as err:
        rng.restore(state)
    assert (err.value.owner, err.value.field) == ("virtio-mmio-rng", "type")
    with pytest.raises(StateRestoreError) as err:
        blk.restore(VirtioBlkState(state.transport, type(state.backend)(False, 7)))
    assert (err.value.field, err.value.expected, err.value.found) == ("backend.capacity", state.backend.capacity, 7)
    bad_queue = type(state.transport.queues[0])(num=16, ready=True, desc=RAM_END)
    with pytest.raises(StateRestoreError) as err:
        blk.restore(VirtioBlkState(VirtioMmioState(2, queues=(bad_queue,)), state.backend))
    assert err.value.field == "queues[0]"
    assert blk.save() == state
    # an interrupt the driver had not acknowledged at the save is raised again on resume
    pending = VirtioMmioState(2, status=0xF, interrupt_status=1, queues=state.transport.queues)
    blk.restore(VirtioBlkState(pending, state.backend))
    assert blk.interrupts == 0
    blk.resume()
    assert blk.interrupts == 1 and blk.save().transport == pending


def test_machine_pauses_resumes_and_stops_its_devices(kvm: Kvm, write_image) -> None:
    # cli; hlt; jmp back: the vCPU sleeps in KVM
    image = write_image(multiboot_elf(b"\xfa\xf4\xeb\xfd"))
    machine = multiboot_machine(kvm, image, "", VmConfig(mem_size=16 * MiB))
    try:
        add_virtio_devices(machine, rng=True)
        dev = machine.devices["virtio-rng0"]
        machine.start(paused=True)
        assert dev.paused
        machine.resume()
        assert not dev.paused
        machine.pause()
        assert dev.paused and dev.worker_parked
        machine.resume()
        machine.stop()
        assert not dev._worker.is_alive()
        with pytest.raises(OSError):
            os.fstat(dev.queue_fds[0])
    finally:
        machine.stop()
        machine.vm.close()


def test_a_guest_store_to_queue_notify_reaches_the_worker_through_kvm(kvm: Kvm, write_image) -> None:
    image = write_image(multiboot_elf(store_then_report([SLOT0 + regs.QUEUE_NOTIFY], value=0)))
    machine = multiboot_machine(kvm, image, "", VmConfig(mem_size=16 * MiB))
    try:
        add_virtio_devices(machine, rng=True)
        drv = Driver(machine, SLOT0)
        drv.init(1, rings=0x80_0000)
        q = drv.queues[0]
        head = q.add([(0x90_0000, 48, True)])
        mmio_exits = machine.stats[0].mmio_exits
        machine.start()
        assert wait_used(q, 1) == [(head, 48)]
        assert machine.stats[0].mmio_exits == mmio_exits, "the notify exited to userspace"
        assert machine.state is RunState.RUNNING
    finally:
        machine.stop()
        machine.vm.close()


# --- ring arithmetic -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(start=st.integers(0, 0xFFFF), log_num=st.integers(0, 8), data=st.data())
def test_ring_indices_wrap_at_16_bits(start: int, log_num: int, data) -> None:
    num = 1 << log_num
    batches = data.draw(st.lists(st.integers(0, num), min_size=1, max_size=6))
    mem = GuestMemory()
    mem.insert(MemoryRegion(0, 1 * MiB, slot=0))
    vq = Virtqueue(mem, 0, 256)
    vq.configure(num=num, desc=0x1000, driver=0x2000, device=0x3000, ready=True,
                 last_avail_idx=start, used_idx=start)
    vq.check()
    drv = DriverQueue(mem, 0, num, 0x1000, 0x2000, 0x3000, avail_idx=start, seen_used=start)
    mem.write(0x2002, struct.pack("<H", start))
    mem.write(0x3002, struct.pack("<H", start))
    for count in batches:
        heads = [drv.add([(0x10000 + 16 * i, 16, True)]) for i in range(count)]
        assert ring_pending(drv.avail_idx, vq.state.last_avail_idx) == count == vq.pending()
        for h in heads:
            chain = vq.pop()
            assert chain.head == h and chain.writable == ((chain.writable[0][0], 16),)
            vq.push_used(h, 7)
        assert vq.pop() is None
        assert drv.take_used() == [(h, 7) for h in heads]
        assert vq.state.used_idx == drv.avail_idx == vq.state.last_avail_idx
        assert ring_slot(vq.state.used_idx, num) == vq.state.used_idx % num
