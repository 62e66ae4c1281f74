"""The one persist protocol: every device, the vCPU and the VM save a state and restore it, and a
restore refuses a state that does not fit (wrong type, values out of range) before applying any
of it, with a `StateRestoreError` naming who, which field, what was expected and what was found."""

from __future__ import annotations

from collections.abc import Callable, Iterator
import struct
from dataclasses import replace
from pathlib import Path

import itertools
import os

import pytest

from hv.vmm.builder import VirtioConfig, VirtioNetSpec, blank_machine
from hv.devices.debug_exit import DebugExit, DebugExitState
from hv.devices.i8042 import I8042
from hv.devices.serial import RX_BUFFER, Serial16550, SerialState
from hv.devices.virtio.console import MAX_PENDING_INPUT, ConsoleState
from hv.devices.virtio.net import NetState
from hv.devices.virtio.queue import QueueState
from hv.errors import ConfigError, StateRestoreError
from hv.kvm.kvm import Kvm
from hv.vmm.machine import Machine
from hv.persist import Lifecycle
from hv.kvm.vm import VmConfig

MiB = 1 << 20
_TAPS = itertools.count()  # tap names unique in this process
DEVICE_IDS = ("serial0", "i8042", "debug-exit", "virtio-blk0", "virtio-console0", "virtio-rng0", "virtio-net0")
RINGS = 0x20_0000  # queue areas from here, 64 KiB per queue (inside the 64 MiB of RAM)


def _machine_factory(kvm: Kvm, tmp_path: Path, pci: tuple[str, ...]) -> Iterator[Callable[[], Machine]]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    made: list[Machine] = []

    def make() -> Machine:  # the card's tap (no address, never up) lives as long as the machine
        net = None if pci else VirtioNetSpec(f"kvp{os.getpid() % 100000}n{next(_TAPS)}")  # mmio only, so far
        virtio = VirtioConfig(disk=disk, console_out=lambda b: None, rng=True, pci=pci, net=net)
        made.append(blank_machine(kvm, VmConfig(mem_size=64 * MiB), virtio=virtio))
        return made[-1]

    yield make
    for m in made:
        m.stop()
        m.vm.close()


@pytest.fixture
def machines(kvm: Kvm, tmp_path: Path) -> Iterator[Callable[[], Machine]]:
    """Machines with every device model (the standard ones and all virtio devices)."""
    yield from _machine_factory(kvm, tmp_path, ())


def _busy_state(machine: Machine, device_id: str) -> object:
    """A state of `device_id` far from power-on, made through the device's own registers where it
    is sans-IO, and as a driver would have configured it for virtio (every queue ready)."""
    device = machine.devices[device_id]
    match device:
        case Serial16550():
            for offset, value in ((3, 0x83), (0, 0x01), (3, 0x03), (4, 0x0B), (1, 0x03), (7, 0x5A)):
                device.write(offset, 1, value)  # divisor 1, 8N1, OUT2, both interrupts, scratch
            device.feed(b"input")
        case I8042():
            device.write(4, 1, 0x60)  # write command byte: the next data byte
            device.write(0, 1, 0x47)
            device.write(4, 1, 0x20)  # read it back: waits in the output buffer
        case DebugExit():
            device.write(0, 4, 0x31)
    state = device.save()
    if device_id.startswith("virtio"):
        queues = tuple(QueueState(num=8, ready=True, desc=RINGS + i * 0x1_0000, driver=RINGS + i * 0x1_0000 + 0x1000,
                                  device=RINGS + i * 0x1_0000 + 0x2000, last_avail_idx=3, used_idx=3)
                       for i in range(len(state.transport.queues)))
        transport = replace(state.transport, status=0x0F, driver_features=1 << 32, config_generation=2,
                            queues=queues)
        backend = {"virtio-console0": ConsoleState(b"typed"),  # input and frames not delivered yet
                   "virtio-net0": NetState(pending_rx=(b"\xff" * 60, b"frame" * 12))}.get(device_id, state.backend)
        state = type(state)(transport, backend)
    return state


