"""Lazy restore: the guest runs before any of its memory is read; pages come in when touched.

`restore(..., lazy=True)` builds the machine with fresh, empty RAM, registers it with the
userfaultfd layer post-copy uses (`hv.kvm.userfault`: MISSING mode, its C fault thread), and
hands back the machine paused; `LazyRestore.resume()` runs it. From then on:

- **on demand**: a thread that touches a page not in place (a vCPU in KVM_RUN, a device thread)
  waits in the kernel; the fault server (a thread of its own, ahead of the others) loads that
  page's 2 MiB block (`migrate.snapshot.blocks`: from the runs the page table names, each page
  from the newest file of the chain that has it; a ZSTD run decompressed, a RAW run or a `.mem`
  block read), places the faulted page first and then the rest of the block from there
  (UFFDIO_COPY, 64 pages a call, so the C thread serves other faults in between);
- **in the background**: the loader walks the blocks with data in file order (the snapshot's
  recorded working set first, from before the guest runs) and loads each the same way, in bulk
  (a run is read whole, with one pread), until every block is in; then the RAM is unregistered
  and is ordinary memory again. A fault on a block the loader is placing has its page placed
  next. Blocks with no data in any file are zero: the C fault thread places zero pages for them
  at once, without Python (`stage_zero`).

What is checked, and when:

- before the guest runs (as an eager restore does): every file's header, CONFIG, LAYOUT (against
  the VM this builds), vCPU, VM and device state (their records' checksums and the record chain
  from the header; the state's shape, the vCPUs' registers and CPUID against this host); the
  page table: each file's MEMORY_INDEX (its record checked against the record before it, END's
  against it; END's page totals and digest against its runs and block hashes; every run inside
  the RAM, its payload inside the file after the one before it), or, for a file without one,
  its whole record chain and its run tables (reading the file, decompressing nothing); that
  every block with no data in any file hashes as zeros by the head's block hashes;
- as each block comes in (by fault or by the loader), before any page of it is placed: a ZSTD
  frame decompresses to exactly its run's size; the block's bytes hash to the head index's block
  hash, so the memory the guest runs on is, block by block, the memory END's digest was taken
  of (for a mappable snapshot that is the only checksum its `.mem` has); when a block fails, its
  runs' own xxh3 checksums, to name the file at fault. A file without an index (format 2.0) has
  no block hashes: each run's checksum is checked instead;
- not checked: the whole-memory digest as such (it is the combination of the block hashes,
  checked against END before the run); with a head file of format 2.0, that the writer stored
  every page it should have (only the block hashes would show a page missing from every run).
  `verify` False (`--no-verify`) skips the block hashes; a PAGES run's checksum is still checked.

A check that fails is a `CorruptPage` naming the page (the one faulted on, or the block's first
when the loader found it) and the file; that block is never placed, the guest is stopped (its
vCPUs kicked, then the range released: a vCPU waiting on the page leaves KVM_RUN on its pending
kick before it runs another instruction) and the error is kept (`error`, `wait_resident`).

While memory is still loading the machine's run state is held (`hv.vmm.owner`): the control
socket's pause, resume, stop, guest-check, snapshot and migration are refused with `Busy`,
since each reads guest memory with the interpreter lock held (which the fault server needs) or
would see unloaded pages as never touched.

A restore with `record_ms` records the pages the guest faults on in its first `record_ms` ms (the
loader held off meanwhile, so every first touch is a fault) and, once every page is in, stores
them in the snapshot as its working set (`migrate.snapshot.workingset`).

Over 450 lines, as one module on purpose: the fault server, the loader, the recording and the
failure path share the blocks' states under one lock, and "a block is placed once, whole, and
only checked" is an argument over all of them together; reading a block is `blocks`.
"""

from __future__ import annotations

import enum
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

