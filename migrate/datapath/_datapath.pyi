"""Types of the module cffi generates at install (migrate/datapath/_build.py, declared in pages.h).

Its functions, constants and the structs `ffi` makes are declared in C, which mypy cannot read:
`Any` here (as in hv/binding/_kvm.pyi), typed by the thin Python wrappers in `__init__.py`.
"""

from typing import Any

ffi: Any
lib: Any
