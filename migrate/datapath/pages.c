/* PAGES section bodies (formats/SPEC.md section 3), encoded in C without the interpreter lock.
 *
 * The same algorithm as formats.pages.PageEncoder.encode, step for step, so the bodies are the
 * same bytes (tests/migrate/test_datapath.py proves it against the Python reference):
 *   1. one bit per page: any non-zero byte;
 *   2. runs of equal kind; when there is more than one run, zero runs shorter than
 *      min_zero_pages become data, and neighbours of equal kind merge;
 *   3. a zero run is one ZERO descriptor (a new section first if this one has max_runs);
 *   4. a data run is cut into frames of at most section_pages pages, counted from the run's
 *      start; a frame that would take the section's data past section_pages, or a section with
 *      max_runs descriptors, starts a new section; each frame is compressed (zstd, content size
 *      in the frame header) and sent ZSTD if that is shorter, else RAW; its digest is xxh3-64 of
 *      the uncompressed bytes.
 * Memory that may change while it is read (a running guest's, `stable` = 0) is copied once per
 * frame and the copy is what is hashed, compressed and sent, so the three agree.
 *
 * Output: each section as a head (u32 run count, u32 0, the descriptors) in `heads` and its
 * payloads as pieces: views of the guest memory itself (a RAW frame of stable memory: no copy)
 * or of `payloads` (compressed frames, and copies of memory that may change); its body is head
 * then pieces, `digest` is xxh3-64 of that body (what the record framing hashes).
 *
 * Over 450 lines, as one file on purpose: the encoder and the decoder are the two halves of one
 * byte layout (formats/SPEC.md section 3), written step for step after formats/pages.py, which
 * holds both halves too; side by side, each is read against the other and against the reference.
 */
#include <stdint.h>
#include <string.h>
#include <zstd.h>

#include "pages.h"
#include <zstd_errors.h>
#define XXH_INLINE_ALL
#include <xxhash.h>

#define KVMIG_PAGE_SHIFT 12
#define KVMIG_PAGE_SIZE 4096u
#define KVMIG_RUN_SIZE 28u
#define KVMIG_BODY_HEADER 8u

enum { ENC_ZERO = 1, ENC_RAW = 2, ENC_ZSTD = 3 };

static int page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (unsigned i = 0; i < KVMIG_PAGE_SIZE / 8; i++)
        acc |= w[i];
    return acc == 0;
}

static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

struct encoder {
    const kvmig_page_params *prm;
    ZSTD_CCtx *cctx;
    uint8_t *heads, *payloads, *scratch;
    size_t heads_cap, payloads_cap;
    size_t head_pos;               /* where the open section's head begins */
    size_t head_len;               /* bytes of the open section's head so far (header included) */
    const uint8_t *mem;
    kvmig_page_section *sections;
    size_t sections_cap, nsections;
    kvmig_payload_piece *pieces;
    size_t pieces_cap, npieces;
    size_t section_first_piece;
    size_t payload_used;           /* bytes of `payloads` written so far */
    uint64_t *zero_runs;           /* (address, bytes) pairs of the ZERO runs */
    size_t zero_cap, nzero;
    uint32_t runs;                 /* descriptors in the open section */
    uint64_t raw_pages, pages, zero_pages, payload_bytes;
    uint64_t judged_raw;           /* frames sent RAW because their sample did not compress */
};

static const uint8_t *piece_bytes(const struct encoder *e, const kvmig_payload_piece *p)
{
    return (p->in_guest ? e->mem : e->payloads) + p->offset;
}

static int flush(struct encoder *e)
{
    if (e->runs == 0)
        return 0;
    if (e->nsections == e->sections_cap)
        return KVMIG_ENOSPACE;
    uint8_t *head = e->heads + e->head_pos;
    put_u32(head, e->runs);
    put_u32(head + 4, 0);
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    XXH3_64bits_update(&st, head, e->head_len);
    for (size_t i = e->section_first_piece; i < e->npieces; i++)
        XXH3_64bits_update(&st, piece_bytes(e, &e->pieces[i]), e->pieces[i].length);
    kvmig_page_section *s = &e->sections[e->nsections++];
    s->head_offset = e->head_pos;
    s->head_length = e->head_len;
    s->first_piece = e->section_first_piece;
    s->pieces = e->npieces - e->section_first_piece;
    s->digest = XXH3_64bits_digest(&st);
    s->pages = e->pages;
    s->zero_pages = e->zero_pages;
    s->raw_bytes = e->raw_pages << KVMIG_PAGE_SHIFT;
    s->payload_bytes = e->payload_bytes;
    e->head_pos += e->head_len;
    e->section_first_piece = e->npieces;
    e->head_len = KVMIG_BODY_HEADER;
    e->runs = 0;
    e->raw_pages = e->pages = e->zero_pages = e->payload_bytes = 0;
    return 0;
}

