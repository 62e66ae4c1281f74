"""The fuzz targets of every decoder that faces a peer (tools/bench/fuzz.py), run briefly: a few
hundred seeded mutants each (the same every run: no luck), every one decoded or refused with the
decoder's own typed error. `tools/bench/fuzz.py` runs them for 10^6 inputs each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools" / "bench"))

import fuzz  # noqa: E402

INPUTS = {"stream": 150, "snapshot": 150, "message": 1500, "control-request": 1500, "control-answer": 1500}


@pytest.fixture(scope="module")
def targets() -> dict[str, fuzz.Target]:
    return {t.name: t for t in fuzz.all_targets()}


@pytest.mark.parametrize("name", list(INPUTS))
def test_a_fuzz_target_finds_nothing(targets, name: str) -> None:
    result = fuzz.fuzz(targets[name], INPUTS[name], seed=21)
    assert result.inputs == INPUTS[name]
    assert not result.findings, {k: (f.error, f.data[:200]) for k, f in result.findings.items()}
    assert 0 < result.refused < result.inputs or name in ("snapshot",), result.as_dict()  # mutants of both kinds


def test_the_fuzzer_reports_what_escapes(targets) -> None:
    def fragile(data: bytes) -> None:
        raise KeyError(data[:1])

    result = fuzz.fuzz(fuzz.Target("fragile", [b"seed"], lambda d: fragile(d) if d != b"seed" else None, (ValueError,)), 10)
    assert result.inputs == 10 and not result.refused
    assert [f.error.split(":")[0] for f in result.findings.values()] == ["KeyError"]
