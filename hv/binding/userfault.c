/* userfaultfd over a range of guest RAM, with its fault path in C (no interpreter lock).

   Any thread of the VMM that touches a missing page of a registered range blocks in the kernel
   until the page is placed: a vCPU inside KVM_RUN (KVM's get_user_pages is a kernel-mode fault,
   which is why the descriptor is opened without UFFD_USER_MODE_ONLY), a device thread reading a
   ring, a Python thread that holds the GIL. So the thread that reads the fault events is a C
   thread, and it never needs Python to make progress:

   - a fault on a page that is *staged* (its contents, or the fact that it is zero, are already
     known: `kvmig_uffd_stage`, `kvmig_uffd_stage_zero`) is resolved here at once, UFFDIO_COPY
     from the staging buffer or UFFDIO_ZEROPAGE;
   - a fault on a page nobody has supplied yet is queued once (a second faulter on the same page
     joins the first), and the notify eventfd is signalled; a consumer takes the queue
     (`kvmig_uffd_take`) and supplies the page (`kvmig_uffd_copy`, `kvmig_uffd_zero`, or by
     staging it), from Python or from C (these entry points take no interpreter lock; another C
     module can call them through their addresses). Placing a page wakes every thread waiting on
     it: UFFDIO_COPY and UFFDIO_ZEROPAGE wake the range they filled.

   A page is placed at most once. A copy to a page already in place (placed by a racing copy,
   or populated before the range was registered: the kernel says EEXIST) leaves it as it is and
   goes on with the rest of the run; the guest may have written to it since.

   Every per-page table and counter is guarded by `lock`, and the placing ioctls run under it, so
   the fault thread and the suppliers agree on what is in place. Faults are timed from the read
   of their event to the end of the ioctl that placed their page (a log-linear histogram).

   Over 450 lines, as one file on purpose: the fault thread, the placing entry points and the
   counters share the per-page table under one lock, and "a page is placed at most once" is an
   argument over all of them together; the Python side (hv/kvm/userfault.py) is apart. */

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "userfault.h"

#define UF_PAGE 4096ULL
#define UF_MSGS 64
#define UF_EAGAIN_TRIES 10000
#define UF_THREADS 64 /* threads whose blocked time is kept: vCPUs, device workers */

enum { UF_ABSENT = 0, UF_STAGED = 1, UF_STAGED_ZERO = 2, UF_PLACED = 3 };

struct kvmig_uffd {
    pthread_mutex_t lock;
    int uffd, notify_fd, stop_fd;
    uint64_t base, length, npages, features;
    uint8_t *state;            /* per page: UF_* */
    uint64_t *since;           /* per page: when its first fault was read (ns), 0: not pending */
    uint8_t *staging;          /* the staging buffer, laid out as the range */
    int own_staging;
    kvmig_uffd_fault *queue;   /* ring of faulted pages, at most one entry per pending page */
    uint64_t q_head, q_len;
    kvmig_uffd_stats st;
    /* per faulting thread (UFFD_FEATURE_THREAD_ID): a thread waits for one page at a time */
    kvmig_uffd_blocked threads[UF_THREADS];
    uint64_t thread_page[UF_THREADS], thread_since[UF_THREADS];
    uint32_t nthreads;
    pthread_t thread;
    int has_thread, registered;
};

static uint64_t uf_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* Log-linear buckets: values below 16 ns exactly, then 16 buckets per power of two (at most
   1/16 = 6% wide). hv/kvm/userfault.py computes the same bounds. */
uint32_t kvmig_uffd_lat_bucket(uint64_t ns) {
    if (ns < 16) return (uint32_t)ns;
    uint32_t e = 63 - (uint32_t)__builtin_clzll(ns);
    return (e - 3) * 16 + (uint32_t)((ns >> (e - 4)) & 15);
}

/* Threads waiting on page p (all pages: p == UINT64_MAX) stop waiting now. */
static void uf_unblock(kvmig_uffd *h, uint64_t p, uint64_t now) {
    for (uint32_t i = 0; i < h->nthreads; i++) {
        kvmig_uffd_blocked *t = &h->threads[i];
        if (!t->waiting || (p != UINT64_MAX && h->thread_page[i] != p)) continue;
        t->waiting = 0;
        t->blocked_ns += now > h->thread_since[i] ? now - h->thread_since[i] : 0;
    }
}

