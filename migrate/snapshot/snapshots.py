"""Snapshots: a paused machine's whole state to a file, and back into a fresh VM.

A snapshot file is one kvmigrate stream (formats/SPEC.md): header, CONFIG (`MachineConfig`),
LAYOUT, one VCPU per vCPU, VM_STATE, one DEVICE per device, PAGES, a MEMORY_INDEX (where each
page is, and the digest's block hashes: for a lazy restore), END (totals and the memory digest).
Three kinds:

- full: every page the guest ever touched (untouched memory is zero and is not stored);
- incremental (`base=`): only pages dirtied since `base`, which must be the last snapshot of the
  same VM taken with dirty tracking on; restoring it restores the chain, base first;
- mappable: no PAGES; memory goes raw to `FILE.mem` (RAM ranges back to back, then a trailer
  naming the snapshot), which a restore maps MAP_PRIVATE, so pages load on first touch and
  restore time does not depend on memory size (as Firecracker's snapshots do).

A snapshot of a guest with a disk also holds the disk as it was at its instant: `FILE.disk`,
copied in the pause and recorded in CONFIG (`migrate.snapshot.disk_copy`); a restore gives the
guest that disk, never one that changed since (`migrate.snapshot.disk_restore`, `migrate.disks`).

Files are written to a temporary name and renamed when complete (after the guest resumed: the
disk copy's fsync needs no pause): a failed snapshot leaves no file that looks whole. What a
file is and how one is read and checked (its kinds, the `.mem` trailer, the chain, staging
memory) is `migrate.snapshot.files`; this module takes, restores and inspects snapshots with it.
A restore reads and checks everything (versions, checksums, layout, totals, memory digest, CPUID,
the disk) into staging memory before it creates the VM, so a corrupt or foreign snapshot never
reaches a VM; a lazy one (`migrate.snapshot.lazy`) checks the state and the page table before,
and each block of memory as it comes in.

Over 450 lines, as one module on purpose: taking, restoring and inspecting are the three uses of
one file and share its kinds and checks; what has a concern of its own lives beside it (`files`,
`live`, `disk_copy`, `disk_restore`, `pagetable`, `lazy`, `workingset`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

import formats
from formats import StreamWriter, ZeroRanges
from migrate.events import Progress, SnapshotWritten
from hv.kvm.kvm import Kvm
from hv.vmm.machine import Machine, RunState, discard_on_error
from hv.kvm.memory import GuestMemory
from hv.kvm.vm import VmConfig
from migrate import digest, pages
from migrate.disks import DiskPolicy
from migrate.errors import IncompatibleError, MissingSections, SnapshotError, StateShapeError
from migrate.records import Collected, state_sections
from migrate.snapshot.disk_copy import DiskCapture, DiskSummary, capture_machine_disk, disk_held
from migrate.snapshot.disk_restore import disk_for_restore
from migrate.snapshot.lazy import LazyRestore, lazy_restore_of
from migrate.snapshot.live import HeldMemory, LiveStats
from migrate.snapshot.pagetable import build_table
from migrate.snapshot.workingset import describe_tail
from migrate.snapshot.spare import MachineFactory, fresh_machine
from migrate.snapshot.files import (
    MEM_TRAILER_MAGIC,
    MEM_TRAILER_SIZE,
    Companion,
    SnapshotKind,
    config_problems,
    copied_memory,
    open_memory_file,
    read_config,
    read_stream,
    scratch_memory,
    shared_memory,
    snapshot_chain,
    state_of,
    vm_config_of,
)
from migrate.state import (
    PRODUCER,
    MachineConfig,
    MachineState,
    MemoryFileRef,
    SnapshotRef,
    apply,
    capture,
    cpuid_problems,
    expected_layout,
    machine_config,
    new_snapshot_id,
    registry,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SnapshotInfo:
    path: str
    snapshot_id: str
    kind: SnapshotKind
    base: str | None
    pages: int  # pages stored (zero runs included)
    raw_bytes: int  # guest bytes stored
    file_bytes: int  # the snapshot file(s) on disk
    memory_bytes: int  # the guest's RAM
    pause_seconds: float  # how long the guest was paused for it
    seconds: float
    live: LiveStats | None = None  # what holding the instant cost (a live snapshot)
    disk: DiskSummary | None = None  # its guest's disk as it was then, copied beside it (None: no disk)


@dataclass
class _LastSnapshot:
    snapshot_id: str
    digest: int
    dirty_generation: int


# The last snapshot of each live machine taken with dirty tracking on: an incremental snapshot
# may only build on it, and only if nobody fetched the dirty log since.
_tracked: weakref.WeakKeyDictionary[Machine, _LastSnapshot] = weakref.WeakKeyDictionary()


def snapshot(machine: Machine, path: str | Path, *, base: str | Path | None = None, level: int = 3,
             mappable: bool = False, track_dirty: bool = False, workers: int = 2, live: bool = False,
             progress: Progress | None = None, index: bool = True) -> SnapshotInfo:
    """Write `machine`'s state to `path`. A running machine is paused for the copy and resumed
    after; a paused one stays paused. `track_dirty` keeps dirty logging on afterwards so that a
    later `snapshot(..., base=path)` can store only what changed (incremental ones always do).

    `live`: the guest is paused only to capture its vCPU and device state and write-protect its
    RAM, then runs while the pages are written (`migrate.snapshot.live`); the file is the same
    as a paused snapshot's, of the instant of that pause.

    `index` writes a MEMORY_INDEX before END (format 2.1), which a lazy restore reads instead of
    the whole file; without it the file is as format 2.0 wrote it."""
    path = Path(path)
    if (pager := lazy_restore_of(machine)) is not None and not pager.resident:  # its unloaded pages look untouched
        raise SnapshotError(path, "the machine's memory is still being loaded (a lazy restore): snapshot it once "
                                  "resident")
    t0 = time.perf_counter()
    was_running = machine.state is RunState.RUNNING
    base_path = Path(base) if base else None
    track = track_dirty or base is not None
    with contextlib.ExitStack() as stack:
        # registered before the pause: nothing in it can fail for want of a descriptor or a thread
        held = stack.enter_context(HeldMemory(machine.vm.memory, path)) if live else None
        paused_at = time.perf_counter()
        resumed_at: float | None = None
        if was_running:
            machine.pause()
        try:
            # the pages ever touched, read in the pause: a full snapshot's pages, and a live one's
            # unless they can be found after it (as the pages still protected or kept aside)
            read_touched = base_path is None if held is None else not held.reads_touched_after
            plan = _plan(machine, path, base=base_path, mappable=mappable, track=track, read_touched=read_touched)
            if plan.disk is not None:  # its temporary file, removed unless the snapshot got it
                stack.callback(plan.disk.discard)
            source: PageSource
            if held is None:
                source = PausedPages(machine.vm.memory, plan.runs(machine.vm.memory), workers)
            else:
                held.protect(plan.touched)
                source = held.pages(plan.dirty, plan.touched)
                if was_running:
                    machine.resume()
                    resumed_at = time.perf_counter()
            publish = _store(machine, plan, source, path, level=level, workers=workers, progress=progress,
                             index=index)
        finally:
            if was_running and machine.state is RunState.PAUSED:
                machine.resume()
            resumed_at = resumed_at or time.perf_counter()
        info = publish()  # the guest runs meanwhile
        if held is not None:
            info["live"] = held.stats()
    pause = resumed_at - paused_at if was_running else 0.0
    return SnapshotInfo(**{**info, "pause_seconds": pause, "seconds": time.perf_counter() - t0})


@dataclass
class _Plan:
    """What a snapshot holds, decided in the pause: its identity, CONFIG and state, and which
    pages: those `dirty` since its base (incremental), of those ever `touched` (None when not
    read in the pause: a live snapshot protecting unpopulated memory reads it after)."""

    snapshot_id: str
    config: MachineConfig
    state: MachineState
    dirty: pages.Touched | None
    touched: pages.Touched | None
    base: Path | None
    mappable: bool
    track: bool
    disk: DiskCapture | None  # its guest's disk copied at the instant (not yet its record: `_store`)

    def runs(self, memory: GuestMemory) -> list[pages.MemoryRun]:
        """The pages to store, as views of guest RAM (the guest paused)."""
        if self.dirty is not None:
            return pages.dirty_runs((r, self.dirty[r.guest_base]) for r in memory.regions)[0]
        return pages.populated_runs(memory, self.touched)


class PageSource(Protocol):
    """Where a snapshot's pages come from: the paused guest's RAM, or copies of the instant."""

    stable: bool  # what `runs` yields does not change while it is encoded
    background: bool  # the work on it runs on CPU time the guest leaves (a running guest comes first)

    def runs(self) -> Iterable[pages.MemoryRun]: ...

    def block_hashes(self, zero: ZeroRanges | None) -> list[tuple[int, int, np.ndarray]]:
        """The memory digest's block hashes of what was stored, per RAM region (address, size,
        hashes): the digest is their combination, a MEMORY_INDEX carries them."""
        ...


@dataclass
class PausedPages:
    """The pages of a guest paused while they are written: its own memory, read in place."""

    memory: GuestMemory
    page_runs: list[pages.MemoryRun]
    workers: int
    stable = True
    background = False  # the guest waits for it

    def runs(self) -> list[pages.MemoryRun]:
        return self.page_runs

    def block_hashes(self, zero: ZeroRanges | None) -> list[tuple[int, int, np.ndarray]]:
        return digest.block_hashes_of(self.memory, self.workers, zero=zero)


def _plan(machine: Machine, path: Path, *, base: Path | None, mappable: bool, track: bool,
          read_touched: bool) -> _Plan:
    """In the pause: what the snapshot holds. `read_touched`: read the page tables for the pages
    ever touched now."""
    if machine.state not in (RunState.PAUSED, RunState.CREATED):
        raise SnapshotError(path, f"the machine is {machine.state.value}; a snapshot needs it paused")
    vm = machine.vm
    snapshot_id = new_snapshot_id()
    base_ref = None
    dirty = None
    if base is not None:
        if mappable:
            raise SnapshotError(path, "an incremental snapshot stores its pages in the stream; "
                                      "only full snapshots can be mappable")
        base_config = read_config(base)
        last = _tracked.get(machine)
        if last is None or last.snapshot_id != base_config.snapshot_id:
            raise SnapshotError(base, "is not the last snapshot of this VM taken with dirty tracking on")
        if last.dirty_generation != vm.dirty_log_generation:
            raise SnapshotError(base, "the dirty log was read by someone else since (a migration?); "
                                      "take a full snapshot")
        dirty = {region.guest_base: bitmap for region, bitmap in vm.fetch_dirty_logs()}
        base_ref = SnapshotRef(base_config.snapshot_id, last.digest, os.path.relpath(base, path.parent))
    elif track:
        if not vm.dirty_logging:
            vm.enable_dirty_log()
        for _ in vm.fetch_dirty_logs():  # from now on the log counts changes since this one
            pass
    touched = pages.touched_pages(vm.memory) if read_touched else None
    mem_ref = None
    if mappable:
        mem_ref = MemoryFileRef(_memory_file(path).name, vm.memory.total_size + MEM_TRAILER_SIZE, snapshot_id)
    config = machine_config(machine, snapshot_id=snapshot_id, base=base_ref, memory_file=mem_ref)
    state = capture(machine, config)
    disk = capture_machine_disk(machine, path, snapshot_id)  # last: nothing after it here can fail
    return _Plan(snapshot_id, config, state, dirty, touched, base, mappable, track, disk)


def _memory_file(path: Path) -> Path:
    return path.with_name(path.name + ".mem")


def _store(machine: Machine, plan: _Plan, source: PageSource, path: Path, *, level: int, workers: int,
           progress: Progress | None, index: bool) -> Callable[[], dict[str, Any]]:
    """Write the snapshot's files at their temporary names; returns what renames them into place
    once the disk copy is on stable storage, which needs no pause (the caller runs it after)."""
    vm = machine.vm
    snapshot_id, mappable = plan.snapshot_id, plan.mappable
    # the disk copy's record (its digest) is made here, not in the pause, where a live snapshot is
    paused = machine.state is not RunState.RUNNING
    config = replace(plan.config, disk_file=plan.disk.record(guest_paused=paused)) if plan.disk else plan.config
    state = replace(plan.state, config=config)
    stream, mem = Companion.of(path, "", snapshot_id), Companion.of(path, ".mem", snapshot_id)
    writer = StreamWriter(registry(), producer=PRODUCER, index=index)
    raw = 0
    try:
        with open(stream.tmp, "wb") as f:
            f.writelines([writer.header(), writer.config(state.config), writer.layout(state.layout)])
            f.writelines(state_sections(writer, state))
            zero = None
            if mappable:
                raw = _write_memory_file(mem.tmp, vm.memory, source.runs(), snapshot_id)
            else:
                with pages.PageEncoderPool(level, workers, stable=source.stable, background=source.background) as pool:
                    for section in pool.encode(source.runs()):
                        f.writelines(writer.pages_parts(section))
                        raw += section.totals.raw_bytes
                        if progress:
                            progress(SnapshotWritten(raw))
                    zero = pool.zero_ranges
            blocks = source.block_hashes(zero)
            ram_digest = formats.combine_block_hashes(blocks)
            if index:  # where every page is, for a lazy restore (migrate.snapshot.lazy)
                f.write(writer.memory_index(state.layout.memory, [hashes for _, _, hashes in blocks]))
            f.write(writer.end(ram_digest))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _discard(stream, mem, plan.disk)
        raise
    tracked_as = _LastSnapshot(snapshot_id, ram_digest, vm.dirty_log_generation) if plan.track else None
    totals = writer.totals

    def publish() -> dict[str, Any]:
        try:
            if plan.disk:
                plan.disk.sync()
                plan.disk.file.commit()
            if mappable:
                mem.commit()
            stream.commit()  # the snapshot exists from here on, whole
        except BaseException:
            _discard(stream, mem, plan.disk)
            raise
        if tracked_as is not None:
            _tracked[machine] = tracked_as
        file_bytes = path.stat().st_size + (mem.final.stat().st_blocks * 512 if mappable else 0)
        log.info("snapshot %s: %s, %d pages, %d bytes", path, snapshot_id, totals.pages, file_bytes)
        return dict(path=str(path), snapshot_id=snapshot_id,
                    kind=SnapshotKind.of(config),
                    base=str(plan.base) if plan.base else None, pages=totals.pages, raw_bytes=raw,
                    file_bytes=file_bytes, memory_bytes=vm.memory.total_size,
                    disk=plan.disk.summary() if plan.disk else None)

    return publish


def _discard(stream: Companion, mem: Companion, disk: DiskCapture | None) -> None:
    """A failed snapshot's files, at their temporary names, removed: nothing that looks whole."""
    for leftover in (stream, mem):
        leftover.discard()
    if disk:
        disk.discard()


