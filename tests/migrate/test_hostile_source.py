"""A hostile source against a real target: whatever it sends, the target refuses it with a typed
error that travels back to the source, before any VM exists where it can, tearing down the one
it built where it cannot; and its memory stays bounded whatever it is sent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import msgpack
import pytest
from hostile import (FakeSource, empty_arrays, hello_body_with, hello_fields, hello_for, kvm_vm_fds,
                     raw_frame, sample_state, with_config)

import formats
from formats import SectionKind
from hv.devices.i8042 import I8042State
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import standard_layout
from migrate.errors import IncompatibleError, MissingSections, ProtocolViolation, StateShapeError
from migrate.protocol import Accept, Commit, Complete, ErrorCode, MessageKind, Ready, Reject, State
from migrate.state import VirtioSpec, layout_for, registry
from migrate.transport.framing import encode

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def state(kvm: Kvm):
    return sample_state(kvm)


def _refused(fake: FakeSource, error_type: type, code: ErrorCode) -> str:
    """The target raised `error_type`, told the source `code`, and left no VM behind."""
    told = fake.error_told()
    error = fake.finish()
    assert isinstance(error, error_type), repr(error)
    assert told.code is code, told
    assert kvm_vm_fds() == fake.vms_before
    return told.message


# --- the handshake --------------------------------------------------------------------------------


def test_a_guest_larger_than_the_target_offers_is_rejected_before_any_vm(kvm: Kvm, state) -> None:
    big = 64 * GiB
    claimed = replace(with_config(state, mem_size=big), layout=layout_for(VmConfig(mem_size=big), standard_layout()))
    fake = FakeSource(kvm, max_mem=1 * GiB)
    fake.send(fake.hello(claimed))
    reply = fake.receive()
    assert isinstance(reply, Reject)
    assert any("65536 MiB of RAM" in p and "at most 1024 MiB" in p for p in reply.problems), reply.problems
    assert isinstance(fake.finish(), IncompatibleError)
    assert kvm_vm_fds() == fake.vms_before


def test_by_default_the_target_offers_what_the_host_can_reserve(kvm: Kvm, state) -> None:
    from migrate.live.admission import host_reservable_memory

    huge = 1 << 50  # a petabyte: more than any host here has
    assert host_reservable_memory() < huge
    claimed = replace(with_config(state, mem_size=huge), layout=layout_for(VmConfig(mem_size=huge), standard_layout()))
    fake = FakeSource(kvm)
    fake.send(fake.hello(claimed))
    reply = fake.receive()
    assert isinstance(reply, Reject) and "this target offers at most" in reply.problems[0]
    assert isinstance(fake.finish(), IncompatibleError)


@pytest.mark.parametrize("missing", ["config", "layout"])
def test_a_hello_without_config_or_layout_is_a_protocol_violation(kvm: Kvm, state, missing: str) -> None:
    fake = FakeSource(kvm)
    fake.send(fake.hello(state, **{missing: b""}))
    message = _refused(fake, ProtocolViolation, ErrorCode.PROTOCOL)
    assert "HELLO carried" in message


def test_a_hello_carrying_state_sections_is_a_protocol_violation(kvm: Kvm, state) -> None:
    fake = FakeSource(kvm)
    hello = fake.hello(state)
    extra = fake.writer.vcpu(state.vcpus[0])  # a VCPU section slipped in after the layout
    fake.send(replace(hello, layout=hello.layout + extra))
    assert "VcpuRecord" in _refused(fake, ProtocolViolation, ErrorCode.PROTOCOL)


@pytest.mark.parametrize("first", ["commit", "ready", "complete"])
def test_a_message_before_hello_is_a_protocol_violation(kvm: Kvm, first: str) -> None:
    fake = FakeSource(kvm)
    fake.send({"commit": Commit(), "ready": Ready(), "complete": Complete(b"")}[first])
    assert "cannot receive" in _refused(fake, ProtocolViolation, ErrorCode.PROTOCOL)


@pytest.mark.parametrize("then", ["commit", "ready", "second hello"])
def test_out_of_order_after_accept_is_a_protocol_violation_and_the_vm_is_discarded(kvm: Kvm, state,
                                                                                    then: str) -> None:
    fake = FakeSource(kvm)
    hello = fake.hello(state)
    fake.send(hello)
    assert isinstance(fake.receive(), Accept)  # the target built its VM now
    fake.send({"commit": Commit(), "ready": Ready(), "second hello": hello}[then])
    assert "cannot receive" in _refused(fake, ProtocolViolation, ErrorCode.PROTOCOL)


def test_an_oversized_hello_is_refused_from_its_frame_header(kvm: Kvm, state) -> None:
    fake = FakeSource(kvm)
    fake.send_raw(raw_frame(MessageKind.HELLO, b"\0" * 24 * MiB))
    assert "frame" in _refused(fake, ProtocolViolation, ErrorCode.PROTOCOL)


def test_a_msgpack_bomb_in_hello_is_refused_by_the_budget(kvm: Kvm, state) -> None:
    fake = FakeSource(kvm)
    body = hello_body_with(hello_fields(fake.hello(state)), "padding", empty_arrays(3 * MiB))
    fake.send_raw(raw_frame(MessageKind.HELLO, body))
    assert "undecodable" in _refused(fake, ProtocolViolation, ErrorCode.PROTOCOL)


def test_a_bomb_in_the_cpuid_is_a_bad_stream(kvm: Kvm, state) -> None:
    fake = FakeSource(kvm)
    hello = fake.hello(state)
    fake.send(replace(hello, cpuid=empty_arrays(3 * MiB)))
    assert "values" in _refused(fake, formats.SchemaError, ErrorCode.BAD_STREAM)


# --- the state ------------------------------------------------------------------------------------


def _accepted(kvm: Kvm, state) -> FakeSource:
    fake = FakeSource(kvm)
    fake.send(fake.hello(state))
    assert isinstance(fake.receive(), Accept)
    return fake


def test_a_device_state_nested_450_deep_is_a_schema_error(kvm: Kvm, state) -> None:
    fake = _accepted(kvm, state)
    reg = fake.writer.registry
    entry = reg.to_wire(state.devices[0][0])[2]
    wire = reg.to_wire(state.devices[0][1])
    for _ in range(450):
        wire = ["formats.device", 1, {"entry": entry, "state": wire}]
    fake.send(State(fake.section(SectionKind.DEVICE, msgpack.packb(wire, use_bin_type=True))))
    assert "nesting" in _refused(fake, formats.SchemaError, ErrorCode.BAD_STREAM)


def _complete(fake: FakeSource, state, devices) -> None:
    shaped = replace(state, devices=tuple(devices))
    fake.send(State(fake.state_payload(shaped)))
    fake.send(Complete(fake.writer.end(0)))


def test_a_state_without_the_vm_state_is_refused_before_it_is_applied(kvm: Kvm, state) -> None:
    fake = _accepted(kvm, state)
    fake.send(State(b"".join(fake.writer.vcpu(v) for v in state.vcpus)))
    fake.send(Complete(fake.writer.end(0)))
    assert "VM_STATE" in _refused(fake, MissingSections, ErrorCode.BAD_STREAM)


def test_an_unknown_device_id_is_refused_before_it_is_applied(kvm: Kvm, state) -> None:
    fake = _accepted(kvm, state)
    entry, saved = state.devices[-1]
    _complete(fake, state, [*state.devices, (replace(entry, device_id="evil0"), saved)])
    assert "'evil0', which the layout does not have" in _refused(fake, StateShapeError, ErrorCode.BAD_STREAM)


def test_a_device_state_of_the_wrong_type_is_refused_before_it_is_applied(kvm: Kvm, state) -> None:
    fake = _accepted(kvm, state)
    devices = [(e, I8042State() if e.device_id == "serial0" else s) for e, s in state.devices]
    message = _refused_after(fake, state, devices)
    assert "'serial0' (serial-16550): its state is a I8042State" in message


def test_a_device_of_the_layout_without_state_is_refused(kvm: Kvm, state) -> None:
    fake = _accepted(kvm, state)
    message = _refused_after(fake, state, [d for d in state.devices if d[0].device_id != "serial0"])
    assert "'serial0' of the layout has no state" in message


def _refused_after(fake: FakeSource, state, devices) -> str:
    _complete(fake, state, devices)
    return _refused(fake, StateShapeError, ErrorCode.BAD_STREAM)


def test_state_sections_in_a_pages_message_are_a_protocol_violation(kvm: Kvm, state) -> None:
    from migrate.protocol import Pages

    fake = _accepted(kvm, state)
    fake.send(Pages(0, fake.writer.vcpu(state.vcpus[0])))
    assert "PAGES carried a VcpuRecord" in _refused(fake, ProtocolViolation, ErrorCode.PROTOCOL)


# --- the disk -------------------------------------------------------------------------------------


def _with_disk(kvm: Kvm, disk: str):
    """A state whose guest has a virtio disk at `disk` (on the source's host, it says)."""
    virtio = VirtioSpec(disk=disk)
    base = sample_state(kvm)
    config = replace(base.config, virtio=virtio)
    layout = layout_for(config.vm_config(), standard_layout(virtio.device_ids()))
    return replace(base, config=config, layout=layout)


def test_a_disk_path_from_the_stream_is_never_opened(kvm: Kvm, tmp_path: Path) -> None:
    victim = tmp_path / "victim.img"
    victim.write_bytes(b"precious" * 512)
    before = victim.stat()
    fake = FakeSource(kvm)  # no --disk, no --disk-dir
    fake.send(fake.hello(_with_disk(kvm, str(victim))))
    reply = fake.receive()
    assert isinstance(reply, Reject)
    assert any("never opened" in p and str(victim) in p for p in reply.problems), reply.problems
    assert isinstance(fake.finish(), IncompatibleError)
    after = victim.stat()
    assert victim.read_bytes() == b"precious" * 512
    assert (after.st_mtime_ns, after.st_ino) == (before.st_mtime_ns, before.st_ino)


def test_a_disk_dir_takes_only_the_streams_file_name(kvm: Kvm, tmp_path: Path) -> None:
    disks = tmp_path / "disks"
    disks.mkdir()
    (disks / "victim.img").write_bytes(bytes(MiB))  # the target's own disk of that name
    elsewhere = tmp_path / "victim.img"
    elsewhere.write_bytes(b"precious" * 512)
    fake = FakeSource(kvm, disk_dir=str(disks))
    fake.send(fake.hello(_with_disk(kvm, str(elsewhere))))
    assert isinstance(fake.receive(), Accept)
    fds = {Path(f"/proc/self/fd/{fd}").resolve() for fd in (p.name for p in Path("/proc/self/fd").iterdir())
           if Path(f"/proc/self/fd/{fd}").exists()}
    assert (disks / "victim.img").resolve() in fds and elsewhere.resolve() not in fds
    fake.send(Commit())  # out of order: the target gives up and discards its VM
    fake.error_told()
    fake.finish()
    assert elsewhere.read_bytes() == b"precious" * 512


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "missing"])
def test_a_disk_dir_entry_that_is_not_a_regular_file_is_refused(kvm: Kvm, tmp_path: Path, kind: str) -> None:
    import os

    disks = tmp_path / "disks"
    disks.mkdir()
    victim = tmp_path / "victim.img"
    victim.write_bytes(b"precious" * 512)
    entry = disks / "disk.img"
    if kind == "symlink":
        entry.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(entry)
    elif kind == "directory":
        entry.mkdir()
    fake = FakeSource(kvm, disk_dir=str(disks))
    fake.send(fake.hello(_with_disk(kvm, "/anywhere/disk.img")))
    reply = fake.receive()
    assert isinstance(reply, Reject), reply
    assert any("disk" in p for p in reply.problems)
    assert isinstance(fake.finish(), IncompatibleError)
    assert victim.read_bytes() == b"precious" * 512


