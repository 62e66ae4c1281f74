/* Guest RAM held at one instant while the guest runs on: userfaultfd write-protect, its fault
   path in C (write_protect.c; Python side hv/kvm/write_protect.py).

   Between the `cffi:` markers only what cffi's cdef parses (see uart.h). */
#ifndef KVMIG_WRITE_PROTECT_H
#define KVMIG_WRITE_PROTECT_H

#include <stddef.h>
#include <stdint.h>

/* cffi: begin */
typedef struct kvmig_wp kvmig_wp;
typedef struct {
    uint64_t faults;                 /* write-protect fault events read */
    uint64_t saved;                  /* pages copied aside by the fault thread before their write */
    uint64_t saved_bytes_peak;       /* the most held aside at once */
    uint64_t blocks_beyond_pool;     /* 2 MiB buffers allocated when the pre-faulted pool ran out */
    uint64_t taken;                  /* pages handed to the reader (kvmig_wp_take) */
    uint64_t protected_pages;        /* still protected (neither saved nor taken) */
    uint64_t lat_count, lat_sum_ns, lat_max_ns;  /* from a fault's event read to its release */
    int32_t thread_errno;            /* the fault thread stopped on this error */
    int32_t last_errno;              /* of the last failed un-protect by the fault thread */
} kvmig_wp_stats;

int kvmig_wp_open(kvmig_wp **out, void *base, uint64_t length, uint64_t pool_bytes, int *failed_op);
int kvmig_wp_protect(kvmig_wp *h, const uint64_t *read_bitmap);
int kvmig_wp_narrow(kvmig_wp *h, uint64_t first, uint64_t count, const uint64_t *words);
long kvmig_wp_sweep(kvmig_wp *h, uint64_t first, uint64_t count, uint64_t budget);
int kvmig_wp_take(kvmig_wp *h, uint64_t off, uint64_t len, void *dst);
int kvmig_wp_close(kvmig_wp *h);
void kvmig_wp_free(kvmig_wp *h);
void kvmig_wp_kept(kvmig_wp *h, uint64_t *bitmap);
void kvmig_wp_get_stats(kvmig_wp *h, kvmig_wp_stats *out);
/* cffi: end */

#endif
