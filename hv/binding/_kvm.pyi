"""Types of the module cffi generates at install (hv/binding/build.py, declared in the headers beside it).

`lib`'s functions and constants and the fields of the structs `ffi` makes are declared in C,
which mypy cannot read: each is `Any` here (types-cffi types a struct as a `_CDataBase` without
fields, no better), and the thin Python wrappers over them give them their types. This is the
one place such an `Any` enters.
"""

from typing import Any

class _Ffi:
    NULL: Any
    errno: int
    def __getattr__(self, name: str) -> Any: ...

class _Lib:
    def __getattr__(self, name: str) -> Any: ...

ffi: _Ffi
lib: _Lib
