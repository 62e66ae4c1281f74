from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.kvm.kvm import Kvm
from hv.kvm.vm import Vm, VmConfig

MiB = 1 << 20


@pytest.fixture
def vm(kvm: Kvm) -> Iterator[Vm]:
    with kvm.create_vm(VmConfig(mem_size=32 * MiB)) as v:
        yield v


@pytest.fixture
def write_image(tmp_path: Path):
    def write(data: bytes, name: str = "tiny.elf") -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    return write