static void uf_block(kvmig_uffd *h, uint32_t tid, uint64_t p, uint64_t now) {
    if (!tid) return;
    uint32_t i = 0;
    while (i < h->nthreads && h->threads[i].tid != tid) i++;
    if (i == h->nthreads) {
        if (h->nthreads == UF_THREADS) { h->st.threads_untracked++; return; }
        h->nthreads++;
        memset(&h->threads[i], 0, sizeof h->threads[i]);
        h->threads[i].tid = tid;
    }
    h->threads[i].waiting = 1;
    h->threads[i].faults++;
    h->thread_page[i] = p;
    h->thread_since[i] = now;
}

/* Page `p` is in place now: a pending fault on it is resolved. */
static void uf_placed(kvmig_uffd *h, uint64_t p, uint64_t now) {
    h->state[p] = UF_PLACED;
    if (h->since[p]) {
        uf_unblock(h, p, now);
        uint64_t lat = now > h->since[p] ? now - h->since[p] : 0;
        h->st.lat_hist[kvmig_uffd_lat_bucket(lat)]++;
        h->st.lat_count++;
        h->st.lat_sum_ns += lat;
        if (lat > h->st.lat_max_ns) h->st.lat_max_ns = lat;
        h->st.resolved++;
        h->st.pending--;
        h->since[p] = 0;
    }
}

static void uf_wake(kvmig_uffd *h, uint64_t off, uint64_t len) {
    struct uffdio_range r = {.start = h->base + off, .len = len};
    ioctl(h->uffd, UFFDIO_WAKE, &r);
}

/* Place [off, off+len), pages all not placed, from src (NULL: zero pages). Under the lock.
   Returns 0 or -errno. */
static int uf_place_run(kvmig_uffd *h, uint64_t off, const uint8_t *src, uint64_t len) {
    uint64_t done = 0;
    int tries = 0;
    while (done < len) {
        int64_t got;
        int r;
        if (src) {
            struct uffdio_copy c = {.dst = h->base + off + done, .src = (uint64_t)(uintptr_t)(src + done),
                                    .len = len - done, .mode = 0, .copy = 0};
            r = ioctl(h->uffd, UFFDIO_COPY, &c);
            got = c.copy;
        } else {
            struct uffdio_zeropage z = {.range = {.start = h->base + off + done, .len = len - done},
                                        .mode = 0, .zeropage = 0};
            r = ioctl(h->uffd, UFFDIO_ZEROPAGE, &z);
            got = z.zeropage;
        }
        int e = r < 0 ? errno : 0;
        if (r == 0) got = (int64_t)(len - done);
        if (got > 0) { /* these pages are in place, and the kernel woke their waiters */
            uint64_t now = uf_now();
            for (uint64_t p = (off + done) / UF_PAGE; p < (off + done + (uint64_t)got) / UF_PAGE; p++)
                uf_placed(h, p, now);
            if (src) h->st.pages_copied += (uint64_t)got / UF_PAGE;
            else h->st.pages_zeroed += (uint64_t)got / UF_PAGE;
            done += (uint64_t)got;
            tries = 0;
        }
        if (r == 0) break;
        if (e == EEXIST) { /* this page was in place already: keep it, wake any waiter on it */
            h->st.eexist++;
            uf_placed(h, (off + done) / UF_PAGE, uf_now());
            uf_wake(h, off + done, UF_PAGE);
            done += UF_PAGE;
        } else if (e == EAGAIN) { /* a partial run (got > 0), or the mm is changing: go on */
            if (got <= 0) {
                h->st.eagain++;
                if (++tries > UF_EAGAIN_TRIES) return -EAGAIN;
                sched_yield();
            }
        } else {
            return -e;
        }
    }
    return 0;
}

