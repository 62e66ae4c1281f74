"""cffi API-mode build of the migration data path: the per-byte work of a round, in C.

cffi releases the interpreter lock around every call into this module, so the vCPU threads of
the VMM (which handle each exit in Python) keep running while a round is encoded. It links the
system's libzstd and inlines the system's xxhash (Debian: libzstd-dev, libxxhash-dev; the
Makefile installs them). The C source is `pages.c` beside this file.
"""

from __future__ import annotations

from pathlib import Path

import cffi

ffibuilder = cffi.FFI()

# Shared by the declarations cffi checks and the C source.
_TYPES = """
typedef struct {
    uint64_t address;        /* guest-physical address of the first page */
    uint64_t npages;
    int level;               /* zstd level; 0: every data frame is sent RAW */
    int stable;              /* 1: memory does not change while it is read (a paused guest) */
    uint32_t section_pages;  /* most data pages in one section, and in one frame */
    uint32_t min_zero_pages; /* shorter zero holes between data travel as data */
    uint32_t max_runs;       /* most descriptors in one section */
} kvmig_page_params;

typedef struct {
    size_t head_offset, head_length;        /* in `heads` */
    size_t payload_offset, payload_length;  /* in `payloads` */
    uint64_t digest;                        /* xxh3-64 of head + payloads: the body's */
    uint64_t pages, zero_pages, raw_bytes, payload_bytes;
} kvmig_page_section;
"""

_ERRORS = {"KVMIG_ENOSPACE": -1, "KVMIG_ECOMPRESS": -2, "KVMIG_EINVAL": -3}

ffibuilder.cdef(_TYPES + "".join(f"#define {name} {value}\n" for name, value in _ERRORS.items()) + """
long kvmig_encode_pages(void *cctx, const uint8_t *mem, const kvmig_page_params *prm,
                        uint8_t *heads, size_t heads_cap, uint8_t *payloads, size_t payloads_cap,
                        uint8_t *scratch, kvmig_page_section *sections, size_t sections_cap,
                        uint64_t *zero_runs, size_t zero_cap, size_t *nzero);
void *kvmig_zstd_cctx_new(void);
void kvmig_zstd_cctx_free(void *cctx);
long kvmig_zstd_compress(void *cctx, int level, const uint8_t *src, size_t len, uint8_t *dst, size_t dst_cap);
uint64_t kvmig_xxh3(const uint8_t *p, size_t len);
""")

_SOURCE = ("#include <stddef.h>\n#include <stdint.h>\n" + _TYPES
           + "".join(f"#define {name} ({value})\n" for name, value in _ERRORS.items())
           + (Path(__file__).parent / "pages.c").read_text())

ffibuilder.set_source("migrate.datapath._datapath", _SOURCE, libraries=["zstd"],
                      extra_compile_args=["-O2", "-Wall"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
