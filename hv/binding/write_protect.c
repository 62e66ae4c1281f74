/* Guest RAM held at one instant while the guest runs on (a live snapshot), by userfaultfd
   write-protect, with its fault path in C (no interpreter lock).

   `kvmig_wp_open` registers the range in write-protect mode and starts the fault thread (before
   the guest is paused: nothing of it can fail in the pause). `kvmig_wp_protect`, called in the
   pause, write-protects the whole range in one ioctl and records which pages are to be read (the
   pages the snapshot holds; the others are zero at the instant, or not wanted, and are never
   read, so untouched memory is not populated). From then on:

   - a thread that writes a protected page (a vCPU in KVM_RUN: KVM's write fault on the host page
     is a kernel-mode fault, so the descriptor is opened without UFFD_USER_MODE_ONLY; a device
     thread; Python) blocks in the kernel; the fault thread copies the page aside (if it is to be
     read) and un-protects it, which wakes the writer. The page's instant contents are kept.
   - the reader (`kvmig_wp_take`) copies pages out in address order, from the copy aside where the
     guest wrote first, from the guest's memory where it did not (still protected: unchanged
     since the instant), and un-protects what it took, so the guest stops faulting there.

   Per-page state and the un-protecting ioctls are under one lock, so a page is copied at most
   once and never after it was released. `kvmig_wp_close` un-protects everything left (a snapshot
   that failed half way leaves no page protected), stops the thread and unregisters. Compiled in
   one translation unit after userfault.c, whose descriptor opening and fault-thread start and
   stop it shares (uf_open_fd, uf_start_thread, uf_stop_thread). */

#include "write_protect.h"

#define WP_CHUNK 64   /* pages taken under the lock at a time: the fault thread waits no longer */
/* Pages released together, by a fault or by the reader: 2 MiB, a huge page. Each release is an
   invalidation KVM's MMU must process (on nested PVM, about 80 us with a 1 GiB guest mapped), and
   a guest writes its memory in runs: a fault that keeps and releases its whole block (a copy of at
   most 2 MiB, ~0.1 ms) costs the guest one wait per block instead of 512, and a huge page is
   released whole, not split. */
#define WP_BLOCK 512
#define WP_EAGAIN_TRIES 10000

/* Per page. RELEASED: written and released without a copy (not to be read: zero at the instant). */
enum { WP_NONE = 0, WP_PROTECTED = 1, WP_SAVED = 2, WP_RELEASED = 3, WP_TAKEN = 4 };

struct kvmig_wp {
    pthread_mutex_t lock;
    int uffd, stop_fd;
    uint64_t base, length, npages;
    uint8_t *state;           /* per page: WP_* */
    uint64_t *read;           /* bit per page: its contents belong to the snapshot */
    uint64_t nblocks;
    uint8_t **aside;          /* per block: where its pages written before they were taken are kept */
    uint32_t *kept;           /* per block: pages kept aside there and not taken yet */
    uint8_t *open_block;      /* per block: released whole (no page of it protected any more) */
    uint8_t **spare;          /* blocks' buffers free for use: the pre-faulted pool, then returned ones */
    uint64_t nspare;
    uint8_t *pool;            /* the pool, faulted in at open (before the pause) */
    uint64_t pool_bytes;
    uint64_t aside_now;       /* bytes held aside now */
    kvmig_wp_stats st;
    pthread_t thread;
    int has_thread, registered;
};

static int wp_reads(const kvmig_wp *h, uint64_t p) { return (h->read[p / 64] >> (p % 64)) & 1; }

/* (Un)protect [off, off+len): mode UFFDIO_WRITEPROTECT_MODE_WP or 0; un-protecting wakes the
   threads waiting there. Returns 0 or -errno. */
static int wp_set(kvmig_wp *h, uint64_t off, uint64_t len, uint64_t mode) {
    for (int tries = 0;; tries++) {
        struct uffdio_writeprotect w = {.range = {.start = h->base + off, .len = len}, .mode = mode};
        if (ioctl(h->uffd, UFFDIO_WRITEPROTECT, &w) == 0) return 0;
        if (errno != EAGAIN || tries > WP_EAGAIN_TRIES) return -errno;
        sched_yield(); /* the address space is changing (an mmap elsewhere): try again */
    }
}

#define WP_BLOCK_BYTES (WP_BLOCK * UF_PAGE)

