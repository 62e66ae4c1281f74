/* Ring-3 drivers for virtio-mmio (version 2) devices: blk, console, rng. */
#ifndef KVMIG_VIRTIO_H
#define KVMIG_VIRTIO_H

#include "lib.h"

#define VIRTIO_MMIO_BASE  0xD0000000ULL /* hv places virtio devices in 4 KiB slots from here */
#define VIRTIO_MMIO_SLOTS 8
#define BLK_SLOTS         64 /* the disk area the workload cycles through: 64 x 4 KiB */

/* A secondary CPU's workload, forever: each round increments byte 0 of every page of its own
 * 1 MiB region (`region`), and CPU 1 also drives every virtio device found; `work` counts rounds. */
void device_workload(u64 cpu, volatile u64 *work, u64 tsc_khz, volatile u8 *region) __attribute__((noreturn));

#endif
