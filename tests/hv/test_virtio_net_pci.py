"""virtio-net on virtio-pci against real KVM and real taps on the two-host rig: the test plays
the driver (capabilities, common configuration, a vector per queue), a tiny guest takes the
MSI-X interrupts (each report is one it took), a UDP client in the rig's middle namespace talks
to the guest's address. rx and tx signal their vectors from the C engine straight into KVM
(the transport's `msix.sent` stays 0 for them); a masked vector is held pending in the PBA and
sent on unmask; frames in flight travel with the PCI function's state and the target announces.

Every wait is on an event (a used index, a report, a datagram, a bridge entry), never a sleep."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pcitools import PciDriver, interrupt_counter, start_counting
from test_virtio import wait_used
from test_virtio_net import (  # noqa: F401 (rig: the module's fixture)
    PORT, RX_BUFFERS, TX_BUFFERS, first_answer, in_flight_state, moved_to, rig, tap_name, udp, udp_client, udp_reply,
)
from tinyguest import Recorder, multiboot_elf, wait_for

from hv.devices.pci import VirtioPciNet
from hv.devices.pci import virtio_pci as vp
from hv.devices.pci.msix import NO_VECTOR
from hv.devices.pci.root import PciAddress
from hv.devices.virtio.net import DEFAULT_MAC, HEADER_LEN, VIRTIO_NET_S_ANNOUNCE, format_mac
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, VirtioNetSpec, multiboot_machine
from hv.vmm.machine import Machine
from tools.netrig import GUEST_ADDRESS, NetRig

MiB = 1 << 20
RX, TX, CTRL = 0, 1, 2
RX_VECTOR, TX_VECTOR, CONFIG_VECTOR = 0x40, 0x41, 0x42  # MSI-X entries 0, 1, 2
RINGS = 0x20_0000  # PciDriver's queues, from here (the tiny guest is below)


@pytest.fixture
def machines(kvm: Kvm, write_image) -> Iterator:
    made: list[Machine] = []

    def make(tap: str, code: bytes | None = None) -> Machine:
        code = code or interrupt_counter([RX_VECTOR, TX_VECTOR, CONFIG_VECTOR])
        made.append(multiboot_machine(kvm, write_image(multiboot_elf(code), f"tiny{len(made)}.elf"), "",
                                      VmConfig(mem_size=64 * MiB),
                                      virtio=VirtioConfig(net=VirtioNetSpec(tap, DEFAULT_MAC, "pci"))))
        return made[-1]

    yield make
    for m in made:
        m.stop()
        m.vm.close()


def card_on_rig(rig: NetRig, machines, side: str = "a") -> tuple[Machine, Recorder]:
    """A machine whose card's tap is on host `side`'s bridge, its tiny guest started."""
    tap = tap_name()
    machine = machines(tap)
    rig.attach_tap(side, tap)
    return machine, start_counting(machine)


def frames(machine: Machine, used: list[tuple[int, int]]) -> list[bytes]:
    return [machine.vm.memory.read(RX_BUFFERS + h * 2048, n)[HEADER_LEN:] for h, n in used]


def taken(reports: Recorder) -> list[int]:
    return [v for _, _, v in reports.writes]


class PciNetDriver:
    """The driver's side of the card on PCI: entries 0-2 -> rx, tx, configuration; 8 rx buffers."""

    def __init__(self, machine: Machine, msix: bool = True) -> None:
        self.machine, self.mem, self.sent = machine, machine.vm.memory, 0
        self.d = PciDriver(machine, PciAddress(*machine.placements["virtio-net0"].pci.address))
        self.d.start([RX_VECTOR, TX_VECTOR, CONFIG_VECTOR])
        if not msix:  # MSI-X Enable off again: the function interrupts on INTx
            cap = next(at for at in range(0x40, 0x100, 4) if self.d.config(at, 1) == 0x11)
            self.d.config(cap + 2, 2, 0)
        self.d.init(3, vectors=[0, 1, NO_VECTOR], config_vector=2)
        self.rx, self.tx, self.ctrl = self.d.queues
        for i in range(8):
            self.rx.add([(RX_BUFFERS + i * 2048, 2048, True)])
        self.notify(RX)

    def notify(self, queue: int) -> None:
        self.d.w(vp.NOTIFY + vp.NOTIFY_MULTIPLIER * queue, 2, queue)

    def echo(self, count: int) -> None:
        """Echo `count` UDP datagrams (other frames the bridge sends are not answered)."""
        while count:
            for head, length in wait_used(self.rx, 1):
                frame = self.mem.read(RX_BUFFERS + head * 2048, length)[HEADER_LEN:]
                self.rx.publish(head)
                self.notify(RX)
                if frame[12:14] == b"\x08\x00" and frame[23] == 17:
                    at = TX_BUFFERS + (self.sent % 16) * 2048
                    reply = udp_reply(frame)
                    self.mem.write(at, bytes(HEADER_LEN) + reply)
                    self.tx.add([(at, HEADER_LEN + len(reply), False)])
                    self.sent += 1
                    self.notify(TX)
                    count -= 1

    def entry_masked(self, entry: int, masked: bool) -> None:
        self.machine.mmio_bus.write(self.d.bar1 + 16 * entry + 12, 4, int(masked))

    def pending(self) -> int:
        return self.machine.mmio_bus.read(self.d.bar1 + vp.MSIX_PBA, 8)