/* Under the lock: release [first, end) (pages), and note the blocks released whole. */
static int wp_release(kvmig_wp *h, uint64_t first, uint64_t end) {
    int r = wp_set(h, first * UF_PAGE, (end - first) * UF_PAGE, 0);
    for (uint64_t b = (first + WP_BLOCK - 1) / WP_BLOCK; !r && b < h->nblocks && b * WP_BLOCK < end; b++)
        if ((b + 1) * WP_BLOCK <= end || end == h->npages) h->open_block[b] = 1;
    return r;
}

/* Under the lock: the buffer block b's pages are kept in, NULL if there is no memory for it. A
   spare one (faulted in already: copying into it costs a copy, not 512 page faults), else a new
   one, populated in one call. */
static uint8_t *wp_block_buffer(kvmig_wp *h, uint64_t b) {
    if (!h->aside[b]) {
        if (h->nspare) {
            h->aside[b] = h->spare[--h->nspare];
        } else {
            void *m = mmap(NULL, WP_BLOCK_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
                           -1, 0);
            if (m == MAP_FAILED) return NULL;
            h->aside[b] = m;
            h->st.blocks_beyond_pool++;
        }
    }
    return h->aside[b];
}

static uint8_t *wp_aside_page(const kvmig_wp *h, uint64_t p) {
    return h->aside[p / WP_BLOCK] + (p % WP_BLOCK) * UF_PAGE;
}

/* Under the lock: page p is about to be written; its instant contents are kept where they
   belong. Returns 0, or -ENOMEM when there is no memory to keep it (it stays protected). */
static int wp_keep(kvmig_wp *h, uint64_t p) {
    if (h->state[p] != WP_PROTECTED) return 0;
    if (wp_reads(h, p)) {
        if (!wp_block_buffer(h, p / WP_BLOCK)) return -ENOMEM;
        memcpy(wp_aside_page(h, p), (const void *)(uintptr_t)(h->base + p * UF_PAGE), UF_PAGE);
        h->state[p] = WP_SAVED;
        h->kept[p / WP_BLOCK]++;
        h->st.saved++;
        h->aside_now += UF_PAGE;
        if (h->aside_now > h->st.saved_bytes_peak) h->st.saved_bytes_peak = h->aside_now;
    } else {
        h->state[p] = WP_RELEASED;
    }
    h->st.protected_pages--;
    return 0;
}

/* Under the lock: page p's copy aside was taken; a block with none left gives its buffer back. */
static void wp_taken_aside(kvmig_wp *h, uint64_t p) {
    uint64_t b = p / WP_BLOCK;
    h->aside_now -= UF_PAGE;
    if (--h->kept[b] == 0) {
        h->spare[h->nspare++] = h->aside[b];
        h->aside[b] = NULL;
    }
}

static void wp_fault(kvmig_wp *h, const struct uffd_msg *m, uint64_t read_ns) {
    uint64_t addr = m->arg.pagefault.address & ~(UF_PAGE - 1);
    h->st.faults++;
    if (addr < h->base || addr >= h->base + h->length) return; /* not ours: cannot happen */
    uint64_t p = (addr - h->base) / UF_PAGE;
    uint64_t first = p / WP_BLOCK * WP_BLOCK, end = first + WP_BLOCK < h->npages ? first + WP_BLOCK : h->npages;
    int r = 0;
    for (uint64_t q = first; q < end && !r; q++) r = wp_keep(h, q);
    /* released, unless it could not be kept (then the writer waits for the reader to take the
       block); a block released already (the fault raced its release) only needs its writer woken:
       a release that changes nothing still costs KVM an invalidation */
    if (!r && !h->open_block[p / WP_BLOCK]) {
        r = wp_release(h, first, end);
    } else if (!r) {
        struct uffdio_range w = {.start = h->base + first * UF_PAGE, .len = (end - first) * UF_PAGE};
        if (ioctl(h->uffd, UFFDIO_WAKE, &w) < 0) r = -errno;
    }
    if (r) h->st.last_errno = -r;
    uint64_t lat = uf_now() - read_ns;
    h->st.lat_count++;
    h->st.lat_sum_ns += lat;
    if (lat > h->st.lat_max_ns) h->st.lat_max_ns = lat;
}

static void *wp_thread(void *arg) {
    kvmig_wp *h = arg;
    struct pollfd pfd[2] = {{.fd = h->uffd, .events = POLLIN}, {.fd = h->stop_fd, .events = POLLIN}};
    struct uffd_msg msgs[UF_MSGS];
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (pfd[1].revents) return NULL;
        ssize_t n = read(h->uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            break;
        }
        uint64_t now = uf_now();
        pthread_mutex_lock(&h->lock);
        for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT) wp_fault(h, &msgs[i], now);
        pthread_mutex_unlock(&h->lock);
    }
    int e = errno;
    pthread_mutex_lock(&h->lock);
    h->st.thread_errno = e;
    pthread_mutex_unlock(&h->lock);
    return NULL;
}