/* Place the pages of [off, off+len) not in place yet, from src (NULL: zeros). Under the lock. */
static int uf_place(kvmig_uffd *h, uint64_t off, const uint8_t *src, uint64_t len) {
    uint64_t first = off / UF_PAGE, end = (off + len) / UF_PAGE;
    for (uint64_t p = first; p < end;) {
        if (h->state[p] == UF_PLACED) { p++; continue; }
        uint64_t q = p;
        while (q < end && h->state[q] != UF_PLACED) q++;
        int r = uf_place_run(h, p * UF_PAGE, src ? src + (p - first) * UF_PAGE : NULL, (q - p) * UF_PAGE);
        if (r) return r;
        p = q;
    }
    return 0;
}

static int uf_check(const kvmig_uffd *h, uint64_t off, uint64_t len) {
    if (off % UF_PAGE || len % UF_PAGE || off > h->length || len > h->length - off) return -EINVAL;
    return h->uffd < 0 ? -EBADF : 0;
}

/* Under the lock: one fault event. Returns 1 when it queued a page. */
static int uf_fault(kvmig_uffd *h, const struct uffd_msg *m, uint64_t now) {
    uint64_t addr = m->arg.pagefault.address & ~(UF_PAGE - 1);
    h->st.faults++;
    if (addr < h->base || addr >= h->base + h->length) return 0; /* not ours: cannot happen */
    uint64_t p = (addr - h->base) / UF_PAGE;
    uint32_t tid = (h->features & UFFD_FEATURE_THREAD_ID) ? m->arg.pagefault.feat.ptid : 0;
    if (h->state[p] != UF_PLACED) uf_block(h, tid, p, now);
    switch (h->state[p]) {
    case UF_PLACED: /* placed after the fault was raised: make sure its thread was woken */
        h->st.late++;
        uf_wake(h, p * UF_PAGE, UF_PAGE);
        return 0;
    case UF_STAGED:
    case UF_STAGED_ZERO: {
        const uint8_t *src = h->state[p] == UF_STAGED ? h->staging + p * UF_PAGE : NULL;
        h->since[p] = now;
        h->st.pending++;
        h->st.fast++;
        int r = uf_place_run(h, p * UF_PAGE, src, UF_PAGE);
        if (r) { /* leave it to the queue: a supplier sees the fault and the error is counted */
            h->st.fast--;
            h->st.fast_failed++;
            h->st.last_errno = -r;
            break;
        }
        return 0;
    }
    default:
        if (h->since[p]) { h->st.joined++; return 0; }
        h->since[p] = now;
        h->st.pending++;
        break;
    }
    if (h->q_len == h->npages) return 0; /* every page queued once at most: cannot happen */
    kvmig_uffd_fault *f = &h->queue[(h->q_head + h->q_len) % h->npages];
    f->offset = p * UF_PAGE;
    f->flags = (uint32_t)m->arg.pagefault.flags;
    f->tid = tid;
    f->t_ns = now;
    h->q_len++;
    h->st.queued++;
    return 1;
}

static void *uf_thread(void *arg) {
    kvmig_uffd *h = arg;
    struct pollfd pfd[2] = {{.fd = h->uffd, .events = POLLIN}, {.fd = h->stop_fd, .events = POLLIN}};
    struct uffd_msg msgs[UF_MSGS];
    for (;;) {
        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR) continue;
            pthread_mutex_lock(&h->lock);
            h->st.thread_errno = errno;
            pthread_mutex_unlock(&h->lock);
            return NULL;
        }
        if (pfd[1].revents) return NULL;
        ssize_t n = read(h->uffd, msgs, sizeof msgs);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            pthread_mutex_lock(&h->lock);
            h->st.thread_errno = errno;
            pthread_mutex_unlock(&h->lock);
            return NULL;
        }
        uint64_t now = uf_now();
        int queued = 0;
        pthread_mutex_lock(&h->lock);
        for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++)
            if (msgs[i].event == UFFD_EVENT_PAGEFAULT) queued |= uf_fault(h, &msgs[i], now);
        pthread_mutex_unlock(&h->lock);
        if (queued) {
            uint64_t one = 1;
            ssize_t w = write(h->notify_fd, &one, sizeof one);
            (void)w;
        }
    }
}

static int uf_open_fd(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd >= 0 || errno != EPERM) return fd;
    /* unprivileged_userfaultfd=0 without CAP_SYS_PTRACE: the device node (5.11) may be open */
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0) { errno = EPERM; return -1; }
    fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    int e = errno;
    close(dev);
    errno = e;
    return fd;
}

