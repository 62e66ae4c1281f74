/* userfaultfd over a range of guest RAM, its fault path in C (userfault.c): what the cffi build
   declares to Python (hv/kvm/userfault.py, which also computes the latency buckets the same way).

   Between the `cffi:` markers only what cffi's cdef parses (see uart.h). */
#ifndef KVMIG_USERFAULT_H
#define KVMIG_USERFAULT_H

#include <stddef.h>
#include <stdint.h>

/* cffi: begin */
/* kvmig_uffd_open's `failed_op`: the step that failed */
#define KVMIG_UFFD_OP_OPEN 1
#define KVMIG_UFFD_OP_API 2
#define KVMIG_UFFD_OP_ALLOC 3
#define KVMIG_UFFD_OP_REGISTER 4
#define KVMIG_UFFD_OP_THREAD 5

typedef struct kvmig_uffd kvmig_uffd;
typedef struct {
    uint64_t offset;                 /* of the faulted page in the range */
    uint32_t tid;                    /* the first faulting thread (UFFD_FEATURE_THREAD_ID), or 0 */
    uint32_t flags;                  /* UFFD_PAGEFAULT_FLAG_* (WRITE) */
    uint64_t t_ns;                   /* CLOCK_MONOTONIC when its event was read */
} kvmig_uffd_fault;
typedef struct {
    uint64_t faults;                 /* fault events read */
    uint64_t fast;                   /* resolved by the fault thread from staged pages */
    uint64_t fast_failed;            /* staged, but placing it failed (queued instead) */
    uint64_t queued;                 /* pages handed to the queue */
    uint64_t joined;                 /* faults on a page already queued by another thread */
    uint64_t late;                   /* faults on a page placed meanwhile (only woken) */
    uint64_t resolved;               /* faulted pages placed since */
    uint64_t pages_copied, pages_zeroed;
    uint64_t eexist, eagain;
    uint64_t pending;                /* faulted pages not placed yet */
    uint64_t queue_len;
    uint64_t lat_count, lat_sum_ns, lat_max_ns;
    uint64_t lat_hist[1024];         /* kvmig_uffd_lat_bucket(ns) -> count */
    uint64_t threads_untracked;      /* faults of threads past the blocked-time table */
    int32_t last_errno;              /* of the last failed placement by the fault thread */
    int32_t thread_errno;            /* the fault thread stopped on this error */
    int32_t zeropage;                /* the range supports UFFDIO_ZEROPAGE */
    int32_t closed;
} kvmig_uffd_stats;
typedef struct {
    uint32_t tid;
    uint32_t waiting;                /* waiting for a page now (blocked_ns counts up to now) */
    uint64_t faults;                 /* faults that made it wait */
    uint64_t blocked_ns;             /* time spent waiting for pages (QEMU's blocktime) */
} kvmig_uffd_blocked;

int kvmig_uffd_open(kvmig_uffd **out, void *base, uint64_t length, void *staging, int *failed_op);
int kvmig_uffd_close(kvmig_uffd *h);
void kvmig_uffd_free(kvmig_uffd *h);
int kvmig_uffd_copy(kvmig_uffd *h, uint64_t off, const void *src, uint64_t len);
int kvmig_uffd_zero(kvmig_uffd *h, uint64_t off, uint64_t len);
int kvmig_uffd_stage(kvmig_uffd *h, uint64_t off, const void *src, uint64_t len);
int kvmig_uffd_stage_zero(kvmig_uffd *h, uint64_t off, uint64_t len);
long kvmig_uffd_place_staged(kvmig_uffd *h, uint64_t off, uint64_t len);
size_t kvmig_uffd_take(kvmig_uffd *h, kvmig_uffd_fault *out, size_t max);
int kvmig_uffd_wait(kvmig_uffd *h, int timeout_ms);
int kvmig_uffd_notify_fd(kvmig_uffd *h);
uint64_t kvmig_uffd_features(kvmig_uffd *h);
void kvmig_uffd_get_stats(kvmig_uffd *h, kvmig_uffd_stats *out);
void kvmig_uffd_missing(kvmig_uffd *h, uint64_t *bitmap);
size_t kvmig_uffd_blocktime(kvmig_uffd *h, kvmig_uffd_blocked *out, size_t max);
uint32_t kvmig_uffd_lat_bucket(uint64_t ns);
/* cffi: end */

#endif
