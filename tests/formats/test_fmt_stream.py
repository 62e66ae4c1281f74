"""The stream: every section round trips in any chunking; every corruption is a FormatError."""

from __future__ import annotations

import struct

import pytest
from fmt_strategies import (
    LAYOUT,
    RAM,
    apply_pages,
    build_stream,
    make_registry,
    page_images,
    strategy_for,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hv.kvm.state as S
from formats import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    MAGIC,
    SUPPORTED_MAJORS,
    BadMagic,
    ChecksumError,
    ConfigRecord,
    DeviceEntry,
    DeviceLayout,
    DeviceRecord,
    DigestMismatch,
    EndRecord,
    FormatError,
    Header,
    IoRange,
    LayoutMismatch,
    LayoutRecord,
    MemoryLayout,
    PageEncoder,
    PagesRecord,
    SectionKind,
    SectionTooLarge,
    SequenceError,
    SkippedRecord,
    StreamLimits,
    StreamReader,
    StreamWriter,
    TotalsMismatch,
    TrailingDataError,
    TruncatedError,
    UnknownSection,
    VcpuRecord,
    VersionError,
    VmStateRecord,
    memory_digest,
    verify_digest,
)
from formats.stream import HEADER

REG = make_registry()
SERIAL = DeviceEntry("com1", "serial", (IoRange(0x3F8, 8),), (), (4,), 1)
LAYOUT_1 = DeviceLayout(RAM, 1, (SERIAL,))


def read_all(data: bytes, chunks: list[int] | None = None, **kw: object) -> list:
    reader = StreamReader(REG, **kw)  # type: ignore[arg-type]
    out: list = []
    pos = 0
    for size in chunks or []:
        out += reader.feed(data[pos:pos + size])
        pos += size
    out += reader.feed(data[pos:])
    reader.finish()
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(vcpus=st.lists(strategy_for(S.VcpuState), min_size=1, max_size=2),
       vm=strategy_for(S.VmState), pic=strategy_for(S.PicState), config=strategy_for(S.Regs),
       mem=page_images(max_pages=24))
def test_every_section_type_round_trips(vcpus: list, vm: S.VmState, pic: S.PicState,
                                        config: S.Regs, mem: bytearray) -> None:
    data = build_stream(REG, mem, layout=LAYOUT_1, vcpus=tuple(vcpus), vm_state=vm,
                        devices=((SERIAL, pic),), config=config)
    records = read_all(data, expected_layout=LAYOUT_1)
    assert isinstance(records[0], Header) and records[0].producer == "tests"
    assert records[1] == ConfigRecord(config)
    assert records[2] == LayoutRecord(LAYOUT_1)
    assert [r.state for r in records if isinstance(r, VcpuRecord)] == vcpus
    assert [r for r in records if isinstance(r, VmStateRecord)] == [VmStateRecord(vm)]
    assert [r for r in records if isinstance(r, DeviceRecord)] == [DeviceRecord(SERIAL, pic)]
    assert apply_pages(records, len(mem)) == mem
    end = records[-1]
    assert isinstance(end, EndRecord)
    assert end.totals.pages == len(mem) // 4096
    verify_digest(end, [(0, mem)])


@settings(max_examples=60, deadline=None)
@given(page_images(max_pages=32), st.lists(st.integers(1, 5000), max_size=30))
def test_any_chunking_gives_the_one_shot_records(mem: bytearray, chunks: list[int]) -> None:
    data = build_stream(REG, mem, vm_state=S.VmState(None, None, S.ClockState(5, 0)))
    one_shot = read_all(data)
    chunked = read_all(data, chunks)
    assert _comparable(chunked) == _comparable(one_shot)


def _comparable(records: list) -> list:
    out = []
    for r in records:
        if isinstance(r, PagesRecord):
            out.append([(x.address, x.count, None if x.data is None else bytes(x.data))
                        for x in r.runs])
        else:
            out.append(r)
    return out


MEM = bytearray(16 * 4096)
MEM[4096:8192] = bytes(range(256)) * 16
MEM[10 * 4096] = 7
VALID = build_stream(REG, MEM, vcpus=(S.Regs(rax=0x1234, rip=0x10_0000, rsp=2**64 - 8),),
                     vm_state=S.VmState(None, None, S.ClockState(1, 2)),
                     devices=((SERIAL, S.ClockState(3, 4)),), section_bytes=4096)


def _mutants(data: bytes, draw: st.DataObject) -> bytes:
    how = draw.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    pos = draw.draw(st.integers(0, len(data) - 1))
    if how == "flip":
        bit = draw.draw(st.integers(0, 7))
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:]
    if how == "truncate":
        return data[:pos]
    if how == "insert":
        return data[:pos] + draw.draw(st.binary(min_size=1, max_size=8)) + data[pos:]
    return data[:pos] + data[pos + draw.draw(st.integers(1, 8)):]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_corruption_is_a_format_error(data: st.DataObject) -> None:
    """The chained record checksum covers every byte after the header (including kind, flags
    and length), so no flip, cut, insertion or deletion reads back as a valid stream."""
    bad = _mutants(VALID, data)
    if bad == VALID:
        return
    with pytest.raises(FormatError):
        read_all(bad, expected_layout=LAYOUT)


