"""One mapping between kernel structs (cffi cdata) and the plain state dataclasses in `hv.kvm.state`.

The dataclass is the schema: each field is read from the C field of the same name (or the dotted
path in the field's ``metadata["c"]``), converted by its annotation:

* ``int``                 <- integer field
* ``bytes``               <- any array (char, u8, multi-dimensional), copied whole
* ``tuple[int, ...]``     <- array of integers
* ``tuple[D, ...]``       <- array of structs, D a dataclass
* a dataclass             <- nested struct

Fields with ``metadata["c"] = None`` are not in the struct; the caller fills them. Writing back
checks sizes, so a state of the wrong shape is refused instead of silently truncated.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from hv.binding.ffi import ffi

T = TypeVar("T")


class StructShapeError(ValueError):
    """A state value does not fit the C field it maps to (wrong length or element count)."""

    def __init__(self, path: str, expected: int, found: int) -> None:
        self.path, self.expected, self.found = path, expected, found
        super().__init__(f"{path}: expected {expected} items/bytes, found {found}")


# How a field converts, decided once per dataclass (not per value): these run on every vCPU
# state capture and restore, inside a migration's downtime.
_INT, _BYTES, _STRUCT, _INTS, _STRUCTS = range(5)


def _kind(tp: Any) -> tuple[int, Any]:
    if dataclasses.is_dataclass(tp):
        return _STRUCT, tp
    if tp is int:
        return _INT, None
    if tp is bytes:
        return _BYTES, None
    if typing.get_origin(tp) is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        return (_STRUCTS, elem) if dataclasses.is_dataclass(elem) else (_INTS, None)
    raise TypeError(f"no C mapping for {tp!r}")


_Plan = tuple[tuple[str, int, Any, tuple[str, ...]], ...]
_PLANS: dict[type, _Plan] = {}


def _plan(cls: type) -> _Plan:
    """`_make_plan(cls)`, made once per class (a dict, not functools.cache: mypy's view of the
    cache wrapper takes no `type[T]`)."""
    plan = _PLANS.get(cls)
    if plan is None:
        plan = _PLANS[cls] = _make_plan(cls)
    return plan


def _make_plan(cls: type) -> _Plan:
    """(field name, conversion kind, its dataclass if any, C path) for every mapped field."""
    hints = typing.get_type_hints(cls)
    plan = []
    for f in dataclasses.fields(cls):
        c_path = f.metadata.get("c", f.name)
        if c_path is None:
            continue
        plan.append((f.name, *_kind(hints[f.name]), tuple(c_path.split("."))))
    return tuple(plan)


def prepare(*classes: type) -> None:
    """Plan the conversions of `classes` and of the dataclasses inside them now (at import), not
    on first use: a source's first use is its migration's pause, a target's its apply."""
    for cls in classes:
        for _name, kind, elem, _path in _plan(cls):
            if kind in (_STRUCT, _STRUCTS):
                prepare(elem)


def _get(cdata: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        cdata = getattr(cdata, part)
    return cdata


def _from_c(kind: int, elem: Any, value: Any) -> Any:
    if kind == _INT:
        return int(value)
    if kind == _STRUCT:
        return from_struct(elem, value)
    if kind == _BYTES:
        return bytes(ffi.buffer(value))
    if kind == _STRUCTS:
        return tuple(from_struct(elem, item) for item in value)
    return tuple(int(item) for item in value)


def from_struct(cls: type[T], cdata: Any, **extra: Any) -> T:
    """Build dataclass `cls` from struct `cdata`; `extra` supplies the unmapped fields."""
    values = {name: _from_c(kind, elem, _get(cdata, path)) for name, kind, elem, path in _plan(cls)}
    values.update(extra)
    return cls(**values)


def to_struct(obj: Any, cdata: Any, _where: str = "") -> Any:
    """Write dataclass `obj` into struct `cdata` (in place) and return `cdata`."""
    where = _where or type(obj).__name__
    for name, kind, elem, path in _plan(type(obj)):
        value = getattr(obj, name)
        parent = _get(cdata, path[:-1]) if len(path) > 1 else cdata
        field = path[-1]
        if kind == _INT:
            setattr(parent, field, value)
        elif kind == _STRUCT:
            to_struct(value, getattr(parent, field), f"{where}.{name}")
        elif kind == _BYTES:
            target = getattr(parent, field)
            size = ffi.sizeof(target)
            if len(value) != size:
                raise StructShapeError(f"{where}.{name}", size, len(value))
            ffi.memmove(target, value, size)
        else:
            target = getattr(parent, field)
            if len(value) != len(target):
                raise StructShapeError(f"{where}.{name}", len(target), len(value))
            for i, item in enumerate(value):
                if kind == _STRUCTS:
                    to_struct(item, target[i], f"{where}.{name}[{i}]")
                else:
                    target[i] = item
    return cdata