/* `pool_bytes`: buffers for blocks the guest writes before they are read, faulted in now (the
   guest's first write to a block then waits for a copy only); more are allocated as needed. */
int kvmig_wp_open(kvmig_wp **out, void *base, uint64_t length, uint64_t pool_bytes, int *failed_op) {
    *out = NULL;
    *failed_op = KVMIG_UFFD_OP_OPEN;
    if ((uintptr_t)base % UF_PAGE || length % UF_PAGE || length == 0) return -EINVAL;
    kvmig_wp *h = calloc(1, sizeof *h);
    if (!h) return -ENOMEM;
    h->uffd = h->stop_fd = -1;
    h->base = (uint64_t)(uintptr_t)base;
    h->length = length;
    h->npages = length / UF_PAGE;
    h->nblocks = (h->npages + WP_BLOCK - 1) / WP_BLOCK;
    pthread_mutex_init(&h->lock, NULL);
    int err = 0;

    h->uffd = uf_open_fd();
    if (h->uffd < 0) { err = errno; goto fail; }
    /* not UFFD_FEATURE_WP_UNPOPULATED: protecting unpopulated memory installs a marker per page,
       which costs the pause time in proportion to RAM (115-300 ms at 16 GiB, measured) */
    *failed_op = KVMIG_UFFD_OP_API;
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP};
    if (ioctl(h->uffd, UFFDIO_API, &api) < 0) { err = errno == EINVAL ? ENOTSUP : errno; goto fail; }

    *failed_op = KVMIG_UFFD_OP_ALLOC;
    h->state = calloc(h->npages, 1);
    h->read = calloc((h->npages + 63) / 64, sizeof *h->read);
    if (!h->state || !h->read) { err = ENOMEM; goto fail; }
    h->aside = calloc(h->nblocks, sizeof *h->aside);
    h->kept = calloc(h->nblocks, sizeof *h->kept);
    h->open_block = calloc(h->nblocks, 1);
    h->spare = calloc(h->nblocks, sizeof *h->spare);
    if (!h->aside || !h->kept || !h->spare || !h->open_block) { err = ENOMEM; goto fail; }
    uint64_t pool_blocks = pool_bytes / WP_BLOCK_BYTES < h->nblocks ? pool_bytes / WP_BLOCK_BYTES : h->nblocks;
    if (pool_blocks) {
        void *pool = mmap(NULL, pool_blocks * WP_BLOCK_BYTES, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (pool == MAP_FAILED) { err = errno; goto fail; }
        h->pool = pool;
        h->pool_bytes = pool_blocks * WP_BLOCK_BYTES;
        for (uint64_t i = 0; i < pool_blocks; i++) h->spare[h->nspare++] = h->pool + i * WP_BLOCK_BYTES;
    }
    h->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (h->stop_fd < 0) { err = errno; goto fail; }

    *failed_op = KVMIG_UFFD_OP_REGISTER;
    struct uffdio_register reg = {.range = {.start = h->base, .len = length}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(h->uffd, UFFDIO_REGISTER, &reg) < 0) { err = errno; goto fail; }
    h->registered = 1;
    if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) { err = ENOTSUP; goto fail; }

    *failed_op = KVMIG_UFFD_OP_THREAD;
    err = uf_start_thread(&h->thread, wp_thread, h);
    if (err) goto fail;
    h->has_thread = 1;
    *failed_op = 0;
    *out = h;
    return 0;
fail:
    kvmig_wp_free(h);
    return -err;
}

/* The instant: protect the whole range (its populated pages: a page unpopulated then is zero at
   the instant, and a write to it does not fault); `read_bitmap` ((npages + 63) / 64 words) says
   which pages the reader will take, NULL: any page, until `kvmig_wp_narrow` says which (found
   after the instant, e.g. the pages still protected). Once per handle. Returns 0 or -errno
   (nothing protected then). */
