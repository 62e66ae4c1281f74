/* Ring-3 drivers for virtio-mmio (version 2) devices: blk, console, rng. */
#ifndef KVMIG_VIRTIO_H
#define KVMIG_VIRTIO_H

#include "lib.h"

#define VIRTIO_MMIO_BASE  0xD0000000ULL /* hv places virtio devices in 4 KiB slots from here */
#define VIRTIO_MMIO_SLOTS 8
#define BLK_SLOTS         64 /* the disk area the workload cycles through: 64 x 4 KiB */

#define QUEUE_SIZE 16

struct desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
struct avail {
    u16 flags, idx, ring[QUEUE_SIZE], used_event;
};
struct used_elem {
    u32 id, len;
};
struct used {
    u16 flags, idx;
    struct used_elem ring[QUEUE_SIZE];
    u16 avail_event;
};

/* one 4 KiB page per queue: descriptors at 0, available ring at 512, used ring at 1024 */
struct queue_page {
    struct desc desc[QUEUE_SIZE];
    u8 pad0[512 - QUEUE_SIZE * sizeof(struct desc)];
    struct avail avail;
    u8 pad1[512 - sizeof(struct avail)];
    struct used used;
} __attribute__((aligned(4096)));

struct queue {
    volatile struct queue_page *page;
    volatile u32 *regs;
    u16 index, num, last_used;
    volatile u16 *notify; /* virtio-pci: where this queue's notification goes (0: virtio-mmio) */
    volatile u64 *irqs;   /* virtio-pci: its MSI-X vector's count, which each used buffer moves */
    u64 irqs_seen;
};

struct pci_virtio;
struct device {
    volatile u32 *regs; /* virtio-mmio's registers; virtio-pci: its common configuration */
    u32 id;
    struct pci_virtio *pci; /* set for a virtio-pci device */
};

/* virtio-pci's counterpart of device_init (virtio_pci.c): queues on pages[*next_page...],
 * queue i on the next free MSI vector (*next_vector), delivered to CPU `apic_id`. */
int virtio_pci_init(struct device *dev, struct queue *queues, u32 nqueues, volatile struct queue_page *pages,
                    u32 *next_page, u32 max_pages, u32 *next_vector, u32 apic_id);

/* A secondary CPU's workload, forever: each round increments byte 0 of every page of its own
 * 1 MiB region (`region`), and CPU 1 also drives every virtio device found; `work` counts rounds. */
void device_workload(u64 cpu, volatile u64 *work, u64 tsc_khz, volatile u8 *region) __attribute__((noreturn));

#endif