static int add_piece(struct encoder *e, int in_guest, size_t offset, size_t length)
{
    if (e->npieces == e->pieces_cap)
        return KVMIG_ENOSPACE;
    e->pieces[e->npieces++] = (kvmig_payload_piece){.in_guest = in_guest, .offset = offset, .length = length};
    e->payload_bytes += length;
    return 0;
}

static int open_descriptor(struct encoder *e)
{
    if (e->head_pos + e->head_len + KVMIG_RUN_SIZE > e->heads_cap)
        return KVMIG_ENOSPACE;
    return 0;
}

static void descriptor(struct encoder *e, uint64_t address, uint32_t pages, uint8_t encoding,
                       uint32_t payload_len, uint64_t digest)
{
    uint8_t *d = e->heads + e->head_pos + e->head_len;
    put_u64(d, address);
    put_u32(d + 8, pages);
    d[12] = encoding;
    d[13] = d[14] = d[15] = 0;
    put_u32(d + 16, payload_len);
    put_u64(d + 20, digest);
    e->head_len += KVMIG_RUN_SIZE;
    e->runs++;
}

static int zero_run(struct encoder *e, uint64_t first, uint64_t count)
{
    int rc;
    if (e->runs >= e->prm->max_runs && (rc = flush(e)))
        return rc;
    if ((rc = open_descriptor(e)))
        return rc;
    if (e->nzero == e->zero_cap)
        return KVMIG_ENOSPACE;
    uint64_t address = e->prm->address + (first << KVMIG_PAGE_SHIFT);
    descriptor(e, address, (uint32_t)count, ENC_ZERO, 0, 0);
    e->zero_runs[2 * e->nzero] = address;
    e->zero_runs[2 * e->nzero + 1] = count << KVMIG_PAGE_SHIFT;
    e->nzero++;
    e->pages += count;
    e->zero_pages += count;
    return 0;
}

static int data_frame(struct encoder *e, uint64_t a, uint64_t b)
{
    int rc;
    uint64_t n = b - a;
    if ((e->raw_pages + n > e->prm->section_pages || e->runs >= e->prm->max_runs) && (rc = flush(e)))
        return rc;
    if ((rc = open_descriptor(e)))
        return rc;
    size_t len = (size_t)n << KVMIG_PAGE_SHIFT, at = (size_t)a << KVMIG_PAGE_SHIFT;
    const uint8_t *raw = e->mem + at;
    /* room in `payloads` for the frame: a copy, or a compressed frame (shorter than `len`) */
    int room = e->payload_used + len <= e->payloads_cap;
    uint8_t *out = e->payloads + e->payload_used;
    if (!e->prm->stable) {  /* copy once: what is hashed, compressed and sent is this copy */
        if (!room)
            return KVMIG_ENOSPACE;
        memcpy(out, raw, len);
        raw = out;
    }
    uint64_t digest = XXH3_64bits(raw, len);
    int worth = e->prm->level > 0;
    uint32_t sample = e->prm->sample_bytes;
    if (worth && sample && len > sample) {
        /* formats/SPEC.md 3: compressed only if the sample shrinks by 1/16 (16 x packed < 15 x
         * sample), i.e. if it fits in (15 x sample - 1) / 16 bytes */
        size_t cap = ((size_t)15 * sample - 1) / 16;
        size_t r = ZSTD_compress2(e->cctx, e->scratch, cap, raw, sample);
        if (ZSTD_isError(r)) {
            if (ZSTD_getErrorCode(r) != ZSTD_error_dstSize_tooSmall)
                return KVMIG_ECOMPRESS;
            worth = 0;
            e->judged_raw++;
        }
    }
    size_t packed = 0;
    if (worth && !room)
        return KVMIG_ENOSPACE;
    if (worth) {
        /* room for one byte less than the frame: it is sent compressed only if that is shorter */
        uint8_t *dst = e->prm->stable ? out : e->scratch;
        packed = ZSTD_compress2(e->cctx, dst, len - 1, raw, len);
        if (ZSTD_isError(packed)) {
            if (ZSTD_getErrorCode(packed) != ZSTD_error_dstSize_tooSmall)
                return KVMIG_ECOMPRESS;
            packed = 0;
        } else if (!e->prm->stable) {
            memcpy(out, e->scratch, packed);
        }
    }
    uint64_t address = e->prm->address + ((uint64_t)a << KVMIG_PAGE_SHIFT);
    if (packed) {
        descriptor(e, address, (uint32_t)n, ENC_ZSTD, (uint32_t)packed, digest);
        rc = add_piece(e, 0, e->payload_used, packed);
        e->payload_used += packed;
    } else if (e->prm->stable) {  /* the guest's own bytes, sent in place */
        descriptor(e, address, (uint32_t)n, ENC_RAW, (uint32_t)len, digest);
        rc = add_piece(e, 1, at, len);
    } else {
        descriptor(e, address, (uint32_t)n, ENC_RAW, (uint32_t)len, digest);
        rc = add_piece(e, 0, e->payload_used, len);
        e->payload_used += len;
    }
    if (rc)
        return rc;
    e->raw_pages += n;
    e->pages += n;
    return 0;
}

