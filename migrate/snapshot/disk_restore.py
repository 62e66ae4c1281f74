"""The disk a restored guest gets from a snapshot that holds one (format 2.1), chosen as
`migrate.disks` says, opened and checked before any VM exists (`disk_for_restore`).

The snapshot's `.disk` is opened only as a plain name next to the snapshot (as the `.mem`:
`files.open_beside`), is checked against its record (size, digest) before anything is made from
it, and is never a guest's disk itself, so restoring twice starts from the same disk twice. A
disk this side names is checked against the record too (reading its data once: 10-15 GB/s from
the page cache, the device's rate otherwise), or, asked to, replaced by a copy of the `.disk`.
What a restore adds for the disk: that check, and a copy (a reflink, or the data copied: the
snapshot's own cost, ~17 ms for 64 MiB of data on ext4 here) unless the disk named was used as it
is.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import formats
from migrate.disks import DiskPolicy, OpenDisk, disk_name
from migrate.errors import DiskRefused, SnapshotError
from migrate.snapshot.disk_copy import block_digests_of, clone_file, digest_of, open_disk_copy
from migrate.state import DiskFileRef, MachineConfig

log = logging.getLogger(__name__)


@dataclass
class RestoreDisk:
    """The disk a restored guest gets, open before any VM exists, and what the output says of it.
    A disk written from the snapshot to a file of its own is at a temporary name in that file's
    directory until `publish` renames it (once the restore is checked: a refused one loses
    nothing); `close` removes it if it never was."""

    disk: OpenDisk
    says: str
    _unpublished: tuple[int, str, str] | None = None  # (directory fd, temporary name, name)

    def publish(self) -> None:
        if self._unpublished is not None:
            dir_fd, tmp, name = self._unpublished
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.close(dir_fd)
            self._unpublished = None

    def close(self) -> None:
        self.disk.close()
        if self._unpublished is not None:
            dir_fd, tmp, _ = self._unpublished
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
            self._unpublished = None


def disk_for_restore(snapshot: Path, config: MachineConfig, policy: DiskPolicy, *,
                     from_snapshot: bool = False) -> RestoreDisk | None:
    """The disk for the guest of the snapshot at `snapshot` whose CONFIG is `config` (None if it
    has none), chosen as `migrate.disks` says; `DiskRefused` or `SnapshotError` before any VM."""
    virtio, ref = config.virtio, config.disk_file
    if virtio is None or virtio.disk is None:
        if ref is not None:
            raise SnapshotError(snapshot, "records a disk copy, but its guest has no disk")
        return None
    named, read_only = virtio.disk, virtio.disk_readonly
    if from_snapshot and policy.disk is None and policy.disk_dir is None:
        raise DiskRefused(named, "--disk-from-snapshot writes the snapshot's disk to --disk FILE or into "
                                 "--disk-dir DIR: neither was given")
    if ref is None:  # written before snapshots held their disk (format 2.0)
        if from_snapshot:
            raise DiskRefused(named, "the snapshot holds no copy of its disk (written by an older kvmigrate): "
                                     "there is nothing to write from it")
        disk = policy.open(named, read_only)
        log.warning("%s does not hold its guest's disk: the guest gets %s as it is now", snapshot, disk.path)
        return RestoreDisk(disk, f"{disk.path} as it is now (the snapshot does not hold its disk: "
                                 "written by an older kvmigrate)")
    if policy.disk is not None or policy.disk_dir is not None:  # this side named a disk
        if from_snapshot:
            return _write_from_copy(snapshot, ref, policy, named, read_only)
        return _checked(snapshot, ref, policy.open(named, read_only))
    copy = open_disk_copy(snapshot, ref)
    try:
        try:
            fd = os.open(snapshot.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DiskRefused(ref.path, f"no private copy of it can be made in {snapshot.parent}: {e.strerror}; "
                                        "--disk FILE --disk-from-snapshot writes it elsewhere") from e
        try:
            _clone(copy, fd, ref, ref.path)
        except BaseException:
            os.close(fd)
            raise
    finally:
        os.close(copy)
    return RestoreDisk(OpenDisk(Path(disk_name(named)), fd, read_only),
                       f"a private copy of {ref.path} (the disk at the snapshot's instant, gone when the guest "
                       "ends; --disk FILE --disk-from-snapshot keeps one)")


def _checked(snapshot: Path, ref: DiskFileRef, disk: OpenDisk) -> RestoreDisk:
    """`disk` if it holds what the snapshot's disk held; else `DiskRefused` saying what differs."""
    try:
        seen = os.fstat(disk.fd)
        _not_the_copy(snapshot, ref, seen, disk.path)
        size = seen.st_size
        if size != ref.size:
            raise DiskRefused(disk.path, f"is {size} bytes, the snapshot's disk {ref.size}: not the disk it had "
                                         f"(--disk-from-snapshot writes the snapshot's {ref.path} to it)")
        if digest_of(disk.fd, size, disk.path) != ref.digest:
            raise DiskRefused(disk.path, f"changed since the snapshot: {_differences(snapshot, ref, disk)} "
                                         f"(--disk-from-snapshot writes the snapshot's {ref.path} to it)")
    except BaseException:
        disk.close()
        raise
    return RestoreDisk(disk, f"{disk.path} (checked: it holds the disk at the snapshot's instant)")


