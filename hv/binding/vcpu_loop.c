/* KVM_RUN in a loop that handles the exits of devices modelled in C (the UART) without coming
   back to Python: the guest's console I/O then never waits for the interpreter lock, whatever
   the rest of the VMM (a migration's encoder, a control command, logging) is doing.

   An exit the table does not claim, or a KVM_RUN that fails (EINTR from a kick or from
   immediate_exit), returns to the caller with kvm_run as KVM left it: Python decodes and handles
   it as before. A kick that lands while this loop is handling an exit is not lost: whoever kicks
   sets immediate_exit first, and the next KVM_RUN returns EINTR at once. */

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <time.h>
#include <linux/kvm.h>

#include "vcpu_loop.h"

/* Where a machine's vCPUs park while it is paused: here, in C, so that neither pausing nor
   resuming waits for the interpreter lock (both are in a migration's downtime). A vCPU whose
   KVM_RUN returns EINTR while `hold` is set waits on `cond` until it is cleared, then enters the
   guest again without returning to Python; `stop` sends it back to Python for good. */
struct kvmig_park {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int hold, stop;
    uint32_t parked;
};

kvmig_park *kvmig_park_new(void) {
    kvmig_park *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    return p;
}

void kvmig_park_free(kvmig_park *p) {
    if (!p) return;
    pthread_cond_destroy(&p->cond);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

void kvmig_park_hold(kvmig_park *p, int hold) {
    pthread_mutex_lock(&p->lock);
    p->hold = hold;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

void kvmig_park_stop(kvmig_park *p) {
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

/* Waits up to timeout_ms until `parked` vCPUs are parked (more for a pause, 0 for a resume);
   returns how many are. */
uint32_t kvmig_park_wait(kvmig_park *p, uint32_t parked, int at_least, int timeout_ms) {
    struct timespec deadline = deadline_after(timeout_ms);
    pthread_mutex_lock(&p->lock);
    while (at_least ? p->parked < parked : p->parked > parked)
        if (pthread_cond_timedwait(&p->cond, &p->lock, &deadline) == ETIMEDOUT) break;
    uint32_t n = p->parked;
    pthread_mutex_unlock(&p->lock);
    return n;
}

/* 1: parked and released, enter the guest again; 0: back to Python. */
static int park_here(kvmig_park *p, kvmig_run_counts *counts) {
    pthread_mutex_lock(&p->lock);
    if (!p->hold || p->stop) {
        pthread_mutex_unlock(&p->lock);
        return 0;
    }
    p->parked++;
    counts->parks++;
    pthread_cond_broadcast(&p->cond);
    while (p->hold && !p->stop) pthread_cond_wait(&p->cond, &p->lock);
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);  /* before `parked` drops: a waiter for 0 sees it set */
    counts->unparked_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
    p->parked--;
    pthread_cond_broadcast(&p->cond);
    int again = !p->stop;
    pthread_mutex_unlock(&p->lock);
    return again;
}

static int fast_pio(const kvmig_fast_pio *fast, struct kvm_run *run) {
    uint16_t port = run->io.port;
    for (uint32_t i = 0; i < fast->n; i++) {
        if (port < fast->base[i] || port >= fast->base[i] + fast->len[i]) continue;
        kvmig_uart *u = fast->uart[i];
        uint32_t offset = port - fast->base[i], size = run->io.size;
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        /* a wider access reaches the register at its first port, zero-extended (as the bus
           does for the Python models) */
        for (uint32_t k = 0; k < run->io.count; k++, data += size) {
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                kvmig_uart_write(u, offset, data[0]);
            } else {
                for (uint32_t b = 0; b < size; b++) data[b] = 0;
                data[0] = kvmig_uart_read(u, offset);
            }
        }
        return 1;
    }
    return 0;
}

/* Returns KVM_RUN's result for the exit it stopped at (0, or -1 with errno). `park` (or NULL):
   where an EINTR parks while the machine holds its vCPUs. */
int kvmig_vcpu_run(int vcpu_fd, struct kvm_run *run, const kvmig_fast_pio *fast, kvmig_run_counts *counts,
                   kvmig_park *park) {
    for (;;) {
        int ret = ioctl(vcpu_fd, KVM_RUN, 0);
        if (ret < 0) {
            if (errno == EINTR && park && park_here(park, counts)) continue;
            return ret;
        }
        if (run->exit_reason == KVM_EXIT_IO && fast->n && fast_pio(fast, run)) {
            counts->fast_io_exits++;
            continue;
        }
        return ret;
    }
}
