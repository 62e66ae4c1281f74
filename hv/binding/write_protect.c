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
   one translation unit after userfault.c, whose descriptor opening it shares (uf_open_fd). */

#include "write_protect.h"

#define WP_CHUNK 64   /* pages taken under the lock at a time: the fault thread waits no longer */
#define WP_EAGAIN_TRIES 10000

enum { WP_NONE = 0, WP_PROTECTED = 1, WP_SAVED = 2, WP_DONE = 3 };

struct kvmig_wp {
    pthread_mutex_t lock;
    int uffd, stop_fd;
    uint64_t base, length, npages;
    uint8_t *state;           /* per page: WP_* */
    uint64_t *read;           /* bit per page: its contents belong to the snapshot */
    uint8_t *aside;           /* copies of pages written before they were taken, laid out as the range */
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

/* Under the lock: page p was written or taken; its instant contents are where they belong. */
static void wp_keep(kvmig_wp *h, uint64_t p) {
    if (h->state[p] != WP_PROTECTED) return;
    if (wp_reads(h, p)) {
        memcpy(h->aside + p * UF_PAGE, (const void *)(uintptr_t)(h->base + p * UF_PAGE), UF_PAGE);
        h->state[p] = WP_SAVED;
        h->st.saved++;
        h->aside_now += UF_PAGE;
        if (h->aside_now > h->st.saved_bytes_peak) h->st.saved_bytes_peak = h->aside_now;
    } else {
        h->state[p] = WP_DONE;
    }
    h->st.protected_pages--;
}

static void wp_fault(kvmig_wp *h, const struct uffd_msg *m, uint64_t read_ns) {
    uint64_t addr = m->arg.pagefault.address & ~(UF_PAGE - 1);
    h->st.faults++;
    if (addr < h->base || addr >= h->base + h->length) return; /* not ours: cannot happen */
    uint64_t p = (addr - h->base) / UF_PAGE;
    wp_keep(h, p);
    int r = wp_set(h, p * UF_PAGE, UF_PAGE, 0); /* also wakes a fault raised after its release */
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

int kvmig_wp_open(kvmig_wp **out, void *base, uint64_t length, int *failed_op) {
    *out = NULL;
    *failed_op = KVMIG_UFFD_OP_OPEN;
    if ((uintptr_t)base % UF_PAGE || length % UF_PAGE || length == 0) return -EINVAL;
    kvmig_wp *h = calloc(1, sizeof *h);
    if (!h) return -ENOMEM;
    h->uffd = h->stop_fd = -1;
    h->base = (uint64_t)(uintptr_t)base;
    h->length = length;
    h->npages = length / UF_PAGE;
    pthread_mutex_init(&h->lock, NULL);
    int err = 0;

    h->uffd = uf_open_fd();
    if (h->uffd < 0) { err = errno; goto fail; }
    *failed_op = KVMIG_UFFD_OP_API;
    struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_PAGEFAULT_FLAG_WP};
    if (ioctl(h->uffd, UFFDIO_API, &api) < 0) { err = errno == EINVAL ? ENOTSUP : errno; goto fail; }

    *failed_op = KVMIG_UFFD_OP_ALLOC;
    h->state = calloc(h->npages, 1);
    h->read = calloc((h->npages + 63) / 64, sizeof *h->read);
    if (!h->state || !h->read) { err = ENOMEM; goto fail; }
    void *a = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (a == MAP_FAILED) { err = errno; goto fail; }
    h->aside = a; /* costs what is held aside, page by page */
    h->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (h->stop_fd < 0) { err = errno; goto fail; }

    *failed_op = KVMIG_UFFD_OP_REGISTER;
    struct uffdio_register reg = {.range = {.start = h->base, .len = length}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(h->uffd, UFFDIO_REGISTER, &reg) < 0) { err = errno; goto fail; }
    h->registered = 1;
    if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT))) { err = ENOTSUP; goto fail; }

    *failed_op = KVMIG_UFFD_OP_THREAD;
    sigset_t all, old;
    sigfillset(&all); /* the fault thread takes no signal: the VMM's kicks are for vCPUs */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    err = pthread_create(&h->thread, NULL, wp_thread, h);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err) goto fail;
    h->has_thread = 1;
    *failed_op = 0;
    *out = h;
    return 0;
