"""Layout diffs list every difference; memory layouts validate run addresses in bulk."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fmt_strategies import LAYOUT, RAM, make_registry
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import (
    DeviceChanged,
    DeviceEntry,
    DeviceLayout,
    DeviceOrderDifference,
    ExtraDevice,
    IoRange,
    LayoutMismatch,
    MemoryDifference,
    MemoryLayout,
    MissingDevice,
    SchemaError,
    VcpuCountDifference,
    check,
    diff,
    register_format_types,
)


def test_identical_layouts_have_no_differences() -> None:
    assert diff(LAYOUT, LAYOUT) == []
    check(LAYOUT, LAYOUT)


def test_diff_lists_every_difference() -> None:
    expected = DeviceLayout(RAM, 2, (
        DeviceEntry("com1", "serial", (IoRange(0x3F8, 8),), (), (4,), 1),
        DeviceEntry("rtc", "cmos", (IoRange(0x70, 2),), (), (8,), 1),
        DeviceEntry("virtio-blk0", "virtio-blk", (), (IoRange(0xD000_0000, 0x1000),), (5,), 2),
        DeviceEntry("hpet", "hpet", (), (IoRange(0xFED0_0000, 0x400),), (), 1),
        DeviceEntry("pit", "i8254", (IoRange(0x40, 4),), (), (0,), 1),
    ))
    found = DeviceLayout(MemoryLayout.of((0, 1 << 20)), 4, (
        DeviceEntry("pit", "i8254", (IoRange(0x40, 4),), (), (0,), 1),
        DeviceEntry("rtc", "cmos", (IoRange(0x70, 2),), (), (8,), 1),
        DeviceEntry("com1", "uart16550", (IoRange(0x2F8, 8),), (), (3,), 1),
        DeviceEntry("virtio-blk0", "virtio-blk", (), (IoRange(0xD000_1000, 0x1000),), (5,), 3),
        DeviceEntry("virtio-net0", "virtio-net", (), (IoRange(0xD000_2000, 0x1000),), (6,), 1),
    ))
    got = diff(expected, found)
    assert got == [
        MemoryDifference(expected.memory, found.memory),
        VcpuCountDifference(2, 4),
        DeviceChanged("com1", "kind", "serial", "uart16550"),
        DeviceChanged("com1", "pio", (IoRange(0x3F8, 8),), (IoRange(0x2F8, 8),)),
        DeviceChanged("com1", "irqs", (4,), (3,)),
        DeviceChanged("virtio-blk0", "mmio", (IoRange(0xD000_0000, 0x1000),),
                      (IoRange(0xD000_1000, 0x1000),)),
        DeviceChanged("virtio-blk0", "state_version", 2, 3),
        MissingDevice("hpet", "hpet"),
        ExtraDevice("virtio-net0", "virtio-net"),
        DeviceOrderDifference(("com1", "rtc", "virtio-blk0", "pit"),
                              ("pit", "rtc", "com1", "virtio-blk0")),
    ]
    text = [str(d) for d in got]
    assert "vCPU count: expected 2, found 4" in text
    assert "device 'com1' pio: expected (0x3f8+0x8), found (0x2f8+0x8)" in text
    assert "device 'hpet' (hpet) expected but missing" in text
    with pytest.raises(LayoutMismatch) as err:
        check(expected, found)
    assert err.value.differences == tuple(got)
    assert all(str(d) in str(err.value) for d in got)


def test_layouts_round_trip_and_invalid_ones_are_schema_errors() -> None:
    reg = register_format_types(make_registry())
    assert reg.decode(reg.encode(LAYOUT)) == LAYOUT
    wire = reg.to_wire(LAYOUT)
    wire[2]["memory"]["ranges"] = [{"address": 4096, "size": 4096}, {"address": 0, "size": 8192}]
    import msgpack

    with pytest.raises(SchemaError):
        reg.decode(msgpack.packb(wire))
    wire = reg.to_wire(LAYOUT)
    wire[2]["devices"].append(wire[2]["devices"][0])  # duplicate id
    with pytest.raises(SchemaError):
        reg.decode(msgpack.packb(wire))


@pytest.mark.parametrize("ranges", [
    ((1, 4096),), ((0, 0),), ((0, 8192), (4096, 4096)), ((1 << 52, 4096),),
    tuple((i * 8192, 4096) for i in range(65)),
])
def test_bad_memory_layouts_are_refused(ranges: tuple) -> None:
    with pytest.raises(ValueError):
        MemoryLayout.of(*ranges)


def _naive_inside(layout: MemoryLayout, address: int, count: int) -> bool:
    return (address % 4096 == 0 and count > 0 and any(
        r.address <= address and address + count * 4096 <= r.end for r in layout.ranges))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40).map(lambda p: p * 4096)
                          | st.integers(0, 2**64 - 1) | st.integers(4090, 4100 + (1 << 32)),
                          st.integers(0, 40) | st.integers(0, 2**32 - 1)), max_size=8))
def test_first_outside_agrees_with_a_naive_check(runs: list[tuple[int, int]]) -> None:
    layout = MemoryLayout.of((0, 8 * 4096), (16 * 4096, 8 * 4096), (1 << 32, 4096))
    addresses = np.array([a for a, _ in runs], dtype=np.uint64)
    counts = np.array([c for _, c in runs], dtype=np.uint32)
    naive = next((i for i, (a, c) in enumerate(runs) if not _naive_inside(layout, a, c)), -1)
    assert layout.first_outside(addresses, counts) == naive


def test_layout_dataclasses_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        LAYOUT.vcpus = 3  # type: ignore[misc]
