"""The disk policy alone: what `migrate.disks` opens for a name from a stream, and what it refuses."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from migrate.disks import DiskPolicy, disk_name
from migrate.errors import DiskRefused


@pytest.mark.parametrize("named, name", [("/etc/passwd", "passwd"), ("disk.img", "disk.img"),
                                         ("../../x/disk.img", "disk.img"), ("a/b/", "b")])
def test_only_the_last_component_of_a_stream_path_is_a_name(named: str, name: str) -> None:
    assert disk_name(named) == name


@pytest.mark.parametrize("named", ["", "/", "..", "a/..", "."])
def test_a_path_without_a_file_name_is_refused(named: str) -> None:
    with pytest.raises(DiskRefused):
        disk_name(named)


def test_without_a_disk_or_a_directory_nothing_is_opened(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"x" * 512)
    with pytest.raises(DiskRefused, match="never opened"):
        DiskPolicy().open(str(tmp_path / "disk.img"), read_only=True)


def test_the_directory_lookup_opens_that_file_in_the_mode_asked(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(b"x" * 512)
    for read_only in (True, False):
        disk = DiskPolicy.of(disk_dir=tmp_path).open("/elsewhere/disk.img", read_only)
        try:
            assert disk.path == tmp_path / "disk.img" and disk.read_only is read_only
            assert os.path.samestat(os.fstat(disk.fd), (tmp_path / "disk.img").stat())
            flags = fcntl.fcntl(disk.fd, fcntl.F_GETFL)
            assert flags & os.O_ACCMODE == (os.O_RDONLY if read_only else os.O_RDWR)
            assert not flags & os.O_NONBLOCK  # opened without blocking, then made blocking again
        finally:
            disk.close()


def test_an_explicit_disk_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DiskRefused, match="not a regular file"):
        DiskPolicy.of(disk=tmp_path / "fifo").open("whatever", read_only=False)


def test_an_explicit_disk_may_be_a_link_the_operator_named(tmp_path: Path) -> None:
    (tmp_path / "real.img").write_bytes(b"x" * 512)
    (tmp_path / "link.img").symlink_to(tmp_path / "real.img")
    for read_only in (True, False):
        disk = DiskPolicy.of(disk=tmp_path / "link.img").open("whatever", read_only)
        try:  # the link followed: the fd is the real file, in the mode asked
            assert disk.read_only is read_only
            assert os.path.samestat(os.fstat(disk.fd), (tmp_path / "real.img").stat())
            flags = fcntl.fcntl(disk.fd, fcntl.F_GETFL)
            assert flags & os.O_ACCMODE == (os.O_RDONLY if read_only else os.O_RDWR)
            assert os.pread(disk.fd, 512, 0) == b"x" * 512
        finally:
            disk.close()
        with pytest.raises(OSError):  # closed: the fd is given back
            os.fstat(disk.fd)


def test_a_disk_and_a_directory_together_are_refused() -> None:
    with pytest.raises(ValueError):
        DiskPolicy.of(disk="a", disk_dir="b")
