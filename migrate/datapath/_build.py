"""cffi API-mode build of the migration data path: the per-byte work of a round, in C.

cffi releases the interpreter lock around every call into this module, so the vCPU threads of
the VMM (which handle each exit in Python) keep running while a round is encoded. It links the
system's libzstd and inlines the system's xxhash (Debian: libzstd-dev, libxxhash-dev; the
Makefile installs them). The C source is `pages.c` beside this file; what Python may call
is declared in `pages.h`.
"""

from __future__ import annotations

from pathlib import Path

import cffi

ffibuilder = cffi.FFI()

_HERE = Path(__file__).resolve().parent


def header_declarations(header: Path) -> str:
    """The part of `header` between its `/* cffi: begin */` and `/* cffi: end */` markers: the
    declarations cffi's cdef reads, written once, in C (as hv/binding/build.py reads its own
    headers; a build script cannot import the package it builds, so the four lines are twice)."""
    text = header.read_text()
    begin, end = text.index("/* cffi: begin */"), text.index("/* cffi: end */")
    return text[begin + len("/* cffi: begin */"):end]


ffibuilder.cdef(header_declarations(_HERE / "pages.h"))
ffibuilder.set_source("migrate.datapath._datapath", '#include "pages.c"\n', include_dirs=[str(_HERE)],
                      libraries=["zstd"], extra_compile_args=["-O3", "-march=native", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