def _raw_section(kind: int, flags: int, body: bytes, seed: int) -> bytes:
    import xxhash

    prefix = struct.pack("<HHI", kind, flags, len(body))
    check = xxhash.xxh3_64_intdigest(prefix + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)),
                                     seed)
    return prefix + struct.pack("<Q", check) + body


def test_unknown_skippable_sections_are_skipped_and_others_refused() -> None:
    w = StreamWriter(REG)
    parts = [w.header(), w.section(99, b"from a newer minor", skippable=True), w.layout(LAYOUT)]
    parts.append(w.end(memory_digest([])))
    records = read_all(b"".join(parts))
    assert isinstance(records[1], SkippedRecord) and records[1].kind == 99
    w = StreamWriter(REG)
    parts = [w.header(), w.section(99, b"must understand")]
    with pytest.raises(UnknownSection) as err:
        read_all(b"".join(parts))
    assert err.value.kind == 99 and err.value.offset == HEADER.size


def _header(major: int, minor: int) -> bytes:
    import xxhash

    head = HEADER.pack(MAGIC, major, minor, 0, b"future", 0)
    return head[:-8] + struct.pack("<Q", xxhash.xxh3_64_intdigest(head[:-8]))


def test_newer_minor_is_read_and_newer_major_refused_naming_both() -> None:
    records = StreamReader(REG).feed(_header(FORMAT_MAJOR, 7))
    assert records == [Header(FORMAT_MAJOR, 7, 0, "future")]
    with pytest.raises(VersionError) as err:
        StreamReader(REG).feed(_header(FORMAT_MAJOR + 1, 0))
    assert err.value.found == (FORMAT_MAJOR + 1, 0) and err.value.supported == (FORMAT_MAJOR, FORMAT_MINOR)
    with pytest.raises(BadMagic):
        StreamReader(REG).feed(b"KVMIGX")  # refused as soon as the prefix differs


def test_a_1x_stream_naming_devices_by_class_is_refused_at_the_header() -> None:
    # 2.0 changed what a device kind is (a declared id, SPEC.md 6.1): 1.x is not guessed at
    assert (FORMAT_MAJOR, SUPPORTED_MAJORS) == (2, (2,))
    with pytest.raises(VersionError) as err:
        StreamReader(REG).feed(_header(1, 0))
    assert err.value.found == (1, 0) and err.value.supported == (2, FORMAT_MINOR)


def test_trailing_data_after_end_and_early_end_of_input() -> None:
    with pytest.raises(TrailingDataError):
        read_all(VALID + b"\0")
    for cut in (0, 10, HEADER.size, HEADER.size + 5, len(VALID) - 1):
        with pytest.raises(TruncatedError):
            read_all(VALID[:cut], expected_layout=LAYOUT)


def test_end_totals_are_checked() -> None:
    w = StreamWriter(REG)
    parts = [w.header(), w.layout(LAYOUT)]
    parts += [w.pages(s) for s in PageEncoder().encode(0, MEM)]
    w._sections += 1  # a sender that lost count  # noqa: SLF001
    parts.append(w.end(0))
    with pytest.raises(TotalsMismatch) as err:
        read_all(b"".join(parts))
    assert err.value.field == "sections"


def test_digest_mismatch_is_reported() -> None:
    end = read_all(VALID)[-1]
    other = bytearray(MEM)
    other[-1] ^= 1
    with pytest.raises(DigestMismatch):
        verify_digest(end, [(0, other)])


def test_layout_mismatch_is_raised_before_any_page() -> None:
    other = DeviceLayout(MemoryLayout.of((0, 1 << 20)), 4, ())
    with pytest.raises(LayoutMismatch) as err:
        read_all(VALID, expected_layout=other)
    assert len(err.value.differences) == 4  # memory, vCPUs, two extra devices
    with pytest.raises(LayoutMismatch):
        read_all(VALID, memory=MemoryLayout.of((0, 2 << 20)))


def test_pages_need_a_known_memory_layout() -> None:
    w = StreamWriter(REG)
    data = b"".join([w.header(), *(w.pages(s) for s in PageEncoder().encode(0, MEM))])
    with pytest.raises(SequenceError):
        StreamReader(REG).feed(data)


def test_oversized_sections_are_refused_from_the_length_field() -> None:
    reader = StreamReader(REG, limits=StreamLimits(max_section=1024))
    reader.feed(VALID[:HEADER.size])
    with pytest.raises(SectionTooLarge):
        reader.feed(struct.pack("<HHIQ", SectionKind.PAGES, 0, 1 << 30, 0))


def test_a_failed_reader_stays_failed() -> None:
    reader = StreamReader(REG)
    with pytest.raises(ChecksumError):
        reader.feed(VALID[:HEADER.size - 1] + bytes([VALID[HEADER.size - 1] ^ 1]))
    with pytest.raises(SequenceError):
        reader.feed(b"")


def test_with_an_expected_layout_pages_must_follow_the_layout_section() -> None:
    w = StreamWriter(REG)
    data = b"".join([w.header(), *(w.pages(s) for s in PageEncoder().encode(0, MEM))])
    with pytest.raises(SequenceError):
        StreamReader(REG, expected_layout=LAYOUT).feed(data)
