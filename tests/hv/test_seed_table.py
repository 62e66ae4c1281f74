"""hv/DESIGN.md's seed table holds: every implementation and test it names exists, every member of
the seed Protocols (`hv.api`) has a row; plus the rows whose proof lives here."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
from pathlib import Path

import pytest
from tinyguest import OUT_LOOP, multiboot_elf, wait_for

from hv import api
from hv.kvm.kvm import Kvm
from hv.kvm.vm import Vm, VmConfig
from hv.vmm.builder import multiboot_machine
from hv.vmm.machine import discard

ROOT = Path(__file__).resolve().parents[2]
ROW = re.compile(r"^\| (?P<seed>[^|]+) \| `(?P<method>[^`]+)`[^|]* \| (?P<impl>[^|]+) \| (?P<test>[^|]+) \|$")
PROTOCOLS = (api.Hypervisor, api.VirtualMachine, api.RunnableVirtualMachine, api.Vcpu, api.AxArchVCpu,
             api.GuestMemory, api.LinuxArch)


def seed_rows() -> list[dict[str, str]]:
    text = (ROOT / "hv" / "DESIGN.md").read_text()
    table = text.split("### Seed table", 1)[1].split("\n\n", 2)[1]  # the lines of the table itself
    lines = [line.strip() for line in table.splitlines()[2:]]  # past the header and the |---| line
    unread = [line for line in lines if not ROW.match(line)]
    assert not unread, f"seed table rows not in the form | seed | `method` | impl | test |: {unread}"
    rows = [m.groupdict() for line in lines if (m := ROW.match(line))]
    return [{k: v.strip().strip("`") for k, v in row.items()} for row in rows]


ROWS = seed_rows()


def _exists(implementation: str) -> bool:
    """`module:Qual.name`: an attribute of the class (method, property), or one every instance
    gets in `__init__` (`self.name = ...`)."""
    module_name, _, qualname = implementation.partition(":")
    obj: object = importlib.import_module(module_name)
    *owners, name = qualname.split(".")
    for part in owners:
        obj = getattr(obj, part)
    if hasattr(obj, name):
        return True
    return inspect.isclass(obj) and re.search(rf"\bself\.{name}\b\s*(:[^=]*)?=", inspect.getsource(obj)) is not None


def _test_exists(test: str) -> bool:
    path, _, name = test.partition("::")
    file = ROOT / path
    return file.is_file() and name in {n.name for n in ast.walk(ast.parse(file.read_text()))
                                       if isinstance(n, ast.FunctionDef)}


def test_the_table_is_there_and_covers_the_seeds() -> None:
    seeds = {row["seed"] for row in ROWS}
    assert seeds == {"arcbox Hypervisor", "arcbox VirtualMachine", "arcbox Vcpu", "arcbox GuestMemory",
                     "arcbox linux/vm.rs KvmVm", "axvcpu AxArchVCpu", "crosvm LinuxArch"}
    ax = {row["method"] for row in ROWS if row["seed"] == "axvcpu AxArchVCpu"}
    assert ax == {"new", "set_entry", "set_ept_root", "setup", "run", "bind", "unbind", "set_gpr",
                  "inject_interrupt", "set_return_value"}
    crosvm = {row["method"] for row in ROWS if row["seed"] == "crosvm LinuxArch"}
    assert crosvm == {"arch_memory_layout", "guest_memory_layout", "get_system_allocator_config", "build_vm",
                      "configure_vcpu", "register_pci_device", "get_host_cpu_frequencies_khz",
                      "get_host_cpu_max_freq_khz", "get_host_cpu_capacity", "get_host_cpu_clusters"}


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r['seed']}::{r['method']}")
def test_each_row_names_an_implementation_and_a_test_that_exist(row: dict[str, str]) -> None:
    assert _exists(row["impl"]), f"{row['impl']} is gone"
    assert _test_exists(row["test"]), f"{row['test']} is gone"


def test_every_protocol_member_has_a_row() -> None:
    implemented = {row["impl"].rsplit(".", 1)[-1] for row in ROWS}
    for protocol in PROTOCOLS:
        missing = {m for m in vars(protocol) if not m.startswith("_")} - implemented
        assert not missing, f"{protocol.__name__}: {sorted(missing)} have no row in the seed table"


def test_the_checks_fail_on_a_missing_name() -> None:
    assert not _exists("hv.kvm.vcpu:Vcpu.set_entry_gone")
    assert not _test_exists("tests/hv/test_api.py::test_gone")


def test_downcasting_is_isinstance(kvm: Kvm) -> None:
    """arcbox's as_any/as_any_mut let Rust code reach a backend's own type; a Python object is its
    own type already."""
    with kvm.create_vm(VmConfig(mem_size=2 << 20)) as vm:
        as_protocol: api.VirtualMachine = vm
        assert isinstance(as_protocol, Vm) and as_protocol.fd is vm.fd


def test_dirty_logging_reports_its_state(kvm: Kvm) -> None:
    with kvm.create_vm(VmConfig(mem_size=2 << 20)) as vm:
        assert not vm.dirty_logging
        vm.enable_dirty_log()
        assert vm.dirty_logging
        vm.disable_dirty_log()
        assert not vm.dirty_logging


def test_bind_pins_the_vcpu_thread_and_unbind_frees_it(kvm: Kvm, write_image) -> None:
    allowed = os.sched_getaffinity(0)
    out = bytearray()
    machine = multiboot_machine(kvm, write_image(multiboot_elf(OUT_LOOP)), "", VmConfig(mem_size=16 << 20),
                                out.extend)
    vcpu, host_cpu = machine.vcpus[0], max(allowed)
    try:
        vcpu.bind(host_cpu)  # before its thread exists: applied when it starts
        machine.start()
        wait_for(lambda: len(out) > 10)
        assert vcpu.native_thread_id is not None
        assert os.sched_getaffinity(vcpu.native_thread_id) == {host_cpu}
        vcpu.unbind()
        assert os.sched_getaffinity(vcpu.native_thread_id) == allowed
    finally:
        discard(machine)
