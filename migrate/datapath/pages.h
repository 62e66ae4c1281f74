/* PAGES section bodies in C (pages.c): what the cffi build (_build.py) declares to Python. The
   reference both sides are proven equal to is formats/pages.py (tests/migrate/test_datapath.py).

   Between the `cffi:` markers only what cffi's cdef parses: types, prototypes and enums (the
   build reads that part; the compiler reads the whole file). */
#ifndef KVMIG_PAGES_H
#define KVMIG_PAGES_H

#include <stddef.h>
#include <stdint.h>

/* cffi: begin */
typedef struct {
    uint64_t address;        /* guest-physical address of the first page */
    uint64_t npages;
    int level;               /* zstd level; 0: every data frame is sent RAW */
    int stable;              /* 1: memory does not change while it is read (a paused guest) */
    uint32_t section_pages;  /* most data pages in one section, and in one frame */
    uint32_t min_zero_pages; /* shorter zero holes between data travel as data */
    uint32_t max_runs;       /* most descriptors in one section */
    uint32_t sample_bytes;   /* > 0: frames judged by a sample first (formats/SPEC.md 3) */
} kvmig_page_params;

typedef struct {
    size_t head_offset, head_length;  /* in `heads` */
    size_t first_piece, pieces;       /* its payloads, in order */
    uint64_t digest;                  /* xxh3-64 of head + payloads: the body's */
    uint64_t pages, zero_pages, raw_bytes, payload_bytes;
} kvmig_page_section;

typedef struct {
    int in_guest;                     /* 1: bytes of the guest memory given; 0: of `payloads` */
    size_t offset, length;
} kvmig_payload_piece;

typedef struct { uint64_t address, size; uint8_t *host; } kvmig_ram_range;  /* host: its bytes */
typedef struct { uint32_t max_runs; uint64_t max_run_bytes, max_section_raw; } kvmig_page_limits;
typedef struct { uint64_t pages, zero_pages, raw_bytes, payload_bytes; } kvmig_page_totals;
typedef struct {
    int code;           /* KVMIG_DEC_*: which of the reference decoder's checks refused the body */
    int64_t run;        /* the run it concerns, or -1 */
    uint64_t offset;    /* in the body */
    uint64_t expected, found;
} kvmig_decode_error;

/* what kvmig_encode_pages and kvmig_zstd_* return on failure */
enum kvmig_error { KVMIG_ENOSPACE = -1, KVMIG_ECOMPRESS = -2, KVMIG_EINVAL = -3 };

/* kvmig_decode_error.code: one per check of formats.pages.PageDecoder.decode (0 is no error) */
enum kvmig_decode_code {
    KVMIG_DEC_TRUNCATED = 1, KVMIG_DEC_RESERVED = 2, KVMIG_DEC_TOO_MANY_RUNS = 3, KVMIG_DEC_ENCODING = 4,
    KVMIG_DEC_OUTSIDE = 5, KVMIG_DEC_OVERLAP = 6, KVMIG_DEC_ZERO_PAYLOAD = 7, KVMIG_DEC_RAW_LENGTH = 8,
    KVMIG_DEC_RUN_TOO_LARGE = 9, KVMIG_DEC_SECTION_TOO_LARGE = 10, KVMIG_DEC_TRAILING = 11,
    KVMIG_DEC_ZSTD = 12, KVMIG_DEC_FRAME_SIZE = 13, KVMIG_DEC_DECOMPRESSED_SIZE = 14,
    KVMIG_DEC_CHECKSUM = 15
};

long kvmig_encode_pages(void *cctx, const uint8_t *mem, const kvmig_page_params *prm,
                        uint8_t *heads, size_t heads_cap, uint8_t *payloads, size_t payloads_cap,
                        uint8_t *scratch, kvmig_page_section *sections, size_t sections_cap,
                        kvmig_payload_piece *pieces, size_t pieces_cap,
                        uint64_t *zero_runs, size_t zero_cap, size_t *nzero, uint64_t *judged_raw);
void *kvmig_zstd_cctx_new(void);
void kvmig_zstd_cctx_free(void *cctx);
long kvmig_zstd_compress(void *cctx, int level, const uint8_t *src, size_t len, uint8_t *dst, size_t dst_cap);
uint64_t kvmig_xxh3(const uint8_t *p, size_t len);
long kvmig_decode_pages(void *dctx, const uint8_t *body, size_t len, const kvmig_ram_range *ranges,
                        size_t nranges, const kvmig_page_limits *lim, int populate,
                        uint8_t *scratch, size_t scratch_cap,
                        kvmig_page_totals *totals, kvmig_decode_error *err);
void *kvmig_zstd_dctx_new(void);
void kvmig_zstd_dctx_free(void *dctx);
long kvmig_zstd_decompress(void *dctx, const uint8_t *src, size_t len, uint8_t *dst, size_t cap);
void kvmig_block_hashes(const uint8_t *mem, uint64_t len, uint64_t block_size, const uint64_t *blocks,
                        size_t n, uint64_t *out);
/* cffi: end */

#endif