/* A fault thread (this layer's, or write_protect.c's): it takes no signal, since the VMM's
   kicks are for vCPUs. Returns 0 or an errno. */
static int uf_start_thread(pthread_t *thread, void *(*run)(void *), void *arg) {
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int err = pthread_create(thread, NULL, run, arg);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return err;
}

/* Tell a fault thread polling `stop_fd` to end, and wait for it. */
static void uf_stop_thread(pthread_t thread, int stop_fd) {
    uint64_t one = 1;
    ssize_t w = write(stop_fd, &one, sizeof one);
    (void)w;
    pthread_join(thread, NULL);
}

/* Features this layer uses where the kernel has them. */
#define UF_WANTED (UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_MISSING_HUGETLBFS)

int kvmig_uffd_open(kvmig_uffd **out, void *base, uint64_t length, void *staging, int *failed_op) {
    *out = NULL;
    *failed_op = KVMIG_UFFD_OP_OPEN;
    if ((uintptr_t)base % UF_PAGE || length % UF_PAGE || length == 0) return -EINVAL;
    kvmig_uffd *h = calloc(1, sizeof *h);
    if (!h) return -ENOMEM;
    h->uffd = h->notify_fd = h->stop_fd = -1;
    h->base = (uint64_t)(uintptr_t)base;
    h->length = length;
    h->npages = length / UF_PAGE;
    pthread_mutex_init(&h->lock, NULL);
    int err = 0;

    /* UFFDIO_API once per descriptor: a probe descriptor learns what the kernel offers, the real
       one asks for what of it we use (asking for an unknown feature fails the handshake). */
    int probe = uf_open_fd();
    if (probe < 0) { err = errno; goto fail; }
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    *failed_op = KVMIG_UFFD_OP_API;
    if (ioctl(probe, UFFDIO_API, &api) < 0) { err = errno; close(probe); goto fail; }
    close(probe);
    *failed_op = KVMIG_UFFD_OP_OPEN;
    h->uffd = uf_open_fd();
    if (h->uffd < 0) { err = errno; goto fail; }
    *failed_op = KVMIG_UFFD_OP_API;
    struct uffdio_api want = {.api = UFFD_API, .features = api.features & UF_WANTED};
    if (ioctl(h->uffd, UFFDIO_API, &want) < 0) { err = errno; goto fail; }
    h->features = want.features & UF_WANTED; /* the kernel reports back all it has, not what it enabled */
    if (!(want.ioctls & (1ULL << _UFFDIO_REGISTER))) { err = ENOSYS; goto fail; }

    *failed_op = KVMIG_UFFD_OP_ALLOC;
    h->state = calloc(h->npages, 1);
    h->since = calloc(h->npages, sizeof *h->since);
    h->queue = calloc(h->npages, sizeof *h->queue);
    if (!h->state || !h->since || !h->queue) { err = ENOMEM; goto fail; }
    if (staging) {
        h->staging = staging;
    } else { /* costs only what is staged */
        void *s = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (s == MAP_FAILED) { err = errno; goto fail; }
        h->staging = s;
        h->own_staging = 1;
    }
    h->notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    h->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (h->notify_fd < 0 || h->stop_fd < 0) { err = errno; goto fail; }

    *failed_op = KVMIG_UFFD_OP_REGISTER;
    struct uffdio_register reg = {.range = {.start = h->base, .len = length},
                                  .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(h->uffd, UFFDIO_REGISTER, &reg) < 0) { err = errno; goto fail; }
    h->registered = 1;
    if (!(reg.ioctls & (1ULL << _UFFDIO_COPY))) { err = ENOTSUP; goto fail; }
    h->st.zeropage = (reg.ioctls & (1ULL << _UFFDIO_ZEROPAGE)) != 0;

    *failed_op = KVMIG_UFFD_OP_THREAD;
    err = uf_start_thread(&h->thread, uf_thread, h);
    if (err) goto fail;
    h->has_thread = 1;
    *failed_op = 0;
    *out = h;
    return 0;
fail:
    kvmig_uffd_free(h);
    return -err;
}

