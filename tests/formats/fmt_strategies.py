"""Hypothesis strategies and builders shared by the formats tests (imported by name: pytest
puts this directory on sys.path)."""

from __future__ import annotations

import dataclasses
import types
import typing

import numpy as np
from hypothesis import strategies as st

import hv.kvm.state as hv_state
from formats import (
    DeviceEntry,
    DeviceLayout,
    IoRange,
    MemoryLayout,
    PageEncoder,
    SchemaRegistry,
    StreamWriter,
    memory_digest,
)

U64 = st.integers(0, 2**64 - 1)

STATE_TYPES = [obj for obj in vars(hv_state).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj)
               and obj.__module__ == hv_state.__name__]


def strategy_for(tp: typing.Any) -> st.SearchStrategy:
    """A strategy for any annotation the schema supports, derived the way the codec derives
    its encoder (so every hv.kvm.state type gets one without hand-written strategies)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is int:
        return U64
    if tp is bool:
        return st.booleans()
    if tp is str:
        return st.text(max_size=12)
    if tp is bytes:
        return st.binary(max_size=48)
    if tp is float:
        return st.floats(allow_nan=False)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return st.builds(tp, **{f.name: strategy_for(hints[f.name])
                                for f in dataclasses.fields(tp)})
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        return st.none() | strategy_for(inner)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(strategy_for(args[0]), max_size=3).map(tuple)
    if origin is tuple:
        return st.tuples(*map(strategy_for, args))
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=3)
    if origin is dict:
        return st.dictionaries(st.text(max_size=5), strategy_for(args[1]), max_size=3)
    return st.from_type(tp)


def make_registry() -> SchemaRegistry:
    reg = SchemaRegistry()
    for cls in STATE_TYPES:
        reg.register(cls, f"hv.{cls.__name__}", version=1)
    return reg


RAM = MemoryLayout.of((0, 1 << 20), (1 << 32, 1 << 20))

LAYOUT = DeviceLayout(RAM, 2, (
    DeviceEntry("com1", "serial", (IoRange(0x3F8, 8),), (), (4,), 1),
    DeviceEntry("rtc", "cmos", (IoRange(0x70, 2),), (), (8,), 1),
))


@st.composite
def page_images(draw: st.DrawFn, max_pages: int = 48) -> bytearray:
    """Memory made of runs of zero, random, repetitive and sparse pages."""
    out = bytearray()
    n = draw(st.integers(0, 6))
    for _ in range(n):
        kind = draw(st.sampled_from(["zero", "random", "repeat", "sparse"]))
        count = draw(st.integers(1, max(1, max_pages // 4)))
        size = count * 4096
        if kind == "zero":
            out += bytes(size)
        elif kind == "random":
            seed = draw(st.integers(0, 2**32 - 1))
            out += np.random.default_rng(seed).bytes(size)
        elif kind == "repeat":
            unit = draw(st.binary(min_size=1, max_size=64))
            out += (unit * (size // len(unit) + 1))[:size]
        else:
            page = bytearray(size)
            for pos in draw(st.lists(st.integers(0, size - 1), max_size=5)):
                page[pos] = draw(st.integers(1, 255))
            out += page
    return out[: max_pages * 4096]


def build_stream(reg: SchemaRegistry, mem: bytes | bytearray, *, layout: DeviceLayout = LAYOUT,
                 vcpus: tuple = (), vm_state: object = None, devices: tuple = (),
                 config: object = None, section_bytes: int = 16 << 10) -> bytes:
    """A whole snapshot: memory `mem` at guest address 0 (inside LAYOUT's first range)."""
    w = StreamWriter(reg, producer="tests")
    out = [w.header()]
    if config is not None:
        out.append(w.config(config))
    out.append(w.layout(layout))
    out += [w.vcpu(v) for v in vcpus]
    if vm_state is not None:
        out.append(w.vm_state(vm_state))
    out += [w.device(e, s) for e, s in devices]
    enc = PageEncoder(level=1, section_bytes=section_bytes, min_zero_pages=2)
    out += [w.pages(s) for s in enc.encode(0, mem)]
    out.append(w.end(memory_digest([(0, mem)])))
    return b"".join(out)


def apply_pages(records: list, size: int) -> bytearray:
    """What a receiver would write into a zeroed RAM range of `size` at address 0."""
    mem = bytearray(size)
    from formats import PagesRecord

    for rec in records:
        if isinstance(rec, PagesRecord):
            for run in rec.runs:
                end = run.address + run.size
                mem[run.address:end] = bytes(run.size) if run.data is None else run.data
    return mem