def _write_memory_file(path: Path, memory: GuestMemory, runs: Iterable[pages.MemoryRun], snapshot_id: str) -> int:
    """RAM ranges back to back (sparse: only touched pages are written), then the trailer."""
    offsets, at = {}, 0
    for region in memory.regions:
        offsets[region.guest_base] = at
        at += region.size
    written = 0
    with open(path, "wb") as f:
        f.truncate(at + MEM_TRAILER_SIZE)
        for run in runs:
            region, offset = memory.find(run.address, len(run.view))
            os.pwrite(f.fileno(), run.view, offsets[region.guest_base] + offset)
            written += len(run.view)
        os.pwrite(f.fileno(), MEM_TRAILER_MAGIC + snapshot_id.encode(), at)
        f.flush()
        os.fsync(f.fileno())
    return written


RestorePhase = Literal["checked", "built", "applied"]  # what `restore` tells `phase_done` it finished


def restore(path: str | Path, kvm: Kvm, *, config: VmConfig | None = None,
            console: Callable[[bytes], None] = lambda b: None, verify_memory: bool = True,
            disk: str | Path | None = None, disk_dir: str | Path | None = None, share_memory: bool = False,
            virtio_console: Callable[[bytes], None] | None = None,
            progress: Progress | None = None, disk_from_snapshot: bool = False,
            say_disk: Callable[[str], None] = log.info, lazy: bool = False, record_ms: int = 0,
            build: MachineFactory = fresh_machine, phase_done: Callable[[RestorePhase], None] | None = None) -> Machine:
    """A paused machine holding the snapshot at `path` (and its chain), checked before any VM
    exists: versions, checksums, layout, the state's shape, totals, CPUID and (`verify_memory`,
    the default, for every kind) the memory digest. `config`, when given, is the VM this VMM
    would build; any difference is refused.

    A guest with a disk gets the snapshot's disk as it was at its instant (`migrate.disks`): a
    private copy of the snapshot's `.disk`, or `disk` (this host's file for it) or the file of the
    disk's name in `disk_dir` if it holds the same, or (`disk_from_snapshot`) that file replaced by
    the `.disk`'s contents; the path the snapshot names is never opened. `say_disk` is told which.
    `virtio_console` takes the virtio console's output (default: `console`).

    A mappable snapshot's `.mem` is read into the VM's own memory (only its data extents); with
    `share_memory` it is mapped instead (MAP_PRIVATE, restored in milliseconds with `verify_memory`
    off, as Firecracker does), and then the file must not change while the VM runs: a page the
    guest has not written yet is the file's, and a truncated file is SIGBUS.

    `lazy`: no page is read before the guest runs; the machine comes back paused with its RAM
    empty and registered, `lazy_restore_of(machine).resume()` runs it and pages come in on
    fault and in the background (`migrate.snapshot.lazy` says what is checked when; the memory
    digest is checked block by block as blocks come in, `verify_memory` False skips that). A
    snapshot's recorded working set is loaded first; `record_ms` records this run's instead: the
    pages the guest touches in its first `record_ms` ms, in order, stored into the snapshot
    file once the memory is in (`migrate.snapshot.workingset`).

    `build` makes the machine once everything is checked (`migrate.snapshot.spare`: a new one, or
    one built before the restore was asked for); `phase_done` hears of each phase's end."""
    started = time.perf_counter()
    path = Path(path)
    chain = snapshot_chain(path)
    head = chain[-1][1]
    vm_config = vm_config_of(head, path)
    if config is not None and (problems := config_problems(vm_config, config)):
        raise IncompatibleError(problems)
    expected = expected_layout(head)
    memory_file = head.memory_file
    mappable = memory_file is not None
    shared = mappable and share_memory
    guest_disk = disk_for_restore(path, head, DiskPolicy.of(disk, disk_dir),  # before any VM or memory
                                  from_snapshot=disk_from_snapshot)
    table = None
    staging: GuestMemory | None = None
    try:
        if lazy:  # each file's head and index read and checked; no page
            table = build_table(chain, expected)
            loaded = table.head.collected
        elif memory_file is not None:
            fd = open_memory_file(path, memory_file)
            try:
                staging = shared_memory(fd, vm_config) if shared else copied_memory(fd, vm_config)
            finally:
                os.close(fd)
            if shared:
                log.warning("%s: guest memory is shared with %s (MAP_PRIVATE): the file must not change or "
                            "shrink while the VM runs", path, memory_file.path)
        else:
            staging = scratch_memory(vm_config)
        if staging is not None:
            sink = pages.MemorySink(staging)
            loaded = Collected()
            for file_path, _ in chain:  # base first; the last is the head
                loaded = read_stream(file_path, expected, None if mappable else sink, progress)
                if verify_memory:
                    digest.verify(loaded.ended()[2], staging, None if mappable else sink.touched)
        state = state_of(loaded, path, kvm)  # its shape and registers checked, before any VM exists
        if problems := cpuid_problems(state.vcpus[0].cpuid, kvm.guest_cpuid):
            raise IncompatibleError(problems)
        if phase_done:
            phase_done("checked")
        virtio = head.virtio.build(virtio_console or console, guest_disk.disk if guest_disk else None) \
            if head.virtio else None
        # a lazy restore's RAM is empty until the pager fills it; otherwise the checked staging memory
        machine = build(kvm, vm_config, console, virtio=virtio, staging=staging, shared=shared)
        if phase_done:
            phase_done("built")
        with discard_on_error(machine):
            pager = None if table is None else LazyRestore(machine, table, started=started, verify=verify_memory,
                                                           record_ms=record_ms)  # (it owns the table)
            table = None
            try:  # (the pages KVM reads as the state goes in are served by the pager)
                apply(machine, state)
                if machine.state is RunState.CREATED:  # (a machine built ahead is started paused already)
                    machine.start(paused=True)
            except BaseException:
                if pager is not None:
                    pager.close()
                raise
            if guest_disk:
                guest_disk.publish()  # a disk written from the snapshot replaces this side's only now
    finally:
        if table is not None:
            table.close()
        if guest_disk:
            guest_disk.close()  # the device has its own descriptor
    if guest_disk:
        say_disk(f"disk: {guest_disk.says}")
    if phase_done:
        phase_done("applied")
    return machine


