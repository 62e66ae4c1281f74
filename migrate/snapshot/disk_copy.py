"""A snapshot's copy of its guest's disk, taken at the snapshot's instant, and its digest.

**Taking it** (`capture_machine_disk`, or `capture_disk` for a descriptor): while the guest is
paused. A paused virtio-blk device has no request half done (a request is popped and answered
in one locked step, and `pause()` returns only when no device thread runs: hv/devices/virtio
DESIGN.md), so the file then holds every write the guest was told is done and nothing more; a
request the guest made available but the device had not taken is in the queue state and is
served after a restore, against this copy. The copy goes to `SNAPSHOT.disk` (at a temporary name
until the snapshot is whole, like the `.mem`, `files.Companion`), made in one of two ways, tried
in this order:

- a reflink (ioctl FICLONE) where the filesystem shares extents (btrfs, XFS, bcachefs): no data
  moves, the pause grows by a metadata operation (0.1-1 ms measured on XFS here, a loop device),
  and the copy costs space only as the guest later rewrites blocks;
- a sparse copy otherwise (ext4, tmpfs: this host's /work and /tmp): the data extents
  (SEEK_DATA/SEEK_HOLE) copied in the kernel by copy_file_range, holes left holes. The pause grows
  by the time to copy the data the disk holds, not its size: measured here (ext4, page cache warm)
  ~2 ms for a 64 MiB disk holding 8 MiB, ~17 ms for a 1 GiB disk holding 64 MiB, 0.6-1 s for
  1 GiB holding 1 GiB (tools/bench/bench_snapshot_disk.py). It costs the data's space again.

Its record (`DiskFileRef` in CONFIG: name, size, digest, kind) needs the disk digest
(`formats.combine_disk_digest`: 1 MiB blocks, xxh3-128, holes hashed for free): ~1 ms per
10-15 MiB of data in the page cache. A paused snapshot writes CONFIG in its pause, so there it
hashes the guest's disk (the same bytes while the guest is paused, and in the page cache where a
fresh reflink is not); a live one writes CONFIG after the pause and hashes the copy then. The
copy's fsync (`DiskCapture.sync`: the device's time, ~0.45 ms per MiB of data here, more than the
copy) always waits until the guest runs again, and is done before the snapshot's files are
renamed into place. A disk that cannot be copied fails the snapshot (`SnapshotError`): a
snapshot never leaves its disk out silently.

A live snapshot pauses for the copy too (its digest and fsync come after): with a sparse copy its
pause then grows as the paused one's does; with a reflink, not measurably. Taking the copy out of
the pause on ext4 would need the device's help (copy-before-write of the sectors the guest writes
while a background copy runs, as the live snapshot does for RAM); not done.

A restore checks the copy against its record and gives the guest a copy of it
(`migrate.snapshot.disk_restore`; the user model is in `migrate.disks`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import formats
from hv.devices.virtio.blk import VirtioBlk
from hv.vmm.machine import Machine
from migrate.errors import SnapshotError
from migrate.snapshot.files import Companion, data_extents, open_beside
from migrate.state import DiskCopyKind, DiskFileRef, MachineConfig

FICLONE = 0x40049409  # _IOW(0x94, 9, int), <linux/fs.h>
COPY_CHUNK = 8 << 20  # bytes per copy_file_range or pread/pwrite call
# FICLONE's and copy_file_range's ways of saying "not here" (no reflink on this filesystem, two
# filesystems, an old kernel): the next way is tried; any other error is the disk's and fails
_NOT_HERE = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}


def clone_file(src: int, dst: int, size: int) -> tuple[DiskCopyKind, int]:
    """Make `dst` (a new, empty file open for writing) a copy of `src`'s `size` bytes; returns how,
    and the data bytes copied (0 for a reflink)."""
    try:
        fcntl.ioctl(dst, FICLONE, src)
        return DiskCopyKind.REFLINK, 0
    except OSError as e:
        if e.errno not in _NOT_HERE:
            raise
    os.ftruncate(dst, size)
    copied = 0
    for start, end in data_extents(src, 0, size):
        copy_range(src, dst, start, end)
        copied += end - start
    return DiskCopyKind.SPARSE, copied


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Bytes [start, end) of `src` to the same place in `dst`: in the kernel (copy_file_range),
    or read and written where it cannot (two filesystems on an older kernel)."""
    at = start
    while at < end:
        try:
            n = os.copy_file_range(src, dst, min(COPY_CHUNK, end - at), at, at)
        except OSError as e:
            if e.errno not in _NOT_HERE:
                raise
            n = _copy_by_reading(src, dst, at, min(COPY_CHUNK, end - at))
        if n <= 0:
            raise OSError(errno.EIO, f"the file ended at byte {at} while being copied")
        at += n


