"""virtio-net against real KVM guest memory and real taps on the two-host rig (tools/netrig.py),
the test acting as the guest's driver: a UDP client in the rig's middle namespace talks to the
guest's address through the bridges and veth links, the driver echoes from guest memory.

Every wait here is on an event (a used-ring index, a datagram, a bridge entry), never a sleep."""

from __future__ import annotations

import copy
import itertools
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest
from test_virtio import Driver, DriverQueue, wait_used
from tinyguest import wait_for

from hv.devices.virtio import mmio as regs
from hv.devices.virtio.net import (
    DEFAULT_MAC,
    FEATURES,
    HEADER_LEN,
    NetState,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
    VirtioNet,
    VirtioNetState,
    format_mac,
    parse_mac,
    rarp_announce,
)
from hv.errors import ConfigError, StateRestoreError
from hv.kvm.dirty import PAGE_SIZE
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, VirtioNetSpec, blank_machine
from hv.vmm.machine import Machine
from tools.netrig import GUEST_ADDRESS, NETWORK_ADDRESS, NetRig, cleanup_leftovers, in_namespace, namespaces

MiB = 1 << 20
SLOT0 = 0xD000_0000
RX, TX, CTRL = 0, 1, 2
RX_BUFFERS = 0x40_0000  # 2 KiB each
TX_BUFFERS = 0x50_0000
PORT = 7777
_taps = itertools.count()


def tap_name() -> str:
    return f"kvt{os.getpid() % 100000}n{next(_taps)}"


@pytest.fixture(scope="module")
def rig() -> Iterator[NetRig]:
    """One rig for the module (building one costs ~1.3 s, mostly the veths' link watch)."""
    cleanup_leftovers()
    with NetRig() as r:
        yield r


@pytest.fixture
def machines(kvm: Kvm) -> Iterator:
    made: list[Machine] = []

    def make(tap: str) -> Machine:
        made.append(blank_machine(kvm, VmConfig(mem_size=64 * MiB),
                                  virtio=VirtioConfig(net=VirtioNetSpec(tap, DEFAULT_MAC))))
        return made[-1]

    yield make
    for m in made:
        m.stop()
        m.vm.close()


def udp_client(rig: NetRig) -> socket.socket:
    """A UDP socket in the network namespace, the guest's address resolved statically (the test
    driver answers no ARP)."""
    from tools.netrig import _ip
    _ip("neigh", "replace", GUEST_ADDRESS, "lladdr", format_mac(DEFAULT_MAC), "dev", "br0", netns=rig.network)

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((NETWORK_ADDRESS, 0))
        s.settimeout(5.0)
        return s

    return in_namespace(rig.network, make)


def udp_reply(frame: bytes) -> bytes:
    """The echo of an Ethernet/IPv4/UDP frame: addresses and ports swapped, no checksum."""
    eth_dst, eth_src, ethertype = frame[:6], frame[6:12], frame[12:14]
    assert ethertype == b"\x08\x00"
    ip = frame[14:34]
    payload = frame[42:14 + struct.unpack("!H", ip[2:4])[0]]
    sport, dport = struct.unpack("!HH", frame[34:38])
    header = bytearray(ip)
    header[12:16], header[16:20] = ip[16:20], ip[12:16]
    header[10:12] = b"\0\0"
    words = struct.unpack("!10H", bytes(header))
    total = sum(words)
    total = (total & 0xFFFF) + (total >> 16)
    header[10:12] = struct.pack("!H", ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF)
    udp = struct.pack("!HHHH", dport, sport, 8 + len(payload), 0) + payload
    return eth_src + eth_dst + ethertype + bytes(header) + udp


