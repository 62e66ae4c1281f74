"""msgpack codec for frozen dataclasses, derived from their annotations.

A type is registered once under a stable wire name and a per-type version; its encoder and
decoder are compiled from `typing.get_type_hints` (so `from __future__ import annotations` works)
and cached. There is no hand-written per-field code: the dataclass is the schema.

Wire form of a registered object: the msgpack array `[name, version, {field name: value}]`.
Nested dataclasses are maps of fields by name (their type comes from the annotation); a field
annotated `typing.Any` holds another registered object in the tagged form (used for device state,
whose type the reader looks up by name).

Decoding is strict about what it keeps and lenient about what it may ignore:
- every field's value is type-checked (bool is not an int, bytes is not a str, tuples have their
  declared length, enums must name a member), failures are `SchemaError(type, field, ...)`;
- unknown fields are ignored (a newer writer added them); missing fields take the dataclass
  default if there is one, otherwise SchemaError;
- a per-type version outside [oldest, version] is a `VersionError`. Versions count incompatible
  changes only: adding a field with a default does not need a new version.
- msgpack runs with explicit size limits (`MsgpackLimits`) so a declared huge container, more
  values than the budget or deeper nesting is refused before anything is allocated; ext types
  are refused.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import msgpack

from . import budget
from .errors import SchemaError, VersionError

Encoder = Callable[[Any], Any]
Decoder = Callable[[Any, str], Any]  # (wire value, field path) -> value

_MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class MsgpackLimits:
    """What one msgpack blob may declare and hold; anything more is refused before msgpack
    allocates it. Each container and string is also capped by the blob's own length (a value
    cannot be longer than the bytes that carry it), and `max_items` / `max_depth` are checked by
    `formats.budget.scan` first, so a blob's decoded objects cost at most its length plus
    `max_items` small objects (SPEC.md section 8)."""

    max_str_len: int = 1 << 20
    max_bin_len: int = 16 << 20
    max_array_len: int = 1 << 16
    max_map_len: int = 1 << 12
    max_blob_len: int = 32 << 20  # a whole encoded object
    max_items: int = 1 << 16  # values in one blob: scalars, containers and map keys
    max_depth: int = 32  # nesting of arrays and maps (a tagged object is two levels)


def unpack(data: bytes | bytearray | memoryview, limits: MsgpackLimits, *, raw: bool = False) -> Any:
    """msgpack-decode one whole blob within `limits`; every failure is a `SchemaError`, raised
    before anything beyond the limits is allocated. `raw`: strings (map keys too) stay bytes, not
    UTF-8 decoded, for a caller that cuts a peer's text before it decodes it."""
    size = len(data)
    if size > limits.max_blob_len:
        raise SchemaError("<msgpack>", None, f"at most {limits.max_blob_len} bytes", f"{size} bytes")
    over = budget.scan(data, budget.Budget(limits.max_items, limits.max_depth))
    if over is not None:
        raise SchemaError("<msgpack>", None, f"at most {over.limit} {over.what}", str(over))
    unpacker = msgpack.Unpacker(
        raw=raw, use_list=True, strict_map_key=not raw, max_buffer_size=max(size, 1),
        max_str_len=min(limits.max_str_len, size), max_bin_len=min(limits.max_bin_len, size),
        max_array_len=min(limits.max_array_len, size), max_map_len=min(limits.max_map_len, size // 2),
        max_ext_len=0)
    try:
        unpacker.feed(data)
        value = unpacker.unpack()
        if unpacker.tell() != size:
            raise ValueError(f"{size - unpacker.tell()} bytes after the value")
        return value
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException, msgpack.OutOfData) as exc:
        # ValueError covers msgpack's ExtraData, FormatError, StackError, size limits, bad UTF-8
        raise SchemaError("<msgpack>", None, "well-formed msgpack within limits",
                          f"{type(exc).__name__}: {exc}"[:200]) from None