import formats
from hv.errors import HvError
from hv.kvm.dirty import PAGE_SIZE
from hv.kvm.memory import GuestMemory
from hv.kvm.userfault import Fault, Userfault
from hv.vmm.machine import Machine, RunState, StopReason
from hv.vmm.owner import owner_of
from migrate.errors import CorruptPage, SnapshotError
from migrate.snapshot.blocks import BadRun, BlockReader
from migrate.snapshot.pagetable import PageTable
from migrate.snapshot.workingset import store_working_set

log = logging.getLogger(__name__)

PLACE_PAGES = 64  # pages per UFFDIO_COPY: the C fault thread waits for the lock at most this long
ZERO_STAGE_BYTES = 64 << 20  # per stage_zero call, for the same reason
URGENT_NICE = -10


class Block(enum.IntEnum):
    PENDING = 0
    BUSY = 1  # a thread is loading it
    DONE = 2  # every page of it in place
    ZERO = 3  # no data in any file: the C fault thread places zero pages
    FAILED = 4  # a check failed: never placed


@dataclass(frozen=True)
class LazyStats:
    """What a lazy restore did, times from the `restore` call (ms; None: not yet)."""

    faults: int  # fault events the userfaultfd layer read (zero pages the C thread placed included)
    fault_blocks: int  # blocks loaded because a thread faulted on them
    pages_on_demand: int  # data pages those blocks held
    pages_by_loader: int  # data pages the background loader placed
    zero_pages_faulted: int  # zero pages placed at a fault by the C thread, without Python
    first_run_ms: float | None  # the guest's first run: its vCPUs left for KVM_RUN
    first_fault_ms: float | None  # the first fault the fault server took
    resident_ms: float | None  # every block in place, the RAM unregistered
    table_ms: float  # building the page table (within the time to the first run)
    table: str  # how each file's runs were found: "index", "read", "mem", "mem-hashed"
    fault_p50_us: int
    fault_p99_us: int
    loader_done: bool
    error: str | None
    preloaded_blocks: int = 0  # blocks of the snapshot's recorded working set loaded first
    working_set_ms: float | None = None  # ... all of them in (by the loader or by faults)
    recorded_pages: int = 0  # pages this restore recorded (`record_ms`)
    working_set_stored: bool = False  # ... and wrote into the snapshot

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.1f} ms"
        return (f"first run {ms(self.first_run_ms)}, resident {ms(self.resident_ms)}; {self.faults} faults, "
                f"{self.fault_blocks} blocks on demand ({self.pages_on_demand} pages), {self.pages_by_loader} pages "
                f"by the loader; page table by {self.table} in {self.table_ms:.1f} ms; fault p50/p99 "
                f"{self.fault_p50_us}/{self.fault_p99_us} us")


_restores: weakref.WeakKeyDictionary[Machine, LazyRestore] = weakref.WeakKeyDictionary()


def lazy_restore_of(machine: Machine) -> LazyRestore | None:
    """The lazy restore `machine` came from, if it did."""
    return _restores.get(machine)