class NetDriver:
    """The driver's side of the card: 8 rx buffers posted, frames taken, frames sent."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        base = machine.placements["virtio-net0"].mmio[0][0]
        self.d = Driver(machine, base)
        self.mem = machine.vm.memory
        self.d.init(3, num=16)
        self.rx, self.tx, self.ctrl = self.d.queues
        self.sent = 0
        for i in range(8):
            self.rx.add([(RX_BUFFERS + i * 2048, 2048, True)])
        self.d.notify_mmio(RX)

    def receive(self, count: int) -> list[bytes]:
        frames = []
        for head, length in wait_used(self.rx, count):
            frames.append(self.mem.read(RX_BUFFERS + head * 2048, length))
            self.rx.publish(head)  # the buffer goes back
        self.d.notify_mmio(RX)
        return frames

    def receive_now(self) -> list[bytes]:
        """What the card has delivered so far, without waiting."""
        return [self.mem.read(RX_BUFFERS + head * 2048, length) for head, length in self.rx.take_used()]

    def send(self, frame: bytes) -> None:
        at = TX_BUFFERS + (self.sent % 16) * 2048
        self.mem.write(at, bytes(HEADER_LEN) + frame)
        self.tx.add([(at, HEADER_LEN, False), (at + HEADER_LEN, len(frame), False)])
        self.sent += 1
        self.d.notify_mmio(TX)


def udp(frames) -> list[bytes]:
    """The UDP payloads among Ethernet frames (a bridge may add frames of its own)."""
    return [f[42:] for f in frames if f[12:14] == b"\x08\x00" and f[23] == 17]


def echo(driver: NetDriver, count: int) -> None:
    """Echo `count` UDP datagrams (other frames, if any, are not answered)."""
    while count:
        for frame in driver.receive(1):
            assert frame[:HEADER_LEN] == bytes(10) + b"\x01\x00"  # num_buffers 1, no offloads
            if frame[HEADER_LEN + 12:HEADER_LEN + 14] == b"\x08\x00" and frame[HEADER_LEN + 23] == 17:
                driver.send(udp_reply(frame[HEADER_LEN:]))
                count -= 1


def test_the_card_offers_mac_status_and_the_control_queue_not_mergeable_buffers(rig, machines) -> None:
    tap = tap_name()
    machine = machines(tap)
    rig.attach_tap("a", tap)
    d = Driver(machine, machine.placements["virtio-net0"].mmio[0][0])
    assert d.r(regs.DEVICE_ID) == 1
    offered = d.features()
    assert offered & FEATURES == FEATURES and not offered & VIRTIO_NET_F_MRG_RXBUF
    config = bytes(machine.mmio_bus.read(d.base + regs.CONFIG + i, 1) for i in range(10))
    assert config[:6] == DEFAULT_MAC and struct.unpack("<HH", config[6:]) == (VIRTIO_NET_S_LINK_UP, 1)
    assert parse_mac("52:54:00:12:34:56") == DEFAULT_MAC
    with pytest.raises(ConfigError):
        parse_mac("01:00:5e:00:00:01")  # multicast


def test_udp_round_trips_through_the_rig_with_pages_dirty_logged(rig, machines) -> None:
    tap = tap_name()
    machine = machines(tap)
    rig.attach_tap("a", tap)
    machine.devices["virtio-net0"].resume()  # the device alone: this test is its driver
    driver = NetDriver(machine)
    for region in machine.vm.memory.regions:
        region.take_vmm_dirty()
    client = udp_client(rig)
    for i in range(20):
        client.sendto(b"ping %d" % i, (GUEST_ADDRESS, PORT))
        echo(driver, 1)
        data, source = client.recvfrom(2048)
        assert (data, source) == (b"ping %d" % i, (GUEST_ADDRESS, PORT))
    dirty = machine.vm.memory.regions[0].take_vmm_dirty().pages().tolist()
    assert RX_BUFFERS // PAGE_SIZE in dirty  # the engine's writes into guest RAM are logged
    stats = machine.device("virtio-net0", VirtioNet).stats()
    assert (stats.rx_packets, stats.tx_packets) >= (20, 20)
    assert rig.bridge_port_of(format_mac(DEFAULT_MAC)) == "pa"
    client.close()


def test_frames_waiting_while_paused_travel_with_the_state_once(rig, machines) -> None:
    """Frames the host holds for a paused guest go with its saved state: the restored card
    delivers each of them once, and the source, stopped, delivers none; then the target
    announces the guest (RARP rounds: the bridge learns its new port; ANNOUNCE for the driver)."""
    tap_a, tap_b = tap_name(), tap_name()
    source = machines(tap_a)
    rig.attach_tap("a", tap_a)
    source.devices["virtio-net0"].resume()
    driver = NetDriver(source)
    client = udp_client(rig)
    client.sendto(b"before", (GUEST_ADDRESS, PORT))
    echo(driver, 1)
    assert client.recvfrom(2048)[0] == b"before"
    assert rig.bridge_port_of(format_mac(DEFAULT_MAC)) == "pa"

    source.devices["virtio-net0"].pause()
    state = in_flight_state(client, source)
    assert udp(state["virtio-net0"].backend.pending_rx) == [b"in flight %d" % i for i in range(3)]

    target = machines(tap_b)
    rig.attach_tap("b", tap_b)
    for region, copy in zip(source.vm.memory.regions, target.vm.memory.regions, strict=True):
        copy.view[:] = region.view
    target.restore_devices({k: v for k, v in state.items()})
    source.stop()
    target.devices["virtio-net0"].resume()
    moved = moved_to(driver, target)
    frames = []
    wait_for(lambda: frames.extend(moved.receive(1)) or len(udp(f[HEADER_LEN:] for f in frames)) >= 3, 5.0,
             "the three datagrams")
    assert udp(f[HEADER_LEN:] for f in frames) == [b"in flight %d" % i for i in range(3)]
    assert udp(f[HEADER_LEN:] for f in moved.receive_now()) == []  # each once
    wait_for(lambda: rig.bridge_port_of(format_mac(DEFAULT_MAC)) == "pb", 5.0, "the bridge learning port pb")
    dev = target.device("virtio-net0", VirtioNet)
    wait_for(lambda: dev.stats().announces >= 2, 5.0, "two announce rounds")
    # the driver negotiated GUEST_ANNOUNCE: the status says so, with a configuration interrupt
    assert moved.d.r(regs.INTERRUPT_STATUS) & regs.INT_CONFIG_CHANGE
    assert target.mmio_bus.read(moved.d.base + regs.CONFIG + 6, 2) & VIRTIO_NET_S_ANNOUNCE
    ack = TX_BUFFERS + 0x8000
    target.vm.memory.write(ack, bytes((3, 0, 0xEE)))
    moved.ctrl.add([(ack, 2, False), (ack + 2, 1, True)])
    moved.d.notify_mmio(CTRL)
    wait_used(moved.ctrl, 1)
    assert target.vm.memory.read(ack + 2, 1) == b"\0"
    assert not target.mmio_bus.read(moved.d.base + regs.CONFIG + 6, 2) & VIRTIO_NET_S_ANNOUNCE
    # and traffic flows from host B
    client.sendto(b"after", (GUEST_ADDRESS, PORT))
    echo(moved, 1)
    assert client.recvfrom(2048)[0] == b"after"
    client.close()


def moved_to(driver, target: Machine):
    """The test's driver (NetDriver, or test_virtio_net_pci's) carried on with the same rings
    and positions on `target`, whose memory holds the source's."""
    moved = copy.copy(driver)
    moved.machine, moved.mem = target, target.vm.memory
    moved.d.machine = target
    for q in (moved.rx, moved.tx, moved.ctrl):
        q.mem = target.vm.memory
    return moved