@pytest.mark.parametrize("device_id", DEVICE_IDS)
def test_each_device_round_trips_its_state(machines, device_id: str) -> None:
    source, target = machines(), machines()
    state = _busy_state(source, device_id)
    if device_id.startswith("virtio"):
        source.devices[device_id].restore(state)  # as a driver had left it
    assert source.devices[device_id].save() == state
    assert target.devices[device_id].save() != state
    target.devices[device_id].restore(state)
    assert target.devices[device_id].save() == state


def test_a_restored_raised_serial_line_is_raised_again(vm) -> None:
    """Seen by the in-kernel IOAPIC (its pin 4 is masked at power-on, so a raised line stays in
    IRR): raised by the restore, lowered when the guest reads the byte."""
    uart = Serial16550(irq_fd=vm.fd.fd, irq=4)
    assert not vm.get_irqchip().ioapic.irr & (1 << 4)
    uart.restore(SerialState(ier=0x01, mcr=0x08, rx=b"x", irq_level=True))
    assert vm.get_irqchip().ioapic.irr & (1 << 4)
    assert uart.read(0, 1) == ord("x") and not vm.get_irqchip().ioapic.irr & (1 << 4)


@pytest.mark.parametrize("device_id", DEVICE_IDS)
def test_each_device_refuses_a_state_of_the_wrong_type(machines, device_id: str) -> None:
    machine = machines()
    device = machine.devices[device_id]
    before = device.save()
    other = SerialState() if device_id == "debug-exit" else DebugExitState()
    with pytest.raises(StateRestoreError) as err:
        device.restore(other)
    assert (err.value.owner, err.value.field) == (device.KIND, "type")
    assert (err.value.expected, err.value.found) == (type(before).__name__, type(other).__name__)
    assert device.save() == before


def _transport(**changes: object) -> Callable[[object], object]:
    return lambda s: replace(s, transport=replace(s.transport, **changes))


def _queue0(**changes: object) -> Callable[[object], object]:
    return lambda s: replace(s, transport=replace(s.transport, queues=(replace(s.transport.queues[0], **changes),
                                                                       *s.transport.queues[1:])))


def _backend(make: Callable[[object], object]) -> Callable[[object], object]:
    return lambda s: replace(s, backend=make(s.backend))


# (device id, how to spoil its saved state, the owner and field the refusal names)
OUT_OF_RANGE = [
    ("serial0", lambda s: replace(s, ier=0x10), "serial-16550", "ier"),
    ("serial0", lambda s: replace(s, fcr=0x02), "serial-16550", "fcr"),  # FCR never keeps bit 1
    ("serial0", lambda s: replace(s, lcr=0x100), "serial-16550", "lcr"),
    ("serial0", lambda s: replace(s, rx=bytes(RX_BUFFER + 1)), "serial-16550", "rx"),
    ("serial0", lambda s: replace(s, thre_pending=1), "serial-16550", "thre_pending"),
    ("serial0", lambda s: replace(s, dropped=-1), "serial-16550", "dropped"),
    ("i8042", lambda s: replace(s, status=0x100), "i8042", "status"),
    ("i8042", lambda s: replace(s, output=0x1FF), "i8042", "output"),
    ("i8042", lambda s: replace(s, pending_command=0xAA), "i8042", "pending_command"),
    ("i8042", lambda s: replace(s, pending_command=False), "i8042", "pending_command"),
    ("i8042", lambda s: replace(s, resets=-1), "i8042", "resets"),
    ("debug-exit", lambda s: replace(s, code=1 << 32), "debug-exit", "code"),
    ("debug-exit", lambda s: replace(s, code="1"), "debug-exit", "code"),
    ("virtio-blk0", _transport(device_id=4), "virtio-mmio-blk", "device_id"),
    ("virtio-blk0", _transport(interrupt_status=4), "virtio-mmio-blk", "interrupt_status"),
    ("virtio-blk0", _transport(queues=()), "virtio-mmio-blk", "queues"),
    ("virtio-blk0", _queue0(used_idx=0x1_0000), "virtio-mmio-blk queues[0]", "used_idx"),
    ("virtio-blk0", _queue0(num=16, ready=True, desc=RINGS, driver=RINGS + 0x1000, device=RINGS + 2),
     "virtio-mmio-blk", "queues[0]"),  # a misaligned used ring
    ("virtio-blk0", _backend(lambda b: replace(b, read_only=True)), "virtio-mmio-blk", "backend.read_only"),
    ("virtio-blk0", _backend(lambda b: replace(b, capacity=b.capacity + 1)), "virtio-mmio-blk",
     "backend.capacity"),
    ("virtio-console0", _backend(lambda b: ConsoleState(bytes(MAX_PENDING_INPUT + 1))), "virtio-mmio-console",
     "backend.pending_input"),
    ("virtio-console0", _transport(status=0x100), "virtio-mmio-console", "status"),
    ("virtio-rng0", _backend(lambda b: ConsoleState()), "virtio-mmio-rng", "type"),
    ("virtio-rng0", _queue0(ready=1), "virtio-mmio-rng queues[0]", "ready"),
    ("virtio-net0", _backend(lambda b: replace(b, mac=bytes(6))), "virtio-mmio-net", "backend.mac"),
    ("virtio-net0", _backend(lambda b: replace(b, pending_rx=[b"x"])), "virtio-mmio-net", "backend.pending_rx"),
    ("virtio-net0", _backend(lambda b: replace(b, pending_rx=(bytes(1 << 17),))), "virtio-mmio-net",
     "backend.pending_rx[0]"),
    ("virtio-net0", _transport(queues=()), "virtio-mmio-net", "queues"),
]