def inspect(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """What a snapshot holds, and whether it checks out (every checksum and the state's shape;
    with `verify`, the memory digest over the pages applied to scratch memory, or over the `.mem`
    of a mappable snapshot, which must be there and be its own)."""
    path = Path(path)
    result: dict[str, Any] = {"path": str(path), "file_bytes": path.stat().st_size}
    try:
        config = read_config(path)
        vm_config = vm_config_of(config, path)
        # the names `migrate snapshot --json` (SnapshotInfo) gives the same things
        result.update(snapshot_id=config.snapshot_id, kind=SnapshotKind.of(config),
                      base=config.base.path if config.base else None, memory_bytes=config.mem_size)
        result["config"] = {"vcpus": config.vcpus, "irqchip": config.irqchip, "pit": config.pit,
                            "tsc_khz": config.tsc_khz}
        result["disk"] = disk_held(path, config, verify)
        memory_file = config.memory_file
        mappable = memory_file is not None
        if memory_file is not None and verify:  # the .mem it names is part of it: missing or foreign, it is not whole
            fd = open_memory_file(path, memory_file)
            try:
                scratch = copied_memory(fd, vm_config)
            finally:
                os.close(fd)
        else:
            scratch = scratch_memory(vm_config)
        expected = expected_layout(config)
        sink = pages.MemorySink(scratch)
        loaded = read_stream(path, expected, sink if verify and not mappable else None)
        h, layout, end = loaded.ended()
        result["layout"] = [{"id": d.device_id, "kind": d.kind, "pio": [str(r) for r in d.pio],
                             "mmio": [str(r) for r in d.mmio], "irqs": list(d.irqs),
                             "state_version": d.state_version} for d in layout.devices]
        result["header"] = {"format_version": f"{h.major}.{h.minor}", "producer": h.producer, "flags": h.flags}
        result["sections"] = loaded.sections
        result["memory_ranges"] = [str(r) for r in layout.memory.ranges]
        result["vcpus"] = [{"id": v.vcpu_id, "rip": hex(v.regs.rip), "mp_state": v.mp_state}
                           for v in loaded.vcpus]
        t = end.totals
        result.update(pages=t.pages, raw_bytes=t.raw_bytes)
        result["totals"] = {"pages": t.pages, "zero_pages": t.zero_pages, "raw_bytes": t.raw_bytes,
                            "payload_bytes": t.payload_bytes, "sections": t.sections}
        result.update(describe_tail(loaded))  # the index and working set, for a lazy restore
        state_of(loaded, path)  # the state's shape, as a restore checks it
        if verify and config.base is None:
            digest.verify(end, scratch, None if mappable else sink.touched)
            result["digest"] = f"verified (with {memory_file.path})" if memory_file is not None else "verified"
        elif verify:
            result["digest"] = "not checked (incremental: restore checks the chain)"
        else:
            result["digest"] = "not checked (--no-verify)"
        result["verified"] = True
    except (formats.FormatError, SnapshotError, StateShapeError, MissingSections) as e:
        result["verified"] = False
        result["error"] = {"type": type(e).__name__, "message": str(e)}
    return result
