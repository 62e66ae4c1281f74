"""The annotation-driven msgpack codec, against the real hv.kvm.state dataclasses and edge types."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgpack
import pytest
from fmt_strategies import STATE_TYPES, make_registry, strategy_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hv.kvm.state as S
from formats import (
    FormatError,
    MsgpackLimits,
    SchemaError,
    SchemaRegistry,
    VersionError,
)

REG = make_registry()


@pytest.mark.parametrize("cls", STATE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_hv_state_type_round_trips(cls: type, data: st.DataObject) -> None:
    obj = data.draw(strategy_for(cls))
    assert REG.decode(REG.encode(obj), cls) == obj


def test_a_realistic_vcpu_state_round_trips() -> None:
    seg = S.Segment(0, 0xFFFFFFFF, 0x10, 11, 1, 0, 0, 1, 1, 1, 0, 0)
    state = S.VcpuState(
        vcpu_id=0, cpuid=(S.CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),),
        mp_state=0, regs=S.Regs(rip=0xFFF0, rsp=0x7000),
        sregs=S.Sregs(seg, seg, seg, seg, seg, seg, seg, seg, S.DescriptorTable(0, 0xFFFF),
                      S.DescriptorTable(0, 0xFFFF), 0x80050033, 0, 0x1000, 0x20, 0, 0x500,
                      0xFEE00900, (0, 0, 0, 0)),
        fpu=S.Fpu(bytes(128), 0x37F, 0, 0, 0, 0, 0, bytes(256), 0x1F80), xsave=bytes(4096),
        xcrs=(S.Xcr(0, 7),), debug_regs=S.DebugRegs((0, 0, 0, 0), 0xFFFF0FF0, 0x400, 0),
        lapic=bytes(1024), msrs=(S.Msr(0x10, 2**64 - 1), S.Msr(0xC0000080, 0x500)),
        events=S.VcpuEvents(S.ExceptionEvent(0, 0, 0, 0, 0), S.InterruptEvent(0, 0, 0, 0),
                            S.NmiEvent(0, 0, 0), 0, 0, S.SmiEvent(0, 0, 0, 0), 0, 0, 0),
        tsc_khz=2_400_000)
    blob = REG.encode(state)
    assert REG.decode(blob, S.VcpuState) == state
    assert msgpack.unpackb(blob)[:2] == ["hv.VcpuState", 1]


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Level(enum.IntEnum):
    INVALID = 0
    LOW = 1
    HIGH = 2


@dataclass(frozen=True)
class Inner:
    x: int
    tag: str = "t"


@dataclass(frozen=True)
class Everything:
    i: int
    b: bool
    s: str
    raw: bytes
    f: float
    opt: int | None
    seq: tuple[Inner, ...]
    pair: tuple[int, str]
    items: list[int]
    named: dict[str, Inner]
    colour: Colour
    level: Level
    with_default: int = 7
    with_factory: tuple[int, ...] = field(default_factory=tuple, metadata={"c": "ignored"})


def _registry() -> SchemaRegistry:
    reg = SchemaRegistry()
    reg.register(Everything, "everything", version=2, oldest=1)
    return reg


EVERYTHING = st.builds(
    Everything, i=st.integers(-(2**63), 2**64 - 1), b=st.booleans(), s=st.text(max_size=20),
    raw=st.binary(max_size=40), f=st.floats(allow_nan=False), opt=st.none() | st.integers(0, 9),
    seq=st.lists(st.builds(Inner, st.integers(0, 99), st.text(max_size=3)), max_size=3).map(tuple),
    pair=st.tuples(st.integers(0, 9), st.text(max_size=3)), items=st.lists(st.integers(0, 9)),
    named=st.dictionaries(st.text(max_size=4), st.builds(Inner, st.integers(0, 9)), max_size=3),
    colour=st.sampled_from(Colour), level=st.sampled_from(Level),
    with_default=st.integers(0, 9), with_factory=st.lists(st.integers(0, 9)).map(tuple))


@settings(max_examples=100, deadline=None)
@given(EVERYTHING)
def test_every_supported_annotation_round_trips(obj: Everything) -> None:
    reg = _registry()
    assert reg.decode(reg.encode(obj)) == obj


def _wire(**changes: object) -> bytes:
    reg = _registry()
    obj = Everything(1, True, "s", b"r", 1.5, None, (Inner(1),), (1, "a"), [1], {"k": Inner(2)},
                     Colour.RED, Level.LOW)
    name, version, fields = reg.to_wire(obj)
    for key, value in changes.items():
        if value is _DELETE:
            del fields[key]
        else:
            fields[key] = value
    return msgpack.packb([name, version, fields], use_bin_type=True)


_DELETE = object()


def test_unknown_fields_are_ignored_and_missing_defaults_apply() -> None:
    obj = _registry().decode(_wire(added_by_newer_minor=[1, 2, 3], with_default=_DELETE,
                                   with_factory=_DELETE))
    assert obj.with_default == 7 and obj.with_factory == ()


@pytest.mark.parametrize("field_, value, expected", [
    ("i", True, "int"),  # a bool is not an int
    ("b", 1, "bool"),
    ("s", b"bytes", "str"),
    ("raw", "text", "bytes"),
    ("f", 1, "float"),
    ("opt", "x", "int"),
    ("pair", [1], "array of 2"),
    ("items", {"a": 1}, "list"),
    ("colour", "green", "a Colour member"),
    ("level", 9, "a Level member"),
    ("i", _DELETE, "a value"),
])
def test_bad_fields_name_type_and_field(field_: str, value: object, expected: str) -> None:
    with pytest.raises(SchemaError) as err:
        _registry().decode(_wire(**{field_: value}))
    assert err.value.type == "Everything"
    assert err.value.field == field_
    assert err.value.expected == expected


@pytest.mark.parametrize("items", [[1, "x", 3], [1, 2, True]])
def test_a_wrong_element_is_named_by_its_index(items: list) -> None:
    """A list of scalars is checked in one pass, its elements' paths made only for the error:
    the error still names the element."""
    with pytest.raises(SchemaError) as err:
        _registry().decode(_wire(items=items))
    assert (err.value.type, err.value.field, err.value.expected) == ("Everything", f"items[{len(items) - 1 if items[-1] is True else 1}]", "int")


def test_nested_errors_name_the_nested_type_and_path() -> None:
    with pytest.raises(SchemaError) as err:
        _registry().decode(_wire(seq=[{"x": 1}, {"x": "no"}]))
    assert (err.value.type, err.value.field) == ("Inner", "x")


def test_versions_outside_the_readable_range_are_refused() -> None:
    reg = _registry()
    blob = reg.to_wire(Everything(1, True, "s", b"", 0.0, None, (), (1, ""), [], {},
                                  Colour.BLUE, Level.HIGH))
    for version in (0, 3):
        with pytest.raises(VersionError) as err:
            reg.decode(msgpack.packb([blob[0], version, blob[2]]))
        assert err.value.found == version and err.value.supported == (1, 2)
    reg.decode(msgpack.packb([blob[0], 1, blob[2]]))  # older, still readable


def test_unregistered_name_and_wrong_expected_type_are_schema_errors() -> None:
    with pytest.raises(SchemaError):
        REG.decode(msgpack.packb(["nope", 1, {}]))
    with pytest.raises(SchemaError):
        REG.decode(REG.encode(S.ClockState(1, 2)), S.PitState)


@pytest.mark.parametrize("blob", [
    b"\xdd\xff\xff\xff\xff",  # array32 declaring 4G items
    b"\xdf\xff\xff\xff\xff",  # map32 declaring 4G pairs
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\x93\xacformats.xxx\x01\xdd\x7f\xff\xff\xff",  # nested huge array
    b"\xc7\x05\x01abcde",  # ext type
    b"\x91" * 10_000,  # nesting beyond msgpack's stack
    b"\x93\xa1a\x01",  # truncated
    b"\x93\xa1a\x01\x80\x00",  # extra data
    b"\xa2\xff\xfe",  # invalid UTF-8
    b"\x81\x01\x02",  # int map key
    b"",
])
def test_hostile_msgpack_is_refused_cleanly(blob: bytes) -> None:
    with pytest.raises(SchemaError):
        REG.decode(blob)


def test_declared_size_limits_apply_before_allocation() -> None:
    reg = SchemaRegistry(MsgpackLimits(max_bin_len=16))
    reg.register(S.Fpu, "fpu")
    blob = SchemaRegistry().to_wire  # noqa: F841 - only the limit matters here
    with pytest.raises(SchemaError):
        reg.decode(msgpack.packb(["fpu", 1, {"fpr": bytes(17)}], use_bin_type=True))


def _assert_a_registered_object_that_round_trips(obj: object, name: str | None = None) -> None:
    """What a hostile blob may decode to, if anything: an object of a registered type (of `name`'s
    type, when the blob names one), which encodes to a blob decoding to the same object."""
    types = REG.names()
    assert type(obj) in types.values(), obj
    if name is not None:
        assert type(obj) is types[name], (name, obj)
    assert REG.decode(REG.encode(obj), type(obj)) == obj


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_format_errors(blob: bytes) -> None:
    try:
        obj = REG.decode(blob)
    except FormatError:
        return
    _assert_a_registered_object_that_round_trips(obj)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=5)
                    | st.binary(max_size=5) | st.floats(allow_nan=False),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20),
       st.sampled_from(sorted(REG.names())))
def test_well_formed_msgpack_of_the_wrong_shape_is_a_schema_error(fields: object, name: str) -> None:
    """Well-formed msgpack under a registered name: a SchemaError (not a FormatError of another
    kind, nor a raw exception), unless the fields happen to be a valid shape of that type."""
    blob = msgpack.packb([name, 1, fields], use_bin_type=True)
    try:
        obj = REG.decode(blob)
    except SchemaError:
        return
    _assert_a_registered_object_that_round_trips(obj, name)


def test_a_wrong_shape_names_the_type_and_the_field() -> None:
    with pytest.raises(SchemaError, match="hv.Fpu|Fpu"):
        REG.decode(msgpack.packb(["hv.Fpu", 1, {"fpr": 7}], use_bin_type=True))
    with pytest.raises(SchemaError):
        REG.decode(msgpack.packb(["hv.Fpu", 1, [1, 2]], use_bin_type=True))


def test_encoding_an_unregistered_or_mistyped_object_is_a_schema_error() -> None:
    with pytest.raises(SchemaError):
        REG.encode(Inner(1))
    with pytest.raises(SchemaError):
        REG.encode(S.ClockState(2**64, 0))  # beyond msgpack's integers
    with pytest.raises(SchemaError):
        REG.encode(S.ClockState("1", 0))  # type: ignore[arg-type]


def test_unsupported_annotations_fail_at_registration() -> None:
    @dataclass(frozen=True)
    class Bad:
        x: int | str

    with pytest.raises(TypeError):
        SchemaRegistry().register(Bad, "bad")