def _copy_by_reading(src: int, dst: int, at: int, length: int) -> int:
    data = os.pread(src, length, at)
    return os.pwrite(dst, data, at) if data else 0


def block_digests_of(fd: int, size: int, name: object) -> Iterator[tuple[int, bytes]]:
    """The disk digest's (index, digest) of the file's 1 MiB blocks that hold data, read as they
    are needed (`formats.disk_block_digests`); the holes between are not read."""
    block = formats.DISK_DIGEST_BLOCK

    def blocks() -> Iterator[tuple[int, memoryview]]:
        view, after = memoryview(bytearray(block)), 0
        for start, end in data_extents(fd, 0, size):  # in order: the blocks come in order
            for index in range(max(start // block, after), -(-end // block)):
                length, got = min(block, size - index * block), 0
                while got < length:
                    n = os.preadv(fd, [view[got:length]], index * block + got)
                    if n <= 0:
                        raise SnapshotError(name, f"ended at byte {index * block + got} while being read (it changed)")
                    got += n
                yield index, view[:length]
                after = index + 1

    return formats.disk_block_digests(size, blocks())


def digest_of(fd: int, size: int, name: object) -> bytes:
    """The disk digest of the file's `size` bytes."""
    return formats.combine_disk_digest(size, block_digests_of(fd, size, name))


# --- taking ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskSummary:
    """What a snapshot holds of its guest's disk: `migrate snapshot` prints it (`--json`: `disk`)."""

    name: str  # the copy, next to the snapshot
    guest_disk: str  # the guest's disk file it is a copy of
    bytes: int  # the disk's size
    copied: int  # data bytes copied (0: a reflink)
    copy: str  # "reflink" | "sparse"
    digest: str  # the disk digest, hex
    copy_seconds: float  # the copy, made while the guest was paused
    digest_seconds: float  # the copy's digest: in a paused snapshot's pause, after a live one's
    sync_seconds: float  # the copy's fsync, once the guest ran again


@dataclass
class DiskCapture:
    """A guest's disk copied at the snapshot's instant, at the temporary name of the snapshot's
    `.disk` (`file`), open as `fd`. Nothing else writes the copy, so `record` and `sync` may run
    once the guest runs again; `file.commit()` with the snapshot, `discard()` if it fails.
    `guest_fd` is the device's own descriptor of the disk (borrowed, never closed here)."""

    file: Companion
    guest_disk: Path
    guest_fd: int
    fd: int
    size: int
    copied: int
    kind: DiskCopyKind
    copy_seconds: float
    digest_seconds: float = 0.0
    sync_seconds: float = 0.0
    ref: DiskFileRef | None = field(default=None, init=False)

    def record(self, guest_paused: bool = False) -> DiskFileRef:
        """The copy's record for CONFIG (its digest computed once). `guest_paused`: the guest has
        not run since the copy, so its disk still holds the same bytes, and they are read there:
        in the page cache, where a reflink's are not (measured on XFS: 44 ms for 64 MiB read from
        a fresh reflink, 5 ms from the guest's disk); once the guest runs, from the copy."""
        if self.ref is None:
            t0 = time.perf_counter()
            read = self.guest_fd if guest_paused else self.fd
            self.ref = DiskFileRef(self.file.final.name, self.size, digest_of(read, self.size, self.guest_disk),
                                   self.kind)
            self.digest_seconds = time.perf_counter() - t0
        return self.ref

    def sync(self) -> None:
        """The copy on stable storage, before the snapshot is renamed into place (the device's
        time, not the guest's: a snapshot does it once the guest runs again)."""
        t0 = time.perf_counter()
        os.fsync(self.fd)
        self.sync_seconds = time.perf_counter() - t0

    def summary(self) -> DiskSummary:
        ref = self.record()
        return DiskSummary(ref.path, str(self.guest_disk), self.size, self.copied, self.kind.value,
                           ref.digest.hex(), self.copy_seconds, self.digest_seconds, self.sync_seconds)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        self.file.discard()


def capture_disk(disk_fd: int, guest_disk: Path, snapshot: Path, snapshot_id: str) -> DiskCapture:
    """Copy the disk open as `disk_fd` (the guest paused: nothing writes it) to the temporary name
    of `snapshot`'s `.disk`. `SnapshotError` naming the disk if it cannot be copied."""
    t0 = time.perf_counter()
    file = Companion.of(snapshot, ".disk", snapshot_id)
    try:
        size = os.fstat(disk_fd).st_size
        fd = os.open(file.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # as the .mem (umask)
    except OSError as e:
        raise SnapshotError(snapshot, f"the guest's disk {guest_disk} cannot be copied: {e.strerror}") from e
    try:
        kind, copied = clone_file(disk_fd, fd, size)
    except OSError as e:
        os.close(fd)
        file.discard()
        raise SnapshotError(snapshot, f"the guest's disk {guest_disk} cannot be copied to {file.final.name}: "
                                      f"{e.strerror or e}") from e
    except BaseException:
        os.close(fd)
        file.discard()
        raise
    return DiskCapture(file, guest_disk, disk_fd, fd, size, copied, kind, time.perf_counter() - t0)


def capture_machine_disk(machine: Machine, snapshot: Path, snapshot_id: str) -> DiskCapture | None:
    """`capture_disk` of a paused machine's virtio-blk disk; None if it has none."""
    blk = machine.devices.get("virtio-blk0")
    if not isinstance(blk, VirtioBlk):
        return None
    return capture_disk(blk.backend.fileno(), blk.path, snapshot, snapshot_id)


# --- checking ------------------------------------------------------------------------------------


def open_disk_copy(snapshot: Path, ref: DiskFileRef) -> int:
    """The snapshot's `.disk`, opened read-only and checked against its record (a plain name next
    to the snapshot, a regular file of its size, its digest); the caller closes the fd."""
    fd = open_beside(snapshot, ref.path, ref.size, "disk copy")
    try:
        found = digest_of(fd, ref.size, snapshot.parent / ref.path)
        if found != ref.digest:
            raise SnapshotError(snapshot.parent / ref.path, f"the disk copy's digest is {found.hex()}, the snapshot "
                                                            f"records {ref.digest.hex()}: it is damaged or another's")
    except BaseException:
        os.close(fd)
        raise
    return fd


def disk_held(snapshot: Path, config: MachineConfig, verify: bool) -> dict[str, object] | None:
    """What the snapshot holds of its guest's disk, for `inspect` (None: the guest has none); with
    `verify`, its `.disk` checked against the record (`SnapshotError` if it is missing or differs)."""
    virtio, ref = config.virtio, config.disk_file
    if virtio is None or virtio.disk is None:
        if ref is not None:
            raise SnapshotError(snapshot, "records a disk copy, but its guest has no disk")
        return None
    if ref is None:
        return {"guest_disk": virtio.disk, "held": False,
                "check": "not in the snapshot (written before snapshots held their disk): a restore needs "
                         "--disk or --disk-dir and uses that file as it is"}
    if verify:
        os.close(open_disk_copy(snapshot, ref))
    return {"guest_disk": virtio.disk, "held": True, "name": ref.path, "bytes": ref.size, "copy": ref.copy.value,
            "digest": ref.digest.hex(), "check": "verified" if verify else "not checked (--no-verify)"}