static int data_run(struct encoder *e, uint64_t start, uint64_t end)
{
    for (uint64_t a = start; a < end; a += e->prm->section_pages) {
        uint64_t b = a + e->prm->section_pages < end ? a + e->prm->section_pages : end;
        int rc = data_frame(e, a, b);
        if (rc)
            return rc;
    }
    return 0;
}

static int emit(struct encoder *e, uint64_t start, uint64_t end, int data)
{
    return data ? data_run(e, start, end) : zero_run(e, start, end - start);
}

/* Step 2's folding: a zero run shorter than min_zero_pages counts as data. */
static int folded(const kvmig_page_params *prm, int data, uint64_t pages)
{
    return data || (prm->min_zero_pages > 1 && pages < prm->min_zero_pages);
}

long kvmig_encode_pages(void *cctx, const uint8_t *mem, const kvmig_page_params *prm,
                        uint8_t *heads, size_t heads_cap, uint8_t *payloads, size_t payloads_cap,
                        uint8_t *scratch, kvmig_page_section *sections, size_t sections_cap,
                        kvmig_payload_piece *pieces, size_t pieces_cap,
                        uint64_t *zero_runs, size_t zero_cap, size_t *nzero, uint64_t *judged_raw)
{
    struct encoder e = {
        .prm = prm, .cctx = cctx, .heads = heads, .payloads = payloads, .scratch = scratch,
        .heads_cap = heads_cap, .payloads_cap = payloads_cap, .head_len = KVMIG_BODY_HEADER,
        .mem = mem, .sections = sections, .sections_cap = sections_cap, .pieces = pieces,
        .pieces_cap = pieces_cap, .zero_runs = zero_runs, .zero_cap = zero_cap,
    };
    *nzero = 0;
    if (prm->section_pages == 0 || prm->max_runs == 0)
        return KVMIG_EINVAL;
    if (prm->level > 0) {
        size_t r = ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
        if (!ZSTD_isError(r))
            r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, prm->level);
        if (!ZSTD_isError(r))
            r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
        if (ZSTD_isError(r))
            return KVMIG_ECOMPRESS;
    }
    /* The first raw run is held until a second one shows that folding applies at all (a lone
     * run keeps its kind); after that, folded runs of equal kind merge into `pending`. */
    uint64_t first_start = 0, first_end = 0, pstart = 0, pend = 0;
    int first_data = 0, pdata = 0, seen = 0, held = 0, rc;
    for (uint64_t i = 0; i < prm->npages;) {
        int data = !page_is_zero(mem + ((size_t)i << KVMIG_PAGE_SHIFT));
        uint64_t j = i + 1;
        while (j < prm->npages && (!page_is_zero(mem + ((size_t)j << KVMIG_PAGE_SHIFT))) == data)
            j++;
        if (!seen) {
            seen = held = 1;
            first_start = i, first_end = j, first_data = data;
        } else {
            if (held) {
                held = 0;
                pstart = first_start, pend = first_end;
                pdata = folded(prm, first_data, first_end - first_start);
            }
            int kind = folded(prm, data, j - i);
            if (kind == pdata) {
                pend = j;
            } else {
                if ((rc = emit(&e, pstart, pend, pdata)))
                    return rc;
                pstart = i, pend = j, pdata = kind;
            }
        }
        i = j;
    }
    if (held)
        rc = emit(&e, first_start, first_end, first_data);
    else
        rc = seen ? emit(&e, pstart, pend, pdata) : 0;
    if (rc || (rc = flush(&e)))
        return rc;
    *nzero = e.nzero;
    *judged_raw = e.judged_raw;
    return (long)e.nsections;
}