def test_udp_round_trips_on_pci_with_rx_and_tx_on_their_own_vectors(rig: NetRig, machines) -> None:
    machine, reports = card_on_rig(rig, machines)
    driver = PciNetDriver(machine)
    card = machine.device("virtio-net0", VirtioPciNet)
    assert driver.d.config(0, 4) == 0x1041_1AF4 and driver.d.config(0x0B, 1) == 0x02  # net, a network controller
    assert bytes(driver.d.r(vp.DEVICE + i, 1) for i in range(6)) == DEFAULT_MAC
    client = udp_client(rig)
    for i in range(5):
        client.sendto(b"ping %d" % i, (GUEST_ADDRESS, PORT))
        driver.echo(1)
        assert client.recvfrom(2048) == (b"ping %d" % i, (GUEST_ADDRESS, PORT))
    wait_for(lambda: {RX_VECTOR, TX_VECTOR} <= set(taken(reports)), 5.0, "rx's and tx's interrupts")
    assert CONFIG_VECTOR not in taken(reports)
    # the engine signalled KVM itself: no message went through the transport's Python path
    assert card.msix.sent[:2] == [0, 0] and card.stats().interrupts >= 10
    assert rig.bridge_port_of(format_mac(DEFAULT_MAC)) == "pa"
    client.close()


def test_a_masked_rx_vector_is_held_pending_and_sent_on_unmask(rig: NetRig, machines) -> None:
    machine, reports = card_on_rig(rig, machines)
    driver = PciNetDriver(machine)
    driver.entry_masked(0, True)
    client = udp_client(rig)
    client.sendto(b"while masked", (GUEST_ADDRESS, PORT))
    wait_for(lambda: driver.pending() & 1, 5.0, "rx's pending bit")  # the used ring moved, the vector held
    assert RX_VECTOR not in taken(reports)
    driver.entry_masked(0, False)
    wait_for(lambda: RX_VECTOR in taken(reports), 5.0, "rx's interrupt on unmask")
    assert not driver.pending() & 1
    assert udp(frames(machine, driver.rx.take_used())) == [b"while masked"]
    # the Function Mask holds every vector the same way, and its clearing sends what is pending
    cap = next(at for at in range(0x40, 0x100, 4) if driver.d.config(at, 1) == 0x11)
    driver.d.config(cap + 2, 2, 0xC000)  # MSI-X Enable | Function Mask
    before = taken(reports).count(RX_VECTOR)
    client.sendto(b"function masked", (GUEST_ADDRESS, PORT))
    wait_for(lambda: driver.pending() & 1, 5.0, "rx's pending bit under the Function Mask")
    assert taken(reports).count(RX_VECTOR) == before
    driver.d.config(cap + 2, 2, 0x8000)
    wait_for(lambda: taken(reports).count(RX_VECTOR) > before, 5.0, "rx's interrupt once the function is unmasked")
    assert not driver.pending() & 1
    client.close()


