"""The thin fd layer: system ioctls, and every error path reachable without a VM."""

from __future__ import annotations

import os

import pytest

from hv.binding.fds import KvmFd, VcpuFd, VmFd
from hv.binding.ffi import ffi, lib
from hv.errors import KvmIoctlError, KvmUnavailableError
from hv.kvm.capabilities import PlatformCapabilities
from hv.kvm.kvm import Kvm


def test_api_version_and_capabilities(kvm: Kvm) -> None:
    caps = kvm.capabilities
    assert isinstance(caps, PlatformCapabilities)
    assert caps.api_version == lib.KVM_API_VERSION == 12
    assert caps.user_memory and caps.irqchip and caps.irqfd and caps.ioeventfd
    assert caps.vcpu_mmap_size >= 4096
    assert caps.max_vcpus >= caps.recommended_vcpus >= 1
    if caps.xsave:
        assert caps.xsave_size >= 4096


def test_supported_cpuid_and_msr_list(kvm: Kvm) -> None:
    leaves = {e.function for e in kvm.supported_cpuid}
    assert {0, 1, 0x80000000, 0x80000001} <= leaves
    assert 0x10 in kvm.msr_index_list  # IA32_TSC is always saved state


def test_missing_device_is_a_typed_error(tmp_path) -> None:
    with pytest.raises(KvmUnavailableError) as err:
        KvmFd(str(tmp_path / "no-such-kvm"))
    assert err.value.path.endswith("no-such-kvm")


def _closed_fd() -> int:
    fd = os.open("/dev/null", os.O_RDONLY)
    os.close(fd)
    return fd


@pytest.mark.parametrize(
    "make, call, ioctl",
    [
        (KvmFd.from_fd, lambda k: k.get_api_version(), "KVM_GET_API_VERSION"),
        (KvmFd.from_fd, lambda k: k.create_vm(), "KVM_CREATE_VM"),
        (VmFd, lambda v: v.create_irqchip(), "KVM_CREATE_IRQCHIP"),
        (VmFd, lambda v: v.set_user_memory_region(0, 0, 0, 4096, 0), "KVM_SET_USER_MEMORY_REGION"),
        (VmFd, lambda v: v.get_clock(), "KVM_GET_CLOCK"),
        (VmFd, lambda v: v.get_dirty_log(0, ffi.NULL), "KVM_GET_DIRTY_LOG"),
        (VcpuFd, lambda c: c.get_regs(), "KVM_GET_REGS"),
        (VcpuFd, lambda c: c.get_sregs(), "KVM_GET_SREGS"),
        (VcpuFd, lambda c: c.get_lapic(), "KVM_GET_LAPIC"),
        (VcpuFd, lambda c: c.run(ffi.new("kvmig_fast_pio *"), ffi.new("kvmig_run_counts *")), "KVM_RUN"),
    ],
)
def test_bad_fd_raises_named_ioctl_error(make, call, ioctl) -> None:
    wrapper = make(_closed_fd())
    try:
        with pytest.raises(KvmIoctlError) as err:
            call(wrapper)
        assert err.value.ioctl == ioctl
        assert err.value.errno == 9  # EBADF
        assert wrapper.kind in str(err.value)
    finally:
        wrapper.detach()  # the number may be reused by now: never close it


def test_wrong_fd_kind_raises_enotty() -> None:
    fd = os.open("/dev/null", os.O_RDWR)
    wrapper = VmFd(fd)
    with pytest.raises(KvmIoctlError) as err:
        wrapper.create_irqchip()
    assert err.value.errno == 25  # ENOTTY: not a KVM fd
    wrapper.close()


def test_closed_wrapper_refuses_use() -> None:
    k = KvmFd()
    k.close()
    with pytest.raises(KvmIoctlError):
        k.get_api_version()
