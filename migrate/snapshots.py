"""Snapshots: a paused machine's whole state to a file, and back into a fresh VM.

A snapshot file is one kvmigrate stream (formats/SPEC.md): header, CONFIG (`MachineConfig`),
LAYOUT, one VCPU per vCPU, VM_STATE, one DEVICE per device, PAGES, END (totals and the memory
digest). Three kinds:

- full: every page the guest ever touched (untouched memory is zero and is not stored);
- incremental (`base=`): only pages dirtied since `base`, which must be the last snapshot of the
  same VM taken with dirty tracking on; restoring it restores the chain, base first;
- mappable: no PAGES; memory goes raw to `FILE.mem` (RAM ranges back to back, then a trailer
  naming the snapshot), which a restore maps MAP_PRIVATE, so pages load on first touch and
  restore time does not depend on memory size (as Firecracker's snapshots do).

Files are written to a temporary name and renamed when complete: a failed snapshot leaves no
file that looks whole. A restore reads and checks everything (versions, checksums, layout,
totals, memory digest, CPUID) into staging memory before it creates the VM, so a corrupt or
foreign snapshot never reaches a VM.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import formats
from formats import ConfigRecord, StreamReader, StreamWriter
from hv.vmm.builder import blank_machine
from hv.vmm.control import Progress
from hv.kvm.kvm import Kvm
from hv.vmm.machine import Machine, RunState, discard_on_error
from hv.kvm.memory import GuestMemory, MemoryRegion, RamBacking
from hv.kvm.vm import VmConfig
from migrate import digest, pages
from migrate.disks import DiskPolicy
from migrate.errors import IncompatibleError, MissingSections, SnapshotError, StateShapeError
from migrate.records import EXPECT, Collected, state_sections
from migrate.state import (
    host_features,
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

READ_CHUNK = 1 << 20
MEM_TRAILER_MAGIC = b"KVMIGMEM"
MEM_TRAILER_SIZE = 4096
MAX_CHAIN = 64



class SnapshotKind(StrEnum):
    """What a snapshot file holds (the values are what `inspect` and the CLI print)."""

    FULL = "full"  # every touched page
    INCREMENTAL = "incremental"  # the pages dirtied since its base
    MAPPABLE = "mappable"  # no pages: memory is the raw FILE.mem next to it

    @classmethod
    def of(cls, config: MachineConfig) -> SnapshotKind:
        return cls.MAPPABLE if config.memory_file else cls.INCREMENTAL if config.base else cls.FULL


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


@dataclass
class _LastSnapshot:
    snapshot_id: str
    digest: int
    dirty_generation: int


# The last snapshot of each live machine taken with dirty tracking on: an incremental snapshot
# may only build on it, and only if nobody fetched the dirty log since.
_tracked: weakref.WeakKeyDictionary[Machine, _LastSnapshot] = weakref.WeakKeyDictionary()


def snapshot(machine: Machine, path: str | Path, *, base: str | Path | None = None, level: int = 3,
             mappable: bool = False, track_dirty: bool = False, workers: int = 2,
             progress: Progress | None = None) -> SnapshotInfo:
    """Write `machine`'s state to `path`. A running machine is paused for the copy and resumed
    after; a paused one stays paused. `track_dirty` keeps dirty logging on afterwards so that a
    later `snapshot(..., base=path)` can store only what changed (incremental ones always do)."""
    path = Path(path)
    t0 = time.perf_counter()
    was_running = machine.state is RunState.RUNNING
    paused_at = time.perf_counter()
    if was_running:
        machine.pause()
    try:
        info = _write(machine, path, base=Path(base) if base else None, level=level,
                      mappable=mappable, track=track_dirty or base is not None, workers=workers,
                      progress=progress)
    finally:
        if was_running and machine.state is RunState.PAUSED:
            machine.resume()
    pause = time.perf_counter() - paused_at if was_running else 0.0
    return SnapshotInfo(**{**info, "pause_seconds": pause, "seconds": time.perf_counter() - t0})


def _write(machine: Machine, path: Path, *, base: Path | None, level: int, mappable: bool, track: bool,
           workers: int, progress: Progress | None) -> dict[str, Any]:
    if machine.state not in (RunState.PAUSED, RunState.CREATED):
        raise SnapshotError(path, f"the machine is {machine.state.value}; a snapshot needs it paused")
    vm = machine.vm
    snapshot_id = new_snapshot_id()
    base_ref = None
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
        runs, _ = pages.dirty_runs(vm.fetch_dirty_logs())
        base_ref = SnapshotRef(base_config.snapshot_id, last.digest, os.path.relpath(base, path.parent))
    else:
        if track:
            if not vm.dirty_logging:
                vm.enable_dirty_log()
            for _ in vm.fetch_dirty_logs():  # from now on the log counts changes since this one
                pass
        runs = pages.populated_runs(vm.memory)

    mem_ref = None
    mem_path = path.with_name(path.name + ".mem")
    if mappable:
        mem_ref = MemoryFileRef(mem_path.name, vm.memory.total_size + MEM_TRAILER_SIZE, snapshot_id)
    config = machine_config(machine, snapshot_id=snapshot_id, base=base_ref, memory_file=mem_ref)
    state = capture(machine, config)
    tmp = path.with_name(f".{path.name}.{snapshot_id[:8]}.tmp")
    tmp_mem = mem_path.with_name(f".{mem_path.name}.{snapshot_id[:8]}.tmp")
    writer = StreamWriter(registry(), producer=PRODUCER)
    raw = 0
    try:
        with open(tmp, "wb") as f:
            f.writelines([writer.header(), writer.config(state.config), writer.layout(state.layout)])
            f.writelines(state_sections(writer, state))
            zero = None
            if mappable:
                raw = _write_memory_file(tmp_mem, vm.memory, runs, snapshot_id)
            else:
                with pages.PageEncoderPool(level, workers, stable=True) as pool:  # the guest is paused
                    for section in pool.encode(runs):
                        f.writelines(writer.pages_parts(section))
                        raw += section.totals.raw_bytes
                        if progress:
                            progress({"stage": "memory", "bytes": raw})
                    zero = pool.zero_ranges
            ram_digest = digest.digest(vm.memory, workers, zero=zero)
            f.write(writer.end(ram_digest))
            f.flush()
            os.fsync(f.fileno())
        if mappable:
            os.replace(tmp_mem, mem_path)
        os.replace(tmp, path)  # the snapshot exists from here on, whole
    except BaseException:
        for leftover in (tmp, tmp_mem):
            leftover.unlink(missing_ok=True)
        raise
    if track:
        _tracked[machine] = _LastSnapshot(snapshot_id, ram_digest, vm.dirty_log_generation)
    totals = writer.totals
    file_bytes = path.stat().st_size + (mem_path.stat().st_blocks * 512 if mappable else 0)
    log.info("snapshot %s: %s, %d pages, %d bytes", path, snapshot_id, totals.pages, file_bytes)
    return dict(path=str(path), snapshot_id=snapshot_id,
                kind=SnapshotKind.of(config),
                base=str(base) if base else None, pages=totals.pages, raw_bytes=raw,
                file_bytes=file_bytes, memory_bytes=vm.memory.total_size)


def _write_memory_file(path: Path, memory: GuestMemory, runs: list[pages.MemoryRun], snapshot_id: str) -> int:
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


# --- reading -----------------------------------------------------------------------------------


def _open_snapshot(path: str | Path) -> BinaryIO:
    """A snapshot file opened for reading, if it is a regular file: a path a snapshot names (its
    base) may be anything, and a FIFO or a device must neither block nor be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise SnapshotError(path, f"cannot be opened: {e.strerror}") from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotError(path, "is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_config(path: str | Path) -> MachineConfig:
    """A snapshot's CONFIG, reading no further than it (it follows the header)."""
    reader = StreamReader(registry(), expect=EXPECT)
    with _open_snapshot(path) as f:
        while chunk := f.read(4096):
            for record in reader.feed(chunk):
                if isinstance(record, ConfigRecord):
                    return record.config
    reader.finish()
    raise SnapshotError(path, "has no CONFIG section")


def _read_stream(path: Path, expected: formats.DeviceLayout, sink: pages.MemorySink | None,
                 progress: Progress | None = None) -> Collected:
    """Read one snapshot file, checking everything; pages go to `sink` (None: checked, dropped)."""
    reader = StreamReader(registry(), expected_layout=expected, expect=EXPECT)
    loaded = Collected(sink)
    done = 0
    with _open_snapshot(path) as f:
        while chunk := f.read(READ_CHUNK):
            done += len(chunk)
            loaded.take(reader.feed(chunk))
            if progress:
                progress({"stage": "read", "file": str(path), "bytes": done})
    reader.finish()
    return loaded


def _state(loaded: Collected, path: Path, kvm: Kvm | None = None) -> MachineState:
    """The snapshot's state, its shape and its vCPUs' registers checked (against this host's
    features when `kvm` is given); a state KVM would refuse is a corrupt snapshot."""
    try:
        return loaded.state(host_features(kvm) if kvm is not None else None)
    except MissingSections as e:
        raise SnapshotError(path, f"is missing {', '.join(e.missing)} sections") from e


def snapshot_chain(path: Path) -> list[tuple[Path, MachineConfig]]:
    """The files to apply, base first, each checked to be the one its successor names."""
    chain = [(path, read_config(path))]
    while (ref := chain[-1][1].base) is not None:
        if len(chain) >= MAX_CHAIN:
            raise SnapshotError(path, f"an incremental chain longer than {MAX_CHAIN}")
        base_path = (chain[-1][0].parent / ref.path).resolve()
        if not base_path.exists():
            raise SnapshotError(chain[-1][0], f"its base {base_path} is missing")
        base_config = read_config(base_path)
        if base_config.snapshot_id != ref.snapshot_id:
            raise SnapshotError(base_path, f"is snapshot {base_config.snapshot_id}, but "
                                           f"{chain[-1][0].name} builds on {ref.snapshot_id}")
        chain.append((base_path, base_config))
    return chain[::-1]


def _vm_config(config: MachineConfig, path: Path) -> VmConfig:
    """The VM a snapshot's CONFIG describes, if it is one at all (memory a positive whole number
    of pages within the physical address space, 1 to 4096 vCPUs): checked before any memory is
    shaped after it."""
    size, vcpus = config.mem_size, config.vcpus
    if not (0 < size <= formats.layout.MAX_ADDRESS // 2 and size % formats.PAGE_SIZE == 0):
        raise SnapshotError(path, f"describes {size} bytes of guest RAM, not a whole number of pages "
                                  f"below {formats.layout.MAX_ADDRESS // 2:#x}")
    if not 0 < vcpus <= formats.layout.MAX_VCPUS:
        raise SnapshotError(path, f"describes {vcpus} vCPUs")
    return config.vm_config()


def _config_problems(saved: VmConfig, wanted: VmConfig) -> list[str]:
    return [f"{name}: the snapshot has {getattr(saved, name)!r}, this VM would have {getattr(wanted, name)!r}"
            for name in ("mem_size", "vcpus", "irqchip", "pit") if getattr(saved, name) != getattr(wanted, name)]


def _scratch_memory(vm_config: VmConfig) -> GuestMemory:
    """Host memory shaped as the guest's RAM, in no VM: pages are checked here before one exists."""
    memory = GuestMemory()
    for base, length in vm_config.memory_layout():
        memory.insert(MemoryRegion(base, length, slot=-1, backing=RamBacking.host_filled(base, length)))
    return memory


def _open_memory_file(path: Path, ref: MemoryFileRef) -> int:
    """The mappable snapshot's `.mem`, opened read-only and checked (a file next to the snapshot,
    regular, of the size and with the trailer the snapshot names); the caller closes the fd."""
    name = ref.path
    if PurePosixPath(name).name != name or name in ("", ".", ".."):
        raise SnapshotError(path, f"names its memory file {name!r}, which is not a file next to it")
    mem_path = path.parent / name
    try:  # not following a link, not blocking on a FIFO: a regular file or nothing
        fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SnapshotError(mem_path, f"the memory file cannot be opened: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(mem_path, "the memory file is not a regular file")
        if st.st_size != ref.size:
            raise SnapshotError(mem_path, f"is {st.st_size} bytes, the snapshot says {ref.size}")
        trailer = os.pread(fd, len(MEM_TRAILER_MAGIC) + 32, st.st_size - MEM_TRAILER_SIZE)
        if trailer != MEM_TRAILER_MAGIC + ref.snapshot_id.encode():
            raise SnapshotError(mem_path, "belongs to another snapshot (trailer mismatch)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _shared_memory(fd: int, vm_config: VmConfig) -> GuestMemory:
    """The `.mem` mapped MAP_PRIVATE: pages load on first touch, the guest's writes stay its own,
    but pages it has not written are the file's: the file must not change while the VM runs."""
    memory, at = GuestMemory(), 0
    for base, length in vm_config.memory_layout():
        mapping = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=at)
        memory.insert(MemoryRegion(base, length, slot=-1, backing=mapping))
        at += length
    return memory


def _copied_memory(fd: int, vm_config: VmConfig) -> GuestMemory:
    """The `.mem` read into fresh anonymous memory, the VM's own: nothing of the file stays mapped,
    so a change to it (even a truncation) cannot reach the guest. Only the file's data extents are
    read (it is sparse: untouched guest memory is a hole, and stays untouched here)."""
    memory, at = _scratch_memory(vm_config), 0
    for region in memory.regions:
        _read_extents(fd, at, region.view)
        at += region.size
    return memory


def _read_extents(fd: int, start: int, into: memoryview) -> None:
    """Copy the data extents of the file's [start, start + len(into)) into `into` (holes skipped)."""
    end, pos = start + len(into), start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        while data < hole:
            n = os.preadv(fd, [into[data - start: min(hole, data + READ_CHUNK * 64) - start]], data)
            if n <= 0:
                raise SnapshotError(f"fd {fd}", f"the memory file ended at byte {data} while being read")
            data += n
        pos = hole


def restore(path: str | Path, kvm: Kvm, *, config: VmConfig | None = None,
            console: Callable[[bytes], None] = lambda b: None, verify_memory: bool = True,
            disk: str | Path | None = None, disk_dir: str | Path | None = None, share_memory: bool = False,
            virtio_console: Callable[[bytes], None] | None = None,
            progress: Progress | None = None) -> Machine:
    """A paused machine holding the snapshot at `path` (and its chain), checked before any VM
    exists: versions, checksums, layout, the state's shape, totals, CPUID and (`verify_memory`,
    the default, for every kind) the memory digest. `config`, when given, is the VM this VMM
    would build; any difference is refused.

    A guest with a disk gets `disk` (this host's file for it) or the file of the snapshot's disk's
    name in `disk_dir`; the snapshot's own path is never opened (`migrate.disks`). `virtio_console`
    takes the virtio console's output (default: `console`).

    A mappable snapshot's `.mem` is read into the VM's own memory (only its data extents); with
    `share_memory` it is mapped instead (MAP_PRIVATE, restored in milliseconds with `verify_memory`
    off, as Firecracker does), and then the file must not change while the VM runs: a page the
    guest has not written yet is the file's, and a truncated file is SIGBUS."""
    path = Path(path)
    chain = snapshot_chain(path)
    head = chain[-1][1]
    vm_config = _vm_config(head, path)
    if config is not None and (problems := _config_problems(vm_config, config)):
        raise IncompatibleError(problems)
    expected = expected_layout(head)
    mappable = head.memory_file is not None
    shared = mappable and share_memory
    disk_file = None
    if head.virtio is not None and head.virtio.disk is not None:  # before any VM or memory
        disk_file = DiskPolicy.of(disk, disk_dir).open(head.virtio.disk, head.virtio.disk_readonly)
    try:
        if mappable:
            fd = _open_memory_file(path, head.memory_file)
            try:
                staging = _shared_memory(fd, vm_config) if shared else _copied_memory(fd, vm_config)
            finally:
                os.close(fd)
            if shared:
                log.warning("%s: guest memory is shared with %s (MAP_PRIVATE): the file must not change or "
                            "shrink while the VM runs", path, head.memory_file.path)
        else:
            staging = _scratch_memory(vm_config)
        sink = pages.MemorySink(staging)
        loaded = None
        for file_path, _ in chain:
            loaded = _read_stream(file_path, expected, None if mappable else sink, progress)
            if verify_memory:
                digest.verify(loaded.end, staging, None if mappable else sink.touched)
        state = _state(loaded, path, kvm)  # its shape and registers checked, before any VM exists
        if problems := cpuid_problems(state.vcpus[0].cpuid, kvm.guest_cpuid):
            raise IncompatibleError(problems)

        by_base = {r.guest_base: r for r in staging.regions}
        virtio = head.virtio.build(virtio_console or console, disk_file) if head.virtio else None
        machine = blank_machine(kvm, vm_config, console, virtio=virtio, backing=lambda base, size: RamBacking(
            by_base[base].mapping, anonymous=not shared))
    finally:
        if disk_file is not None:
            disk_file.close()  # the device has its own descriptor
    with discard_on_error(machine):
        apply(machine, state)
        machine.start(paused=True)
    return machine


def inspect(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """What a snapshot holds, and whether it checks out (every checksum and the state's shape;
    with `verify`, the memory digest over the pages applied to scratch memory, or over the `.mem`
    of a mappable snapshot, which must be there and be its own)."""
    path = Path(path)
    result: dict[str, Any] = {"path": str(path), "file_bytes": path.stat().st_size}
    try:
        config = read_config(path)
        vm_config = _vm_config(config, path)
        # the names `migrate snapshot --json` (SnapshotInfo) gives the same things
        result.update(snapshot_id=config.snapshot_id, kind=SnapshotKind.of(config),
                      base=config.base.path if config.base else None, memory_bytes=config.mem_size)
        result["config"] = {"vcpus": config.vcpus, "irqchip": config.irqchip, "pit": config.pit,
                            "tsc_khz": config.tsc_khz}
        mappable = config.memory_file is not None
        if mappable and verify:  # the .mem it names is part of it: missing or foreign, it is not whole
            fd = _open_memory_file(path, config.memory_file)
            try:
                scratch = _copied_memory(fd, vm_config)
            finally:
                os.close(fd)
        else:
            scratch = _scratch_memory(vm_config)
        expected = expected_layout(config)
        sink = pages.MemorySink(scratch)
        loaded = _read_stream(path, expected, sink if verify and not mappable else None)
        result["layout"] = [{"id": d.device_id, "kind": d.kind, "pio": [str(r) for r in d.pio],
                             "mmio": [str(r) for r in d.mmio], "irqs": list(d.irqs),
                             "state_version": d.state_version} for d in loaded.layout.devices]
        h = loaded.header
        result["header"] = {"format_version": f"{h.major}.{h.minor}", "producer": h.producer, "flags": h.flags}
        result["sections"] = loaded.sections
        result["memory_ranges"] = [str(r) for r in loaded.layout.memory.ranges]
        result["vcpus"] = [{"id": v.vcpu_id, "rip": hex(v.regs.rip), "mp_state": v.mp_state}
                           for v in loaded.vcpus]
        t = loaded.end.totals
        result.update(pages=t.pages, raw_bytes=t.raw_bytes)
        result["totals"] = {"pages": t.pages, "zero_pages": t.zero_pages, "raw_bytes": t.raw_bytes,
                            "payload_bytes": t.payload_bytes, "sections": t.sections}
        _state(loaded, path)  # the state's shape, as a restore checks it
        if verify and config.base is None:
            digest.verify(loaded.end, scratch, None if mappable else sink.touched)
            result["digest"] = f"verified (with {config.memory_file.path})" if mappable else "verified"
        elif verify:
            result["digest"] = "not checked (incremental: restore checks the chain)"
        else:
            result["digest"] = "not checked (--no-verify)"
        result["verified"] = True
    except (formats.FormatError, SnapshotError, StateShapeError, MissingSections) as e:
        result["verified"] = False
        result["error"] = {"type": type(e).__name__, "message": str(e)}
    return result
