"""Device kinds on the wire are declared ids (formats/SPEC.md 6.1), never Python class names: the
ids are pinned here, and a renamed model class still writes the same layout entry and state."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.vmm.builder import VirtioConfig, blank_machine
from hv.devices.debug_exit import DebugExit
from hv.devices.i8042 import I8042
from hv.devices.serial import Serial16550
from hv.devices.virtio import VirtioBlk, VirtioConsole, VirtioRng
from hv.devices.virtio.net import VirtioNet
from hv.kvm.kvm import Kvm
from hv.vmm.machine import Machine
from hv.kvm.vm import VmConfig
from migrate.state import DEVICE_STATES, capture, machine_layout, registry

MiB = 1 << 20

# the format: changing any of these is a new stream version (SPEC.md section 6)
WIRE_KINDS = {
    "serial-16550": ("hv.device.serial_16550", 1),
    "i8042": ("hv.device.i8042", 1),
    "debug-exit": ("hv.device.debug_exit", 1),
    "virtio-mmio-blk": ("hv.device.virtio_blk", 2),
    "virtio-mmio-console": ("hv.device.virtio_console", 1),
    "virtio-mmio-rng": ("hv.device.virtio_rng", 1),
    "virtio-mmio-net": ("hv.device.virtio_net", 1),
    "pci-host-bridge": ("hv.device.pci_host_bridge", 1),
    "virtio-pci-blk": ("hv.device.virtio_pci", 1),
    "virtio-pci-console": ("hv.device.virtio_pci", 1),
    "virtio-pci-rng": ("hv.device.virtio_pci", 1),
    "virtio-pci-net": ("hv.device.virtio_pci", 1),
}


@pytest.fixture
def machine(kvm: Kvm, tmp_path: Path) -> Iterator[Machine]:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    m = blank_machine(kvm, VmConfig(mem_size=32 * MiB),
                      virtio=VirtioConfig(disk=disk, console_out=lambda b: None, rng=True))
    yield m
    m.stop()
    m.vm.close()


def test_the_kind_table_is_declared_and_pinned() -> None:
    from hv.devices.pci import PciRoot, VirtioPciBlk, VirtioPciConsole, VirtioPciNet, VirtioPciRng

    models = (Serial16550, I8042, DebugExit, VirtioBlk, VirtioConsole, VirtioRng, PciRoot, VirtioPciBlk,
              VirtioPciConsole, VirtioPciRng, VirtioPciNet, VirtioNet)
    assert {m.KIND for m in models} == set(WIRE_KINDS) == set(DEVICE_STATES)
    assert all(m.KIND != m.__name__ for m in models)
    reg = registry()
    for kind, (state_type, name, version) in DEVICE_STATES.items():
        assert (name, version) == WIRE_KINDS[kind]
        assert (reg.name_of(state_type), reg.version_of(state_type)) == (name, version)


def test_layout_entries_carry_the_declared_kinds(machine: Machine) -> None:
    entries = {e.device_id: (e.kind, e.state_version) for e in machine_layout(machine).devices}
    assert entries == {"serial0": ("serial-16550", 1), "i8042": ("i8042", 1), "debug-exit": ("debug-exit", 1),
                       "virtio-blk0": ("virtio-mmio-blk", 2), "virtio-console0": ("virtio-mmio-console", 1),
                       "virtio-rng0": ("virtio-mmio-rng", 1)}


def test_renaming_a_model_class_changes_nothing_on_the_wire(machine: Machine) -> None:
    renamed = type("Uart", (Serial16550,), {})  # as if the class were renamed
    machine.add_device("serial1", renamed(lambda b: None), pio=(0x2F8, 8))
    entry = next(e for e in machine_layout(machine).devices if e.device_id == "serial1")
    assert (entry.kind, entry.state_version) == ("serial-16550", 1)
    state = {e.device_id: s for e, s in capture(machine).devices}["serial1"]
    assert registry().to_wire(state)[:2] == ["hv.device.serial_16550", 1]


def test_the_disk_path_is_configuration_not_state(machine: Machine) -> None:
    saved = machine.devices["virtio-blk0"].save()
    assert not hasattr(saved.backend, "path")
    config = capture(machine).config
    assert config.virtio is not None and config.virtio.disk == str(machine.devices["virtio-blk0"].path)
