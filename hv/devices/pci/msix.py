"""MSI-X (PCI Local Bus 3.0, 6.8.2): the capability, the vector table and the pending bits, with
each vector delivered through KVM GSI routing and an irqfd.

The capability (12 bytes) holds Message Control (table size - 1 read-only; Function Mask, bit
14, and MSI-X Enable, bit 15, writable), the table's BAR and offset and the PBA's. Each table
entry is 16 bytes: message address (low, high), message data, vector control (bit 0: masked;
every entry starts masked). The PBA has one read-only bit per vector.

Delivery: vector v owns GSI `gsi_base + v` and an eventfd registered with KVM_IRQFD on it. A
vector fired while MSI-X is enabled and neither the function nor the vector is masked has its
GSI routed to the entry's message (KVM_SET_GSI_ROUTING, only when the entry changed since the
last route) and its eventfd written: KVM injects the message without a VMM exit. Fired while
masked, its pending bit is set instead and nothing is sent; when the mask goes (vector control
or Function Mask written, or Enable set) a pending vector is sent and its bit cleared, as the
spec asks. Masking is kept here, in the VMM, not by unrouting in KVM: the PBA must say what
is pending, and only the VMM knows.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hv.errors import KvmIoctlError, StateRestoreError
from hv.persist import check_bytes, check_equal, check_int

from .config import PciConfigSpace

if TYPE_CHECKING:
    from hv.kvm.vm import Vm

log = logging.getLogger(__name__)

CAP_ID_MSIX = 0x11
ENTRY_SIZE = 16
CONTROL_ENABLE, CONTROL_FUNCTION_MASK = 0x8000, 0x4000
VECTOR_MASKED = 0x1
MAX_VECTORS = 2048
NO_VECTOR = 0xFFFF  # what virtio (and Linux) write for "no vector"


@dataclass(frozen=True)
class MsixState:
    """The vector table (16 bytes an entry) and the pending bits; Message Control lives in the
    configuration space, which the function saves beside this."""

    table: bytes
    pending: int = 0


class MsixVectors:
    """The MSI-X capability of one function and its table in BAR `bar` at `table_offset`, its
    PBA at `pba_offset` of the same BAR."""

    def __init__(self, config: PciConfigSpace, vectors: int, bar: int, table_offset: int, pba_offset: int) -> None:
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"{vectors} MSI-X vectors (1..{MAX_VECTORS})")
        self.vectors = vectors
        self.config = config
        self.bar, self.table_offset, self.pba_offset = bar, table_offset, pba_offset
        body = ((vectors - 1).to_bytes(2, "little") + (table_offset | bar).to_bytes(4, "little")
                + (pba_offset | bar).to_bytes(4, "little"))
        self.capability = config.add_capability(CAP_ID_MSIX, body, writable=bytes([0x00, 0xC0]) + bytes(8))
        self._table = bytearray(self._power_on_table())
        self._pending = 0
        self._lock = threading.Lock()
        self._vm: Vm | None = None
        self._fds: list[int] = []
        self._close_lock = threading.Lock()
        self._gsi_base = 0
        self._routed: dict[int, tuple[int, int]] = {}
        self.sent = [0] * vectors  # messages sent, per vector (stats and tests)

    def _power_on_table(self) -> bytes:
        return (bytes(12) + VECTOR_MASKED.to_bytes(4, "little")) * self.vectors

    @property
    def table_size(self) -> int:
        return self.vectors * ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        return ((self.vectors + 63) // 64) * 8

    # --- KVM wiring ------------------------------------------------------------------------------

    def connect(self, vm: Vm, gsi_base: int) -> None:
        """One eventfd per vector, an irqfd on GSI gsi_base + v; routes follow the table."""
        self._vm, self._gsi_base = vm, gsi_base
        for v in range(self.vectors):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._fds.append(fd)
            vm.register_irqfd(fd, gsi_base + v)

    def close(self) -> None:
        """Idempotent, and safe from two threads at once (a machine stopped by a control command
        and by its run's end together): each fd is taken by one caller and closed once."""
        with self._close_lock:
            vm, self._vm = self._vm, None
            fds, self._fds = self._fds, []
        for v, fd in enumerate(fds):
            if vm is not None:
                try:
                    vm.unregister_irqfd(fd, self._gsi_base + v)
                    vm.clear_msi_route(self._gsi_base + v)
                except KvmIoctlError as e:  # the VM is closed already: its routes went with it
                    log.debug("msix: irqfd not unregistered: %s", e)
            os.close(fd)

    # --- Message Control (in configuration space) ------------------------------------------------

    @property
    def control(self) -> int:
        return self.config.read(self.capability + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self.control & CONTROL_ENABLE)

    def control_written(self) -> None:
        """After a configuration write: Enable set or Function Mask cleared may free pending
        vectors."""
        with self._lock:
            self._send_pending()

    # --- the table and the PBA (BAR accesses) ----------------------------------------------------

    def _entry(self, v: int) -> tuple[int, int, int]:
        """(address, data, vector control) of entry v."""
        e = self._table[v * ENTRY_SIZE : (v + 1) * ENTRY_SIZE]
        return (int.from_bytes(e[0:8], "little"), int.from_bytes(e[8:12], "little"),
                int.from_bytes(e[12:16], "little"))

    def read_table(self, offset: int, size: int) -> int:
        with self._lock:
            return int.from_bytes(self._table[offset : offset + size].ljust(size, b"\0"), "little")

    def write_table(self, offset: int, size: int, value: int) -> None:
        """Dword or qword writes (the spec's only sizes); others are ignored. Reserved vector
        control bits and the address's low 2 bits stay 0."""
        if size not in (4, 8) or offset % size or offset + size > self.table_size:
            return
        with self._lock:
            for at, dword in ((offset, value & 0xFFFF_FFFF), (offset + 4, value >> 32))[: size // 4]:
                field = at % ENTRY_SIZE
                if field == 0:
                    dword &= ~0x3
                elif field == 12:
                    dword &= VECTOR_MASKED
                self._table[at : at + 4] = dword.to_bytes(4, "little")
            self._send_pending()

    def read_pba(self, offset: int, size: int) -> int:
        with self._lock:
            pba = self._pending.to_bytes(self.pba_size, "little")
        return int.from_bytes(pba[offset : offset + size].ljust(size, b"\0"), "little")

    # --- delivery --------------------------------------------------------------------------------

    def masked(self, v: int) -> bool:
        return bool(self.control & CONTROL_FUNCTION_MASK or self._entry(v)[2] & VECTOR_MASKED)

    def fire(self, v: int) -> bool:
        """Signal vector v: sent, or held pending while masked. False when MSI-X is off (the
        caller uses INTx) or v is not a vector (NO_VECTOR: the driver asked for none)."""
        if v >= self.vectors or not self.enabled:
            return False
        with self._lock:
            if self.masked(v):
                self._pending |= 1 << v
            else:
                self._send(v)
        return True

    def direct_fd(self, v: int) -> int | None:
        """Vector v's irqfd, its route current, for a device thread to signal itself (without
        this class: a C engine), or None while a message could not go straight to the guest
        (MSI-X off, the function or the vector masked, no such vector, no VM): then the
        device signals through `fire`, which keeps the pending bit. The caller asks again
        whenever the table or Message Control changed."""
        with self._lock:
            if v >= self.vectors or not self.enabled or self.masked(v) or self._vm is None or not self._fds:
                return None
            address, data, _ = self._entry(v)
            self._route(v, address, data)
            return self._fds[v]

    def _send_pending(self) -> None:
        if not self.enabled or not self._pending:
            return
        for v in range(self.vectors):
            if self._pending >> v & 1 and not self.masked(v):
                self._pending &= ~(1 << v)
                self._send(v)

    def _send(self, v: int) -> None:
        address, data, _ = self._entry(v)
        self.sent[v] += 1
        if self._vm is None:
            log.debug("msix: vector %d has no VM to go to", v)
            return
        self._route(v, address, data)
        os.eventfd_write(self._fds[v], 1)

    def _route(self, v: int, address: int, data: int) -> None:
        """GSI gsi_base + v to the entry's message, if it changed since the last route."""
        assert self._vm is not None
        if self._routed.get(v) != (address, data):
            self._vm.set_msi_route(self._gsi_base + v, address, data)
            self._routed[v] = (address, data)

    # --- state -----------------------------------------------------------------------------------

    def save(self) -> MsixState:
        with self._lock:
            return MsixState(bytes(self._table), self._pending)

    def check(self, owner: str, state: MsixState) -> None:
        """Everything `apply` needs, checked before any of it is applied."""
        check_bytes(owner, "msix.table", state.table, self.table_size)
        check_equal(owner, "msix.table length", self.table_size, len(state.table))
        check_int(owner, "msix.pending", state.pending, 0, (1 << self.vectors) - 1)
        for v in range(self.vectors):
            control = int.from_bytes(state.table[v * ENTRY_SIZE + 12 : (v + 1) * ENTRY_SIZE], "little")
            if control & ~VECTOR_MASKED or state.table[v * ENTRY_SIZE] & 0x3:
                entry = state.table[v * ENTRY_SIZE : (v + 1) * ENTRY_SIZE].hex()
                raise StateRestoreError(owner, f"msix.table[{v}]", "reserved bits 0", entry)

    def apply(self, state: MsixState) -> None:
        """Take a checked state; pending vectors stay pending until their mask goes (a message
        sent before the save is in the vCPU's LAPIC state already)."""
        with self._lock:
            self._table[:] = state.table
            self._pending = state.pending
            self._routed.clear()

    def reset(self) -> None:
        with self._lock:
            self._table[:] = self._power_on_table()
            self._pending = 0