@pytest.mark.parametrize(("device_id", "spoil", "owner", "field"), OUT_OF_RANGE,
                         ids=[f"{d}-{f}" for d, _, _, f in OUT_OF_RANGE])
def test_each_device_refuses_values_out_of_range_before_applying_any(
        machines, device_id: str, spoil, owner: str, field: str) -> None:
    machine = machines()
    device = machine.devices[device_id]
    good = _busy_state(machine, device_id)
    device.restore(good)
    with pytest.raises(StateRestoreError) as err:
        device.restore(spoil(replace(good)))
    assert (err.value.owner, err.value.field) == (owner, field)
    assert device.save() == good


def test_the_vm_refuses_a_state_that_does_not_fit(machines) -> None:
    vm = machines().vm
    state = vm.save()
    for spoilt, field in ((vm.vcpus[0].save(), "type"), (replace(state, pit=None), "pit present"),
                          (replace(state, clock=replace(state.clock, clock=-1)), "clock.clock")):
        with pytest.raises(StateRestoreError) as err:
            vm.restore(spoilt)
        assert (err.value.owner, err.value.field) == ("vm", field)
    ioapic = replace(state.irqchip.ioapic, redirtbl=state.irqchip.ioapic.redirtbl[:3])
    with pytest.raises(StateRestoreError) as err:
        vm.restore(replace(state, irqchip=replace(state.irqchip, ioapic=ioapic)))
    assert (err.value.field, err.value.found) == ("ioapic.redirtbl entries", 3)
    vm.restore(state)  # the unspoilt state still goes in (its round trip: test_vcpu_state.py)


def test_the_vcpu_refuses_a_state_that_does_not_fit(machines) -> None:
    machine = machines()
    vcpu = machine.vcpus[0]
    state = vcpu.save()
    for spoilt, owner, field in ((machine.vm.save(), "vcpu 0", "type"),
                                 (replace(state, vcpu_id=1), "vcpu 0", "vcpu_id"),
                                 (replace(state, regs=replace(state.regs, rax=1 << 64)), "vcpu 0 regs", "rax"),
                                 (replace(state, regs=state.sregs), "vcpu 0 regs", "type"),
                                 (replace(state, tsc_khz=-1), "vcpu 0", "tsc_khz")):
        with pytest.raises(StateRestoreError) as err:
            vcpu.restore(spoilt)
        assert (err.value.owner, err.value.field) == (owner, field)
    assert vcpu.save().regs == state.regs


def test_only_devices_with_a_lifecycle_are_driven_by_the_machine(machines) -> None:
    machine = machines()
    driven = {i for i, d in machine.devices.items() if isinstance(d, Lifecycle)}
    assert driven == {"serial0", "virtio-blk0", "virtio-console0", "virtio-rng0", "virtio-net0"}
    machine.start(paused=True)
    assert all(machine.devices[i].paused for i in driven)
    machine.resume()
    assert not any(machine.devices[i].paused for i in driven)