void *kvmig_zstd_cctx_new(void) { return ZSTD_createCCtx(); }
void kvmig_zstd_cctx_free(void *cctx) { ZSTD_freeCCtx(cctx); }

/* One zstd frame of `src` at `level`, content size in its header: the compressor the Python
 * reference encoder is given in the tests, so both paths use this very library. Returns the
 * frame's length, or 0 when it does not fit in `dst_cap`, or -1 on another zstd error. */
long kvmig_zstd_compress(void *cctx, int level, const uint8_t *src, size_t len, uint8_t *dst, size_t dst_cap)
{
    size_t r = ZSTD_CCtx_reset(cctx, ZSTD_reset_session_and_parameters);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level);
    if (!ZSTD_isError(r))
        r = ZSTD_CCtx_setParameter(cctx, ZSTD_c_contentSizeFlag, 1);
    if (!ZSTD_isError(r))
        r = ZSTD_compress2(cctx, dst, dst_cap, src, len);
    if (ZSTD_isError(r))
        return ZSTD_getErrorCode(r) == ZSTD_error_dstSize_tooSmall ? 0 : -1;
    return (long)r;
}

uint64_t kvmig_xxh3(const uint8_t *p, size_t len) { return XXH3_64bits(p, len); }

/* ---- decoding: formats.pages.PageDecoder.decode, with the pages written where they belong ----
 *
 * Every check of the reference, in its order, so a hostile body is refused with the same error
 * (kvmig_decode_error says which, where, expected and found; the Python side raises the same
 * FormatError): the whole run table is checked before any payload is touched. Data runs are
 * then decompressed (or copied) straight into guest memory and their digest checked there; a
 * later run failing leaves earlier runs written, which is why this writes only into memory that
 * no guest runs on yet (a migration target's or a restore's staging RAM). ZERO runs are left to
 * the caller (it gives the pages back to the host), which reads them from the run table.
 */
#include <sys/mman.h>
#ifndef MADV_POPULATE_WRITE
#include <linux/mman.h>  /* a C library older than the kernel's header: the kernel's own number */
#endif

static uint32_t get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static long fail(kvmig_decode_error *err, int code, int64_t run, uint64_t offset, uint64_t expected,
                 uint64_t found)
{
    err->code = code, err->run = run, err->offset = offset, err->expected = expected, err->found = found;
    return -1;
}

/* The RAM range holding [address, address + length), or -1 (formats.MemoryLayout.first_outside). */
static long range_of(const kvmig_ram_range *ranges, size_t n, uint64_t address, uint64_t length)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t end = ranges[i].address + ranges[i].size;
        if (address >= ranges[i].address && address < end)
            return length <= end - address ? (long)i : -1;
    }
    return -1;
}

