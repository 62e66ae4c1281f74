"""A machine's state to stream sections and back (`migrate.records`), and the one error table."""

from __future__ import annotations

import json

import pytest
from hostile import sample_state

import formats
from formats import StreamReader, StreamWriter
from hv.guests import builtin as bg
from hv.vmm.builder import builtin_machine
from hv.errors import HvError
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from migrate.errors import (Cancelled, DiskRefused, IncompatibleError, MigrationFailed, MissingSections,
                            NotConverging, ProtocolViolation, StateShapeError, TransportError, error_code)
from migrate.pages import MemorySink
from migrate.protocol import ErrorCode
from migrate.records import EXPECT, Collected, state_sections
from migrate.snapshot.snapshots import SnapshotKind
from migrate.state import PRODUCER, capture, registry
from migrate.stats import MigrationOutcome, MigrationStats


def test_state_sections_read_back_into_the_same_state_and_pages_into_the_sink(kvm: Kvm) -> None:
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=32 << 20), bg.GuestConsole())
    try:
        machine.vm.memory.regions[0].view[0x180_0000:0x180_1000] = b"\x5a" * 4096
        state = capture(machine)
        writer = StreamWriter(registry(), producer=PRODUCER)
        parts = [writer.header(), writer.config(state.config), writer.layout(state.layout)]
        parts += state_sections(writer, state)
        encoder = formats.PageEncoder(stable=True)
        region = machine.vm.memory.regions[0]
        parts += [writer.pages(s) for s in encoder.encode(region.guest_base + 0x180_0000,
                                                          region.view[0x180_0000:0x180_2000])]
        stream = b"".join(parts) + writer.end(0)
        scratch = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=32 << 20), bg.GuestConsole())
        try:
            collected = Collected(MemorySink(scratch.vm.memory))
            reader = StreamReader(registry(), expect=EXPECT)
            pages = sum(collected.take(reader.feed(stream[i:i + 1000])) for i in range(0, len(stream), 1000))
            reader.finish()
            assert collected.state() == state
            assert pages == collected.pages == 2 and collected.end.digest == 0
            assert collected.sections["vcpu"] == len(state.vcpus) and collected.sections["pages"] == 1
            got = scratch.vm.memory.regions[0].view[0x180_0000:0x180_2000]
            assert bytes(got) == bytes(region.view[0x180_0000:0x180_2000]) and got[:4096] == b"\x5a" * 4096
        finally:
            scratch.vm.close()
    finally:
        machine.vm.close()


def test_a_stream_without_a_section_the_state_needs_names_it() -> None:
    with pytest.raises(MissingSections) as err:
        Collected().state()
    assert err.value.missing == ("CONFIG", "LAYOUT", "VCPU", "VM_STATE")
    with pytest.raises(MissingSections) as err:
        Collected().need("LAYOUT")
    assert err.value.missing == ("LAYOUT",)


@pytest.mark.parametrize(("error", "code"), [
    (Cancelled("by the user"), ErrorCode.CANCELLED),
    (KeyboardInterrupt(), ErrorCode.CANCELLED),
    (NotConverging(30, 12.0, 100, 500.0, 80.0, 300.0), ErrorCode.TIMEOUT),
    (formats.DigestMismatch(1, 2), ErrorCode.DIGEST_MISMATCH),
    (formats.LayoutMismatch([]), ErrorCode.INCOMPATIBLE),
    (IncompatibleError(["a CPU flag"]), ErrorCode.INCOMPATIBLE),
    (formats.ChecksumError("pages", 0, 1, 2), ErrorCode.BAD_STREAM),
    (MissingSections(["VCPU"]), ErrorCode.BAD_STREAM),
    (StateShapeError(["device 'x' of the layout has no state"]), ErrorCode.BAD_STREAM),
    (ProtocolViolation("Commit before Ready"), ErrorCode.PROTOCOL),
    (DiskRefused("/etc/passwd", "not given"), ErrorCode.INCOMPATIBLE),
    (HvError("KVM_SET_REGS failed"), ErrorCode.RESTORE_FAILED),
    (MigrationFailed("why", "here"), ErrorCode.INTERNAL),
    (TransportError("cut"), ErrorCode.INTERNAL),
    (ValueError("a bug"), ErrorCode.INTERNAL),
])
def test_every_failure_maps_to_the_code_the_peer_is_told(error: BaseException, code: ErrorCode) -> None:
    assert error_code(error) is code


def test_outcomes_and_kinds_print_as_they_always_did() -> None:
    assert [str(o) for o in MigrationOutcome] == ["completed", "rejected", "cancelled", "failed", "in-doubt",
                                                  "dry-run"]
    assert [str(k) for k in SnapshotKind] == ["full", "incremental", "mappable"]
    assert json.loads(json.dumps(MigrationStats().as_dict()))["outcome"] == "failed"


def test_a_second_config_or_vm_state_is_refused_not_taken_over(kvm: Kvm) -> None:
    state = sample_state(kvm)
    for twice in ("config", "vm_state"):
        writer = StreamWriter(registry(), producer=PRODUCER)
        parts = [writer.header(), writer.config(state.config), writer.layout(state.layout)]
        parts += [writer.config(state.config)] if twice == "config" else [
            writer.vm_state(state.vm), writer.vm_state(state.vm)]
        reader = StreamReader(registry(), expect=EXPECT)
        with pytest.raises(StateShapeError, match="a second"):
            Collected().take(reader.feed(b"".join(parts)))