def in_flight_state(client: socket.socket, paused: Machine) -> dict:
    """Three datagrams sent to the guest of a machine whose card is paused: its devices' state
    once the three are drained into the card's (an event: they are in `pending_rx`)."""
    for i in range(3):
        client.sendto(b"in flight %d" % i, (GUEST_ADDRESS, PORT))
    saved: list[dict] = []
    wait_for(lambda: saved.append(paused.snapshot_devices()) or len(udp(saved[-1]["virtio-net0"].backend.pending_rx)) == 3,
             5.0, "three datagrams drained into the state")
    return saved[-1]


def test_the_announce_frame_is_qemus_rarp() -> None:
    frame = rarp_announce(DEFAULT_MAC)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == DEFAULT_MAC
    assert frame[12:14] == b"\x80\x35" and frame[20:22] == b"\x00\x03"  # RARP, reverse request


def test_a_bad_transmit_buffer_needs_a_reset_and_touches_nothing(rig, machines) -> None:
    tap = tap_name()
    machine = machines(tap)
    rig.attach_tap("a", tap)
    machine.devices["virtio-net0"].resume()  # the device alone: this test is its driver
    driver = NetDriver(machine)
    driver.tx.add([(0x1_0000_0000_0000, 64, False)])  # far outside guest RAM
    driver.d.notify_mmio(TX)
    wait_for(lambda: driver.d.r(regs.STATUS) & regs.STATUS_NEEDS_RESET, 5.0, "NEEDS_RESET")
    assert machine.devices["virtio-net0"].last_error and "outside guest RAM" in machine.devices["virtio-net0"].last_error


