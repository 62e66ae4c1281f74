/* virtio-net's packet engine (net.c): what the cffi build declares to Python
   (hv/devices/virtio/net.py). Between the `cffi:` markers only what cffi's cdef parses. */
#ifndef KVMIG_NET_H
#define KVMIG_NET_H

#include <stddef.h>
#include <stdint.h>

/* cffi: begin */
#define KVMIG_NET_REGIONS 8        /* guest RAM regions the engine can address */
#define KVMIG_NET_PENDING 256      /* frames held for the guest while it is paused (state) */
#define KVMIG_NET_FRAME_MAX 65536  /* the longest frame the tap gives (no offloads: 1514) */
#define KVMIG_NET_HDR 12           /* struct virtio_net_hdr with num_buffers (VERSION_1) */

typedef struct kvmig_net kvmig_net;

typedef struct {
    uint64_t guest_base, size;
    uint8_t *host;
    uint64_t *dirty;               /* one bit a 4 KiB page, set atomically (taken by Python) */
} kvmig_net_region;

typedef struct {
    uint32_t num;                  /* 0: the queue is not ready */
    uint64_t desc, driver, device; /* guest addresses of its three areas */
    uint16_t last_avail_idx, used_idx;
} kvmig_net_queue;

typedef struct {
    uint64_t rx_packets, rx_bytes, tx_packets, tx_bytes;
    uint64_t rx_truncated;         /* frames longer than the guest's buffer (cut, as tap does) */
    uint64_t interrupts, announces, drained;
} kvmig_net_stats;

kvmig_net *kvmig_net_new(int tap_fd, const kvmig_net_region *regions, uint32_t nregions, int rx_kick_fd,
                         int tx_kick_fd, int err_fd, int wake_fd);
void kvmig_net_run(kvmig_net *n, const kvmig_net_queue *rx, const kvmig_net_queue *tx, int rx_irq_fd,
                   int tx_irq_fd);
void kvmig_net_set_irq(kvmig_net *n, int rx_irq_fd, int tx_irq_fd);
void kvmig_net_halt(kvmig_net *n, kvmig_net_queue *rx, kvmig_net_queue *tx);
uint32_t kvmig_net_isr(kvmig_net *n, uint32_t ack);
int kvmig_net_take_error(kvmig_net *n, char *buf, size_t cap);
uint32_t kvmig_net_drain(kvmig_net *n);
uint32_t kvmig_net_pending_count(kvmig_net *n);
int64_t kvmig_net_pending_get(kvmig_net *n, uint32_t i, uint8_t *buf, uint32_t cap);
void kvmig_net_pending_clear(kvmig_net *n);
int kvmig_net_pending_add(kvmig_net *n, const uint8_t *frame, uint32_t len);
void kvmig_net_announce(kvmig_net *n, const uint8_t *frame, uint32_t len, uint32_t rounds);
void kvmig_net_stats_get(kvmig_net *n, kvmig_net_stats *s);
void kvmig_net_free(kvmig_net *n);
void kvmig_bitmap_take_or(uint64_t *dst, uint64_t *src, size_t nwords);
/* cffi: end */

#endif
