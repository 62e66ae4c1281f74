"""A snapshot's disk without a VM: the copy (sparse, across filesystems, read and written where
the kernel cannot copy) and its digest over a file; the CONFIG record through the format, read by
a reader from before it, refused when hostile. With a VM: tests/migrate/test_snapshot_disk.py."""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import formats
from formats import StreamReader, StreamWriter
from migrate.records import EXPECT
from migrate.snapshot import disk_copy
from migrate.state import (PRODUCER, DiskCopyKind, DiskFileRef, MachineConfig, MemoryFileRef, SnapshotRef,
                           VirtioSpec, registry)

MiB = 1 << 20


def _sparse(path: Path, size: int, data: dict[int, bytes]) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for at, chunk in data.items():
            os.pwrite(f.fileno(), chunk, at)


@pytest.mark.parametrize("where", ["same", "tmpfs"])
def test_a_sparse_disk_is_copied_whole_and_stays_sparse(tmp_path: Path, where: str) -> None:
    src_dir = Path("/dev/shm") if where == "tmpfs" else tmp_path  # another filesystem: copied across
    src = src_dir / f"kvmig-test-{os.getpid()}.img"
    _sparse(src, 64 * MiB, {0: b"a" * 4096, 40 * MiB + 12345: os.urandom(3 * MiB), 64 * MiB - 1: b"z"})
    try:
        s, d = os.open(src, os.O_RDONLY), os.open(tmp_path / "copy", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            kind, copied = disk_copy.clone_file(s, d, 64 * MiB)
            digest = disk_copy.digest_of(d, 64 * MiB, "copy")
            assert digest == disk_copy.digest_of(s, 64 * MiB, "src")
        finally:
            os.close(s)
            os.close(d)
        assert (tmp_path / "copy").read_bytes() == src.read_bytes()
        if kind is DiskCopyKind.SPARSE:  # data extents only: the holes are not written
            assert 3 * MiB < copied < 8 * MiB and (tmp_path / "copy").stat().st_blocks * 512 < 8 * MiB
    finally:
        src.unlink()
    # the digest is the construction formats defines: a plain file's bytes, read whole, agree
    data = (tmp_path / "copy").read_bytes()
    blocks = [(i, data[i * MiB:(i + 1) * MiB]) for i in range(64)]
    assert formats.combine_disk_digest(64 * MiB, formats.disk_block_digests(64 * MiB, blocks)) == digest


def test_the_copy_falls_back_to_reading_and_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(*args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    _sparse(tmp_path / "src", 20 * MiB + 7, {MiB: os.urandom(9 * MiB), 20 * MiB: b"tail!!!"})
    monkeypatch.setattr(os, "copy_file_range", cross_device)
    s, d = os.open(tmp_path / "src", os.O_RDONLY), os.open(tmp_path / "dst", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(d, 20 * MiB + 7)
        disk_copy.copy_range(s, d, MiB, 20 * MiB + 7)
    finally:
        os.close(s)
        os.close(d)
    assert (tmp_path / "dst").read_bytes() == (tmp_path / "src").read_bytes()


# --- the record in the format ----------------------------------------------------------------------


records = st.builds(DiskFileRef, path=st.text(max_size=40), size=st.integers(0, (1 << 62) - 1),
                    digest=st.binary(min_size=16, max_size=16), copy=st.sampled_from(DiskCopyKind))
configs = st.builds(MachineConfig, mem_size=st.integers(1, 1 << 40), vcpus=st.integers(1, 4096),
                    irqchip=st.booleans(), pit=st.booleans(), cpuid_digest=st.integers(0, 2**64 - 1),
                    snapshot_id=st.text(max_size=32),
                    memory_file=st.none() | st.builds(MemoryFileRef, st.text(max_size=20), st.integers(0, 1 << 40),
                                                      st.text(max_size=32)),
                    virtio=st.none() | st.builds(VirtioSpec, disk=st.none() | st.text(max_size=40)),
                    disk_file=st.none() | records)


def _through_a_stream(config: MachineConfig, reg: formats.SchemaRegistry, expect: type) -> object:
    writer = StreamWriter(registry(), producer=PRODUCER)
    reader = StreamReader(reg, expect={formats.SectionKind.CONFIG: expect})
    found = reader.feed(writer.header() + writer.config(config))
    assert reader.header is not None and (reader.header.major, reader.header.minor) == (2, 1)
    return found[-1].config


@given(config=configs)
@settings(max_examples=60, deadline=None)
def test_the_disk_record_round_trips_through_the_format(config: MachineConfig) -> None:
    assert _through_a_stream(config, registry(), EXPECT[formats.SectionKind.CONFIG]) == config


@given(config=configs)
@settings(max_examples=30, deadline=None)
def test_a_reader_from_before_the_record_reads_the_config_without_it(config: MachineConfig) -> None:
    """A 2.0 reader knew MachineConfig without `disk_file`: it reads a 2.1 CONFIG, field ignored."""
    fields = [(f.name, f.type) if f.default is dataclasses.MISSING else
              (f.name, f.type, dataclasses.field(default=f.default))
              for f in dataclasses.fields(MachineConfig) if f.name != "disk_file"]
    old = dataclasses.make_dataclass("MachineConfig", fields, frozen=True, namespace={"__module__": __name__})
    reg = formats.SchemaRegistry()
    for cls, name in ((SnapshotRef, "migrate.SnapshotRef"), (MemoryFileRef, "migrate.MemoryFileRef"),
                      (VirtioSpec, "migrate.VirtioSpec"), (old, "migrate.MachineConfig")):
        reg.register(cls, name)
    formats.register_format_types(reg)
    read = _through_a_stream(config, reg, old)
    assert dataclasses.asdict(read) == {k: v for k, v in dataclasses.asdict(config).items() if k != "disk_file"}


@pytest.mark.parametrize("field, value", [("digest", b"\0" * 15), ("copy", "overlay"), ("size", -1),
                                          ("path", b"s.disk")])
def test_a_hostile_disk_record_is_a_schema_error(field: str, value: object) -> None:
    reg = registry()
    record = DiskFileRef("s.disk", MiB, b"\1" * 16, DiskCopyKind.SPARSE)
    config = MachineConfig(64 * MiB, 1, True, True, 0, disk_file=record)
    wire = reg.to_wire(config)
    wire[2]["disk_file"][field] = value
    with pytest.raises(formats.SchemaError, match="DiskFileRef|disk_file"):
        reg.decode(msgpack.packb(wire, use_bin_type=True), MachineConfig)