/* Stop the fault thread, unregister, close the descriptor. Threads still waiting for a page are
   woken by the kernel (UFFDIO_UNREGISTER wakes the range it unregisters, and closing the
   descriptor wakes the rest); their fault is then retried on an ordinary mapping, so a page never
   supplied reads as zero. Returns 0 or -errno of UFFDIO_UNREGISTER (the descriptor is closed
   either way). */
int kvmig_uffd_close(kvmig_uffd *h) {
    int err = 0;
    if (h->has_thread) {
        uf_stop_thread(h->thread, h->stop_fd);
        h->has_thread = 0;
    }
    pthread_mutex_lock(&h->lock);
    if (h->registered) {
        struct uffdio_range r = {.start = h->base, .len = h->length};
        if (ioctl(h->uffd, UFFDIO_UNREGISTER, &r) < 0) err = -errno;
        h->registered = 0;
    }
    if (h->uffd >= 0) {
        close(h->uffd);
        h->uffd = -1;
    }
    if (!h->st.closed) uf_unblock(h, UINT64_MAX, uf_now()); /* released by the teardown */
    h->st.closed = 1;
    pthread_mutex_unlock(&h->lock);
    uint64_t one = 1; /* a consumer waiting in kvmig_uffd_wait sees the end */
    ssize_t w = write(h->notify_fd, &one, sizeof one);
    (void)w;
    return err;
}

void kvmig_uffd_free(kvmig_uffd *h) {
    if (!h) return;
    kvmig_uffd_close(h);
    if (h->notify_fd >= 0) close(h->notify_fd);
    if (h->stop_fd >= 0) close(h->stop_fd);
    if (h->own_staging) munmap(h->staging, h->length);
    free(h->state);
    free(h->since);
    free(h->queue);
    pthread_mutex_destroy(&h->lock);
    free(h);
}

int kvmig_uffd_copy(kvmig_uffd *h, uint64_t off, const void *src, uint64_t len) {
    pthread_mutex_lock(&h->lock);
    int r = uf_check(h, off, len);
    if (!r) r = uf_place(h, off, src, len);
    pthread_mutex_unlock(&h->lock);
    return r;
}

int kvmig_uffd_zero(kvmig_uffd *h, uint64_t off, uint64_t len) {
    pthread_mutex_lock(&h->lock);
    int r = uf_check(h, off, len);
    if (!r) r = uf_place(h, off, NULL, len);
    pthread_mutex_unlock(&h->lock);
    return r;
}

/* Make [off, off+len) staged: `src` is copied into the staging buffer (NULL: the buffer holds
   the data already; zero: the pages are zero). Pages in place are left alone; pages with a
   fault pending are placed now. */
static int uf_stage(kvmig_uffd *h, uint64_t off, const uint8_t *src, uint64_t len, int zero) {
    pthread_mutex_lock(&h->lock);
    int r = uf_check(h, off, len);
    for (uint64_t p = off / UF_PAGE; !r && p < (off + len) / UF_PAGE; p++) {
        if (h->state[p] == UF_PLACED) continue;
        if (src) memcpy(h->staging + p * UF_PAGE, src + (p * UF_PAGE - off), UF_PAGE);
        h->state[p] = zero ? UF_STAGED_ZERO : UF_STAGED;
        if (h->since[p]) r = uf_place_run(h, p * UF_PAGE, zero ? NULL : h->staging + p * UF_PAGE, UF_PAGE);
    }
    pthread_mutex_unlock(&h->lock);
    return r;
}

int kvmig_uffd_stage(kvmig_uffd *h, uint64_t off, const void *src, uint64_t len) {
    return uf_stage(h, off, src, len, 0);
}

int kvmig_uffd_stage_zero(kvmig_uffd *h, uint64_t off, uint64_t len) {
    return uf_stage(h, off, NULL, len, 1);
}

/* Place the staged pages of [off, off+len) not in place yet (from staging, or zero pages), the
   lock taken for at most UF_PLACE_CHUNK pages at a time so the fault thread is never held off
   for long. Returns the pages placed, or -errno. */