fail:
    kvmig_wp_free(h);
    return -err;
}

/* The instant: protect the whole range; `read_bitmap` ((npages + 63) / 64 words) says which
   pages the reader will take. Once per handle. Returns 0 or -errno (nothing protected then). */
int kvmig_wp_protect(kvmig_wp *h, const uint64_t *read_bitmap) {
    pthread_mutex_lock(&h->lock);
    int r = h->uffd < 0 ? -EBADF : h->st.protected_pages || h->state[0] != WP_NONE ? -EALREADY : 0;
    if (!r) {
        memcpy(h->read, read_bitmap, (h->npages + 63) / 64 * sizeof *h->read);
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

/* Copy [off, off+len) as it was at the instant into dst (pages not to be read: zeros) and
   release it. Each page once: -EALREADY for a page to be read that was taken before. */
int kvmig_wp_take(kvmig_wp *h, uint64_t off, uint64_t len, void *dst) {
    if (off % UF_PAGE || len % UF_PAGE || off > h->length || len > h->length - off) return -EINVAL;
    uint8_t *out = dst;
    uint64_t first = off / UF_PAGE, end = (off + len) / UF_PAGE;
    for (uint64_t c = first; c < end; c += WP_CHUNK) {
        uint64_t stop = c + WP_CHUNK < end ? c + WP_CHUNK : end, freed = 0;
        pthread_mutex_lock(&h->lock);
        int r = h->uffd < 0 ? -EBADF : 0;
        for (uint64_t p = c; p < stop && !r; p++) {
            uint8_t *to = out + (p - first) * UF_PAGE;
            if (!wp_reads(h, p)) {
                memset(to, 0, UF_PAGE);
                if (h->state[p] == WP_PROTECTED) { h->state[p] = WP_DONE; h->st.protected_pages--; }
                continue;
            }
            switch (h->state[p]) {
            case WP_PROTECTED: /* unchanged since the instant: the guest's own page */
                memcpy(to, (const void *)(uintptr_t)(h->base + p * UF_PAGE), UF_PAGE);
                h->st.protected_pages--;
                break;
            case WP_SAVED:
                memcpy(to, h->aside + p * UF_PAGE, UF_PAGE);
                h->aside_now -= UF_PAGE;
                freed++;
                break;
            default:
                r = -EALREADY;
                continue;
            }
            h->state[p] = WP_DONE;
            h->st.taken++;
        }
        if (!r) r = wp_set(h, c * UF_PAGE, (stop - c) * UF_PAGE, 0);
        pthread_mutex_unlock(&h->lock);
        if (r) return r;
        if (freed) /* nothing reads these copies again: give the memory back */
            madvise(h->aside + c * UF_PAGE, (stop - c) * UF_PAGE, MADV_DONTNEED);
    }
    return 0;
}

/* Release every page still protected, stop the fault thread, unregister, close the descriptor.
   Returns 0 or the first -errno (the descriptor is closed either way). */
int kvmig_wp_close(kvmig_wp *h) {
    int err = 0;
    pthread_mutex_lock(&h->lock);
    if (h->registered && h->st.protected_pages) {
        err = wp_set(h, 0, h->length, 0); /* wakes every writer waiting */
        for (uint64_t p = 0; p < h->npages; p++)
            if (h->state[p] == WP_PROTECTED) h->state[p] = WP_DONE;
        h->st.protected_pages = 0;
    }
    pthread_mutex_unlock(&h->lock);
    if (h->has_thread) {
        uint64_t one = 1;
        ssize_t w = write(h->stop_fd, &one, sizeof one);
        (void)w;
        pthread_join(h->thread, NULL);
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
    if (h->aside) munmap(h->aside, h->length);
    free(h->state);
    free(h->read);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

void kvmig_wp_get_stats(kvmig_wp *h, kvmig_wp_stats *out) {
    pthread_mutex_lock(&h->lock);
    *out = h->st;
    pthread_mutex_unlock(&h->lock);
}