def test_a_device_is_found_by_id_as_the_model_asked_for(machines) -> None:
    machine = machines()
    assert machine.device("serial0", Serial16550) is machine.devices["serial0"]
    with pytest.raises(ConfigError):
        machine.device("i8042", Serial16550)
    with pytest.raises(ConfigError):
        machine.device("serial1", Serial16550)


def test_the_vcpu_the_vm_and_every_device_persist_through_one_protocol() -> None:
    from hv.kvm.vcpu import Vcpu
    from hv.kvm.vm import Vm
    from hv.vmm.persisted import DEVICE_MODELS  # the list mypy holds to the protocol

    models = DEVICE_MODELS
    for cls in (Vcpu, Vm, *models):
        assert callable(getattr(cls, "save", None)) and callable(getattr(cls, "restore", None)), cls
        assert not hasattr(cls, "snapshot") and not hasattr(cls, "save_state"), cls
    assert len({m.KIND for m in models}) == len(models)


# --- PCI: the host bridge and the virtio-pci functions ----------------------------------------------

from hv.devices.pci import MsixState, PciRoot, PciRootState, VirtioPci, VirtioPciState  # noqa: E402
from hv.devices.pci.config import BAR0, COMMAND  # noqa: E402

PCI_DEVICE_IDS = ("pci-root", "virtio-blk0", "virtio-console0", "virtio-rng0")
MOVED_BAR0 = 0xE800_0000  # inside the bridge's window, away from firmware's placements


@pytest.fixture
def pci_machines(kvm: Kvm, tmp_path: Path) -> Iterator[Callable[[], Machine]]:
    """Machines with the three virtio devices on PCI."""
    yield from _machine_factory(kvm, tmp_path, ("virtio-blk0", "virtio-console0", "virtio-rng0"))


def _busy_pci_state(machine: Machine, device_id: str) -> object:
    """A state far from power-on: for a function, decoding on and BAR 0 moved, MSI-X enabled with
    its entries written and the last vector masked and pending, vectors chosen, queues ready."""
    device = machine.devices[device_id]
    state = device.save()
    if isinstance(device, PciRoot):
        return replace(state, config_address=0x8000_0810)
    assert isinstance(device, VirtioPci)
    config = bytearray(state.config)
    config[COMMAND] = 0x06  # memory space, bus master
    config[BAR0 : BAR0 + 4] = MOVED_BAR0.to_bytes(4, "little")
    cap = device.msix.capability
    config[cap + 3] |= 0x80  # MSI-X enable
    n = device.msix.vectors
    table = b"".join(struct.pack("<QII", 0xFEE0_0000, 0x40 + v, int(v == n - 1)) for v in range(n))
    busy = _busy_state_transport(state.transport)
    return VirtioPciState(bytes(config), MsixState(table, 1 << (n - 1)), busy, n - 1,
                          tuple(range(len(state.queue_vectors))),
                          ConsoleState(b"typed") if device_id == "virtio-console0" else state.backend)


def _busy_state_transport(transport):
    queues = tuple(QueueState(num=8, ready=True, desc=RINGS + i * 0x1_0000, driver=RINGS + i * 0x1_0000 + 0x1000,
                              device=RINGS + i * 0x1_0000 + 0x2000, last_avail_idx=3, used_idx=3)
                   for i in range(len(transport.queues)))
    return replace(transport, status=0x0F, driver_features=1 << 32, config_generation=2, queues=queues)


@pytest.mark.parametrize("device_id", PCI_DEVICE_IDS)
def test_each_pci_device_round_trips_its_state(pci_machines, device_id: str) -> None:
    source, target = pci_machines(), pci_machines()
    state = _busy_pci_state(source, device_id)
    source.devices[device_id].restore(state)
    assert source.devices[device_id].save() == state
    assert target.devices[device_id].save() != state
    target.devices[device_id].restore(state)
    assert target.devices[device_id].save() == state
    if device_id != "pci-root":  # the restored BAR is decoded where the state says, on the target's bus
        hit = target.mmio_bus.find(MOVED_BAR0)
        assert hit is not None and hit[0].name == f"{device_id} BAR0"


def _pci(**changes: object) -> Callable[[object], object]:
    return lambda s: replace(s, **changes)


