"""Imports point one way: formats imports neither hv nor migrate; hv does not import migrate."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"formats": {"hv", "migrate"}, "hv": {"migrate", "formats"}}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_point_one_way(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    for path in files:
        bad = _imported_packages(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_kvm_backend_satisfies_the_platform_neutral_api() -> None:
    from hv.api import GuestMemoryApi, Hypervisor, VirtualCpu, VirtualMachine
    from hv.kvm.kvm import Kvm
    from hv.kvm.memory import GuestMemory
    from hv.kvm.vcpu import Vcpu
    from hv.kvm.vm import Vm

    for impl, proto in ((Kvm, Hypervisor), (Vm, VirtualMachine), (Vcpu, VirtualCpu),
                        (GuestMemory, GuestMemoryApi)):
        missing = [m for m in dir(proto) if not m.startswith("_") and not hasattr(impl, m)
                   and m not in getattr(proto, "__annotations__", {})]
        assert not missing, f"{impl.__name__} lacks {missing}"
