"""Each size constant is defined once (issue 22): a second `MiB = 1 << 20` somewhere drifts
from the first sooner or later. `formats` may not import `hv`, so the page has two homes, the
format's and the hardware's, held equal here."""

from __future__ import annotations

import ast
from pathlib import Path

import formats.layout
import hv.kvm.units

ROOT = Path(__file__).resolve().parent.parent
HOMES = {"MiB": {"hv/kvm/units.py"}, "GiB": {"hv/kvm/units.py"},
         "PAGE_SIZE": {"hv/kvm/units.py", "formats/layout.py"},
         "PAGE_SHIFT": {"hv/kvm/units.py", "formats/layout.py"},
         "LOW_MEMORY_END": {"hv/boot/x86.py"}}


def _definitions(path: Path) -> set[str]:
    """Names assigned at the top level of `path` (imports are not definitions)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for n in ast.walk(target):
                if isinstance(n, ast.Name):
                    names.add(n.id)
    return names


def test_each_constant_is_defined_in_its_home_only() -> None:
    found: dict[str, set[str]] = {name: set() for name in HOMES}
    for package in ("hv", "formats", "migrate"):
        for path in (ROOT / package).rglob("*.py"):
            for name in _definitions(path) & HOMES.keys():
                found[name].add(str(path.relative_to(ROOT)))
    assert found == HOMES


def test_the_format_page_is_the_hardware_page() -> None:
    assert (formats.layout.PAGE_SIZE, formats.layout.PAGE_SHIFT) == (hv.kvm.units.PAGE_SIZE, hv.kvm.units.PAGE_SHIFT)
