"""Decoding with a budget: a msgpack blob is refused before msgpack builds anything when it holds
more values or deeper nesting than its limits, so what any accepted blob costs once decoded is
bounded by its length and the budget, never by what it declares."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest
from fmt_strategies import make_registry
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import (Budget, DeviceEntry, DeviceSection, FormatError, MsgpackLimits, SchemaError,
                     SchemaRegistry, register_format_types, scan_budget, unpack_msgpack)
from hv.kvm.state import Xcr

MiB = 1 << 20

scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=8) | st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=60)


def items_of(value: Any) -> int:
    """Values in `value` as the budget counts them: itself, and every key and value inside."""
    if isinstance(value, list):
        return 1 + sum(map(items_of, value))
    if isinstance(value, dict):
        return 1 + sum(items_of(k) + items_of(v) for k, v in value.items())
    return 1


def depth_of(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth_of, value), default=0)
    if isinstance(value, dict):
        return 1 + max((max(depth_of(k), depth_of(v)) for k, v in value.items()), default=0)
    return 0


@settings(max_examples=400, deadline=None)
@given(value=values, max_items=st.integers(1, 80), max_depth=st.integers(0, 8))
def test_the_scan_counts_values_and_depth_exactly(value: Any, max_items: int, max_depth: int) -> None:
    blob = msgpack.packb(value, use_bin_type=True)
    over = scan_budget(blob, Budget(max_items, max_depth))
    assert scan_budget(memoryview(bytearray(blob)), Budget(max_items, max_depth)) == over  # views too
    items, depth = items_of(value), depth_of(value)
    if items <= max_items and depth <= max_depth:
        assert over is None
    else:
        assert over is not None
        assert (over.what == "items" and items > max_items) or (over.what == "depth" and depth > max_depth)


@settings(max_examples=300, deadline=None)
@given(value=values, max_items=st.integers(1, 80), max_depth=st.integers(0, 8))
def test_a_blob_decodes_exactly_when_it_is_within_budget(value: Any, max_items: int, max_depth: int) -> None:
    blob = msgpack.packb(value, use_bin_type=True)
    limits = MsgpackLimits(max_items=max_items, max_depth=max_depth)
    within = items_of(value) <= max_items and depth_of(value) <= max_depth
    if within:
        assert unpack_msgpack(blob, limits) == value
    else:
        with pytest.raises(SchemaError):
            unpack_msgpack(blob, limits)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=200), max_items=st.integers(1, 50), max_depth=st.integers(0, 6))
def test_any_bytes_decode_within_budget_or_raise_a_schema_error(blob: bytes, max_items: int,
                                                                max_depth: int) -> None:
    try:
        value = unpack_msgpack(blob, MsgpackLimits(max_items=max_items, max_depth=max_depth))
    except SchemaError:
        return
    assert items_of(value) <= max_items and depth_of(value) <= max_depth


@settings(max_examples=200, deadline=None)
@given(value=values)
def test_no_declared_length_may_exceed_the_blob_that_carries_it(value: Any) -> None:
    # a lying length field (a string, array or map longer than the bytes left) is refused by
    # msgpack's own limits, capped per call at the blob's size
    blob = bytearray(msgpack.packb([value, "x" * 40], use_bin_type=True))
    at = blob.rindex(b"\xd9")  # str8 header of the 40-byte string
    blob[at:at + 2] = b"\xda\xff"  # now it claims 0xff28 bytes
    with pytest.raises(SchemaError):
        unpack_msgpack(bytes(blob), MsgpackLimits())


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    except FormatError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


@pytest.mark.parametrize("bomb", ["empty arrays", "empty maps", "nested arrays", "one-char strings"])
def test_a_msgpack_bomb_costs_no_more_than_its_own_bytes(bomb: str) -> None:
    """16 MiB of one-byte values would be ~1 GiB of Python objects decoded: refused while
    costing about the blob once (the unpacker's copy), not 64 times it."""
    n = 16 * MiB
    body = {"empty arrays": b"\x90" * n, "empty maps": b"\x80" * n,
            "nested arrays": b"\x91" * 30 + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n,
            "one-char strings": b"\xa1a" * (n // 2)}[bomb]
    blob = body if bomb == "nested arrays" else b"\xdd" + (len(body) // (1 + (bomb == "one-char strings"))
                                                          ).to_bytes(4, "big") + body
    limits = MsgpackLimits(max_array_len=1 << 30, max_map_len=1 << 30)  # only the budget holds it
    with pytest.raises(SchemaError, match="values"):
        unpack_msgpack(blob, limits)
    assert _peak_bytes(lambda: unpack_msgpack(blob, limits)) < 2 * MiB


def test_deeply_nested_tagged_state_is_a_schema_error_not_a_recursion_error() -> None:
    reg = register_format_types(make_registry())
    entry = reg.to_wire(DeviceEntry("d0", "kind"))[2]
    wire: Any = reg.to_wire(Xcr(0, 7))
    for _ in range(450):  # a device state whose state is a device section whose state is ...
        wire = ["formats.device", 1, {"entry": entry, "state": wire}]
    blob = msgpack.packb(wire, use_bin_type=True)
    with pytest.raises(SchemaError, match="nesting"):
        reg.decode(blob, DeviceSection)


@dataclass(frozen=True)
class Box:
    items: tuple[int, ...]


def test_the_registry_decodes_with_its_budget() -> None:
    reg = SchemaRegistry(MsgpackLimits(max_items=100))
    reg.register(Box, "box")
    assert reg.decode(reg.encode(Box(tuple(range(90)))), Box) == Box(tuple(range(90)))
    with pytest.raises(SchemaError, match="100 items"):
        reg.decode(reg.encode(Box(tuple(range(200)))), Box)