class LazyRestore:
    """The pages of a lazily restored `machine` (built by `restore(..., lazy=True)`): its RAM
    registered, the fault server running (a restore's own reads of guest memory, as KVM applies
    the vCPU state, are served too), the loader waiting for `resume` (or a fault once the guest
    ran). `verify` False skips the block hashes (the memory digest's checks: `migrate restore
    --no-verify`); a PAGES run's own checksum is still checked, as every reader of one does."""

    def __init__(self, machine: Machine, table: PageTable, *, started: float, verify: bool = True,
                 record_ms: int = 0) -> None:
        self.machine, self.table, self.started, self.verify = machine, table, started, verify
        self.record_ms = record_ms
        self._recorded: list[int] | None = [] if record_ms > 0 else None  # faulted pages, first first
        self._record_until: float | None = None  # (perf_counter) the recording's window ends
        self.error: CorruptPage | None = None
        self._failure: str | None = None  # why the loading stopped, if it did before the end
        self._state = np.where(table.has_data, Block.PENDING, Block.ZERO).astype(np.uint8)
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._go = threading.Event()  # the loader may begin
        self._autostart = True  # a fault after the guest ran sets `_go`
        self._resident = threading.Event()  # every block in, or given up on
        self._stop_r, self._stop_w = os.pipe()
        self._first_run: float | None = None
        self._first_fault: float | None = None
        self._resident_at: float | None = None
        self._counts = {"fault_blocks": 0, "pages_on_demand": 0, "pages_by_loader": 0, "preloaded_blocks": 0}
        self._stored = False
        self._working_set_at: float | None = None
        self._wanted: dict[int, list[int]] = {}  # block being loaded -> pages a thread faulted on since
        self._uffd: list[Userfault] = []
        self._hold: AbstractContextManager[object] | None = None
        self._closed = False
        self._last_stats = (0, 0, 0, 0)
        self._memory: GuestMemory = machine.vm.memory
        try:
            for region in self._memory.regions:
                self._uffd.append(Userfault(region))
            self._hold = owner_of(machine).hold(f"lazy restore of {table.head.path} (memory loading)")
            self._hold.__enter__()
        except BaseException:
            self._release_range()
            os.close(self._stop_r)
            os.close(self._stop_w)
            table.close()
            raise
        self._server = threading.Thread(target=self._serve, name="lazy-faults", daemon=True)
        self._loader = threading.Thread(target=self._load_all, name="lazy-loader", daemon=True)
        self._server.start()
        self._loader.start()
        _restores[machine] = self

    # --- the caller's ---

    def resume(self, *, load: bool = True) -> float:
        """Run the guest (`Machine.resume`, until its vCPUs left for KVM_RUN: the first run);
        then the loader begins, unless `load` is False (only faults bring pages in then, until
        `start_loader`). Returns the time from the `restore` call to the first run (s)."""
        self._autostart = load and self._recorded is None
        self.machine.resume(wait_running=True)
        now = time.perf_counter()
        self._first_run = now - self.started
        if self._recorded is not None:  # the loader waits out the window: every first touch is a fault
            self._record_until = now + self.record_ms / 1000
            timer = threading.Timer(self.record_ms / 1000, self._go.set if load else lambda: None)
            timer.daemon = True
            timer.start()
        elif load:
            self._go.set()
        return self._first_run

    def start_loader(self) -> None:
        self._go.set()

    @property
    def resident(self) -> bool:
        return self._resident.is_set() and self._failure is None

    def wait_resident(self, timeout: float | None = None) -> LazyStats:
        """Wait until every page is in (or the loading stopped): the stats; `CorruptPage` if a
        check failed, `SnapshotError` if the loading stopped otherwise, `TimeoutError` if
        `timeout` passed first."""
        if not self._resident.wait(timeout):
            raise TimeoutError(f"lazy restore of {self.table.head.path}: memory not resident after {timeout} s")
        if self.error is not None:
            raise self.error
        if self._failure is not None:
            raise SnapshotError(self.table.head.path, f"the lazy restore stopped: {self._failure}")
        return self.stats()

    def stats(self) -> LazyStats:
        faults, zero, p50, p99 = self._uffd_stats()

        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1000, 3)
        with self._lock:
            counts = dict(self._counts)
        return LazyStats(faults=faults, zero_pages_faulted=zero, first_run_ms=ms(self._first_run),
                         recorded_pages=len(self._recorded or ()), working_set_stored=self._stored,
                         working_set_ms=ms(self._working_set_at),
                         first_fault_ms=ms(self._first_fault), resident_ms=ms(self._resident_at),
                         table_ms=round(self.table.seconds * 1000, 3),
                         table="+".join(sorted({s.found for s in self.table.sources})),
                         fault_p50_us=p50, fault_p99_us=p99, loader_done=self.resident,
                         error=str(self.error) if self.error is not None else self._failure, **counts)

    def _uffd_stats(self) -> tuple[int, int, int, int]:
        """(faults, zero pages the C thread placed, latency p50 us, p99 us); once the range is
        unregistered, as they were then."""
        with self._lock:
            return self._uffd_stats_of(self._uffd) if self._uffd else self._last_stats

    @staticmethod
    def _uffd_stats_of(uffds: list[Userfault]) -> tuple[int, int, int, int]:
        faults = zero = p50 = p99 = 0
        for uffd in uffds:
            s = uffd.stats()
            faults, zero = faults + s.faults, zero + s.fast
            p50, p99 = max(p50, s.latency.p50_ns // 1000), max(p99, s.latency.p99_ns // 1000)
        return faults, zero, p50, p99

    def close(self) -> None:
        """Stop loading, unregister the RAM, close the files. For a machine that is stopped, or
        whose memory is all in: a page never loaded reads as zero from then on."""
        self._stop.set()
        self._go.set()
        self._wake_server()
        for thread in (self._server, self._loader):
            if thread is not threading.current_thread():
                thread.join(10)
        self._release_range()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.table.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    # --- the two threads ---

    def _serve(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), URGENT_NICE)  # a vCPU waits on it
        except OSError:
            pass
        reader = BlockReader(self.table, self.verify)
        reader.warm()
        by_fd = {u.notify_fd: u for u in self._uffd}
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([*by_fd, self._stop_r], [], [])
                for fd in ready:
                    if fd in by_fd and not self._stop.is_set():
                        for fault in by_fd[fd].take_faults(512):
                            self._fault(fault, reader)
        except (HvError, OSError) as e:
            if not self._ending():
                log.error("lazy restore: the fault server stopped: %s", e)
                self._stop_guest(f"the fault server stopped: {e}")

    def _fault(self, fault: Fault, reader: BlockReader) -> None:
        now = time.perf_counter()
        if self._first_fault is None:
            self._first_fault = now - self.started
        if self._recorded is not None and (self._record_until is None or now < self._record_until):
            self._recorded.append(fault.address)
        if self._autostart and self.machine.ever_ran:
            self._go.set()
        block = self.table.block_of(fault.address)
        with self._lock:
            state = Block(self._state[block])
            if state is Block.PENDING:
                self._state[block] = Block.BUSY
            elif state is Block.BUSY:  # the loader has it: it places this page next
                self._wanted.setdefault(block, []).append(fault.address)
        if state is Block.PENDING:
            self._load(block, reader, fault.address)
        elif state in (Block.ZERO, Block.DONE):  # (a zero block before its staging: placed now)
            self._region(fault.address).resolve_zero(fault.address, PAGE_SIZE)
        # FAILED: it is never placed (the guest is being stopped)

    def _load_all(self) -> None:
        """The snapshot's recorded working set first, at once (before and while the guest
        runs; not when this restore records its own); then, from `_go` on, the rest."""
        try:
            reader = BlockReader(self.table, self.verify)
            recorded = self.table.recorded_blocks() if self._recorded is None else np.zeros(0, dtype=np.int64)
            if len(recorded):
                self._stage_zero_blocks()
                self._counts["preloaded_blocks"] = self._load_blocks(recorded, reader)
                with self._lock:  # (those a fault is loading)
                    self._lock.wait_for(lambda: self._ending() or (self._state[recorded] != Block.BUSY).all())
                self._working_set_at = time.perf_counter() - self.started
            self._go.wait()
            if self._ending():
                return
            if not len(recorded):
                self._stage_zero_blocks()
            self._load_blocks(self.table.load_order(), reader)
            with self._lock:  # blocks a fault is loading still
                self._lock.wait_for(lambda: self._ending() or not (self._state == Block.BUSY).any())
            if not self._ending():
                self._finish()
                self._store_recorded()
        except (HvError, OSError) as e:
            if not self._ending():
                log.error("lazy restore: the loader stopped: %s", e)
                self._stop_guest(f"the loader stopped: {e}")

    def _load_blocks(self, blocks: np.ndarray, reader: BlockReader) -> int:
        """Load those of `blocks` nobody has yet, in order; how many this did."""
        done = 0
        for block in blocks.tolist():
            if self._ending():
                break
            with self._lock:
                if self._state[block] != Block.PENDING:
                    continue
                self._state[block] = Block.BUSY
            self._load(block, reader, None)
            done += 1
        return done

    def _store_recorded(self) -> None:
        """What this restore recorded, into its snapshot for the next (a failure only logged:
        the guest has what it needs)."""
        if self._recorded is None:
            return
        try:
            store_working_set(self.table.head.path, np.array(self._recorded, dtype=np.uint64), self.record_ms)
            self._stored = True
        except (SnapshotError, formats.FormatError, OSError) as e:
            log.warning("lazy restore: the recorded working set was not stored: %s", e)

    def _stage_zero_blocks(self) -> None:
        """Blocks with no data: zero pages, placed by the C fault thread when touched."""
        zero = np.flatnonzero(self._state == Block.ZERO)
        if not len(zero):
            return
        cuts = np.flatnonzero((np.diff(zero) != 1) | np.isin(zero[1:], self.table.first_block)) + 1
        for group in np.split(zero, cuts):  # consecutive blocks of one RAM range
            start, _, _ = self.table.block_span(int(group[0]))
            last, _, pages = self.table.block_span(int(group[-1]))
            end = last + pages * PAGE_SIZE
            for at in range(start, end, ZERO_STAGE_BYTES):
                self._region(at).stage_zero(at, min(end - at, ZERO_STAGE_BYTES))

    def _finish(self) -> None:
        """Every block in: the RAM back to ordinary memory, the run state free again, the files
        closed."""
        self._resident_at = time.perf_counter() - self.started
        self._stop.set()
        self._wake_server()
        self._server.join(10)
        self._release_range()
        self.table.close()  # (nobody reads them any more: the server is gone, this is the loader)
        self._resident.set()
        log.info("lazy restore of %s: resident after %.1f ms", self.table.head.path, self._resident_at * 1000)

    def _ending(self) -> bool:
        return self._stop.is_set() or self.error is not None or self.machine.state in (RunState.STOPPED,
                                                                                       RunState.ERROR)

    def _wake_server(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:  # closed already
            pass

    # --- one block ---

    def _load(self, block: int, reader: BlockReader, faulted: int | None) -> None:
        """Load `block` (claimed BUSY by this thread): its bytes checked, then placed, the page
        `faulted` (a thread waits for it) first."""
        address, first_page, pages = self.table.block_span(block)
        try:
            image = reader.assemble(block)
        except (BadRun, formats.FormatError) as e:
            self._corrupt(block, address if faulted is None else faulted, e)
            return
        data = reader.data_pages(first_page, pages)
        uffd = self._region(address)
        # pieces of one kind (data, zero) and at most PLACE_PAGES; a page a thread waits for goes
        # first, and the pieces from it on next (a guest touching a page goes on to the next)
        cuts = np.union1d(np.flatnonzero(np.diff(data.astype(np.int8))) + 1, np.arange(PLACE_PAGES, pages, PLACE_PAGES))
        pieces = list(zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [pages])).tolist(), strict=True))
        wanted = [] if faulted is None else [faulted]
        while pieces:
            with self._lock:  # pages faulted on while this block loads
                wanted += self._wanted.pop(block, [])
            if wanted:
                for page in wanted:
                    i = (page - address) // PAGE_SIZE
                    _place(uffd, address, image, bool(data[i]), i, i + 1)
                i = (wanted[-1] - address) // PAGE_SIZE
                at = next((n for n, (a, b) in enumerate(pieces) if b > i), 0)
                pieces = pieces[at:] + pieces[:at]
                wanted = []
            a, b = pieces.pop(0)
            _place(uffd, address, image, bool(data[a]), a, b)
        with self._lock:
            self._wanted.pop(block, None)  # (all placed by now)
            self._state[block] = Block.DONE
            self._counts["pages_by_loader" if faulted is None else "pages_on_demand"] += int(data.sum())
            self._counts["fault_blocks"] += faulted is not None
            self._lock.notify_all()

    def _region(self, address: int) -> Userfault:
        for uffd in self._uffd:
            if uffd.guest_base <= address < uffd.guest_base + uffd.length:
                return uffd
        raise formats.PageRangeError(address, 1, "outside the guest's RAM")

    # --- failure and teardown ---

    def _corrupt(self, block: int, address: int, error: BadRun | formats.FormatError) -> None:
        """A check failed for `block` (at `address`, the page faulted on or the block's first):
        the block is never placed, the error kept, the guest stopped."""
        block_address, _, pages = self.table.block_span(block)
        if isinstance(error, BadRun):  # the run's file; else the block hash, the head's
            run = self.table.runs[error.run]
            path = self.table.sources[int(run["source"])].path
            first, count, cause = int(run["address"]), int(run["pages"]), error.error
        else:
            path, first, count, cause = self.table.head.path, block_address, pages, error
        corrupt = CorruptPage(path, address, first, count, cause)
        with self._lock:
            self._state[block] = Block.FAILED
            if self.error is None:
                self.error = corrupt
            self._lock.notify_all()
        log.error("lazy restore: %s", corrupt)
        self._stop_guest(str(corrupt))

    def _stop_guest(self, why: str) -> None:
        """Stop the guest without letting it run on a page that is not right: its vCPUs kicked
        first (a stop requested), then the range released (a vCPU waiting on a page leaves
        KVM_RUN on the pending kick, before any guest instruction). On a thread of its own: the
        one that found it may be the fault server, which the stop may need."""
        self._failure = self._failure or why

        def stop() -> None:
            self.machine.request_stop(StopReason("fatal", why))
            self._stop.set()
            self._go.set()
            self._wake_server()
            self._release_range()
            self._resident.set()  # (wait_resident wakes, and raises the error)
        threading.Thread(target=stop, name="lazy-stop", daemon=True).start()

    def _release_range(self) -> None:
        """Unregister the RAM (once) and give the run state back."""
        with self._lock:
            if self._uffd:
                self._last_stats = self._uffd_stats_of(self._uffd)
            uffds, self._uffd = self._uffd, []
            hold, self._hold = self._hold, None
        for uffd in uffds:
            try:
                uffd.close()
            except HvError as e:  # (the VM's memory may be gone already)
                log.info("lazy restore: closing %r: %s", uffd, e)
        if hold is not None:
            hold.__exit__(None, None, None)


def _place(uffd: Userfault, address: int, image: memoryview, data: bool, first: int, end: int) -> None:
    """Pages [first, end) of the block at `address`, all data (from `image`) or all zero pages;
    those in place already stay as they are."""
    if data:
        uffd.resolve_copy(address + first * PAGE_SIZE, image[first * PAGE_SIZE:end * PAGE_SIZE])
    else:
        uffd.resolve_zero(address + first * PAGE_SIZE, (end - first) * PAGE_SIZE)


def report_when_resident(restore: LazyRestore, say: Callable[[str, bool], None]) -> None:
    """Call `say(line, failed)` once, from a thread of its own, when `restore`'s memory is all in
    (its figures) or a check failed (the error)."""
    def wait() -> None:
        try:
            stats = restore.wait_resident()
        except SnapshotError as e:  # (CorruptPage among them)
            say(f"lazy restore stopped the guest: {e}", True)
            return
        say(f"lazy restore: memory resident; {stats.summary()}", False)
    threading.Thread(target=wait, name="lazy-report", daemon=True).start()
