"""What a snapshot file is, and reading one: its kinds, the files beside it (written at a temporary
name and renamed with it; opened only as plain names next to it: the raw `.mem` of a mappable one,
whose trailer names the snapshot, and the `.disk` copy of its guest's disk), a file's CONFIG, the
chain of an incremental one (base first), and a whole stream checked into staging memory.
`migrate.snapshot.snapshots` takes, restores and inspects snapshots with these; nothing here
creates a VM.
"""

from __future__ import annotations

import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import formats
from formats import ConfigRecord, StreamReader
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory, MemoryRegion, RamBacking
from hv.kvm.vm import VmConfig
from migrate import pages
from migrate.errors import MissingSections, SnapshotError
from migrate.events import Progress, SnapshotRead
from migrate.records import EXPECT, Collected
from migrate.state import MachineConfig, MachineState, MemoryFileRef, host_features, registry

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



def open_snapshot(path: str | Path) -> BinaryIO:
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
    with open_snapshot(path) as f:
        while chunk := f.read(4096):
            for record in reader.feed(chunk):
                if isinstance(record, ConfigRecord):
                    return record.config
    reader.finish()
    raise SnapshotError(path, "has no CONFIG section")


def read_stream(path: Path, expected: formats.DeviceLayout, sink: pages.MemorySink | None,
                 progress: Progress | None = None) -> Collected:
    """Read one snapshot file, checking everything; pages go to `sink` (None: checked, dropped)."""
    reader = StreamReader(registry(), expected_layout=expected, expect=EXPECT, index=True)
    loaded = Collected(sink)
    done = 0
    with open_snapshot(path) as f:
        while chunk := f.read(READ_CHUNK):
            done += len(chunk)
            loaded.take(reader.feed(chunk))
            if progress:
                progress(SnapshotRead(str(path), done))
    reader.finish()
    return loaded


def state_of(loaded: Collected, path: Path, kvm: Kvm | None = None) -> MachineState:
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


def vm_config_of(config: MachineConfig, path: Path) -> VmConfig:
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


def config_problems(saved: VmConfig, wanted: VmConfig) -> list[str]:
    return [f"{name}: the snapshot has {getattr(saved, name)!r}, this VM would have {getattr(wanted, name)!r}"
            for name in ("mem_size", "vcpus", "irqchip", "pit") if getattr(saved, name) != getattr(wanted, name)]


def scratch_memory(vm_config: VmConfig) -> GuestMemory:
    """Host memory shaped as the guest's RAM, in no VM: pages are checked here before one exists."""
    memory = GuestMemory()
    for base, length in vm_config.memory_layout():
        memory.insert(MemoryRegion(base, length, slot=-1, backing=RamBacking.host_filled(base, length)))
    return memory


@dataclass(frozen=True)
class Companion:
    """A file beside a snapshot (its `.mem`, its `.disk`, or the snapshot file itself), written at
    a hidden temporary name in the same directory and renamed to its own when the snapshot is
    whole, so a failed snapshot leaves nothing that looks like part of one."""

    final: Path
    tmp: Path

    @classmethod
    def of(cls, snapshot: Path, suffix: str, snapshot_id: str) -> Companion:
        final = snapshot.with_name(snapshot.name + suffix)
        return cls(final, final.with_name(f".{final.name}.{snapshot_id[:8]}.tmp"))

    def commit(self) -> None:
        os.replace(self.tmp, self.final)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def open_beside(path: Path, name: str, size: int, what: str) -> int:
    """The file `name` the snapshot at `path` names as its `what` (memory file, disk copy),
    opened read-only and checked: a plain name next to the snapshot (never a path elsewhere), a
    regular file (not following a link, not blocking on a FIFO) of the size the snapshot says.
    The caller closes the fd."""
    if PurePosixPath(name).name != name or name in ("", ".", ".."):
        raise SnapshotError(path, f"names its {what} {name!r}, which is not a file next to it")
    beside = path.parent / name
    try:
        fd = os.open(beside, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise SnapshotError(beside, f"the {what} cannot be opened: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(beside, f"the {what} is not a regular file")
        if st.st_size != size:
            raise SnapshotError(beside, f"is {st.st_size} bytes, the snapshot says {size}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_memory_file(path: Path, ref: MemoryFileRef) -> int:
    """The mappable snapshot's `.mem`, opened read-only and checked (`open_beside`, and the
    trailer naming the snapshot); the caller closes the fd."""
    if ref.size < MEM_TRAILER_SIZE:
        raise SnapshotError(path, f"names a memory file of {ref.size} bytes, shorter than its trailer")
    fd = open_beside(path, ref.path, ref.size, "memory file")
    try:
        trailer = os.pread(fd, len(MEM_TRAILER_MAGIC) + 32, ref.size - MEM_TRAILER_SIZE)
        if trailer != MEM_TRAILER_MAGIC + ref.snapshot_id.encode():
            raise SnapshotError(path.parent / ref.path, "belongs to another snapshot (trailer mismatch)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def shared_memory(fd: int, vm_config: VmConfig) -> GuestMemory:
    """The `.mem` mapped MAP_PRIVATE: pages load on first touch, the guest's writes stay its own,
    but pages it has not written are the file's: the file must not change while the VM runs."""
    memory, at = GuestMemory(), 0
    for base, length in vm_config.memory_layout():
        mapping = mmap.mmap(fd, length, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=at)
        memory.insert(MemoryRegion(base, length, slot=-1, backing=mapping))
        at += length
    return memory


def copied_memory(fd: int, vm_config: VmConfig) -> GuestMemory:
    """The `.mem` read into fresh anonymous memory, the VM's own: nothing of the file stays mapped,
    so a change to it (even a truncation) cannot reach the guest. Only the file's data extents are
    read (it is sparse: untouched guest memory is a hole, and stays untouched here)."""
    memory, at = scratch_memory(vm_config), 0
    for region in memory.regions:
        read_extents(fd, at, region.view)
        at += region.size
    return memory


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The [data, hole) extents of the file's [start, end), by SEEK_DATA / SEEK_HOLE: what a
    sparse file holds, its holes (never written, read as zeros) left out."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            return
        if data >= end:
            return
        pos = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, pos


def read_extents(fd: int, start: int, into: memoryview) -> None:
    """Copy the data extents of the file's [start, start + len(into)) into `into` (holes skipped)."""
    for data, hole in data_extents(fd, start, start + len(into)):
        while data < hole:
            n = os.preadv(fd, [into[data - start: min(hole, data + READ_CHUNK * 64) - start]], data)
            if n <= 0:
                raise SnapshotError(f"fd {fd}", f"the memory file ended at byte {data} while being read")
            data += n
