"""Protocol-speaking fakes for the hostile-peer tests: a source that sends what it likes to a real
target, and a target that answers a real source with what it likes. They speak the real framing
and authentication (so what they send reaches the code under test), and build their messages from
a real machine's state, changed only where a test says."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack

from formats import SectionKind, StreamWriter
from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import builtin_machine
from migrate.options import ReceiveOptions
from migrate.protocol import PROTOCOL_VERSION, Error, Hello, Message, MessageKind
from migrate.records import state_sections
from migrate.state import PRODUCER, GuestCpuid, MachineState, capture, registry
from migrate.live.target import receive
from migrate.transport.connection import Connection, connect
from migrate.transport.framing import FRAME, encode
from migrate.transport.listener import Listener

MiB = 1 << 20


def kvm_vm_fds(pid: int | str = "self") -> int:
    """VMs this process (or process `pid`) holds open: a refused migration must leave none behind."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:kvm-vm"
        except OSError:
            pass
    return count


def sample_state(kvm: Kvm, mem: int = 64 * MiB) -> MachineState:
    """A real machine's whole state (built, never run, then closed)."""
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=mem))
    try:
        return capture(machine)
    finally:
        machine.vm.close()


def hello_for(writer: StreamWriter, state: MachineState, *, config: bytes | None = None,
              layout: bytes | None = None, **fields: Any) -> Hello:
    """HELLO for `state`: the stream's header and CONFIG, its LAYOUT, the guest's CPUID (`config`
    and `layout`: other bytes in their place)."""
    head = writer.header()
    cfg = head + (writer.config(state.config) if config is None else config)
    lay = writer.layout(state.layout) if layout is None else layout
    cpuid = registry().encode(GuestCpuid(state.vcpus[0].cpuid))
    return Hello(PROTOCOL_VERSION, "2.0", PRODUCER, cfg, lay, cpuid, **fields)


def raw_frame(kind: int, body: bytes) -> bytes:
    return FRAME.pack(len(body), kind) + body


class FakeSource:
    """Speaks to a real `receive` running on a thread of this process; sends frames as told."""

    def __init__(self, kvm: Kvm, **receive_options: Any) -> None:
        self.listener = Listener("127.0.0.1:0", b"")
        self.error: BaseException | None = None
        self.incoming = None
        self.vms_before = kvm_vm_fds()
        self.writer = StreamWriter(registry(), producer=PRODUCER)
        self._thread = threading.Thread(target=self._serve, args=(kvm, receive_options), daemon=True)
        self._thread.start()
        self.conn: Connection = connect(self.listener.address, b"")

    def _serve(self, kvm: Kvm, options: dict[str, Any]) -> None:
        try:
            conn = self.listener.accept(20)
            try:
                self.incoming = receive(conn, kvm, ReceiveOptions(**{"timeout": 20, **options}))
            finally:
                conn.close()
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e
        finally:
            self.listener.close()

    def hello(self, state: MachineState, **changes: Any) -> Hello:
        return hello_for(self.writer, state, **changes)

    def send(self, message: Message) -> None:
        for part in encode(message):
            self.conn.sock.sendall(part)

    def send_raw(self, data: bytes) -> None:
        self.conn.sock.sendall(data)

    def receive(self) -> Message:
        return self.conn.receive(20)

    def state_payload(self, state: MachineState) -> bytes:
        return b"".join(state_sections(self.writer, state))

    def section(self, kind: SectionKind, body: bytes) -> bytes:
        return self.writer.section(kind, body)

    def finish(self) -> BaseException | None:
        """Wait for the target to give up (or finish); what it raised. This side stops sending
        first, as a real source does once it has read the target's refusal: the target, having
        told why, drains the link until the peer's end (`Connection.close_after_telling`) and
        would otherwise wait out its 2 s for an end that never comes. What it still sends can be
        read (`receive`)."""
        try:
            self.conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the target already reset the link
        self._thread.join(30)
        assert not self._thread.is_alive(), "the target is still running"
        try:
            self.conn.close()
        except OSError:
            pass
        return self.error

    def error_told(self) -> Error:
        """The Error the target sent back (skipping an Accept it sent first)."""
        while True:
            message = self.receive()
            if isinstance(message, Error):
                return message


def hello_body_with(fields: dict[str, Any], key: str, raw_value: bytes) -> bytes:
    """A HELLO body: the msgpack map of `fields` plus `key` holding `raw_value` (msgpack bytes
    written as they are, so a bomb need not be built as Python objects first)."""
    assert len(fields) < 15
    out = bytearray([0x80 | (len(fields) + 1)])
    for k, v in fields.items():
        out += msgpack.packb(k) + msgpack.packb(v, use_bin_type=True)
    return bytes(out + msgpack.packb(key) + raw_value)


def hello_fields(hello: Hello) -> dict[str, Any]:
    return {k: getattr(hello, k) for k in ("protocol_version", "format_version", "producer", "config",
                                           "layout", "cpuid", "dry_run", "streams")}


def empty_arrays(n: int) -> bytes:
    """About `n` empty arrays, in arrays of 65535 (so no one array is longer than msgpack's own
    per-container limits allow): ~n bytes, ~64 n bytes of Python objects once decoded."""
    chunk, count = 65535, -(-n // 65535)
    inner = b"\xdc" + chunk.to_bytes(2, "big") + b"\x90" * chunk
    return b"\xdd" + count.to_bytes(4, "big") + inner * count


class FakeTarget:
    """A target that authenticates a real source, reads its HELLO and answers with `reply` (raw
    bytes: frames as a test builds them)."""

    def __init__(self, reply: bytes, after: int = 0) -> None:
        self.listener = Listener("127.0.0.1:0", b"")
        self.address = self.listener.address
        self.reply, self.after = reply, after
        self.got: list[Message] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn = self.listener.accept(20)
            try:
                self.got.append(conn.receive(20))  # HELLO
                threading.Thread(target=self._reply, args=(conn,), daemon=True).start()
                try:
                    while True:  # what the source says back (its Error, say)
                        self.got.append(conn.receive(5))
                except Exception:  # noqa: BLE001 - the source hung up
                    pass
            finally:
                conn.close()
        finally:
            self.listener.close()

    def _reply(self, conn: Connection) -> None:
        try:
            conn.sock.sendall(self.reply)
        except OSError:
            pass  # the source stopped reading (as it should, past a frame's cap) and hung up

    def join(self) -> None:
        self._thread.join(30)


def frame_of(kind: MessageKind, fields: dict[str, Any]) -> bytes:
    return raw_frame(kind, msgpack.packb(fields, use_bin_type=True))


def with_config(state: MachineState, **changes: Any) -> MachineState:
    return replace(state, config=replace(state.config, **changes))


__all__ = ["FakeSource", "FakeTarget", "empty_arrays", "frame_of", "hello_body_with", "hello_fields", "hello_for",
           "kvm_vm_fds", "raw_frame", "sample_state", "with_config"]