int kvmig_wp_protect(kvmig_wp *h, const uint64_t *read_bitmap) {
    pthread_mutex_lock(&h->lock);
    int r = h->uffd < 0 ? -EBADF : h->st.protected_pages || h->state[0] != WP_NONE ? -EALREADY : 0;
    if (!r) {
        if (read_bitmap) memcpy(h->read, read_bitmap, (h->npages + 63) / 64 * sizeof *h->read);
        else memset(h->read, 0xff, (h->npages + 63) / 64 * sizeof *h->read);
        memset(h->state, WP_PROTECTED, h->npages);
        h->st.protected_pages = h->npages;
        r = wp_set(h, 0, h->length, UFFDIO_WRITEPROTECT_MODE_WP);
        if (r) {
            memset(h->state, WP_NONE, h->npages);
            h->st.protected_pages = 0;
        }
    }
    pthread_mutex_unlock(&h->lock);
    return r;
}

/* After the instant: of the pages [first, first + count) not kept aside, read only those set in
   `words` (bit i: page first + i; `first` a multiple of 64): the pages still protected (the others
   were unpopulated at the instant, and what a write put there since is not of it). A page kept
   aside is read from there whatever this says. */
int kvmig_wp_narrow(kvmig_wp *h, uint64_t first, uint64_t count, const uint64_t *words) {
    if (first % 64 || first > h->npages || count > h->npages - first) return -EINVAL;
    pthread_mutex_lock(&h->lock);
    int r = h->uffd < 0 ? -EBADF : 0;
    if (!r) {
        memcpy(h->read + first / 64, words, count / 64 * sizeof *words);
        if (count % 64) { /* the last word: only its first count % 64 bits are this range's */
            uint64_t mask = (1ULL << (count % 64)) - 1, *w = &h->read[(first + count) / 64];
            *w = (*w & ~mask) | (words[count / 64] & mask);
        }
    }
    pthread_mutex_unlock(&h->lock);
    return r;
}

/* Keep aside every page of [first, first + count) still protected and release it, a block at a
   time, in address order, while at most `budget` bytes are held aside: what the guest will
   write is then released before it gets there, and so is what it writes in ways that do not
   wait for the fault thread (seen on nested PVM: a write by the guest's emulated ring 0 to a
   protected page spins in KVM until the page is released). Returns the pages kept, or -errno. */
long kvmig_wp_sweep(kvmig_wp *h, uint64_t first, uint64_t count, uint64_t budget) {
    if (first > h->npages || count > h->npages - first) return -EINVAL;
    long kept = 0;
    int r = 0;
    uint64_t p = first;
    while (p < first + count && !r) { /* kept a block at a time (the fault thread waits no longer) */
        uint64_t stop = (p / WP_BLOCK + 1) * WP_BLOCK < first + count ? (p / WP_BLOCK + 1) * WP_BLOCK : first + count;
        pthread_mutex_lock(&h->lock);
        r = h->uffd < 0 ? -EBADF : h->aside_now >= budget ? -ENOBUFS : 0;
        for (uint64_t q = p; q < stop && !r; q++) {
            if (h->state[q] == WP_PROTECTED && wp_reads(h, q)) kept++;
            r = wp_keep(h, q);
        }
        pthread_mutex_unlock(&h->lock);
        if (!r) p = stop;
    }
    /* released in one call: each release is an invalidation of KVM's mappings, whose cost on
       nested PVM the guest pays again (it slowed a guest taking interrupts to a standstill when
       released a block at a time) */
    if (p > first) {
        pthread_mutex_lock(&h->lock);
        int w = h->uffd < 0 ? -EBADF : wp_release(h, first, p);
        pthread_mutex_unlock(&h->lock);
        if (w) return w;
    }
    return r && r != -ENOBUFS ? r : kept; /* out of budget: the rest is released as it is written or taken */
}

/* Copy [off, off+len) as it was at the instant into dst (pages not to be read: zeros) and
   release it, a block at a time once the whole block is copied (the lock held for WP_CHUNK
   pages at a time). Each page once: -EALREADY for a page to be read that was taken before. */
