"""The thin wrapper over the compiled binding: the one ioctl choke point."""

from __future__ import annotations

from hv.binding._kvm import ffi, lib
from hv.errors import KvmIoctlError

__all__ = ["ffi", "lib", "ioctl", "ioctl_int"]


def ioctl(fd: int, name: str, arg: object = ffi.NULL, target: str = "") -> int:
    """Issue ioctl `name` (a KVM_* constant name) with a pointer argument; raise on failure."""
    ret = lib.kvmig_ioctl_ptr(fd, getattr(lib, name), arg)
    if ret < 0:
        raise KvmIoctlError(name, ffi.errno, target)
    return ret


def ioctl_int(fd: int, name: str, arg: int = 0, target: str = "") -> int:
    """Issue ioctl `name` with an integer argument; raise on failure."""
    ret = lib.kvmig_ioctl_int(fd, getattr(lib, name), arg)
    if ret < 0:
        raise KvmIoctlError(name, ffi.errno, target)
    return ret
