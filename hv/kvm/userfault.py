"""userfaultfd over guest RAM: missing pages that are filled when something touches them.

A `Userfault` registers a range of a `MemoryRegion` with userfaultfd in MISSING mode. From then
on, any thread that touches a page of it that is not in place yet — a vCPU in KVM_RUN, a device
thread reading a ring, a Python thread, GIL held or not — blocks in the kernel until the page is
placed. The fault events are read by a C thread (hv/binding/userfault.c) that never needs the
interpreter lock:

- pages already *staged* (`stage`, `stage_zero`: their contents or their zeroness are known)
  are placed by that thread at once, with no Python involved;
- faults on other pages are queued, once per page, and `notify_fd` becomes readable; a consumer
  (the migration layer's page fetcher) takes them (`take_faults`, `wait_faults`) and answers with
  `resolve_copy` / `resolve_zero`, or stages the page. Placing a page wakes every thread waiting
  on it.

A page is placed once: a copy to a page already in place (placed by a racing copy, or populated
before the range was registered) leaves it as it is, since the guest may have written it since.

Everything that places pages runs in C without the GIL, so a consumer thread waiting for a page
from the network does not stop the rest of the VMM. But a thread that faults *while holding the
GIL* can only be served without Python: by a staged page, or by C code (another C module can call
the entry points in `c_api` from a thread of its own). `close()` releases every waiter (see there).

Addresses in this API are guest physical addresses of whole pages.
"""

from __future__ import annotations

import errno as _errno
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hv.binding.ffi import ffi, lib
from hv.errors import GuestAddressError, UserfaultClosedError, UserfaultResolveError, UserfaultSetupError
from hv.kvm.dirty import PAGE_SHIFT, PAGE_SIZE, DirtyBitmap, words_for
from hv.kvm.memory import GuestMemory, MemoryRegion

OPERATIONS = {
    lib.KVMIG_UFFD_OP_OPEN: "userfaultfd",
    lib.KVMIG_UFFD_OP_API: "UFFDIO_API",
    lib.KVMIG_UFFD_OP_ALLOC: "allocating the page tables",
    lib.KVMIG_UFFD_OP_REGISTER: "UFFDIO_REGISTER",
    lib.KVMIG_UFFD_OP_THREAD: "starting the fault thread",
}

FAULT_WRITE = lib.UFFD_PAGEFAULT_FLAG_WRITE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fault:
    """A page some thread is waiting for. `tid` is the first thread that faulted on it (0 when
    the kernel does not say), `write` whether that fault was a write, `t_ns` when its event was
    read (CLOCK_MONOTONIC, as `time.monotonic_ns`)."""

    address: int
    tid: int
    write: bool
    t_ns: int


def latency_bucket_bounds(index: int) -> tuple[int, int]:
    """[low, high] in ns of histogram bucket `index` (userfault.c's kvmig_uffd_lat_bucket):
    exact below 16 ns, then 16 buckets per power of two."""
    if index < 16:
        return index, index
    exponent, sub = index // 16 + 3, index % 16
    shift = exponent - 4
    return (16 + sub) << shift, ((17 + sub) << shift) - 1