long kvmig_decode_pages(void *dctx, const uint8_t *body, size_t len, const kvmig_ram_range *ranges,
                        size_t nranges, const kvmig_page_limits *lim, int populate,
                        uint8_t *scratch, size_t scratch_cap,
                        kvmig_page_totals *totals, kvmig_decode_error *err)
{
    memset(totals, 0, sizeof *totals);
    if (len < KVMIG_BODY_HEADER)
        return fail(err, KVMIG_DEC_TRUNCATED, -1, 0, KVMIG_BODY_HEADER, len);
    uint32_t count = get_u32(body), reserved = get_u32(body + 4);
    if (reserved)
        return fail(err, KVMIG_DEC_RESERVED, -1, 4, 0, reserved);
    if (count > lim->max_runs)
        return fail(err, KVMIG_DEC_TOO_MANY_RUNS, -1, 0, lim->max_runs, count);
    uint64_t table_end = KVMIG_BODY_HEADER + (uint64_t)count * KVMIG_RUN_SIZE;
    if (table_end > len)
        return fail(err, KVMIG_DEC_TRUNCATED, -1, 0, table_end, len);
    const uint8_t *table = body + KVMIG_BODY_HEADER;
#define RUN_ADDRESS(i) get_u64(table + (size_t)(i) * KVMIG_RUN_SIZE)
#define RUN_PAGES(i) get_u32(table + (size_t)(i) * KVMIG_RUN_SIZE + 8)
#define RUN_ENCODING(i) (table[(size_t)(i) * KVMIG_RUN_SIZE + 12])
#define RUN_LENGTH(i) get_u32(table + (size_t)(i) * KVMIG_RUN_SIZE + 16)
#define RUN_DIGEST(i) get_u64(table + (size_t)(i) * KVMIG_RUN_SIZE + 20)
    /* the same checks as the reference, each over the whole table before the next */
    for (uint32_t i = 0; i < count; i++)
        if (RUN_ENCODING(i) < ENC_ZERO || RUN_ENCODING(i) > ENC_ZSTD)
            return fail(err, KVMIG_DEC_ENCODING, i, 0, 0, RUN_ENCODING(i));
    for (uint32_t i = 0; i < count; i++) {
        uint64_t a = RUN_ADDRESS(i), n = RUN_PAGES(i);
        if ((a & (KVMIG_PAGE_SIZE - 1)) || n == 0 || range_of(ranges, nranges, a, n << KVMIG_PAGE_SHIFT) < 0)
            return fail(err, KVMIG_DEC_OUTSIDE, i, 0, 0, 0);
    }
    for (uint32_t i = 1; i < count; i++)
        if (RUN_ADDRESS(i) < RUN_ADDRESS(i - 1) + ((uint64_t)RUN_PAGES(i - 1) << KVMIG_PAGE_SHIFT))
            return fail(err, KVMIG_DEC_OVERLAP, i, 0, 0, 0);
    for (uint32_t i = 0; i < count; i++)
        if (RUN_ENCODING(i) == ENC_ZERO && (RUN_LENGTH(i) || RUN_DIGEST(i)))
            return fail(err, KVMIG_DEC_ZERO_PAYLOAD, i, 0, 0, 0);
    for (uint32_t i = 0; i < count; i++)
        if (RUN_ENCODING(i) == ENC_RAW && RUN_LENGTH(i) != (uint64_t)RUN_PAGES(i) << KVMIG_PAGE_SHIFT)
            return fail(err, KVMIG_DEC_RAW_LENGTH, i, KVMIG_BODY_HEADER + (uint64_t)i * KVMIG_RUN_SIZE,
                        (uint64_t)RUN_PAGES(i) << KVMIG_PAGE_SHIFT, RUN_LENGTH(i));
    uint64_t raw_total = 0, payload_total = 0, zero_pages = 0, pages = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint64_t size = (uint64_t)RUN_PAGES(i) << KVMIG_PAGE_SHIFT;
        if (RUN_ENCODING(i) != ENC_ZERO && size > lim->max_run_bytes)
            return fail(err, KVMIG_DEC_RUN_TOO_LARGE, i, KVMIG_BODY_HEADER + (uint64_t)i * KVMIG_RUN_SIZE,
                        lim->max_run_bytes, size);
    }
    for (uint32_t i = 0; i < count; i++) {
        uint64_t size = (uint64_t)RUN_PAGES(i) << KVMIG_PAGE_SHIFT;
        pages += RUN_PAGES(i);
        if (RUN_ENCODING(i) == ENC_ZERO)
            zero_pages += RUN_PAGES(i);
        else
            raw_total += size;
        payload_total += RUN_LENGTH(i);
    }
    if (raw_total > lim->max_section_raw)
        return fail(err, KVMIG_DEC_SECTION_TOO_LARGE, -1, 0, lim->max_section_raw, raw_total);
    if (table_end + payload_total > len)
        return fail(err, KVMIG_DEC_TRUNCATED, -1, 0, table_end + payload_total, len);
    if (table_end + payload_total < len)
        return fail(err, KVMIG_DEC_TRAILING, -1, table_end + payload_total, 0, len - table_end - payload_total);

    uint64_t pos = table_end;
    for (uint32_t i = 0; i < count; i++) {
        if (RUN_ENCODING(i) == ENC_ZERO)
            continue;
        uint64_t a = RUN_ADDRESS(i), size = (uint64_t)RUN_PAGES(i) << KVMIG_PAGE_SHIFT;
        const kvmig_ram_range *r = &ranges[range_of(ranges, nranges, a, size)];
        uint8_t *dst = r->host + (a - r->address);
        const uint8_t *payload = body + pos;
        uint32_t plen = RUN_LENGTH(i);
        if (populate)
            madvise(dst, size, MADV_POPULATE_WRITE);  /* one fault-in for the run, not one a page */
        if (RUN_ENCODING(i) == ENC_ZSTD) {
            unsigned long long declared = ZSTD_getFrameContentSize(payload, plen);
            if (declared == ZSTD_CONTENTSIZE_ERROR)
                return fail(err, KVMIG_DEC_ZSTD, i, pos, 0, 0);
            if (declared != size)
                return fail(err, KVMIG_DEC_FRAME_SIZE, i, pos, size,
                            declared == ZSTD_CONTENTSIZE_UNKNOWN ? (uint64_t)-1 : declared);
            if (ZSTD_findFrameCompressedSize(payload, plen) != plen)  /* bytes after the frame */
                return fail(err, KVMIG_DEC_ZSTD, i, pos, 0, 0);
            /* with `scratch` (hosts other decoders write at the same time): decompressed and
             * checked in this decoder's own buffer, then copied. zstd writes past its output
             * position and corrects it later, and reads back what it wrote as its window: in a
             * shared buffer another decoder of the same page would see, or cause, bytes that
             * were never the page's. */
            uint8_t *out_to = scratch && size <= scratch_cap ? scratch : dst;
            size_t out = ZSTD_decompressDCtx(dctx, out_to, size, payload, plen);
            if (ZSTD_isError(out))
                return fail(err, KVMIG_DEC_ZSTD, i, pos, 0, 0);
            if (out != size)
                return fail(err, KVMIG_DEC_DECOMPRESSED_SIZE, i, pos, size, out);
            uint64_t found = XXH3_64bits(out_to, size);
            if (found != RUN_DIGEST(i))
                return fail(err, KVMIG_DEC_CHECKSUM, i, pos, RUN_DIGEST(i), found);
            if (out_to != dst)
                memcpy(dst, out_to, size);
        } else {
            uint64_t found = XXH3_64bits(payload, size);
            if (found != RUN_DIGEST(i))
                return fail(err, KVMIG_DEC_CHECKSUM, i, pos, RUN_DIGEST(i), found);
            memcpy(dst, payload, size);
        }
        pos += plen;
    }
    totals->pages = pages, totals->zero_pages = zero_pages, totals->raw_bytes = raw_total;
    totals->payload_bytes = payload_total;
    return count;
}

void *kvmig_zstd_dctx_new(void) { return ZSTD_createDCtx(); }
void kvmig_zstd_dctx_free(void *dctx) { ZSTD_freeDCtx(dctx); }

/* ---- the memory digest's block hashes (formats/digest.py block_hash), many in one call ---- */

void kvmig_block_hashes(const uint8_t *mem, uint64_t len, uint64_t block_size, const uint64_t *blocks,
                        size_t n, uint64_t *out)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t start = blocks[i] * block_size;
        uint64_t size = start >= len ? 0 : (len - start < block_size ? len - start : block_size);
        out[i] = XXH3_64bits(mem + start, size);
    }
}

/* One zstd frame of exactly `len` bytes into `dst` (at most `cap`): the decompressor the Python
 * reference decoder is given in the tests. Its length, or -1 for anything but one valid frame. */
long kvmig_zstd_decompress(void *dctx, const uint8_t *src, size_t len, uint8_t *dst, size_t cap)
{
    if (ZSTD_findFrameCompressedSize(src, len) != len)
        return -1;
    size_t r = ZSTD_decompressDCtx(dctx, dst, cap, src, len);
    return ZSTD_isError(r) ? -1 : (long)r;
}