def _not_the_copy(snapshot: Path, ref: DiskFileRef, seen: os.stat_result, where: object) -> None:
    """`DiskRefused` if the disk given is the snapshot's `.disk` itself: the guest would write
    into the snapshot, and it would not restore again."""
    try:
        copy = os.stat(snapshot.parent / ref.path, follow_symlinks=False)
    except OSError:
        return
    if os.path.samestat(seen, copy):
        raise DiskRefused(where, f"is the snapshot's own {ref.path}, which a guest never writes (restoring "
                                 "again starts from it): name another file, or no --disk for a private copy")


def _differences(snapshot: Path, ref: DiskFileRef, disk: OpenDisk) -> str:
    """How `disk` differs from the snapshot's `.disk`, if that is there and whole: how many 1 MiB
    blocks, and where the first is (both files' data blocks walked in step, holes unread)."""
    try:
        fd = open_disk_copy(snapshot, ref)
    except SnapshotError:
        return f"its digest differs from the snapshot's {ref.digest.hex()}"
    try:
        differ, first = _differing_blocks(block_digests_of(disk.fd, ref.size, disk.path),
                                          block_digests_of(fd, ref.size, snapshot.parent / ref.path), ref.size)
    finally:
        os.close(fd)
    return (f"{differ} of its {-(-ref.size // formats.DISK_DIGEST_BLOCK)} MiB differ from {ref.path}, the first "
            f"at byte {first * formats.DISK_DIGEST_BLOCK:#x}" if differ else "its digest differs")


def _differing_blocks(ours: Iterator[tuple[int, bytes]], theirs: Iterator[tuple[int, bytes]],
                      size: int) -> tuple[int, int]:
    """How many blocks differ between two disks given by the (index, digest) of their data blocks
    in order (a block one lacks is zeros there), and the first: the two walked in step."""
    def zero(index: int) -> bytes:
        return formats.zero_disk_block_digest(min(formats.DISK_DIGEST_BLOCK, size - index * formats.DISK_DIGEST_BLOCK))

    differ, first = 0, -1
    a, b = next(ours, None), next(theirs, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            index, mine, other = a[0], a[1], zero(a[0])
            a = next(ours, None)
        elif a is None or b[0] < a[0]:
            index, mine, other = b[0], zero(b[0]), b[1]
            b = next(theirs, None)
        else:
            index, mine, other = a[0], a[1], b[1]
            a, b = next(ours, None), next(theirs, None)
        if mine != other:
            differ += 1
            first = index if first < 0 else first
    return differ, first


def _write_from_copy(snapshot: Path, ref: DiskFileRef, policy: DiskPolicy, named: str,
                     read_only: bool) -> RestoreDisk:
    """The snapshot's `.disk` written to this side's disk file (`--disk-from-snapshot`): a new file
    at a temporary name in its directory, renamed over it by `publish`. An existing disk there is
    replaced only if it is a regular file (a link in a `--disk-dir` is not followed), keeping its
    permissions; a process holding the old one open keeps reading the old one."""
    directory, name = policy.place(named)
    where, tmp = directory / name, f".{name}.{secrets.token_hex(4)}.tmp"
    copy = open_disk_copy(snapshot, ref)
    dir_fd = fd = -1
    try:
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            seen = _lstat(name, dir_fd)
            if seen is not None and not stat.S_ISREG(seen.st_mode):
                raise DiskRefused(where, "is not a regular file: --disk-from-snapshot replaces only a disk file")
            if seen is not None:
                _not_the_copy(snapshot, ref, seen, where)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                         stat.S_IMODE(seen.st_mode) if seen is not None else 0o666, dir_fd=dir_fd)
        except OSError as e:
            raise DiskRefused(where, f"cannot be written: {e.strerror}") from e
        _clone(copy, fd, ref, where)
    except BaseException:
        if fd >= 0:
            os.close(fd)
            os.unlink(tmp, dir_fd=dir_fd)
        if dir_fd >= 0:
            os.close(dir_fd)
        raise
    finally:
        os.close(copy)
    return RestoreDisk(OpenDisk(where, fd, read_only), f"{where}, written from {ref.path} (the disk at the "
                                                       "snapshot's instant)", (dir_fd, tmp, name))


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _clone(copy: int, fd: int, ref: DiskFileRef, where: object) -> None:
    try:
        clone_file(copy, fd, ref.size)
    except OSError as e:
        raise DiskRefused(where, f"the snapshot's {ref.path} cannot be copied to it: {e.strerror or e}") from e