int kvmig_wp_take(kvmig_wp *h, uint64_t off, uint64_t len, void *dst) {
    if (off % UF_PAGE || len % UF_PAGE || off > h->length || len > h->length - off) return -EINVAL;
    uint8_t *out = dst;
    uint64_t first = off / UF_PAGE, end = (off + len) / UF_PAGE;
    int r = 0, released = 0; /* a page of the current block was protected until now */
    for (uint64_t c = first; c < end && !r; c += WP_CHUNK) {
        uint64_t stop = c + WP_CHUNK < end ? c + WP_CHUNK : end;
        pthread_mutex_lock(&h->lock);
        r = h->uffd < 0 ? -EBADF : 0;
        for (uint64_t p = c; p < stop && !r; p++) {
            uint8_t *to = out + (p - first) * UF_PAGE;
            switch (h->state[p]) {
            case WP_PROTECTED: /* unchanged since the instant: the guest's own page, or zero */
                if (wp_reads(h, p)) memcpy(to, (const void *)(uintptr_t)(h->base + p * UF_PAGE), UF_PAGE);
                else memset(to, 0, UF_PAGE);
                h->st.protected_pages--;
                released = 1;
                break;
            case WP_SAVED:
                memcpy(to, wp_aside_page(h, p), UF_PAGE);
                wp_taken_aside(h, p);
                break;
            case WP_RELEASED:
                memset(to, 0, UF_PAGE);
                break;
            default:
                r = -EALREADY;
                continue;
            }
            h->state[p] = WP_TAKEN;
            h->st.taken++;
        }
        /* the end of a block, or of the run: what was copied of it is released (the rest of a
           block the run covers only in part stays protected) */
        int block_done = stop % WP_BLOCK == 0 || stop == end;
        uint64_t from = c / WP_BLOCK * WP_BLOCK > first ? c / WP_BLOCK * WP_BLOCK : first;
        if (!r && block_done && released && !h->open_block[from / WP_BLOCK]) r = wp_release(h, from, stop);
        if (block_done) released = 0;
        pthread_mutex_unlock(&h->lock);
    }
    return r;
}

/* Release every page still protected, stop the fault thread, unregister, close the descriptor.
   Returns 0 or the first -errno (the descriptor is closed either way). */
int kvmig_wp_close(kvmig_wp *h) {
    int err = 0;
    pthread_mutex_lock(&h->lock);
    if (h->registered && h->st.protected_pages) {
        err = wp_set(h, 0, h->length, 0); /* wakes every writer waiting */
        for (uint64_t p = 0; p < h->npages; p++)
            if (h->state[p] == WP_PROTECTED) h->state[p] = WP_RELEASED;
        h->st.protected_pages = 0;
    }
    pthread_mutex_unlock(&h->lock);
    if (h->has_thread) {
        uf_stop_thread(h->thread, h->stop_fd);
        h->has_thread = 0;
    }
    pthread_mutex_lock(&h->lock);
    if (h->registered) {
        struct uffdio_range r = {.start = h->base, .len = h->length};
        if (ioctl(h->uffd, UFFDIO_UNREGISTER, &r) < 0 && !err) err = -errno;
        h->registered = 0;
    }
    if (h->uffd >= 0) {
        close(h->uffd);
        h->uffd = -1;
    }
    pthread_mutex_unlock(&h->lock);
    return err;
}

void kvmig_wp_free(kvmig_wp *h) {
    if (!h) return;
    kvmig_wp_close(h);
    if (h->stop_fd >= 0) close(h->stop_fd);
    /* the pool's own blocks are unmapped with it; those allocated beyond it one by one (every
       buffer is either a block's or spare: at most nblocks of them, the size of `spare`) */
    for (uint64_t b = 0; h->aside && b < h->nblocks; b++)
        if (h->aside[b]) h->spare[h->nspare++] = h->aside[b];
    for (uint64_t i = 0; h->spare && i < h->nspare; i++)
        if (h->spare[i] < h->pool || h->spare[i] >= h->pool + h->pool_bytes) munmap(h->spare[i], WP_BLOCK_BYTES);
    if (h->pool) munmap(h->pool, h->pool_bytes);
    free(h->aside);
    free(h->kept);
    free(h->open_block);
    free(h->spare);
    free(h->state);
    free(h->read);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

/* Bit p of `bitmap` ((npages + 63) / 64 words) set: page p is kept aside (written after the
   instant, not taken yet). */
void kvmig_wp_kept(kvmig_wp *h, uint64_t *bitmap) {
    memset(bitmap, 0, (h->npages + 63) / 64 * 8);
    pthread_mutex_lock(&h->lock);
    for (uint64_t b = 0; b < h->nblocks; b++) {
        if (!h->kept[b]) continue; /* most blocks: none */
        for (uint64_t p = b * WP_BLOCK; p < (b + 1) * WP_BLOCK && p < h->npages; p++)
            if (h->state[p] == WP_SAVED) bitmap[p / 64] |= 1ULL << (p % 64);
    }
    pthread_mutex_unlock(&h->lock);
}

void kvmig_wp_get_stats(kvmig_wp *h, kvmig_wp_stats *out) {
    pthread_mutex_lock(&h->lock);
    *out = h->st;
    pthread_mutex_unlock(&h->lock);
}