#define UF_PLACE_CHUNK 64
long kvmig_uffd_place_staged(kvmig_uffd *h, uint64_t off, uint64_t len) {
    long placed = 0;
    pthread_mutex_lock(&h->lock);
    int r = uf_check(h, off, len);
    pthread_mutex_unlock(&h->lock);
    if (r) return r;
    uint64_t first = off / UF_PAGE, end = (off + len) / UF_PAGE;
    for (uint64_t c = first; c < end; c += UF_PLACE_CHUNK) {
        uint64_t stop = c + UF_PLACE_CHUNK < end ? c + UF_PLACE_CHUNK : end;
        pthread_mutex_lock(&h->lock);
        for (uint64_t p = c; p < stop && !r;) {
            uint8_t kind = h->state[p];
            if (kind != UF_STAGED && kind != UF_STAGED_ZERO) { p++; continue; }
            uint64_t q = p;
            while (q < stop && h->state[q] == kind) q++;
            r = uf_place_run(h, p * UF_PAGE, kind == UF_STAGED ? h->staging + p * UF_PAGE : NULL, (q - p) * UF_PAGE);
            placed += (long)(q - p);
            p = q;
        }
        pthread_mutex_unlock(&h->lock);
        if (r) return r;
    }
    return placed;
}

/* Take up to `max` queued faults whose page is still not in place (oldest first). */
size_t kvmig_uffd_take(kvmig_uffd *h, kvmig_uffd_fault *out, size_t max) {
    uint64_t count;
    ssize_t r = read(h->notify_fd, &count, sizeof count); /* reset before draining: see wait */
    (void)r;
    size_t n = 0;
    pthread_mutex_lock(&h->lock);
    while (n < max && h->q_len) {
        kvmig_uffd_fault f = h->queue[h->q_head];
        h->q_head = (h->q_head + 1) % h->npages;
        h->q_len--;
        if (h->state[f.offset / UF_PAGE] != UF_PLACED) out[n++] = f;
    }
    uint64_t left = h->q_len;
    pthread_mutex_unlock(&h->lock);
    if (left) { /* the caller stopped early: keep the fd readable for the rest */
        uint64_t one = 1;
        ssize_t w = write(h->notify_fd, &one, sizeof one);
        (void)w;
    }
    return n;
}

/* Wait (without the interpreter lock) until faults may be queued, or the range is closed.
   Returns 1 (take them), 0 (timeout) or -errno. */
int kvmig_uffd_wait(kvmig_uffd *h, int timeout_ms) {
    struct pollfd p = {.fd = h->notify_fd, .events = POLLIN};
    int r = poll(&p, 1, timeout_ms);
    return r < 0 ? -errno : r > 0;
}

int kvmig_uffd_notify_fd(kvmig_uffd *h) { return h->notify_fd; }
uint64_t kvmig_uffd_features(kvmig_uffd *h) { return h->features; }

void kvmig_uffd_get_stats(kvmig_uffd *h, kvmig_uffd_stats *out) {
    pthread_mutex_lock(&h->lock);
    *out = h->st;
    out->queue_len = h->q_len;
    pthread_mutex_unlock(&h->lock);
}

/* Up to `max` threads that faulted on the range (first fault first); returns how many. */
size_t kvmig_uffd_blocktime(kvmig_uffd *h, kvmig_uffd_blocked *out, size_t max) {
    pthread_mutex_lock(&h->lock);
    uint64_t now = uf_now();
    size_t n = h->nthreads < max ? h->nthreads : max;
    for (size_t i = 0; i < n; i++) {
        out[i] = h->threads[i];
        if (out[i].waiting) out[i].blocked_ns += now > h->thread_since[i] ? now - h->thread_since[i] : 0;
    }
    pthread_mutex_unlock(&h->lock);
    return n;
}

/* Bit p of `bitmap` ((npages + 63) / 64 words) set: page p is not in place yet. */
void kvmig_uffd_missing(kvmig_uffd *h, uint64_t *bitmap) {
    memset(bitmap, 0, (h->npages + 63) / 64 * 8);
    pthread_mutex_lock(&h->lock);
    for (uint64_t p = 0; p < h->npages; p++)
        if (h->state[p] != UF_PLACED) bitmap[p / 64] |= 1ULL << (p % 64);
    pthread_mutex_unlock(&h->lock);
}
