/* Ring-3 drivers for virtio-mmio (version 2) devices: blk, console, rng. */
#ifndef KVMIG_VIRTIO_H
#define KVMIG_VIRTIO_H

#include "lib.h"

#define VIRTIO_MMIO_BASE  0xD0000000ULL /* hv places virtio devices in 4 KiB slots from here */
#define VIRTIO_MMIO_SLOTS 8
#define BLK_SLOTS         64 /* the disk area the workload cycles through: 64 x 4 KiB */

/* A secondary CPU's workload: drive every virtio device found, forever; `work` counts rounds. */
void device_workload(u64 cpu, volatile u64 *work, u64 tsc_khz) __attribute__((noreturn));

#endif
