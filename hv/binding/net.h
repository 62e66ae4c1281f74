/* virtio-net's packet engine (net.c): the types and entry points cffi declares (build.py reads
   this file for both the declarations and the C source, so the two cannot drift). */

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
