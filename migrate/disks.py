"""Where a received or restored guest's disk is: this side decides, never the stream.

A stream (a migration's CONFIG, a snapshot file) names the disk the guest had where it came
from. That path is the other host's, and whoever wrote the stream chose it: opened as it is, it
would let a source make the target write into any file the target's user can open. So the
stream's path is only a name to match. This side opens only

- the file its own command line or API gave for the disk (`--disk FILE`), whatever the stream
  names; or
- the stream's file name (its last component, nothing else of the path) looked up in a directory
  it was given (`--disk-dir DIR`), without following a symlink and only if it is a regular file.

With neither, a guest with a disk is refused (`DiskRefused`) before any VM exists (but see a
snapshot's disk, below). A file that is not a regular file (a device, a FIFO, a directory) is
never opened: it is looked at first, opened without blocking and without following a link (for a
name in the directory), and checked again on the open descriptor (the same inode, a regular
file), so a swap between the look and the open is refused too. The VM gets its own copy of the
descriptor; the path is never opened again.

**A snapshot's disk** (format 2.1: a snapshot holds its guest's disk as it was at its instant,
`SNAPSHOT.disk`, recorded in CONFIG with its size and digest; migrate/snapshot/disk_copy.py). A
restore gives the guest that disk, and never a disk that changed since, whichever way it is named:

- nothing named: a private copy of the `.disk` (a reflink, or a sparse copy, unlinked in the
  snapshot's directory) that ends with the guest, as the temporary overlay of QEMU's
  `-snapshot` does. The `.disk` itself is never a guest's disk, so a snapshot restores the
  same way any number of times, and restoring needs no disk of the source's host;
- `--disk FILE` / `--disk-dir DIR`: that file, if it holds what the snapshot's disk held (its
  size, then its digest: the whole file's data is read once, before any VM exists); a file that
  differs is refused naming it and how many MiB differ and where, since running the snapshot's
  memory against another disk's contents corrupts the guest's filesystem (the guest's own check
  stops with "blk read back differs");
- `--disk-from-snapshot` with either: the `.disk` written there first (a new file at a
  temporary name in its directory, renamed over the old one once the restore is checked, so a
  refused restore leaves the old one as it was), which the guest then keeps writing, as QEMU's
  `loadvm` reverts the disk it runs on. Only when asked: the file may hold work done since, or
  be the disk another guest still runs on (which keeps its old inode, renamed over).

No fast check by inode and mtime stands in for the digest: mtime moves in coarse ticks, and a
guest resumed after its snapshot writes within the same tick, so an unchanged mtime proves
nothing. A snapshot from before 2.1 holds no disk: its restore takes `--disk`/`--disk-dir` as
before and says the guest gets that file as it is now.
"""

from __future__ import annotations

import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from migrate.errors import DiskRefused


@dataclass(frozen=True)
class DiskPolicy:
    """What this side was told about disks: a file to use, or a directory to look names up in."""

    disk: Path | None = None
    disk_dir: Path | None = None

    @classmethod
    def of(cls, disk: str | Path | None = None, disk_dir: str | Path | None = None) -> DiskPolicy:
        if disk is not None and disk_dir is not None:
            raise ValueError("give the disk's file or a directory to find it in, not both")
        return cls(Path(disk) if disk is not None else None, Path(disk_dir) if disk_dir is not None else None)

    def open(self, named: str, read_only: bool) -> OpenDisk:
        """The disk for a guest whose stream names `named`, opened (read-only if the guest's
        disk is); `DiskRefused` unless this side was given it."""
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
        if self.disk is not None:
            return _open_checked(self.disk, None, str(self.disk), flags, follow=True)
        if self.disk_dir is None:
            raise _not_given(named)
        name = disk_name(named)
        try:
            dir_fd = os.open(self.disk_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise DiskRefused(named, f"the disk directory {self.disk_dir}: {e.strerror}") from None
        try:
            return _open_checked(self.disk_dir / name, dir_fd, name, flags, follow=False)
        finally:
            os.close(dir_fd)

    def place(self, named: str) -> tuple[Path, str]:
        """The directory and the file name of this side's disk for `named`, which need not exist
        yet (a restore writing the snapshot's disk there): `--disk FILE` with its links followed
        (the operator named it), or the stream's file name in `--disk-dir`."""
        if self.disk is not None:
            real = Path(os.path.realpath(self.disk))
            return real.parent, real.name
        if self.disk_dir is None:
            raise _not_given(named)
        return self.disk_dir, disk_name(named)


def _not_given(named: str) -> DiskRefused:
    return DiskRefused(named, "the stream names this disk, but this side was given no --disk "
                              "or --disk-dir for it (a path from the stream is never opened)")


def disk_name(named: str) -> str:
    """The file name a stream's disk path stands for: its last component, which must be a plain
    name (not empty, `.` or `..`)."""
    name = PurePosixPath(named).name if named else ""
    if name in ("", ".", "..") or "\0" in name:
        raise DiskRefused(named, "the stream's disk path has no file name to look up")
    return name


@dataclass
class OpenDisk:
    """A disk file this side opened and checked; `fd` stays open until `close`."""

    path: Path
    fd: int
    read_only: bool

    def dup(self) -> int:
        """A descriptor of its own for the VM's device (which closes it)."""
        return os.dup(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_checked(path: Path, dir_fd: int | None, name: str, flags: int, *, follow: bool) -> OpenDisk:
    where = str(path)
    try:
        seen = os.stat(name, dir_fd=dir_fd, follow_symlinks=follow)
    except OSError as e:
        raise DiskRefused(where, e.strerror or str(e)) from None
    if not stat.S_ISREG(seen.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(seen.st_mode) else "not a regular file"
        raise DiskRefused(where, f"is {what}; a disk must be a regular file")
    try:
        fd = os.open(name, flags | (0 if follow else os.O_NOFOLLOW), dir_fd=dir_fd)
    except OSError as e:
        raise DiskRefused(where, e.strerror or str(e)) from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
            raise DiskRefused(where, "changed while it was being opened")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return OpenDisk(path, fd, not flags & os.O_RDWR)