def _wire_type(value: Any) -> str:
    return type(value).__name__


class _Ctx:
    """The dataclass being decoded, for error messages."""

    __slots__ = ("owner",)

    def __init__(self, owner: str) -> None:
        self.owner = owner


def _fail(owner: str, path: str, expected: str, value: Any) -> SchemaError:
    return SchemaError(owner, path or None, expected, _wire_type(value))


class SchemaRegistry:
    """Registered state types by wire name; encodes and decodes them as msgpack."""

    def __init__(self, limits: MsgpackLimits | None = None) -> None:
        self.limits = limits or MsgpackLimits()
        self._by_name: dict[str, tuple[type, int, int]] = {}
        self._by_type: dict[type, tuple[str, int]] = {}
        self._codecs: dict[Any, tuple[Encoder, Callable[[Any, str, str], Any]]] = {}

    # --- registration -----------------------------------------------------------------------

    def register(self, cls: type, name: str, version: int = 1, *, oldest: int = 1) -> None:
        """Register the dataclass `cls` under `name`, writing `version`, reading [oldest, version]."""
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls!r} is not a dataclass")
        if not 1 <= oldest <= version:
            raise ValueError(f"bad version range [{oldest}, {version}]")
        if name in self._by_name and self._by_name[name][0] is not cls:
            raise ValueError(f"wire name {name!r} already registered for {self._by_name[name][0]}")
        self._codec(cls)  # compile now: an unsupported annotation fails at registration
        self._by_name[name] = (cls, version, oldest)
        self._by_type[cls] = (name, version)

    def names(self) -> dict[str, type]:
        return {name: entry[0] for name, entry in self._by_name.items()}

    def name_of(self, cls: type) -> str:
        return self._by_type[cls][0]

    def version_of(self, cls: type) -> int:
        return self._by_type[cls][1]

    # --- public encode/decode ---------------------------------------------------------------

    def to_wire(self, obj: Any) -> list[Any]:
        """The tagged wire form `[name, version, fields]` (plain msgpack-able objects)."""
        try:
            name, version = self._by_type[type(obj)]
        except KeyError:
            raise SchemaError(type(obj).__name__, None, "a registered type",
                              "unregistered type") from None
        return [name, version, self._codec(type(obj))[0](obj)]

    def from_wire(self, wire: Any, expect: type | None = None) -> Any:
        if not (isinstance(wire, list) and len(wire) == 3):
            raise _fail("<tagged>", "", "[name, version, fields]", wire)
        name, version, fields = wire
        if type(name) is not str:
            raise _fail("<tagged>", "name", "str", name)
        if type(version) is not int:
            raise _fail(name, "<version>", "int", version)
        try:
            cls, supported, oldest = self._by_name[name]
        except KeyError:
            raise SchemaError(name, None, "a registered type name", repr(name)[:80]) from None
        if expect is not None and cls is not expect:
            raise SchemaError(name, None, self._by_type.get(expect, (expect.__name__,))[0],
                              name)
        if not oldest <= version <= supported:
            raise VersionError(version, (oldest, supported), section=f"schema {name}",
                               offset=None)
        return self._codec(cls)[1](fields, "", name)

    def encode(self, obj: Any) -> bytes:
        try:
            return msgpack.packb(self.to_wire(obj), use_bin_type=True)
        except (OverflowError, ValueError, TypeError) as exc:  # ints beyond 64 bits
            raise SchemaError(type(obj).__name__, None, "msgpack-encodable values",
                              str(exc)) from None

    def decode(self, data: bytes | memoryview, expect: type | None = None) -> Any:
        return self.from_wire(self.unpack(data), expect)

    def unpack(self, data: bytes | memoryview) -> Any:
        """msgpack-decode `data` with the registry's limits; every failure is a SchemaError."""
        return unpack(data, self.limits)

    # --- compilation ------------------------------------------------------------------------

    def _codec(self, tp: Any) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        try:
            return self._codecs[tp]
        except (KeyError, TypeError):
            pass
        codec = self._compile(tp)
        try:
            self._codecs[tp] = codec
        except TypeError:  # unhashable annotation object
            pass
        return codec

    def _compile(self, tp: Any) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self._codec(args[0])
        if tp is Any:
            return self._compile_tagged()
        if tp in (int, bool, str, float, bytes):
            return _compile_scalar(tp)
        if tp is type(None):
            return _compile_none()
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _compile_enum(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self._compile_dataclass(tp)
        if origin in (typing.Union, types.UnionType):
            rest = [a for a in args if a is not type(None)]
            if len(rest) != 1 or len(args) != 2:
                raise TypeError(f"only X | None unions are supported, not {tp}")
            return self._compile_optional(rest[0])
        if origin is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return self._compile_seq(args[0], tuple, "tuple")
            return self._compile_fixed_tuple(args)
        if origin is list:
            return self._compile_seq(args[0], list, "list")
        if origin is dict:
            if args[0] is not str:
                raise TypeError(f"only dict[str, X] is supported, not {tp}")
            return self._compile_dict(args[1])
        raise TypeError(f"unsupported annotation {tp!r}")

    def _compile_dataclass(self, cls: type) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        # Placeholder first so a self-referencing dataclass compiles (the lambdas look it up).
        fields_: list[tuple[str, Encoder, Callable[[Any, str, str], Any], Any, Any]] = []

        def enc(obj: Any) -> dict[str, Any]:
            if type(obj) is not cls:
                raise SchemaError(cls.__name__, None, cls.__name__, _wire_type(obj))
            return {name: fenc(getattr(obj, name)) for name, fenc, _, _, _ in fields_}

        def dec(value: Any, path: str, owner: str) -> Any:
            if type(value) is not dict:
                raise _fail(owner, path, f"map of {cls.__name__} fields", value)
            kwargs = {}
            for name, _, fdec, default, factory in fields_:
                if name in value:
                    kwargs[name] = fdec(value[name], name, cls.__name__)
                elif default is not _MISSING:
                    kwargs[name] = default
                elif factory is not _MISSING:
                    kwargs[name] = factory()
                else:
                    raise SchemaError(cls.__name__, name, "a value", "missing field")
            try:
                return cls(**kwargs)
            except (TypeError, ValueError) as exc:  # the dataclass' own __post_init__ checks
                raise SchemaError(cls.__name__, None, "values its constructor accepts",
                                  str(exc)[:200]) from None

        self._codecs[cls] = (enc, dec)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            fenc, fdec = self._codec(hints[f.name])
            fields_.append((f.name, fenc, fdec, f.default, f.default_factory))
        return enc, dec

    def _compile_optional(self, inner: Any) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        ienc, idec = self._codec(inner)

        def enc(obj: Any) -> Any:
            return None if obj is None else ienc(obj)

        def dec(value: Any, path: str, owner: str) -> Any:
            return None if value is None else idec(value, path, owner)

        return enc, dec

    def _compile_seq(self, item: Any, kind: type, label: str
                     ) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        ienc, idec = self._codec(item)

        def enc(obj: Any) -> list[Any]:
            if not isinstance(obj, (tuple, list)):
                raise SchemaError("<value>", None, label, _wire_type(obj))
            return [ienc(v) for v in obj]

        scalar = _SCALAR_TYPES.get(idec)

        def dec(value: Any, path: str, owner: str) -> Any:
            if type(value) is not list:
                raise _fail(owner, path, label, value)
            if scalar is not None and all(type(v) is scalar for v in value):
                return kind(value)  # a list of the scalar it must hold: nothing to convert
            try:  # an element's path is only worth making for the error that names it
                return kind(idec(v, path, owner) for v in value)
            except SchemaError:
                return kind(idec(v, f"{path}[{i}]", owner) for i, v in enumerate(value))

        return enc, dec

    def _compile_fixed_tuple(self, items: tuple[Any, ...]
                             ) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        codecs = [self._codec(t) for t in items]
        n = len(codecs)

        def enc(obj: Any) -> list[Any]:
            if not isinstance(obj, tuple) or len(obj) != n:
                raise SchemaError("<value>", None, f"tuple of {n}", _wire_type(obj))
            return [c[0](v) for c, v in zip(codecs, obj)]

        def dec(value: Any, path: str, owner: str) -> Any:
            if type(value) is not list or len(value) != n:
                raise _fail(owner, path, f"array of {n}", value)
            return tuple(c[1](v, f"{path}[{i}]", owner)
                         for i, (c, v) in enumerate(zip(codecs, value)))

        return enc, dec

    def _compile_dict(self, item: Any) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        ienc, idec = self._codec(item)

        def enc(obj: Any) -> dict[str, Any]:
            if not isinstance(obj, dict) or not all(type(k) is str for k in obj):
                raise SchemaError("<value>", None, "dict[str, ...]", _wire_type(obj))
            return {k: ienc(v) for k, v in obj.items()}

        def dec(value: Any, path: str, owner: str) -> Any:
            if type(value) is not dict:
                raise _fail(owner, path, "map", value)
            out = {}
            for k, v in value.items():
                if type(k) is not str:
                    raise _fail(owner, path, "str keys", k)
                out[k] = idec(v, f"{path}[{k!r}]", owner)
            return out

        return enc, dec

    def _compile_tagged(self) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
        def enc(obj: Any) -> Any:
            return self.to_wire(obj)

        def dec(value: Any, path: str, owner: str) -> Any:
            return self.from_wire(value)

        return enc, dec


def _compile_scalar(tp: type) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
    name = tp.__name__

    if tp is bytes:
        def enc(obj: Any) -> Any:
            if not isinstance(obj, (bytes, bytearray, memoryview)):
                raise SchemaError("<value>", None, name, _wire_type(obj))
            return bytes(obj)
    else:
        def enc(obj: Any) -> Any:
            # bool is an int subclass: an int field must not silently carry a bool, and back
            if type(obj) is not tp and not (tp is float and type(obj) is int):
                raise SchemaError("<value>", None, name, _wire_type(obj))
            # (the check above narrows `obj` to `tp`, a bare `type` to mypy: object)
            return float(cast(float, obj)) if tp is float else obj

    def dec(value: Any, path: str, owner: str) -> Any:
        if type(value) is not tp:
            raise _fail(owner, path, name, value)
        return value

    _SCALAR_TYPES[dec] = tp
    return enc, dec


# a scalar's decoder -> its type: a sequence of them is checked in one pass (`_compile_seq`)
_SCALAR_TYPES: dict[Callable[[Any, str, str], Any], type] = {}


def _compile_none() -> tuple[Encoder, Callable[[Any, str, str], Any]]:
    def enc(obj: Any) -> Any:
        if obj is not None:
            raise SchemaError("<value>", None, "None", _wire_type(obj))
        return None

    def dec(value: Any, path: str, owner: str) -> Any:
        if value is not None:
            raise _fail(owner, path, "nil", value)
        return None

    return enc, dec


def _compile_enum(cls: type[enum.Enum]) -> tuple[Encoder, Callable[[Any, str, str], Any]]:
    def enc(obj: Any) -> Any:
        if not isinstance(obj, cls):
            raise SchemaError("<value>", None, cls.__name__, _wire_type(obj))
        return obj.value

    def dec(value: Any, path: str, owner: str) -> Any:
        if type(value) not in (int, str):
            raise _fail(owner, path, f"{cls.__name__} value", value)
        try:
            return cls(value)
        except ValueError:
            raise SchemaError(owner, path or None, f"a {cls.__name__} member",
                              repr(value)[:80]) from None

    return enc, dec