@dataclass(frozen=True)
class FaultLatency:
    """Fault latency, from the read of a fault's event to the end of the ioctl that placed its
    page, as a log-linear histogram (buckets at most 6% wide)."""

    count: int
    sum_ns: int
    max_ns: int
    histogram: tuple[int, ...] = field(repr=False)

    def percentile(self, p: float) -> int:
        """The latency (ns) at percentile `p` (0-100): the upper bound of the bucket it falls in,
        never above the largest seen; 0 when no fault was timed."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for index, n in enumerate(self.histogram):
            seen += n
            if seen >= rank:
                return min(latency_bucket_bounds(index)[1], self.max_ns)
        return self.max_ns

    @property
    def p50_ns(self) -> int:
        return self.percentile(50)

    @property
    def p99_ns(self) -> int:
        return self.percentile(99)


@dataclass(frozen=True)
class UserfaultStats:
    """Counters kept by the C side. A page counts once however many threads faulted on it:
    `queued` pages went to the consumer, `fast` ones were placed from staging by the fault
    thread; `joined` faults found their page queued already, `late` ones found it placed."""

    faults: int
    fast: int
    fast_failed: int
    queued: int
    joined: int
    late: int
    resolved: int
    pending: int
    queue_len: int
    pages_copied: int
    pages_zeroed: int
    eexist: int
    eagain: int
    latency: FaultLatency
    threads_untracked: int
    thread_errno: int
    closed: bool


@dataclass(frozen=True)
class ThreadBlocktime:
    """How long one thread (by kernel thread id: `threading.Thread.native_id`) waited for pages
    of the range, over how many faults; `waiting` says it is waiting now (counted up to now)."""

    tid: int
    faults: int
    blocked_ns: int
    waiting: bool


@dataclass(frozen=True)
class UserfaultCApi:
    """Entry points for C code that supplies pages without Python (addresses, to cast to the
    prototypes in hv/binding/build.py's `_CDEF_UFFD`): `handle` is the `kvmig_uffd *`; offsets
    are bytes from the start of the range. Valid until the `Userfault` is closed."""

    handle: int
    copy: int  # int kvmig_uffd_copy(kvmig_uffd *, uint64_t off, const void *src, uint64_t len)
    zero: int  # int kvmig_uffd_zero(kvmig_uffd *, uint64_t off, uint64_t len)
    stage: int  # int kvmig_uffd_stage(kvmig_uffd *, uint64_t off, const void *src, uint64_t len)
    stage_zero: int  # int kvmig_uffd_stage_zero(kvmig_uffd *, uint64_t off, uint64_t len)


def _address_of(name: str) -> int:
    return int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))


class Userfault:
    """One userfaultfd registration over [region.guest_base + offset, ... + length).

    The range should be missing (fresh memory, or given back with `GuestMemory.zero_pages`):
    pages already populated never fault, and a copy to one keeps what it holds. The region's
    memory must be private anonymous (this project's guest RAM) or shmem/memfd; the kernel
    refuses other mappings at UFFDIO_REGISTER. Close it before the region is unmapped, and never
    resolve from a source inside a registered range (its own fault would wait for the lock the
    copy holds). `staging`, if given, is a buffer laid out as the
    range that the caller fills and declares with `stage_range`; by default the layer
    allocates one (MAP_NORESERVE: it costs what is staged).
    """

    def __init__(self, region: MemoryRegion, offset: int = 0, length: int | None = None, *,
                 staging: object | None = None) -> None:
        length = region.size - offset if length is None else length
        if (offset % PAGE_SIZE or length % PAGE_SIZE or length <= 0 or offset < 0
                or offset + length > region.size):
            raise GuestAddressError(region.guest_base + offset, max(length, 0),
                                    f"is not a range of whole pages of {region}")
        self.region = region
        self.guest_base = region.guest_base + offset
        self.length = length
        self.npages = length >> PAGE_SHIFT
        self._staging_ref = None
        staging_ptr = ffi.NULL
        if staging is not None:
            self._staging_ref = ffi.from_buffer(staging, require_writable=True)
            if len(self._staging_ref) < length:
                raise GuestAddressError(self.guest_base, length,
                                        f"is larger than the staging buffer ({len(self._staging_ref)})")
            staging_ptr = self._staging_ref
        out = ffi.new("kvmig_uffd **")
        failed = ffi.new("int *")
        base = ffi.cast("void *", region.host_address + offset)
        ret = lib.kvmig_uffd_open(out, base, length, staging_ptr, failed)
        if ret < 0:
            raise UserfaultSetupError(OPERATIONS.get(failed[0], "userfaultfd"), -ret, self.guest_base, length)
        self._h: Any = ffi.gc(out[0], lib.kvmig_uffd_free)
        self._close_lock = threading.Lock()
        self._closed = False
        self._take_lock = threading.Lock()
        self._faults = ffi.new("kvmig_uffd_fault[]", 256)
        log.debug("%r registered (features %#x)", self, self.features)

    @classmethod
    def over(cls, memory: GuestMemory, address: int, length: int, *, staging: object | None = None) -> Userfault:
        """A `Userfault` over guest physical [address, address+length) (inside one region)."""
        region, offset = memory.find(address, length)
        return cls(region, offset, length, staging=staging)

    # --- what the consumer reads -------------------------------------------------------------

    @property
    def notify_fd(self) -> int:
        """An eventfd, readable when faults may be queued (or the layer was closed): to select on."""
        return lib.kvmig_uffd_notify_fd(self._live())

    @property
    def features(self) -> int:
        """The UFFD_FEATURE_* bits the handshake obtained."""
        return lib.kvmig_uffd_features(self._live())

    def take_faults(self, limit: int = 256) -> list[Fault]:
        """The queued faults whose page is still missing, oldest first (does not block)."""
        h = self._live()
        with self._take_lock:
            if limit > len(self._faults):
                self._faults = ffi.new("kvmig_uffd_fault[]", limit)
            n = lib.kvmig_uffd_take(h, self._faults, limit)
            return [Fault(self.guest_base + f.offset, f.tid, bool(f.flags & FAULT_WRITE), f.t_ns)
                for f in (self._faults[i] for i in range(n))]

    def wait_faults(self, timeout: float | None = None, limit: int = 256) -> list[Fault]:
        """Wait (without the GIL) for queued faults, up to `timeout` seconds (None: forever) and
        take them; [] on timeout or once the layer is closed."""
        h = self._live()
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        ret = lib.kvmig_uffd_wait(h, ms)
        if ret < 0:
            raise UserfaultResolveError("poll", -ret, self.guest_base, self.length)
        return self.take_faults(limit) if ret and not self._closed else []

    def missing_pages(self) -> DirtyBitmap:
        """Bit i set: page i of the range is not in place (not placed by this layer, and not
        found in place by a copy)."""
        words = np.zeros(words_for(self.npages), dtype=np.uint64)
        lib.kvmig_uffd_missing(self._h, ffi.cast("uint64_t *", words.ctypes.data))
        return DirtyBitmap(self.npages, words)

    def blocktime(self) -> dict[int, ThreadBlocktime]:
        """Time each faulting thread spent waiting (a vCPU's is QEMU's "blocktime"), by tid; the
        first 64 threads are kept (`stats().threads_untracked` counts faults of any others)."""
        out = ffi.new("kvmig_uffd_blocked[]", 64)
        n = lib.kvmig_uffd_blocktime(self._h, out, 64)
        return {t.tid: ThreadBlocktime(t.tid, t.faults, t.blocked_ns, bool(t.waiting))
                for t in (out[i] for i in range(n))}

    def stats(self) -> UserfaultStats:
        """The counters (still readable after `close`)."""
        s = ffi.new("kvmig_uffd_stats *")
        lib.kvmig_uffd_get_stats(self._h, s)
        latency = FaultLatency(s.lat_count, s.lat_sum_ns, s.lat_max_ns, tuple(s.lat_hist))
        return UserfaultStats(
            faults=s.faults, fast=s.fast, fast_failed=s.fast_failed, queued=s.queued, joined=s.joined,
            late=s.late, resolved=s.resolved, pending=s.pending, queue_len=s.queue_len,
            pages_copied=s.pages_copied, pages_zeroed=s.pages_zeroed, eexist=s.eexist, eagain=s.eagain,
            latency=latency, threads_untracked=s.threads_untracked, thread_errno=s.thread_errno,
            closed=bool(s.closed),
        )

    # --- what the consumer supplies ----------------------------------------------------------

    def resolve_copy(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Place the pages [address, address+len(data)) still missing with `data` (UFFDIO_COPY),
        waking their waiters; pages in place keep their contents."""
        offset = self._offset(address, len(data))
        ret = lib.kvmig_uffd_copy(self._live(), offset, ffi.from_buffer(data), len(data))
        self._check("UFFDIO_COPY", address, len(data), ret)

    def resolve_zero(self, address: int, length: int) -> None:
        """Place zero pages over the pages of the range still missing (UFFDIO_ZEROPAGE)."""
        offset = self._offset(address, length)
        self._check("UFFDIO_ZEROPAGE", address, length, lib.kvmig_uffd_zero(self._live(), offset, length))

    def stage(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Make pages known without placing them: the fault thread places each one when it is
        touched, without Python; a page already waited for is placed now. Pages in place are
        left alone."""
        offset = self._offset(address, len(data))
        self._check("stage", address, len(data),
                    lib.kvmig_uffd_stage(self._live(), offset, ffi.from_buffer(data), len(data)))

    def stage_range(self, address: int, length: int) -> None:
        """`stage` for a run the caller's `staging` buffer already holds."""
        offset = self._offset(address, length)
        self._check("stage", address, length, lib.kvmig_uffd_stage(self._live(), offset, ffi.NULL, length))

    def stage_zero(self, address: int, length: int) -> None:
        """Declare pages zero: placed (UFFDIO_ZEROPAGE) by the fault thread when touched."""
        offset = self._offset(address, length)
        self._check("stage", address, length, lib.kvmig_uffd_stage_zero(self._live(), offset, length))

    def place_staged(self, address: int, length: int) -> int:
        """Place every staged page of the run not in place yet (a background fill: the lock is
        held for at most 64 pages at a time, so faults are served in between); returns how many
        were placed."""
        offset = self._offset(address, length)
        ret = lib.kvmig_uffd_place_staged(self._live(), offset, length)
        self._check("UFFDIO_COPY", address, length, ret)
        return ret

    @property
    def c_api(self) -> UserfaultCApi:
        return UserfaultCApi(
            handle=int(ffi.cast("uintptr_t", self._live())),
            copy=_address_of("kvmig_uffd_copy"), zero=_address_of("kvmig_uffd_zero"),
            stage=_address_of("kvmig_uffd_stage"), stage_zero=_address_of("kvmig_uffd_stage_zero"),
        )

    # --- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the fault thread, unregister the range, close the descriptor.

        Threads still waiting for a page are released, not left blocked: UFFDIO_UNREGISTER wakes
        the range it unregisters (and closing the descriptor wakes anything left), and their
        retried fault is served by the ordinary anonymous-memory path, so a page nobody supplied
        reads as zero — the same as resolving it with a zero page, without racing the teardown.
        A caller that must not let a guest run on such holes pauses its vCPUs first.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        ret = lib.kvmig_uffd_close(self._h)
        log.debug("%r closed with %d pages still waited for", self, self.stats().pending)
        if ret < 0:
            raise UserfaultResolveError("UFFDIO_UNREGISTER", -ret, self.guest_base, self.length)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Userfault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        closed = ", closed" if self._closed else ""
        return f"Userfault([{self.guest_base:#x}, {self.guest_base + self.length:#x}){closed})"

    # --- helpers ------------------------------------------------------------------------------

    def _live(self) -> Any:
        if self._closed:
            raise UserfaultClosedError(self.guest_base, self.length)
        return self._h

    def _offset(self, address: int, length: int) -> int:
        offset = address - self.guest_base
        if (address % PAGE_SIZE or length % PAGE_SIZE or length <= 0 or offset < 0
                or offset + length > self.length):
            raise GuestAddressError(address, max(length, 0), f"is not a run of whole pages of {self}")
        return offset

    def _check(self, operation: str, address: int, length: int, ret: int) -> None:
        if ret < 0:
            if -ret == _errno.EBADF:
                raise UserfaultClosedError(self.guest_base, self.length)
            raise UserfaultResolveError(operation, -ret, address, length)