# --- memory, measured in a process of its own -----------------------------------------------------

_TARGET = textwrap.dedent("""
    import json, sys
    from hv.kvm.kvm import Kvm
    from migrate import ReceiveOptions, listen_and_receive
    from migrate.transport.listener import Listener
    from migrate.state import registry

    def peak_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

    registry()
    kvm = Kvm()
    listener = Listener("127.0.0.1:0", b"")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak starts again from what is resident now
    print(json.dumps({"address": listener.address, "kib": peak_kib()}), flush=True)
    try:
        listen_and_receive(listener, kvm, ReceiveOptions(timeout=30), accept_timeout=30)
        error = None
    except BaseException as e:
        error = type(e).__name__
    print(json.dumps({"error": error, "kib": peak_kib()}), flush=True)
""")


@pytest.mark.parametrize("attack", ["24 MiB HELLO", "bomb within the cap", "bomb in the cpuid"])
def test_the_receivers_peak_memory_stays_bounded_whatever_it_is_sent(kvm: Kvm, state, attack: str) -> None:
    """SPEC.md section 8: before any VM exists a receiver holds at most one frame of its kind's
    cap (4 MiB for HELLO), its copy, and a budget's worth of objects. Unbounded, these cost
    1.5 GiB (a 24 MiB HELLO of empty arrays) or ~200 MiB (a 3 MiB bomb)."""
    from migrate.transport.connection import connect

    proc = subprocess.Popen([sys.executable, "-c", _TARGET], stdout=subprocess.PIPE, text=True)
    try:
        start = json.loads(proc.stdout.readline())
        conn = connect(start["address"], b"")
        hello = hello_for(formats.StreamWriter(registry(), producer="test"), state)
        if attack == "24 MiB HELLO":
            frame = raw_frame(MessageKind.HELLO, hello_body_with(hello_fields(hello), "padding",
                                                                 empty_arrays(24 * MiB)))
        elif attack == "bomb within the cap":
            frame = raw_frame(MessageKind.HELLO, hello_body_with(hello_fields(hello), "padding",
                                                                 empty_arrays(3 * MiB + MiB // 2)))
        else:
            from migrate.transport.framing import encode
            frame = b"".join(bytes(p) for p in encode(replace(hello, cpuid=empty_arrays(3 * MiB + MiB // 2))))
        try:
            conn.sock.sendall(frame)
            conn.sock.shutdown(socket.SHUT_WR)  # all sent: the target, having told why, need not wait for more
        except OSError:
            pass  # the target may stop reading as soon as it has the frame header
        end = json.loads(proc.stdout.readline())
        conn.close()
        proc.wait(30)
    finally:
        proc.kill()
    assert end["error"] in ("ProtocolViolation", "SchemaError"), end
    grew_mib = (end["kib"] - start["kib"]) / 1024
    assert grew_mib < 24, f"the receiver's peak RSS grew by {grew_mib:.0f} MiB"


def test_migrate_recv_takes_no_more_guest_ram_than_its_mem_option(kvm: Kvm) -> None:
    from hv.guests import builtin as bg
    from hv.vmm.builder import builtin_machine
    from migrate import MigrationOptions, send
    from migrate.transport.listener import Listener

    probe = Listener("127.0.0.1:0", b"")
    address = probe.address
    probe.close()
    recv = subprocess.Popen([sys.executable, "-m", "migrate.cli", "recv", "--listen", address, "--mem", "32M",
                             "--accept-timeout", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=64 * MiB))
    try:
        assert "listening on" in recv.stderr.readline()
        machine.start()
        stats = send(machine, address, MigrationOptions(timeout=10))
        assert stats.outcome == "rejected"
        assert stats.problems == ["the guest has 64 MiB of RAM; this target offers at most 32 MiB"]
        assert machine.state.value == "running"
    finally:
        recv.kill()
        machine.stop()
        machine.vm.close()


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_state_bomb_after_accept_costs_no_more_than_the_stated_bound(kvm: Kvm, state) -> None:
    """SPEC.md section 8: while it decodes a STATE frame (at most 16 MiB) a target holds at most
    three copies of it and a budget's worth of objects. 15 MiB of empty arrays decoded would be
    ~1 GiB."""
    fake = _accepted(kvm, state)
    bomb = fake.section(SectionKind.DEVICE, empty_arrays(15 * MiB))
    frame = b"".join(bytes(p) for p in encode(State(bomb)))  # the fake's own copies made before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # this process's peak starts again from what is resident now
    start = _peak_kib()
    fake.send_raw(frame)
    del frame
    told = _refused(fake, formats.SchemaError, ErrorCode.BAD_STREAM)
    grew_mib = (_peak_kib() - start) / 1024
    assert "values" in told
    assert grew_mib < 4 * 16, f"the target's peak RSS grew by {grew_mib:.0f} MiB for a 15 MiB STATE"


def test_an_applied_the_link_refuses_leaves_the_sources_cancel_to_be_read(kvm: Kvm, state, monkeypatch) -> None:
    """Applied is advisory: a target whose Applied cannot go (the source cancelled and closed its
    end meanwhile: a suite run met it) reads on, and ends on the source's Cancel, not on
    a broken pipe."""
    from migrate.errors import MigrationFailed, TransportError
    from migrate.live.link import TargetLink
    from migrate.protocol import Applied, Cancel, RoundDone

    tell = TargetLink.tell

    def refusing(self, message) -> None:
        if isinstance(message, Applied):
            raise TransportError("sending Applied: [Errno 32] Broken pipe")
        tell(self, message)

    monkeypatch.setattr(TargetLink, "tell", refusing)
    fake = FakeSource(kvm)
    fake.send(fake.hello(state, round_acks=True))
    accept = fake.receive()
    assert isinstance(accept, Accept) and accept.round_acks
    fake.send(RoundDone(0, 0, ack=True))
    fake.send(Cancel("the user"))
    error = fake.finish()
    assert isinstance(error, MigrationFailed) and "cancelled" in str(error), repr(error)
    assert kvm_vm_fds() == fake.vms_before
