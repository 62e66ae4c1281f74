"""Thin wrappers over the three KVM file descriptors: /dev/kvm, a VM fd and a vCPU fd.

One method per ioctl, named after it; arguments and results are the kernel's structs (cffi cdata)
or plain ints. No policy lives here: addresses, CPUID fixes and memory layout belong to the
platform layer (`hv.kvm.vm`, `hv.kvm.vcpu`). Every fd is owned by its object the moment the ioctl that
created it returns, and closed by `close()` or the context manager.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Self

from hv.binding.ffi import ffi, ioctl, ioctl_int, lib
from hv.errors import KvmApiVersionError, KvmIoctlError, KvmUnavailableError

CData = Any  # a cffi struct or pointer; cffi has no static types


def new_flexible(ctype: str, array_field: str, count: int) -> CData:
    """A zeroed struct whose trailing flexible array `array_field` has room for `count` items."""
    return ffi.new(ctype, {array_field: count})


class _Fd:
    """An owned file descriptor."""

    kind = "fd"
    _fd = -1  # so a constructor that failed leaves nothing for __del__ to close

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def detach(self) -> int:
        """Give up ownership: return the fd without closing it."""
        fd, self._fd = self._fd, -1
        return fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise KvmIoctlError("(closed fd)", 9, self.kind)  # EBADF
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except OSError:
            pass

    def _ioctl(self, name: str, arg: object = ffi.NULL) -> int:
        return ioctl(self.fd, name, arg, self.kind)

    def _ioctl_int(self, name: str, arg: int = 0) -> int:
        return ioctl_int(self.fd, name, arg, self.kind)


class KvmFd(_Fd):
    """/dev/kvm itself: system ioctls."""

    kind = "/dev/kvm"

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailableError(path, e.errno or 0) from None
        super().__init__(fd)
        version = self.get_api_version()
        if version != lib.KVM_API_VERSION:
            self.close()
            raise KvmApiVersionError(lib.KVM_API_VERSION, version)

    @classmethod
    def from_fd(cls, fd: int) -> KvmFd:
        """Wrap an already open fd without checks (tests use it to reach error paths)."""
        obj = cls.__new__(cls)
        _Fd.__init__(obj, fd)
        return obj

    def get_api_version(self) -> int:
        return self._ioctl_int("KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        return self._ioctl_int("KVM_CHECK_EXTENSION", cap)

    def get_vcpu_mmap_size(self) -> int:
        return self._ioctl_int("KVM_GET_VCPU_MMAP_SIZE")

    def get_supported_cpuid(self, max_entries: int = 256) -> CData:
        cpuid = new_flexible("struct kvm_cpuid2 *", "entries", max_entries)
        cpuid.nent = max_entries
        self._ioctl("KVM_GET_SUPPORTED_CPUID", cpuid)
        return cpuid

    def get_msr_index_list(self, max_entries: int = 1024) -> list[int]:
        return self._msr_list("KVM_GET_MSR_INDEX_LIST", max_entries)

    def _msr_list(self, name: str, max_entries: int) -> list[int]:
        msr_list = new_flexible("struct kvm_msr_list *", "indices", max_entries)
        msr_list.nmsrs = max_entries
        self._ioctl(name, msr_list)
        return [msr_list.indices[i] for i in range(msr_list.nmsrs)]

    def create_vm(self, machine_type: int = 0) -> VmFd:
        return VmFd(self._ioctl_int("KVM_CREATE_VM", machine_type))


class VmFd(_Fd):
    """A VM file descriptor."""

    kind = "VM fd"

    def check_extension(self, cap: int) -> int:
        return self._ioctl_int("KVM_CHECK_EXTENSION", cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        enable = ffi.new("struct kvm_enable_cap *")
        enable.cap, enable.flags = cap, flags
        for i, value in enumerate(args):
            enable.args[i] = value
        self._ioctl("KVM_ENABLE_CAP", enable)

    def set_user_memory_region(
        self, slot: int, flags: int, guest_phys_addr: int, memory_size: int, userspace_addr: int
    ) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot, region.flags = slot, flags
        region.guest_phys_addr, region.memory_size = guest_phys_addr, memory_size
        region.userspace_addr = userspace_addr
        self._ioctl("KVM_SET_USER_MEMORY_REGION", region)

    def set_tss_addr(self, addr: int) -> None:
        self._ioctl_int("KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr: int) -> None:
        self._ioctl("KVM_SET_IDENTITY_MAP_ADDR", ffi.new("__u64 *", addr))

    def create_irqchip(self) -> None:
        self._ioctl("KVM_CREATE_IRQCHIP")

    def create_pit2(self, flags: int = 0) -> None:
        config = ffi.new("struct kvm_pit_config *")
        config.flags = flags
        self._ioctl("KVM_CREATE_PIT2", config)

    def irq_line(self, irq: int, level: int) -> None:
        irq_level = ffi.new("struct kvm_irq_level *")
        irq_level.irq, irq_level.level = irq, level
        self._ioctl("KVM_IRQ_LINE", irq_level)

    def irqfd(self, fd: int, gsi: int, flags: int = 0, resamplefd: int = 0) -> None:
        req = ffi.new("struct kvm_irqfd *")
        req.fd, req.gsi, req.flags, req.resamplefd = fd, gsi, flags, resamplefd
        self._ioctl("KVM_IRQFD", req)

    def ioeventfd(self, fd: int, addr: int, length: int, flags: int, datamatch: int = 0) -> None:
        req = ffi.new("struct kvm_ioeventfd *")
        req.fd, req.addr, req.len, req.flags, req.datamatch = fd, addr, length, flags, datamatch
        self._ioctl("KVM_IOEVENTFD", req)

    def signal_msi(self, address: int, data: int) -> int:
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo, msi.address_hi, msi.data = address & 0xFFFF_FFFF, address >> 32, data
        return self._ioctl("KVM_SIGNAL_MSI", msi)

    def set_gsi_routing(self, irqchip: list[tuple[int, int, int]], msi: list[tuple[int, int, int]]) -> None:
        """Replace the whole GSI routing table: `irqchip` entries (gsi, chip, pin) and `msi`
        entries (gsi, address, data)."""
        table = new_flexible("struct kvm_irq_routing *", "entries", len(irqchip) + len(msi))
        table.nr = len(irqchip) + len(msi)
        for i, (gsi, chip, pin) in enumerate(irqchip):
            e = table.entries[i]
            e.gsi, e.type, e.u.irqchip.irqchip, e.u.irqchip.pin = gsi, lib.KVM_IRQ_ROUTING_IRQCHIP, chip, pin
        for i, (gsi, address, data) in enumerate(msi, len(irqchip)):
            e = table.entries[i]
            e.gsi, e.type = gsi, lib.KVM_IRQ_ROUTING_MSI
            e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = address & 0xFFFF_FFFF, address >> 32, data
        self._ioctl("KVM_SET_GSI_ROUTING", table)

    def get_dirty_log(self, slot: int, bitmap: CData) -> None:
        log = ffi.new("struct kvm_dirty_log *")
        log.slot, log.dirty_bitmap = slot, bitmap
        self._ioctl("KVM_GET_DIRTY_LOG", log)

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: CData) -> None:
        log = ffi.new("struct kvm_clear_dirty_log *")
        log.slot, log.first_page, log.num_pages, log.dirty_bitmap = slot, first_page, num_pages, bitmap
        self._ioctl("KVM_CLEAR_DIRTY_LOG", log)

    def get_clock(self) -> CData:
        clock = ffi.new("struct kvm_clock_data *")
        self._ioctl("KVM_GET_CLOCK", clock)
        return clock

    def set_clock(self, clock: CData) -> None:
        self._ioctl("KVM_SET_CLOCK", clock)

    def get_irqchip(self, chip_id: int) -> CData:
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        self._ioctl("KVM_GET_IRQCHIP", chip)
        return chip

    def set_irqchip(self, chip: CData) -> None:
        self._ioctl("KVM_SET_IRQCHIP", chip)

    def get_pit2(self) -> CData:
        pit = ffi.new("struct kvm_pit_state2 *")
        self._ioctl("KVM_GET_PIT2", pit)
        return pit

    def set_pit2(self, pit: CData) -> None:
        self._ioctl("KVM_SET_PIT2", pit)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        return VcpuFd(self._ioctl_int("KVM_CREATE_VCPU", vcpu_id))


class VcpuFd(_Fd):
    """A vCPU file descriptor and its shared `struct kvm_run` page."""

    kind = "vCPU fd"
    _run: CData = ffi.NULL

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self._run: CData = ffi.NULL
        self._run_size = 0

    def map_run(self, mmap_size: int) -> CData:
        """mmap the kvm_run area (size from KVM_GET_VCPU_MMAP_SIZE) and return it."""
        ptr = lib.kvmig_mmap_shared(self.fd, mmap_size)
        if ptr == ffi.NULL:
            raise KvmIoctlError("mmap(kvm_run)", ffi.errno, self.kind)
        self._run = ffi.cast("struct kvm_run *", ptr)
        self._run_size = mmap_size
        return self._run

    def close(self) -> None:
        if self._run != ffi.NULL:
            lib.kvmig_munmap(self._run, self._run_size)
            self._run = ffi.NULL
        super().close()

    def run(self, fast: CData, counts: CData, park: CData = ffi.NULL) -> int:
        """KVM_RUN, again and again while the exits are port I/O that `fast` (a kvmig_fast_pio
        table of devices modelled in C) serves, counted in `counts`, and while `park` (a
        kvmig_park) holds the vCPU at an EINTR. Returns 0 at the first other exit, or -EINTR
        when a signal or immediate_exit interrupted it (and nothing held it)."""
        while True:
            ret = lib.kvmig_vcpu_run(self.fd, self._run, fast, counts, park)
            if ret >= 0:
                return ret
            err = ffi.errno
            if err == errno.EINTR:  # kicked out of the guest; not an error
                return -errno.EINTR
            if err != errno.EAGAIN:
                raise KvmIoctlError("KVM_RUN", err, self.kind)
            # EAGAIN: a secondary vCPU left its wait for INIT/SIPI (or was woken while waiting);
            # api.rst has userspace simply enter again, as QEMU does.

    def _get(self, name: str, ctype: str) -> CData:
        obj = ffi.new(ctype)
        self._ioctl(name, obj)
        return obj

    def get_regs(self) -> CData:
        return self._get("KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs: CData) -> None:
        self._ioctl("KVM_SET_REGS", regs)

    def get_sregs(self) -> CData:
        return self._get("KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs: CData) -> None:
        self._ioctl("KVM_SET_SREGS", sregs)

    def get_fpu(self) -> CData:
        return self._get("KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu: CData) -> None:
        self._ioctl("KVM_SET_FPU", fpu)

    def get_lapic(self) -> CData:
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state *")

    def set_lapic(self, lapic: CData) -> None:
        self._ioctl("KVM_SET_LAPIC", lapic)

    def get_mp_state(self) -> int:
        return self._get("KVM_GET_MP_STATE", "struct kvm_mp_state *").mp_state

    def set_mp_state(self, mp_state: int) -> None:
        self._ioctl("KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))

    def get_vcpu_events(self) -> CData:
        return self._get("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events: CData) -> None:
        self._ioctl("KVM_SET_VCPU_EVENTS", events)

    def get_debugregs(self) -> CData:
        return self._get("KVM_GET_DEBUGREGS", "struct kvm_debugregs *")

    def set_debugregs(self, dregs: CData) -> None:
        self._ioctl("KVM_SET_DEBUGREGS", dregs)

    def get_xcrs(self) -> CData:
        return self._get("KVM_GET_XCRS", "struct kvm_xcrs *")

    def set_xcrs(self, xcrs: CData) -> None:
        self._ioctl("KVM_SET_XCRS", xcrs)

    def get_xsave(self) -> CData:
        return self._get("KVM_GET_XSAVE", "struct kvm_xsave *")

    def get_xsave2(self, size: int) -> CData:
        """KVM_GET_XSAVE2: `size` is KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd."""
        extra_words = max(0, (size - 4096 + 3) // 4)
        xsave = new_flexible("struct kvm_xsave *", "extra", extra_words)
        self._ioctl("KVM_GET_XSAVE2", xsave)
        return xsave

    def set_xsave(self, xsave: CData) -> None:
        self._ioctl("KVM_SET_XSAVE", xsave)

    def get_msrs(self, msrs: CData) -> int:
        """KVM_GET_MSRS: fills `msrs` (indices set by the caller); returns how many were read."""
        return self._ioctl("KVM_GET_MSRS", msrs)

    def set_msrs(self, msrs: CData) -> int:
        """KVM_SET_MSRS: returns how many were written (stops at the first refused one)."""
        return self._ioctl("KVM_SET_MSRS", msrs)

    def set_cpuid2(self, cpuid: CData) -> None:
        self._ioctl("KVM_SET_CPUID2", cpuid)

    def get_cpuid2(self, max_entries: int = 256) -> CData:
        cpuid = new_flexible("struct kvm_cpuid2 *", "entries", max_entries)
        cpuid.nent = max_entries
        self._ioctl("KVM_GET_CPUID2", cpuid)
        return cpuid

    def get_tsc_khz(self) -> int:
        return self._ioctl_int("KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        self._ioctl_int("KVM_SET_TSC_KHZ", khz)

    def interrupt(self, irq: int) -> None:
        self._ioctl("KVM_INTERRUPT", ffi.new("struct kvm_interrupt *", {"irq": irq}))

    def nmi(self) -> None:
        self._ioctl("KVM_NMI")

    def translate(self, linear_address: int) -> CData:
        tr = ffi.new("struct kvm_translation *")
        tr.linear_address = linear_address
        self._ioctl("KVM_TRANSLATE", tr)
        return tr

    def kvmclock_ctrl(self) -> None:
        self._ioctl("KVM_KVMCLOCK_CTRL")