def test_with_msix_off_the_engine_interrupts_on_intx(rig: NetRig, machines) -> None:
    """The engine's rx interrupt goes through the transport: ISR bit and the level line, which
    the guest's handler lowers by reading the ISR (it reports what it read)."""
    from hv.vmm.builder import standard_layout

    (placement,) = [p for p in standard_layout(("virtio-net0",), ("virtio-net0",)) if p.device_id == "virtio-net0"]
    assert placement.pci is not None
    line, bar0 = placement.irqs[0], placement.pci.bars[0][2]
    tap = tap_name()
    machine = machines(tap, interrupt_counter([0x48], isr_reads={0x48: bar0 + vp.ISR}, ioapic=(line, 0x48)))
    rig.attach_tap("a", tap)
    reports = start_counting(machine)
    driver = PciNetDriver(machine, msix=False)
    client = udp_client(rig)
    client.sendto(b"on intx", (GUEST_ADDRESS, PORT))
    driver.echo(1)
    assert client.recvfrom(2048)[0] == b"on intx"
    wait_for(lambda: 1 in taken(reports), 5.0, "the handler reading the used-buffer bit")
    assert set(taken(reports)) <= {0, 1}  # 0: a second delivery after the EOI, the line already low
    assert machine.device("virtio-net0", VirtioPciNet).msix.sent == [0] * 4
    client.close()


def test_frames_in_flight_travel_with_the_pci_state_and_the_target_announces(rig: NetRig, machines) -> None:
    source, _ = card_on_rig(rig, machines)
    driver = PciNetDriver(source)
    client = udp_client(rig)
    client.sendto(b"before", (GUEST_ADDRESS, PORT))
    driver.echo(1)
    assert client.recvfrom(2048)[0] == b"before"

    source.pause()
    state = in_flight_state(client, source)
    assert isinstance(state["virtio-net0"], vp.VirtioPciState)

    target, reports = card_on_rig(rig, machines, "b")  # a fresh guest whose IDT and LAPIC take the same vectors
    target.pause()
    for region, copy in zip(source.vm.memory.regions, target.vm.memory.regions, strict=True):
        copy.view[RINGS:] = region.view[RINGS:]  # the rings and buffers, not the tiny guest
    target.restore_devices(state)
    source.stop()
    target.resume()
    moved = moved_to(driver, target)
    used: list[tuple[int, int]] = []
    wait_for(lambda: used.extend(moved.rx.take_used()) or len(udp(frames(target, used))) >= 3, 5.0,
             "the three datagrams")
    assert udp(frames(target, used)) == [b"in flight %d" % i for i in range(3)]  # each once
    # the target announced: RARP rounds (the bridge learned port pb), ANNOUNCE on the config vector
    wait_for(lambda: rig.bridge_port_of(format_mac(DEFAULT_MAC)) == "pb", 5.0, "the bridge learning port pb")
    wait_for(lambda: {RX_VECTOR, CONFIG_VECTOR} <= set(taken(reports)), 5.0, "rx's and the configuration's interrupts")
    assert moved.d.r(vp.DEVICE + 6, 2) & VIRTIO_NET_S_ANNOUNCE
    ack = TX_BUFFERS + 0x8000
    target.vm.memory.write(ack, bytes((3, 0, 0xEE)))
    moved.ctrl.add([(ack, 2, False), (ack + 2, 1, True)])
    moved.notify(CTRL)
    wait_used(moved.ctrl, 1)
    assert target.vm.memory.read(ack + 2, 1) == b"\0" and not moved.d.r(vp.DEVICE + 6, 2) & VIRTIO_NET_S_ANNOUNCE
    for head, _ in used:  # the buffers back, and traffic flows from host B
        moved.rx.publish(head)
    moved.notify(RX)
    client.sendto(b"after", (GUEST_ADDRESS, PORT))
    moved.echo(1)
    assert client.recvfrom(2048)[0] == b"after"
    client.close()


