"""migrate's rooms: the policy module is pure, and the two sides of a migration stay apart."""

from __future__ import annotations

import ast
from pathlib import Path


def test_the_policy_and_the_two_sides_keep_to_their_rooms() -> None:
    """convergence is pure (no clock, socket, thread or machine); source and target (and
    post-copy's halves of each) never meet but through the protocol and the link."""
    root = Path(__file__).resolve().parents[2] / "migrate" / "live"

    def imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return found | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}

    assert imports("convergence") <= {"__future__", "enum", "math", "dataclasses", "hv.kvm.dirty", "hv.kvm.units", "migrate.options",
                                      "migrate.stats"}
    assert "migrate.live.target" not in imports("source") and "migrate.live.source" not in imports("target")
    # post-copy's halves keep to their sides too, and neither reaches back into the side that holds it
    sources, targets = {"migrate.live.source", "migrate.live.postcopy.source"}, {"migrate.live.target",
                                                                                 "migrate.live.postcopy.target"}
    assert not imports("postcopy/source") & (targets | {"migrate.live.source"})
    assert not imports("postcopy/target") & (sources | {"migrate.live.target"})
    assert not imports("source") & {"migrate.live.postcopy.target"} and not imports("target") & {
        "migrate.live.postcopy.source"}
