"""vCPU registers KVM would refuse (issue 21, item 3), in a snapshot and in a stream: refused in
staging, before any VM exists (a snapshot: exit 3, a corrupt snapshot; a stream: the source is
told BAD_STREAM), never by KVM_SET_SREGS after the VM was built."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from hostile import FakeSource, kvm_vm_fds, sample_state

import formats
from formats import SectionKind, StreamWriter
from hv.kvm.kvm import Kvm
from hv.vmm.command import ExitStatus
from migrate.errors import StateShapeError
from migrate.protocol import Accept, Complete, ErrorCode, State
from migrate.snapshot.snapshots import inspect, restore
from migrate.state import PRODUCER, registry

U64 = (1 << 64) - 1


@pytest.fixture(scope="module")
def corrupt(kvm: Kvm):
    """A real machine's state with the issue's registers: rip = 2^64-1, cr0 = ~0."""
    state = sample_state(kvm)
    vcpu = state.vcpus[0]
    bad = replace(vcpu, regs=replace(vcpu.regs, rip=U64), sregs=replace(vcpu.sregs, cr0=U64))
    return replace(state, vcpus=(bad, *state.vcpus[1:]))


def _snapshot_of(state, path: Path) -> None:
    reg = registry()
    writer = StreamWriter(reg, producer=PRODUCER)
    parts = [writer.header(), writer.config(state.config), writer.layout(state.layout)]
    parts += [writer.vcpu(v) for v in state.vcpus] + [writer.vm_state(state.vm)]
    parts += [writer.section(SectionKind.DEVICE, reg.encode(formats.DeviceSection(e, s)))
              for e, s in state.devices]
    parts.append(writer.end(0))
    path.write_bytes(b"".join(parts))


def test_a_snapshot_with_registers_kvm_refuses_is_corrupt_before_any_vm(kvm: Kvm, corrupt, tmp_path: Path) -> None:
    snap = tmp_path / "bad.snap"
    _snapshot_of(corrupt, snap)
    before = kvm_vm_fds()
    with pytest.raises(StateShapeError, match="CR0 0xffffffffffffffff sets reserved bits"):
        restore(snap, kvm, verify_memory=False)
    assert kvm_vm_fds() == before
    assert inspect(snap, verify=False)["error"]["type"] == "StateShapeError"
    done = subprocess.run([sys.executable, "-m", "migrate.cli", "restore", str(snap), "--no-verify"],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == ExitStatus.REFUSED, done.stderr
    assert "Traceback" not in done.stderr and "RIP" in done.stderr


def test_a_stream_with_registers_kvm_refuses_is_refused_before_they_are_applied(kvm: Kvm, corrupt) -> None:
    fake = FakeSource(kvm)
    fake.send(fake.hello(corrupt))
    assert isinstance(fake.receive(), Accept)
    fake.send(State(fake.state_payload(corrupt)))
    fake.send(Complete(fake.writer.end(0)))
    told = fake.error_told()
    error = fake.finish()
    assert isinstance(error, StateShapeError), repr(error)
    assert told.code is ErrorCode.BAD_STREAM and "CR0" in told.message, told
    assert kvm_vm_fds() == fake.vms_before
