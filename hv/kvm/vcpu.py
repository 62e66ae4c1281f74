"""A vCPU: typed exits from KVM_RUN, registers, and the complete architectural state.

Over 450 lines because it is one object's one concern, the vCPU file descriptor: running it and
answering its exits, its registers, and saving/restoring all of its state in the kernel's order.

State is saved and restored in a fixed order (`SAVE_ORDER`, `RESTORE_ORDER`); the reasons are
kernel facts, each written beside its step (from api.rst and Firecracker's notes on them).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any

from hv.binding import structconv
from hv.binding.fds import VcpuFd, new_flexible
from hv.binding.ffi import ffi, lib
from hv.errors import KvmIoctlError, VcpuStateError
from hv.kvm.exits import (
    DebugExit,
    FailEntry,
    Hlt,
    InternalError,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    Shutdown,
    SystemEvent,
    UnknownExit,
    VcpuExit,
)
from hv.persist import U32, U64, check_equal, check_int, check_ints, check_type
from hv.kvm.state import (
    CpuidEntry,
    DebugRegs,
    Fpu,
    Msr,
    Regs,
    Sregs,
    VcpuEvents,
    VcpuState,
    Xcr,
)

if TYPE_CHECKING:
    from hv.kvm.vm import Vm

structconv.prepare(Regs, Sregs, Fpu, DebugRegs, VcpuEvents, CpuidEntry, Xcr)

# (part, why it is at this position). Restore walks this list top to bottom.
RESTORE_ORDER: tuple[tuple[str, str], ...] = (
    ("cpuid", "first: KVM checks CR4, XSAVE features and MSRs against the guest CPUID"),
    ("mp_state", "before registers: KVM_SET_MP_STATE may reset a vCPU that is not runnable"),
    ("regs", "before events: KVM_SET_REGS clears a pending exception, which events restore"),
    ("sregs", "before the LAPIC: KVM_SET_SREGS restores the APIC base MSR the LAPIC lives at"),
    ("fpu", "before XSAVE: the XSAVE area is the complete copy and overwrites the FPU part"),
    ("xsave", "after CPUID: the accepted features follow the guest's CPUID leaf 0xD"),
    ("xcrs", "after XSAVE, as the kernel documents the pair"),
    ("debug_regs", "independent of the rest"),
    ("lapic", "after sregs (APIC base), before MSRs (the TSC-deadline MSR needs the LAPIC mode)"),
    ("msrs", "after the LAPIC; writes IA32_TSC, so the TSC restarts from the saved value"),
    ("events", "last: pending exceptions/interrupts/NMIs/SIPI would be cleared by earlier sets"),
)
# x86-64 general-purpose registers by their number in instruction encodings (ModRM/REX: 0 is RAX,
# 1 RCX, 2 RDX, 3 RBX, 4 RSP, ...), the index axvcpu's set_gpr takes.
GPR_NAMES: tuple[str, ...] = (
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
SAVE_ORDER: tuple[str, ...] = (
    "mp_state", "regs", "sregs", "fpu", "xsave", "xcrs", "debug_regs", "lapic", "msrs",
    "events", "cpuid",
)


def _msr_buffer(indices: Sequence[int]) -> Any:
    msrs = new_flexible("struct kvm_msrs *", "entries", len(indices))
    msrs.nmsrs = len(indices)
    for i, index in enumerate(indices):
        msrs.entries[i].index = index
    return msrs


def _check_u64(register: str, value: int) -> None:
    if type(value) is not int or not 0 <= value <= U64:
        raise ValueError(f"{register} holds 64 bits unsigned, not {value!r}")


def _value_bytes(value: int, size: int) -> bytes:
    if not 0 <= value < 1 << (8 * size):
        raise ValueError(f"return value {value:#x} does not fit the exit's {size} bytes")
    return value.to_bytes(size, "little")


class SaveableMsrs:
    """The MSRs KVM lists as saved state (KVM_GET_MSR_INDEX_LIST) that a vCPU of this host lets
    us read. KVM_GET_MSRS stops at the first MSR it refuses and returns how many it read; such MSRs
    are dropped one at a time. Probed once per host, on the first vCPU that asks (the answer depends
    on the host CPU and the guest CPUID we give every vCPU, which is the same for all VMs we build):
    `Kvm` makes one and hands it to every VM it creates."""

    def __init__(self, listed: Callable[[], Sequence[int]]) -> None:
        self._listed = listed
        self._lock = threading.Lock()
        self._indices: tuple[int, ...] | None = None

    def indices(self, fd: VcpuFd) -> tuple[int, ...]:
        with self._lock:
            if self._indices is None:
                candidates = list(self._listed())
                while (n := fd.get_msrs(_msr_buffer(candidates))) != len(candidates):
                    del candidates[n]
                self._indices = tuple(candidates)
            return self._indices


class Vcpu:
    """One vCPU of a `Vm`. `run()` must be called from a single thread (the vCPU thread)."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: VcpuFd, mmap_size: int) -> None:
        self.vm = vm
        self.vcpu_id = vcpu_id
        self.fd = fd
        self._run = fd.map_run(mmap_size)
        self._run_bytes = ffi.cast("char *", self._run)
        self._exit_union = self._run_bytes + lib.KVMIG_RUN_EXIT_OFFSET
        self.thread_id: int | None = None  # pthread id of the thread in run(), for kicks
        self.native_thread_id: int | None = None  # kernel TID, for sched_setaffinity
        self._affinity: set[int] | None = None
        self._fast_pio = ffi.new("kvmig_fast_pio *")  # port ranges served in C inside run()
        self._counts = ffi.new("kvmig_run_counts *")

    # --- running ------------------------------------------------------------------------------

    def run(self, park: Any = ffi.NULL) -> VcpuExit:
        """Enter the guest until the next exit that Python must see (those of the ports claimed by
        `serve_ports` are handled on the way, in C, without the interpreter lock; so is a pause
        that `park`, a kvmig_park, holds the vCPU for)."""
        if self.fd.run(self._fast_pio, self._counts, park) < 0:
            return Interrupted()
        return self._decode_exit(self._run.exit_reason)

    def serve_ports(self, base: int, length: int, uart: Any) -> None:
        """Let `run()` handle the port exits of [base, base+length) with the C model `uart` (a
        kvmig_uart). Only before the vCPU's thread runs: the table is read without a lock."""
        table = self._fast_pio
        if self.thread_id is not None:
            raise RuntimeError(f"vCPU {self.vcpu_id}: ports are claimed before its thread starts")
        if table.n == lib.KVMIG_FAST_PIO_MAX:
            raise ValueError(f"vCPU {self.vcpu_id}: at most {lib.KVMIG_FAST_PIO_MAX} port ranges in C")
        table.base[table.n], table.len[table.n], table.uart[table.n] = base, length, uart
        table.n += 1

    @property
    def fast_io_exits(self) -> int:
        """Port exits `run()` handled in C, since the vCPU was made."""
        return self._counts.fast_io_exits

    @property
    def parks(self) -> int:
        """Times `run()` parked in C (a pause), since the vCPU was made."""
        return self._counts.parks

    @property
    def unparked_ns(self) -> int:
        """When `run()` last left its park for KVM_RUN (`time.monotonic_ns`'s clock; 0: it never
        parked): after a resume, the moment this vCPU enters the guest again."""
        return int(self._counts.unparked_ns)

    def _payload(self, ctype: str) -> Any:
        return ffi.cast(ctype, self._exit_union)

    def _decode_exit(self, reason: int) -> VcpuExit:
        if reason == lib.KVM_EXIT_IO:
            io = self._payload("kvmig_exit_io *")
            if io.direction == lib.KVM_EXIT_IO_OUT:
                data = ffi.buffer(self._run_bytes + io.data_offset, io.size * io.count)[:]
                return IoOut(io.port, io.size, data, io.count)
            return IoIn(io.port, io.size, io.count)
        if reason == lib.KVM_EXIT_MMIO:
            mmio = self._payload("kvmig_exit_mmio *")
            if mmio.is_write:
                return MmioWrite(mmio.phys_addr, bytes(mmio.data)[: mmio.len])
            return MmioRead(mmio.phys_addr, mmio.len)
        if reason == lib.KVM_EXIT_HLT:
            return Hlt()
        if reason == lib.KVM_EXIT_SHUTDOWN:
            return Shutdown()
        if reason == lib.KVM_EXIT_INTR:
            return Interrupted()
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            ev = self._payload("kvmig_exit_system_event *")
            words = ffi.cast("__u64 *", ffi.cast("char *", ev) + lib.KVMIG_SYSTEM_EVENT_DATA_OFFSET)
            return SystemEvent(ev.type, tuple(words[i] for i in range(min(ev.ndata, 16))))
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = self._payload("kvmig_exit_internal *")
            return InternalError(ie.suberror, tuple(ie.data[i] for i in range(min(ie.ndata, 16))))
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            fe = self._payload("kvmig_exit_fail_entry *")
            return FailEntry(fe.hardware_entry_failure_reason, fe.cpu)
        if reason == lib.KVM_EXIT_DEBUG:
            return DebugExit()
        hw = self._payload("kvmig_exit_hw *")
        return UnknownExit(reason, hw.hardware_exit_reason)

    def set_io_result(self, data: bytes) -> None:
        """Answer the pending IoIn exit: `data` is size * count bytes."""
        io = self._payload("kvmig_exit_io *")
        expected = io.size * io.count
        if len(data) != expected:
            raise ValueError(f"I/O result for port {io.port:#x} needs {expected} bytes, got {len(data)}")
        ffi.memmove(self._run_bytes + io.data_offset, data, expected)

    def set_mmio_result(self, data: bytes) -> None:
        mmio = self._payload("kvmig_exit_mmio *")
        if len(data) != mmio.len:
            raise ValueError(f"MMIO result at {mmio.phys_addr:#x} needs {mmio.len} bytes, got {len(data)}")
        ffi.memmove(mmio.data, data, len(data))

    def set_return_value(self, value: int) -> None:
        """What the exit the VMM just handled returns to the guest (axvcpu's set_return_value).

        For an IoIn (IN/INS) or an MmioRead exit, `value` goes where KVM completes the instruction
        from on the next KVM_RUN: the run area's data, `size` (or `len`) bytes of it, little-endian,
        which KVM then stores into AL/AX/EAX or the instruction's destination. After any other
        exit (an OUT-based hypercall: the guest writes a request to a port and reads the answer
        from RAX), RAX itself, as axvcpu's x86 vCPU does it."""
        if self._run.exit_reason == lib.KVM_EXIT_IO:
            io = self._payload("kvmig_exit_io *")
            if io.direction != lib.KVM_EXIT_IO_OUT:
                self.set_io_result(_value_bytes(value, io.size) * io.count)
                return
        elif self._run.exit_reason == lib.KVM_EXIT_MMIO:
            mmio = self._payload("kvmig_exit_mmio *")
            if not mmio.is_write:
                self.set_mmio_result(_value_bytes(value, mmio.len))
                return
        self.set_gpr(0, value)

    @property
    def immediate_exit(self) -> bool:
        return bool(self._run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self._run.immediate_exit = 1 if value else 0

    # --- thread placement -----------------------------------------------------------------------

    def bind(self, host_cpu: int) -> None:
        """Pin the vCPU's thread to `host_cpu` (at once if the thread exists, else when it starts)."""
        self._affinity = {host_cpu}
        self.apply_affinity()

    def unbind(self) -> None:
        """Let the vCPU's thread run on every CPU this process may use."""
        self._affinity = os.sched_getaffinity(0)
        self.apply_affinity()

    def attach_thread(self) -> None:
        """Called by the thread that will run this vCPU."""
        self.thread_id = threading.get_ident()
        self.native_thread_id = threading.get_native_id()
        self.apply_affinity()

    def apply_affinity(self) -> None:
        # sched_setaffinity takes a kernel TID, so any thread may place the vCPU thread.
        if self._affinity is not None and self.native_thread_id is not None:
            os.sched_setaffinity(self.native_thread_id, self._affinity)

    # --- registers ------------------------------------------------------------------------------

    def get_regs(self) -> Regs:
        return structconv.from_struct(Regs, self.fd.get_regs())

    def set_regs(self, regs: Regs) -> None:
        self.fd.set_regs(structconv.to_struct(regs, ffi.new("struct kvm_regs *")))

    def set_gpr(self, index: int, value: int) -> None:
        """Set general-purpose register `index` (`GPR_NAMES`: 0 RAX ... 15 R15) to `value`, a
        64-bit unsigned value (axvcpu's set_gpr). Only while the vCPU is not in KVM_RUN."""
        if not 0 <= index < len(GPR_NAMES):
            raise ValueError(f"vCPU {self.vcpu_id}: general-purpose register {index} is not 0-15")
        _check_u64(GPR_NAMES[index], value)
        self.set_regs(replace(self.get_regs(), **{GPR_NAMES[index]: value}))

    def set_entry(self, address: int) -> None:
        """Where the vCPU starts executing: RIP (axvcpu's set_entry, a guest address; the
        builder sets the boot vCPU's through it). The code segment it runs in is the sregs',
        set before (`boot.x86.EntryState`)."""
        _check_u64("rip", address)
        self.set_regs(replace(self.get_regs(), rip=address))

    def get_sregs(self) -> Sregs:
        return structconv.from_struct(Sregs, self.fd.get_sregs())

    def set_sregs(self, sregs: Sregs) -> None:
        self.fd.set_sregs(structconv.to_struct(sregs, ffi.new("struct kvm_sregs *")))

    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        cpuid = new_flexible("struct kvm_cpuid2 *", "entries", len(entries))
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            structconv.to_struct(entry, cpuid.entries[i])
        self.fd.set_cpuid2(cpuid)
        self._cpuid = None

    @property
    def cpuid(self) -> tuple[CpuidEntry, ...]:
        """What the guest sees, read once after it was set. A vCPU ioctl waits while the vCPU is
        inside KVM_RUN (KVM holds its mutex), so a running guest's CPUID is read from here."""
        if getattr(self, "_cpuid", None) is None:
            self._cpuid = self.get_cpuid()
        return self._cpuid

    def get_cpuid(self) -> tuple[CpuidEntry, ...]:
        cpuid = self.fd.get_cpuid2()
        return tuple(structconv.from_struct(CpuidEntry, cpuid.entries[i]) for i in range(cpuid.nent))

    def setup(self, cpuid: Sequence[CpuidEntry], msrs: Sequence[Msr] = ()) -> None:
        """Give the vCPU its CPUID (mandatory before it runs) and initial MSR values."""
        self.set_cpuid(cpuid)
        _ = self.cpuid  # read back now, while no thread runs the vCPU
        if msrs:
            self._set_msrs(msrs)

    def inject_interrupt(self, vector: int) -> None:
        """Deliver interrupt `vector` to this vCPU's local APIC (fixed delivery, physical mode)."""
        if self.vm.has_irqchip:
            self.vm.signal_msi(address=0xFEE0_0000 | (self.vcpu_id << 12), data=vector)
        else:
            self.fd.interrupt(vector)

    # --- MSRs ---------------------------------------------------------------------------------

    def get_msrs(self, indices: Sequence[int]) -> tuple[Msr, ...]:
        msrs = _msr_buffer(indices)
        n = self.fd.get_msrs(msrs)
        if n != len(indices):
            raise VcpuStateError(self.vcpu_id, "msrs", f"KVM refused to read MSR {indices[n]:#x}")
        return tuple(Msr(msrs.entries[i].index, msrs.entries[i].data) for i in range(n))

    def _set_msrs(self, values: Sequence[Msr]) -> None:
        msrs = _msr_buffer([m.index for m in values])
        for i, m in enumerate(values):
            msrs.entries[i].data = m.data
        n = self.fd.set_msrs(msrs)
        if n != len(values):
            bad = values[n]
            raise VcpuStateError(self.vcpu_id, "msrs", f"KVM refused MSR {bad.index:#x} = {bad.data:#x}")

    # --- complete state -------------------------------------------------------------------------

    def _get_xsave(self) -> bytes:
        size = self.vm.xsave_size
        xsave = self.fd.get_xsave2(size) if size > 4096 else self.fd.get_xsave()
        return bytes(ffi.buffer(xsave, max(size, 4096)))

    def _set_xsave(self, data: bytes) -> None:
        size = max(self.vm.xsave_size, 4096)
        xsave = new_flexible("struct kvm_xsave *", "extra", (size - 4096) // 4)
        self._copy_exact(ffi.cast("char *", xsave), data, "xsave", size)
        self.fd.set_xsave(xsave)

    def _copy_exact(self, dst: Any, data: bytes, part: str, size: int | None = None) -> None:
        """Copy a saved blob into a kernel buffer, refusing one of the wrong size."""
        size = ffi.sizeof(dst) if size is None else size
        if len(data) != size:
            raise VcpuStateError(self.vcpu_id, part, f"expected {size} bytes, found {len(data)}")
        ffi.memmove(dst, data, size)

    def _get_xcrs(self) -> tuple[Xcr, ...]:
        xcrs = self.fd.get_xcrs()
        return tuple(structconv.from_struct(Xcr, xcrs.xcrs[i]) for i in range(xcrs.nr_xcrs))

    def _set_xcrs(self, values: tuple[Xcr, ...]) -> None:
        xcrs = ffi.new("struct kvm_xcrs *")
        if len(values) > len(xcrs.xcrs):
            raise VcpuStateError(self.vcpu_id, "xcrs", f"{len(values)} XCRs, at most {len(xcrs.xcrs)}")
        xcrs.nr_xcrs = len(values)
        for i, x in enumerate(values):
            structconv.to_struct(x, xcrs.xcrs[i])
        self.fd.set_xcrs(xcrs)

    def _getters(self) -> dict[str, Callable[[], Any]]:
        fd = self.fd
        return {
            "cpuid": lambda: self.cpuid,  # as set (read back then); it cannot change since
            "mp_state": fd.get_mp_state,
            "regs": self.get_regs,
            "sregs": self.get_sregs,
            "fpu": lambda: structconv.from_struct(Fpu, fd.get_fpu()),
            "xsave": self._get_xsave if self.vm.capabilities.xsave else (lambda: b""),
            "xcrs": self._get_xcrs if self.vm.capabilities.xcrs else (lambda: ()),
            "debug_regs": lambda: structconv.from_struct(DebugRegs, fd.get_debugregs()),
            "lapic": lambda: bytes(ffi.buffer(fd.get_lapic().regs)),
            "msrs": lambda: self.get_msrs(self.vm.saveable_msrs.indices(self.fd)),
            "events": lambda: structconv.from_struct(VcpuEvents, fd.get_vcpu_events()),
        }

    def _setters(self) -> dict[str, Callable[[Any], None]]:
        fd = self.fd

        def set_lapic(data: bytes) -> None:
            lapic = ffi.new("struct kvm_lapic_state *")
            self._copy_exact(lapic.regs, data, "lapic")
            fd.set_lapic(lapic)

        return {
            # the same CPUID as the vCPU has (a target built like its source) is not set again
            "cpuid": lambda v: None if tuple(v) == self.cpuid else self.set_cpuid(v),
            "mp_state": fd.set_mp_state,
            "regs": self.set_regs,
            "sregs": self.set_sregs,
            "fpu": lambda v: fd.set_fpu(structconv.to_struct(v, ffi.new("struct kvm_fpu *"))),
            "xsave": lambda v: self._set_xsave(v) if v else None,
            "xcrs": lambda v: self._set_xcrs(v) if v else None,
            "debug_regs": lambda v: fd.set_debugregs(
                structconv.to_struct(v, ffi.new("struct kvm_debugregs *"))),
            "lapic": set_lapic,
            "msrs": self._set_msrs,
            "events": lambda v: fd.set_vcpu_events(
                structconv.to_struct(v, ffi.new("struct kvm_vcpu_events *"))),
        }

    def save(self) -> VcpuState:
        """The complete state. The vCPU must not be inside KVM_RUN (pause the VM first)."""
        getters = self._getters()
        parts: dict[str, Any] = {}
        for part in SAVE_ORDER:
            try:
                parts[part] = getters[part]()
            except KvmIoctlError as e:
                raise VcpuStateError(self.vcpu_id, part, str(e)) from e
        return VcpuState(vcpu_id=self.vcpu_id, tsc_khz=self.fd.get_tsc_khz(), **parts)

    def _check(self, state: object) -> VcpuState:
        """What can be known before any ioctl: the types of the parts, this vCPU's id, the
        general registers' width and the sizes of the blobs (the kernel checks the rest)."""
        owner = f"vcpu {self.vcpu_id}"
        state = check_type(owner, state, VcpuState)
        check_equal(owner, "vcpu_id", self.vcpu_id, state.vcpu_id)
        for part, cls in (("regs", Regs), ("sregs", Sregs), ("fpu", Fpu), ("debug_regs", DebugRegs),
                          ("events", VcpuEvents)):
            check_type(f"{owner} {part}", getattr(state, part), cls)
        for part, cls in (("cpuid", CpuidEntry), ("xcrs", Xcr), ("msrs", Msr)):
            for i, item in enumerate(getattr(state, part)):
                check_type(f"{owner} {part}[{i}]", item, cls)
        check_ints(f"{owner} regs", state.regs, {f.name: (0, U64) for f in fields(Regs)})
        check_int(owner, "mp_state", state.mp_state, 0, U32)
        check_int(owner, "tsc_khz", state.tsc_khz, 0, U32)
        check_equal(owner, "lapic", f"{ffi.sizeof('struct kvm_lapic_state')} bytes", f"{len(state.lapic)} bytes")
        if state.xsave:
            check_equal(owner, "xsave", f"{max(self.vm.xsave_size, 4096)} bytes", f"{len(state.xsave)} bytes")
        return state

    def restore(self, state: VcpuState) -> None:
        """Check the state (`_check`), then apply it in RESTORE_ORDER."""
        state = self._check(state)
        if self.vm.capabilities.tsc_control and state.tsc_khz and state.tsc_khz != self.fd.get_tsc_khz():
            self.fd.set_tsc_khz(state.tsc_khz)
        setters = self._setters()
        for part, _why in RESTORE_ORDER:
            try:
                setters[part](getattr(state, part))
            except (KvmIoctlError, structconv.StructShapeError) as e:
                raise VcpuStateError(self.vcpu_id, part, str(e)) from e
        _ = self.cpuid  # read back before anyone runs the vCPU

    def close(self) -> None:
        self.fd.close()
