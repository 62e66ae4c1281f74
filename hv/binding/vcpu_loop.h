/* KVM_RUN in a loop that serves the UART's port exits in C, and the park where paused vCPUs
   wait (vcpu_loop.c): what the cffi build declares to Python. Its Python counterpart is
   `hv.kvm.vcpu.Vcpu.run` (the exits this loop does not claim) with `hv.vmm.machine`.

   Between the `cffi:` markers only what cffi's cdef parses (see uart.h). */
#ifndef KVMIG_VCPU_LOOP_H
#define KVMIG_VCPU_LOOP_H

#include <stdint.h>
#include <linux/kvm.h>

#include "uart.h"

/* cffi: begin */
#define KVMIG_FAST_PIO_MAX 4         /* port ranges served in C, at most */

typedef struct {
    uint32_t n;
    uint16_t base[4], len[4];        /* [KVMIG_FAST_PIO_MAX]: cffi's cdef takes no macro as a size */
    kvmig_uart *uart[4];
} kvmig_fast_pio;
/* unparked_ns: CLOCK_MONOTONIC (Python's time.monotonic_ns) when the vCPU last left its park for
   KVM_RUN: after a resume, the moment it enters the guest again; 0 if it never parked */
typedef struct { uint64_t fast_io_exits, parks, unparked_ns; } kvmig_run_counts;
typedef struct kvmig_park kvmig_park;

int kvmig_vcpu_run(int vcpu_fd, struct kvm_run *run, const kvmig_fast_pio *fast, kvmig_run_counts *counts,
                   kvmig_park *park);
kvmig_park *kvmig_park_new(void);
void kvmig_park_free(kvmig_park *p);
void kvmig_park_hold(kvmig_park *p, int hold);
void kvmig_park_stop(kvmig_park *p);
uint32_t kvmig_park_wait(kvmig_park *p, uint32_t parked, int at_least, int timeout_ms);
/* cffi: end */

_Static_assert(sizeof(((kvmig_fast_pio *)0)->base) / sizeof(uint16_t) == KVMIG_FAST_PIO_MAX,
               "kvmig_fast_pio's tables hold KVMIG_FAST_PIO_MAX ranges");

#endif