def _config_byte(offset: int, value: int) -> Callable[[object], object]:
    def spoil(s):
        config = bytearray(s.config)
        config[offset] = value
        return replace(s, config=bytes(config))
    return spoil


def _msix(**changes: object) -> Callable[[object], object]:
    return lambda s: replace(s, msix=replace(s.msix, **changes))


PCI_OUT_OF_RANGE = [
    ("virtio-rng0", _config_byte(0, 0x34), "virtio-pci-rng", "config[0x0]"),  # the vendor id is read-only
    ("virtio-rng0", _config_byte(BAR0, 0x08), "virtio-pci-rng", "config[0x10]"),  # a BAR's type bits
    ("virtio-rng0", _pci(config=bytes(16)), "virtio-pci-rng", "config length"),
    ("virtio-rng0", _msix(table=bytes(16)), "virtio-pci-rng", "msix.table length"),
    ("virtio-rng0", _msix(table=bytes(15) + b"\x02" + bytes(16)), "virtio-pci-rng", "msix.table[0]"),
    ("virtio-rng0", _msix(pending=1 << 2), "virtio-pci-rng", "msix.pending"),
    ("virtio-console0", _pci(queue_vectors=(0,)), "virtio-pci-console", "queue_vectors"),
    ("virtio-blk0", _pci(config_vector=0x1_0000), "virtio-pci-blk", "config_vector"),
    ("virtio-blk0", _transport(device_id=4), "virtio-pci-blk", "device_id"),
    ("virtio-blk0", _queue0(used_idx=0x1_0000), "virtio-pci-blk queues[0]", "used_idx"),
    ("virtio-blk0", _backend(lambda b: replace(b, capacity=b.capacity + 1)), "virtio-pci-blk", "backend.capacity"),
    ("pci-root", _pci(config_address=0x8000_0001), "pci-host-bridge", "config_address"),
    ("pci-root", _pci(config_address=1 << 32), "pci-host-bridge", "config_address"),
    ("pci-root", lambda s: replace(s, bridge_config=b"\x00" + s.bridge_config[1:]), "pci-host-bridge",
     "bridge_config[0x0]"),
]


@pytest.mark.parametrize(("device_id", "spoil", "owner", "field"), PCI_OUT_OF_RANGE,
                         ids=[f"{d}-{f}" for d, _, _, f in PCI_OUT_OF_RANGE])
def test_each_pci_device_refuses_values_out_of_range_before_applying_any(
        pci_machines, device_id: str, spoil, owner: str, field: str) -> None:
    machine = pci_machines()
    device = machine.devices[device_id]
    good = _busy_pci_state(machine, device_id)
    device.restore(good)
    with pytest.raises(StateRestoreError) as err:
        device.restore(spoil(good))
    assert (err.value.owner, err.value.field) == (owner, field)
    assert device.save() == good


@pytest.mark.parametrize("device_id", PCI_DEVICE_IDS)
def test_each_pci_device_refuses_a_state_of_the_wrong_type(pci_machines, device_id: str) -> None:
    device = pci_machines().devices[device_id]
    before = device.save()
    other = DebugExitState()
    with pytest.raises(StateRestoreError) as err:
        device.restore(other)
    assert (err.value.owner, err.value.field) == (device.KIND, "type")
    assert device.save() == before


def test_pci_devices_persist_through_the_one_protocol(pci_machines) -> None:
    from hv.devices.pci import VirtioPciBlk, VirtioPciConsole, VirtioPciNet, VirtioPciRng

    machine = pci_machines()
    models = (PciRoot, VirtioPciBlk, VirtioPciConsole, VirtioPciRng, VirtioPciNet)
    for cls in models:
        assert callable(getattr(cls, "save", None)) and callable(getattr(cls, "restore", None)), cls
    kinds = {m.KIND for m in models} | {m.KIND for m in (Serial16550, I8042, DebugExit)}
    assert len(kinds) == len(models) + 3
    driven = {i for i, d in machine.devices.items() if isinstance(d, Lifecycle)}
    assert driven == {"serial0", "virtio-blk0", "virtio-console0", "virtio-rng0"}  # not the bridge
    assert type(machine.devices["pci-root"].save()) is PciRootState
