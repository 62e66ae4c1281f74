"""The built-in guest on virtio-net, its clients talking to it while it moves: two hosts in network
namespaces (tools/netrig.py), the guest's tap on host A's bridge, an observer in the network
sending a UDP datagram every millisecond (tools/net_observer.py), the migration over the veth
links with a pre-shared key. Real KVM, real taps, real bridges; waits are on events."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator

import pytest

from hv.devices.pci import VirtioPci
from hv.devices.virtio.net import DEFAULT_MAC, VIRTIO_NET_S_ANNOUNCE, VirtioNet, format_mac
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, VirtioNetSpec, builtin_machine
from hv.vmm.machine import Machine, RunState
from migrate import MigrationOptions, ReceiveOptions, receive, restore, send, snapshot
from migrate.errors import TransportError
from migrate.protocol import State
from migrate.transport.listener import Listener
from tests.migrate.test_live import _cut_after
from tests.hv.tinyguest import wait_for
from tools.net_observer import UdpObserver
from tools.netrig import GUEST_ADDRESS, HOST_ADDRESSES, NetRig, cleanup_leftovers, in_namespace

MiB = 1 << 20
PORT = 7777
CONFIG = VmConfig(mem_size=64 * MiB, vcpus=2)  # CPU 1 drives the card


@pytest.fixture(scope="module")
def rig() -> Iterator[NetRig]:
    cleanup_leftovers()
    with NetRig() as r:
        yield r


def _guest(kvm: Kvm, rig: NetRig, tap: str, transport: str = "mmio") -> tuple[Machine, bg.GuestConsole]:
    """The built-in guest on host A, its card (on `transport`)'s tap on A's bridge, past its first pass."""
    console = bg.GuestConsole()
    params = bg.GuestParams(ws_mib=8, rate_mib_s=40, extra=f"net_ip={GUEST_ADDRESS} net_port={PORT}")
    spec = VirtioNetSpec(tap, DEFAULT_MAC, bridge="br0")
    pci = ("virtio-net0",) if transport == "pci" else ()
    machine = in_namespace(rig.host("a"), lambda: builtin_machine(kvm, params, CONFIG, console,
                                                                  virtio=VirtioConfig(net=spec, pci=pci)))
    machine.start()
    console.wait_pass(1, timeout=30)
    return machine, console


class _TargetOnB:
    """`receive` in host B's namespace (its card's tap is made there, on B's bridge)."""

    def __init__(self, kvm: Kvm, rig: NetRig, key: bytes, wrap=None) -> None:
        self.console = bg.GuestConsole()
        self.listener = in_namespace(rig.host("b"), lambda: Listener(f"{HOST_ADDRESSES['b']}:0", key))
        self.incoming = None
        self.error: BaseException | None = None

        def run() -> None:
            conn = self.listener.accept(30)
            conn = wrap(conn) if wrap else conn
            try:
                self.incoming = receive(conn, kvm, ReceiveOptions(console=self.console, timeout=30), listener=self.listener)
            finally:
                conn.close()

        def in_b() -> None:
            try:
                in_namespace(rig.host("b"), run)
            except BaseException as e:  # noqa: BLE001 - the test inspects it
                self.error = e
            finally:
                self.listener.close()

        self.thread = threading.Thread(target=in_b, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


def _tap() -> str:
    return f"kvm{os.getpid() % 100000}g{secrets.token_hex(2)}"


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_the_guest_keeps_answering_its_clients_across_a_live_migration(kvm: Kvm, rig: NetRig, transport: str) -> None:
    machine, console = _guest(kvm, rig, _tap(), transport)
    key = secrets.token_bytes(32)
    target = _TargetOnB(kvm, rig, key)
    mac = format_mac(DEFAULT_MAC)
    try:
        with UdpObserver(rig.network, GUEST_ADDRESS, PORT) as observer:
            observer.wait_answers(50)  # ARP resolved (the guest answered it), echoes flowing
            assert rig.bridge_port_of(mac) == "pa"
            stats = in_namespace(rig.host("a"), lambda: send(
                machine, target.listener.address, MigrationOptions(key=key, downtime_ms=300, timeout=30)))
            target.join()
            assert stats.outcome == "completed", stats
            assert target.error is None and target.incoming is not None
            assert machine.state is not RunState.RUNNING
            machine.stop()  # the source's tap is gone: what answers now is on host B
            observer.wait_answers(50)
            seen = observer.stop()
        moved = target.incoming.machine
        # the bridge in the middle learned the new port (the announce; the guest's answers too)
        card = moved.device("virtio-net0", VirtioNet)
        assert (transport == "pci") == isinstance(card, VirtioPci)  # rebuilt on the same transport
        assert card.stats().announces >= 1 and card.stats().tx_packets > 0
        assert rig.bridge_port_of(mac) == "pb"
        # the guest negotiated GUEST_ANNOUNCE: it saw the ANNOUNCE status, announced itself, acked
        wait_for(lambda: not card.backend.status & VIRTIO_NET_S_ANNOUNCE, 10.0, "the guest's announce ack")
        assert seen.duplicates() == []
        assert len(seen.lost_runs()) <= 1, seen.lost_runs()  # only at the switch-over, if at all
        first = min(a.passes for a in seen.answers)
        last = max(a.passes for a in seen.answers if a.seq == max(x.seq for x in seen.answers))
        assert last >= first  # the same guest, further on
        target.console.wait_pass(bg.read_status(moved.vm.memory).passes + 1, timeout=20)
        moved.pause()
        assert bg.check_memory(moved.vm.memory).ok  # the working set checks on arrival
    finally:
        machine.stop()
        machine.vm.close()
        if target.incoming is not None:
            target.incoming.machine.stop()
            target.incoming.machine.vm.close()


def test_a_failure_before_commit_leaves_the_guest_answering_from_host_a(kvm: Kvm, rig: NetRig) -> None:
    machine, console = _guest(kvm, rig, _tap())
    key = secrets.token_bytes(32)
    target = _TargetOnB(kvm, rig, key, wrap=_cut_after(State, 1))  # the link dies in stop-and-copy
    mac = format_mac(DEFAULT_MAC)
    try:
        with UdpObserver(rig.network, GUEST_ADDRESS, PORT) as observer:
            observer.wait_answers(50)
            stats = in_namespace(rig.host("a"), lambda: send(
                machine, target.listener.address, MigrationOptions(key=key, timeout=10)))
            target.join()
            assert stats.outcome == "failed" and isinstance(target.error, TransportError)
            assert machine.state is RunState.RUNNING
            observer.wait_answers(50)  # still answering, from A: the target never ran
            seen = observer.stop()
        assert rig.bridge_port_of(mac) == "pa"
        # the frames that waited while the source was paused were delivered by the source itself
        assert seen.duplicates() == [] and seen.lost() == []
        machine.pause()
        assert bg.check_memory(machine.vm.memory).ok
    finally:
        machine.stop()
        machine.vm.close()


def test_a_snapshot_with_traffic_flowing_loses_no_answer_and_restores_on_host_b(
        kvm: Kvm, rig: NetRig, tmp_path) -> None:
    """Snapshot while the observer talks to the guest: paused for the write and resumed, it
    answers every request once (those that came during the pause waited in its tap or its state).
    The snapshot restored on host B runs there: announced, the bridge learns it, it answers."""
    machine, console = _guest(kvm, rig, _tap())
    path = tmp_path / "guest.kvs"
    restored = None
    try:
        with UdpObserver(rig.network, GUEST_ADDRESS, PORT) as observer:
            observer.wait_answers(50)
            t_snap = time.monotonic_ns()
            info = snapshot(machine, path)
            assert info.pause_seconds > 0 and machine.state is RunState.RUNNING
            observer.wait_answers(50)
            seen = observer.stop()
        lost = seen.lost()
        assert seen.duplicates() == [] and lost == [], (  # the facts to read a failure by
            info.pause_seconds, [(x, (seen.sent[x] - t_snap) / 1e6) for x in lost[:3]], len(lost),
            machine.device("virtio-net0", VirtioNet).stats())
        machine.stop()
        restored = in_namespace(rig.host("b"), lambda: restore(path, kvm))  # its tap on B's bridge
        snapshot_passes = bg.read_status(restored.vm.memory).passes
        restored.resume()
        with UdpObserver(rig.network, GUEST_ADDRESS, PORT) as observer:
            observer.wait_answers(50)
            after = observer.stop()
        assert rig.bridge_port_of(format_mac(DEFAULT_MAC)) == "pb"
        assert restored.device("virtio-net0", VirtioNet).stats().announces >= 1
        assert after.duplicates() == [] and min(a.passes for a in after.answers) >= snapshot_passes
    finally:
        machine.stop()
        machine.vm.close()
        if restored is not None:
            restored.stop()
            restored.vm.close()
