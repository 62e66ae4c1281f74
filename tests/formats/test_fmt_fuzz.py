"""Fuzz the StreamReader: random bytes and mutated valid streams, in random chunkings. The only
acceptable outcomes are records or a FormatError: no other exception, no hang."""

from __future__ import annotations

from fmt_strategies import LAYOUT, build_stream, make_registry
from hypothesis import given, settings
from hypothesis import strategies as st

import hv.kvm.state as S
from formats import FormatError, StreamLimits, StreamReader
from formats.pages import PageLimits
from formats.stream import HEADER

REG = make_registry()
MEM = bytearray(24 * 4096)
MEM[3 * 4096:5 * 4096] = b"abc" * (8192 // 3) + b"ab"
MEM[9 * 4096:10 * 4096] = bytes(range(256)) * 16
SEED = build_stream(REG, MEM, vm_state=S.VmState(None, None, S.ClockState(9, 1)),
                    devices=((LAYOUT.devices[0], S.ClockState(1, 1)),), section_bytes=8192)
LIMITS = StreamLimits(max_section=1 << 20, pages=PageLimits(max_runs=512,
                                                            max_run_bytes=1 << 20,
                                                            max_section_raw=1 << 20))


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    base = draw(st.sampled_from(["seed", "random", "header+random"]))
    if base == "random":
        return draw(st.binary(max_size=512))
    if base == "header+random":
        return SEED[:HEADER.size] + draw(st.binary(max_size=512))
    data = bytearray(SEED)
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete", "splice"]))
        if op == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 64))]
        else:  # move a chunk of the stream elsewhere (reordered/duplicated sections)
            size = draw(st.integers(1, 256))
            data[draw(st.integers(0, len(data))):0] = data[pos:pos + size]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(hostile_streams(), st.lists(st.integers(1, 2048), max_size=12))
def test_reader_only_raises_format_errors(data: bytes, chunks: list[int]) -> None:
    reader = StreamReader(REG, expected_layout=LAYOUT, limits=LIMITS)
    pos = 0
    try:
        for size in [*chunks, len(data)]:
            reader.feed(data[pos:pos + size])
            pos += size
        reader.finish()
    except FormatError:
        return
    assert data == SEED  # anything else that reads cleanly would be an undetected corruption