def test_a_saved_card_refuses_a_state_that_does_not_fit(rig, machines) -> None:
    tap = tap_name()
    machine = machines(tap)
    dev = machine.device("virtio-net0", VirtioNet)
    good = dev.save()
    for spoil, field in ((NetState(mac=bytes(6)), "backend.mac"), (NetState(status=8), "backend.status"),
                         (NetState(pending_rx=(b"x",) * 257), "backend.pending_rx"),
                         (NetState(pending_rx=(bytes(65537),)), "backend.pending_rx[0]")):
        with pytest.raises(StateRestoreError) as err:
            dev.restore(VirtioNetState(good.transport, spoil))
        assert err.value.field == field
    assert dev.save() == good
    frames = (b"a" * 60, b"b" * 1514)
    dev.restore(VirtioNetState(good.transport, replace(good.backend, pending_rx=frames)))
    assert dev.save().backend.pending_rx == frames


def test_the_rig_removes_everything_even_when_the_body_fails() -> None:
    cleanup_leftovers()
    with pytest.raises(RuntimeError, match="injected"):
        with NetRig(rate_mbit=1000) as r:
            made = set(r.ns.values())
            assert "tbf" in subprocess.run(["tc", "-n", r.host("a"), "qdisc", "show", "dev", "up0"],
                                           capture_output=True, text=True).stdout
            assert made <= set(namespaces())
            raise RuntimeError("injected")
    assert not made & set(namespaces())
    # a run killed before its exit: its namespaces carry a dead pid, and the next run removes them
    dead = f"kvr{2**22 + 7}x0-a"
    os.system(f"ip netns add {dead}")
    assert dead in cleanup_leftovers() and dead not in namespaces()


def test_the_net_option_reads_as_qemus_netdev() -> None:
    spec = VirtioNetSpec.parse("tap=tap7,mac=52:54:00:00:00:07,bridge=br0")
    assert (spec.tap, spec.mac, spec.bridge, spec.transport) == ("tap7", bytes.fromhex("525400000007"), "br0", "mmio")
    assert VirtioNetSpec.parse("tap=t").mac == DEFAULT_MAC
    assert VirtioNetSpec.parse("tap=t,transport=pci").transport == "pci"
    from hv.vmm import cli
    on_pci = cli._virtio(cli.build_parser().parse_args(["run", "--net", "tap=t,transport=pci"]), print)
    assert on_pci is not None and on_pci.pci == ("virtio-net0",)  # the layout a target checks has it on PCI
    for bad in ("mac=52:54:00:00:00:07", "tap=t,colour=red", "tap=t,transport=isa", "tap=t,tap=u", "tap"):
        with pytest.raises(ConfigError):
            VirtioNetSpec.parse(bad)


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_hv_run_net_answers_a_client_on_the_rig(rig, transport) -> None:
    """`hv run --net tap=..,bridge=br0[,transport=pci]` in host A's namespace: the built-in guest
    answers ARP and UDP from the network (the process is ended once it has answered); on PCI its
    driver looks at the receive ring only when rx's MSI-X vector was taken."""
    import signal

    process = subprocess.Popen(
        ["ip", "netns", "exec", rig.host("a"), sys.executable, "-m", "hv.vmm.cli", "run", "--mem", "64M",
         "--cpus", "2", "--ws", "4", "--net", f"tap={tap_name()},bridge=br0,transport={transport}",
         "--cmdline", f"net_ip={GUEST_ADDRESS} net_port={PORT}", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert len(first_answer(rig, lambda: process.poll() is None or process.communicate()[0])) == 24
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


def first_answer(rig: NetRig, alive) -> bytes:
    """The built-in guest's first UDP echo, asked for every 0.1 s from the network until it
    comes (an event: the guest is up), at most a minute; `alive()` is checked between tries
    (true, or what to say about the guest that died)."""
    client = in_namespace(rig.network, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    client.settimeout(0.1)
    try:
        for seq in range(600):
            client.sendto(struct.pack("<QQ", seq, 0), (GUEST_ADDRESS, PORT))
            try:
                return client.recv(64)
            except OSError:
                assert (why := alive()) is True, why
        raise AssertionError("the guest never answered")
    finally:
        client.close()
