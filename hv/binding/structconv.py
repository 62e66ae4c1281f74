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
import functools
import typing
from typing import Any, TypeVar

from hv.binding.ffi import ffi

T = TypeVar("T")


class StructShapeError(ValueError):
    """A state value does not fit the C field it maps to (wrong length or element count)."""

    def __init__(self, path: str, expected: int, found: int) -> None:
        self.path, self.expected, self.found = path, expected, found
        super().__init__(f"{path}: expected {expected} items/bytes, found {found}")


@functools.cache
def _plan(cls: type) -> tuple[tuple[str, object, tuple[str, ...]], ...]:
    """(field name, annotation, C path) for every mapped field of `cls`."""
    hints = typing.get_type_hints(cls)
    plan = []
    for f in dataclasses.fields(cls):
        c_path = f.metadata.get("c", f.name)
        if c_path is None:
            continue
        plan.append((f.name, hints[f.name], tuple(c_path.split("."))))
    return tuple(plan)


def _get(cdata: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        cdata = getattr(cdata, part)
    return cdata


def _from_c(tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        return from_struct(tp, value)
    if tp is int:
        return int(value)
    if tp is bytes:
        return bytes(ffi.buffer(value))
    if typing.get_origin(tp) is tuple:
        (elem, _ellipsis) = typing.get_args(tp)
        if dataclasses.is_dataclass(elem):
            return tuple(from_struct(elem, item) for item in value)
        return tuple(int(item) for item in value)
    raise TypeError(f"no C mapping for {tp!r}")


def from_struct(cls: type[T], cdata: Any, **extra: Any) -> T:
    """Build dataclass `cls` from struct `cdata`; `extra` supplies the unmapped fields."""
    values = {name: _from_c(tp, _get(cdata, path)) for name, tp, path in _plan(cls)}
    values.update(extra)
    return cls(**values)  # type: ignore[call-arg]


def to_struct(obj: Any, cdata: Any, _where: str = "") -> Any:
    """Write dataclass `obj` into struct `cdata` (in place) and return `cdata`."""
    where = _where or type(obj).__name__
    for name, tp, path in _plan(type(obj)):
        value = getattr(obj, name)
        parent = _get(cdata, path[:-1])
        field = path[-1]
        here = f"{where}.{name}"
        if dataclasses.is_dataclass(tp):
            to_struct(value, getattr(parent, field), here)
        elif tp is int:
            setattr(parent, field, value)
        elif tp is bytes:
            target = getattr(parent, field)
            size = ffi.sizeof(target)
            if len(value) != size:
                raise StructShapeError(here, size, len(value))
            ffi.memmove(target, value, size)
        else:
            target = getattr(parent, field)
            if len(value) != len(target):
                raise StructShapeError(here, len(target), len(value))
            (elem, _ellipsis) = typing.get_args(tp)
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(elem):
                    to_struct(item, target[i], f"{here}[{i}]")
                else:
                    target[i] = item
    return cdata