def test_the_layout_has_the_card_on_pci(machines) -> None:
    from hv.vmm.builder import standard_layout

    machine = machines(tap_name())
    assert machine.device_layout() == standard_layout(("virtio-net0",), ("virtio-net0",))
    (placement,) = [p for p in machine.device_layout() if p.device_id == "virtio-net0"]
    assert placement.kind == "virtio-pci-net" and placement.pci is not None
    assert struct.pack("<I", placement.pci.class_code)[:3] == b"\x00\x00\x02"


def test_the_builtin_guest_echoes_over_pci_on_msix_interrupts(kvm: Kvm, rig: NetRig) -> None:
    """The guest's net driver on virtio-pci looks at its receive ring only when rx's vector was
    taken: an answer is the proof the interrupt came; its per-vector counts say which fired."""
    from hv.guests import builtin as bg
    from hv.vmm.builder import builtin_machine

    tap, console = tap_name(), bg.GuestConsole()
    params = bg.GuestParams(ws_mib=4, cpus=2, extra=f"net_ip={GUEST_ADDRESS} net_port={PORT} irq_bench=20")
    machine = builtin_machine(kvm, params, VmConfig(mem_size=64 * MiB, vcpus=2), console,
                              virtio=VirtioConfig(net=VirtioNetSpec(tap, DEFAULT_MAC, "pci"), pci=("virtio-net0",)))
    try:
        rig.attach_tap("a", tap)
        machine.start()
        # irq_bench=20 runs first (bench_irq_latency.py's figures): 20 frames, each timed to tx's handler
        console.wait_for(lambda: any(isinstance(e, (bg.IrqLatency, bg.GuestError)) for _, e in console.events), 30,
                         "the guest's irqlat line")
        for _ in range(3):
            assert len(first_answer(rig, lambda: True)) == 24
        machine.pause()
        config, rx, tx = bg.read_msi_counts(machine.vm.memory)[:3]  # the guest's vectors 0x28-0x2A
        assert rx >= 3 and tx >= 20 + 3 and config == 0, (config, rx, tx)  # no announce on a first boot
        (timed,) = [e for _, e in console.events if isinstance(e, bg.IrqLatency)]
        assert timed.n == 20 and 0 < timed.min_ns <= timed.p50_ns <= timed.p99_ns <= timed.max_ns, timed
    finally:
        machine.stop()
        machine.vm.close()


def test_qemus_virtio_net_pci_runs_the_same_driver(kvm: Kvm, rig: NetRig) -> None:
    """QEMU boots the same image with `-netdev tap -device virtio-net-pci` in host A: the guest's
    driver (MSI-X driven there too) answers the network's UDP client, stamping its pass counter."""
    import shutil
    import subprocess

    from hv.guests import builtin as bg

    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.fail("qemu-system-x86_64 is not installed (`make test` installs it)")
    with kvm.create_vm(VmConfig(mem_size=MiB)) as vm:
        tsc_khz = vm.create_vcpu(0).fd.get_tsc_khz()
    tap = tap_name()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", rig.host("a"), qemu, "-enable-kvm", "-cpu", "max,-arch-capabilities", "-m", "64",
         "-smp", "2", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
         "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={format_mac(DEFAULT_MAC)}",
         "-kernel", str(bg.guest_image()),
         "-append", f"ws=4 cpus=2 tsc_khz={tsc_khz} net_ip={GUEST_ADDRESS} net_port={PORT}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or _has_link(rig.host("a"), tap), 30.0, "QEMU's tap")
        assert proc.poll() is None, proc.communicate()[0]
        rig.attach_tap("a", tap)
        answer = first_answer(rig, lambda: proc.poll() is None or proc.communicate()[0])
        assert len(answer) == 24  # the 16 bytes sent, then the guest's pass counter
        assert rig.bridge_port_of(format_mac(DEFAULT_MAC)) == "pa"
    finally:
        proc.kill()
        proc.communicate()


def _has_link(namespace: str, name: str) -> bool:
    import subprocess

    return name in subprocess.run(["ip", "-n", namespace, "-o", "link", "show"], capture_output=True, text=True).stdout
