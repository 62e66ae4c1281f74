/*
 * The virtio-pci (modern) side of the ring-3 drivers: the common configuration structure in
 * place of virtio-mmio's registers (virtio 1.x, 4.1.4.3), each queue's notification address from
 * the notify capability, and each queue's used buffers signalled on an MSI-X vector of its own,
 * which transact() waits for.
 */
#include "virtio.h"
#include "pci.h"

enum {
    DEVICE_FEATURE_SELECT = 0x00, DEVICE_FEATURE = 0x04, DRIVER_FEATURE_SELECT = 0x08, DRIVER_FEATURE = 0x0C,
    CONFIG_MSIX_VECTOR = 0x10, DEVICE_STATUS = 0x14, QUEUE_SELECT = 0x16, QUEUE_SIZE_REG = 0x18,
    QUEUE_MSIX_VECTOR = 0x1A, QUEUE_ENABLE = 0x1C, QUEUE_NOTIFY_OFF = 0x1E, QUEUE_DESC = 0x20,
    QUEUE_DRIVER = 0x28, QUEUE_DEVICE = 0x30,
};
enum { ACKNOWLEDGE = 1, DRIVER = 2, DRIVER_OK = 4, FEATURES_OK = 8 };

static inline void w8(volatile u8 *c, u32 off, u8 v) { c[off] = v; }
static inline void w16(volatile u8 *c, u32 off, u16 v) { *(volatile u16 *)(c + off) = v; }
static inline void w32(volatile u8 *c, u32 off, u32 v) { *(volatile u32 *)(c + off) = v; }
static inline u8 r8(volatile u8 *c, u32 off) { return c[off]; }
static inline u16 r16(volatile u8 *c, u32 off) { return *(volatile u16 *)(c + off); }
static inline u32 r32(volatile u8 *c, u32 off) { return *(volatile u32 *)(c + off); }

static void w64(volatile u8 *c, u32 off, u64 v) /* two 32-bit halves, as Linux writes them */
{
    w32(c, off, (u32)v);
    w32(c, off + 4, (u32)(v >> 32));
}

int virtio_pci_init(struct device *dev, struct queue *queues, u32 nqueues, volatile struct queue_page *pages,
                    u32 *next_page, u32 max_pages, u32 *next_vector, u32 apic_id)
{
    struct pci_virtio *pci = dev->pci;
    volatile u8 *c = pci->common;
    w8(c, DEVICE_STATUS, 0);
    while (r8(c, DEVICE_STATUS))
        cpu_relax(); /* the reset is done when status reads 0 */
    w8(c, DEVICE_STATUS, ACKNOWLEDGE);
    w8(c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER);
    w32(c, DEVICE_FEATURE_SELECT, 1);
    if (!(r32(c, DEVICE_FEATURE) & 1))
        return -1; /* no VIRTIO_F_VERSION_1 */
    w32(c, DRIVER_FEATURE_SELECT, 1);
    w32(c, DRIVER_FEATURE, 1);
    w32(c, DRIVER_FEATURE_SELECT, 0);
    w32(c, DRIVER_FEATURE, 0);
    w8(c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    if (!(r8(c, DEVICE_STATUS) & FEATURES_OK))
        return -2;
    w16(c, CONFIG_MSIX_VECTOR, 0xFFFF); /* no configuration-change interrupts wanted */
    for (u32 q = 0; q < nqueues; q++) {
        w16(c, QUEUE_SELECT, (u16)q);
        u16 max = r16(c, QUEUE_SIZE_REG);
        if (max == 0 || *next_page >= max_pages || *next_vector >= MSI_VECTORS || q >= pci->msix_vectors)
            return -3;
        struct queue *vq = &queues[q];
        vq->page = &pages[(*next_page)++];
        vq->regs = 0;
        vq->index = (u16)q;
        vq->num = max < QUEUE_SIZE ? max : QUEUE_SIZE;
        vq->last_used = 0;
        w16(c, QUEUE_SIZE_REG, vq->num);
        u32 vector = (*next_vector)++;
        pci_msix_route(pci, q, MSI_FIRST_VECTOR + vector, apic_id);
        w16(c, QUEUE_MSIX_VECTOR, (u16)q);
        if (r16(c, QUEUE_MSIX_VECTOR) != q)
            return -4; /* the device could not take that vector */
        vq->irqs = (volatile u64 *)MSI_COUNTS_ADDR + vector;
        vq->irqs_seen = *vq->irqs;
        vq->notify = (volatile u16 *)(pci->notify + (u32)r16(c, QUEUE_NOTIFY_OFF) * pci->notify_multiplier);
        w64(c, QUEUE_DESC, (u64)vq->page->desc);
        w64(c, QUEUE_DRIVER, (u64)&vq->page->avail);
        w64(c, QUEUE_DEVICE, (u64)&vq->page->used);
        w16(c, QUEUE_ENABLE, 1);
    }
    w8(c, DEVICE_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    return 0;
}
