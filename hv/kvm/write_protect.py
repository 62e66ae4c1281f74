"""Guest RAM held at one instant while the guest runs on: userfaultfd write-protect.

A `WriteProtect` registers a `MemoryRegion` with userfaultfd in write-protect mode (and starts
its C fault thread) when it is made: do that before pausing the guest, so nothing in the pause
can fail for want of a descriptor or a thread. `protect(pages)`, in the pause, write-protects the
whole region in one call and says which pages will be read. From then on any thread that writes
a protected page (a vCPU in KVM_RUN, a device thread, Python with the GIL) waits in the kernel
while the C thread (hv/binding/write_protect.c) copies the page aside and releases it; `take`
reads pages as they were at the instant, in any order, each once, and releases them. Pages not
named in `protect` are never read (untouched memory stays unpopulated) and read as zeros.

`close()` releases every page still protected: a reader that gives up half way leaves the guest
running normally. The region must be anonymous or shmem memory (the kernel refuses others), and
not registered with another userfaultfd (post-copy's `Userfault`): that is EBUSY at `__init__`.
"""

from __future__ import annotations

import errno as _errno
import functools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from hv.binding.ffi import ffi, lib
from hv.errors import UserfaultClosedError, UserfaultResolveError, UserfaultSetupError
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap
from hv.kvm.memory import MemoryRegion, RamBacking
from hv.kvm.userfault import OPERATIONS


@dataclass(frozen=True)
class WriteProtectStats:
    """`faults`: writes that waited; `saved`: pages copied aside for them; `taken`: pages read
    by `take`; `protected`: pages still protected; `saved_peak_bytes`: the most held aside at
    once (what a live snapshot costs in memory), in 2 MiB buffers, `blocks_beyond_pool` of them
    allocated when the pool ran out; fault latency from the event's read to the
    page's release (ns)."""

    faults: int
    saved: int
    taken: int
    protected: int
    saved_peak_bytes: int
    blocks_beyond_pool: int
    latency_count: int
    latency_sum_ns: int
    latency_max_ns: int
    thread_errno: int
    last_errno: int

    @property
    def latency_mean_ns(self) -> float:
        return self.latency_sum_ns / self.latency_count if self.latency_count else 0.0


@functools.cache
def pagemap_shows_protection() -> bool:
    """Whether /proc/self/pagemap marks the pages userfaultfd write-protects (Linux 5.13): then
    what was populated at the instant need not be read at the instant (one page, tried once)."""
    region = MemoryRegion(0, PAGE_SIZE, slot=-1, backing=RamBacking.host_filled(0, PAGE_SIZE))
    region.view[0] = 1
    with WriteProtect(region) as held:
        held.protect(None)
        return bool(region.write_protected_pages(0, 1)[0])


class WriteProtect:
    """One write-protect registration over a whole `MemoryRegion` (see the module's text)."""

    def __init__(self, region: MemoryRegion, pool_bytes: int = 0) -> None:
        """`pool_bytes`: memory faulted in now for pages the guest writes before they are
        read (a write then waits for a copy, not for page faults); more is taken as needed."""
        self.region = region
        out = ffi.new("kvmig_wp **")
        failed = ffi.new("int *")
        ret = lib.kvmig_wp_open(out, ffi.cast("void *", region.host_address), region.size, pool_bytes, failed)
        if ret < 0:
            raise UserfaultSetupError(OPERATIONS.get(failed[0], "userfaultfd"), -ret, region.guest_base, region.size)
        self._h: Any = ffi.gc(out[0], lib.kvmig_wp_free)
        self._lock = threading.Lock()
        self._closed = False

    def protect(self, pages: DirtyBitmap | None) -> None:
        """The instant: write-protect the region; `pages` (one bit per page of the region) are
        the ones `take` will read; None: any, until `narrow` says which. Only populated pages
        are protected (a page unpopulated now is zero now, and a write to it does not wait).
        Once."""
        self._check("UFFDIO_WRITEPROTECT", 0, self.region.size,
                    lib.kvmig_wp_protect(self._live(), self._words(pages) if pages is not None else ffi.NULL))

    def narrow(self, first: int, pages: np.ndarray) -> None:
        """After the instant: of the pages [first, first + len(pages)) not kept aside, `take`
        reads only those `pages` marks (those `region.write_protected_pages` still finds
        protected: the others were unpopulated at the instant, and what a write put there since
        is not of it); the rest read as zeros. `first` a multiple of 64."""
        words = DirtyBitmap.from_bools(pages).words
        self._check("narrow", first * PAGE_SIZE, len(pages) * PAGE_SIZE,
                    lib.kvmig_wp_narrow(self._live(), first, len(pages), ffi.from_buffer("uint64_t[]", words)))

    def sweep(self, first: int, count: int, budget: int) -> int:
        """Keep aside and release every page of [first, first + count) still protected, in
        address order, while at most `budget` bytes are held aside; returns the pages kept."""
        ret = lib.kvmig_wp_sweep(self._live(), first, count, budget)
        self._check("sweep", first * PAGE_SIZE, count * PAGE_SIZE, ret)
        return ret

    def _words(self, pages: DirtyBitmap) -> Any:
        if pages.npages != self.region.npages:
            raise ValueError(f"a bitmap of {pages.npages} pages for a region of {self.region.npages}")
        return ffi.from_buffer("uint64_t[]", pages.words)

    def take(self, offset: int, into: bytearray | memoryview) -> None:
        """Copy the region's [offset, offset + len(into)) as it was at the instant into `into`
        (zeros for pages not to be read) and release those pages. Each page once."""
        self._check("take", offset, len(into),
                    lib.kvmig_wp_take(self._live(), offset, len(into), ffi.from_buffer(into, require_writable=True)))

    def kept_aside(self) -> DirtyBitmap:
        """The pages written since the instant and kept aside, not taken yet."""
        bitmap = DirtyBitmap(self.region.npages)
        lib.kvmig_wp_kept(self._live(), ffi.from_buffer("uint64_t[]", bitmap.words))
        return bitmap

    def stats(self) -> WriteProtectStats:
        s = ffi.new("kvmig_wp_stats *")
        lib.kvmig_wp_get_stats(self._h, s)
        return WriteProtectStats(
            faults=s.faults, saved=s.saved, taken=s.taken, protected=s.protected_pages,
            saved_peak_bytes=s.saved_bytes_peak, blocks_beyond_pool=s.blocks_beyond_pool, latency_count=s.lat_count, latency_sum_ns=s.lat_sum_ns,
            latency_max_ns=s.lat_max_ns, thread_errno=s.thread_errno, last_errno=s.last_errno)

    def close(self) -> None:
        """Release every page still protected, stop the fault thread, unregister."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._check("UFFDIO_UNREGISTER", 0, self.region.size, lib.kvmig_wp_close(self._h))

    def __enter__(self) -> WriteProtect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"WriteProtect({self.region}{', closed' if self._closed else ''})"

    def _live(self) -> Any:
        if self._closed:
            raise UserfaultClosedError(self.region.guest_base, self.region.size)
        return self._h

    def _check(self, operation: str, offset: int, length: int, ret: int) -> None:
        """`ret` from C: 0 or more is success, -errno an error naming the operation and range."""
        if ret < 0:
            if -ret == _errno.EBADF:
                raise UserfaultClosedError(self.region.guest_base, self.region.size)
            raise UserfaultResolveError(operation, -ret, self.region.guest_base + offset, length)

