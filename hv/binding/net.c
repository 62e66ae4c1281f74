/* virtio-net's receive and transmit queues, served in C on a thread of their own, so that no
   packet waits for the Python interpreter lock (the console does the same: uart.c).

   The Python side (hv/devices/virtio/net.py) owns the transport registers, the control queue and
   the state; it hands this engine the two queues' configuration when the device goes live
   (`kvmig_net_run`) and takes their positions back when it stops (`kvmig_net_halt`). Between
   the two, only this thread touches the rx and tx rings:
   - tx: each chain the driver made available is written to the tap with one writev (its 12-byte
     virtio_net_hdr skipped: no offloads are offered, so the header says nothing), then used;
   - rx: frames held in `pending` (from a saved state) go first, then the tap is read with one
     read into the engine's buffer and copied, after the header this engine writes (num_buffers 1),
     in the chain's order.
     A chain is consumed only once a frame filled it, so an empty tap costs the guest nothing;
     with no buffer available the tap is not read at all: frames wait in the kernel's queue.
   Every guest address is checked against the RAM regions (a hostile driver reaches nothing
   else), indices against the queue size, chains against loops; a violation stops the engine and
   signals `err_fd` (the device then needs a reset). Every byte written into guest RAM sets its
   page's bit in the region's dirty bitmap (atomically; `kvmig_bitmap_take_or` hands them to the
   migration's dirty log), since KVM's log only sees the guest's own writes.

   Paused (halted), the engine moves nothing: `kvmig_net_drain` then reads what the tap holds
   into `pending`, which the device's state carries, so a frame the host took is delivered once,
   by the side that runs the guest. All fields are guarded by `lock`; the thread holds it while it
   works and drops it to poll, so a halt waits for at most one batch.

   Over 450 lines, as one room on purpose: the ring walk, rx, tx, the held frames and the
   announce rounds all run under that one lock, and reading them together is how a halt's
   guarantee (no guest memory touched after it returns) is checked. */

#include "net.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define NET_BATCH 64           /* chains per queue per pass: bounds how long a halt waits */
#define NET_SEGS 64            /* buffers per chain the engine follows */
#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define AVAIL_F_NO_INTERRUPT 1

struct kvmig_net {
    pthread_mutex_t lock;
    pthread_cond_t changed;
    pthread_t thread;
    int has_thread, running, stopping, failed;
    int tap_fd, irq_fd[2], err_fd, wake_fd, kick_fd[2]; /* irq_fd per queue: one vector each (MSI-X), or one fd twice */
    kvmig_net_region regions[KVMIG_NET_REGIONS];
    uint32_t nregions;
    kvmig_net_queue q[2];      /* 0 rx, 1 tx */
    uint32_t isr;              /* InterruptStatus bits this engine raised */
    uint8_t *pending[KVMIG_NET_PENDING];
    uint32_t pending_len[KVMIG_NET_PENDING], pending_head, pending_n;
    uint8_t announce[64];
    uint32_t announce_len, announce_left;
    uint64_t announce_next_ns, announce_delay_ns;
    kvmig_net_stats stats;
    char error[160];
    uint8_t scratch[KVMIG_NET_FRAME_MAX]; /* the part of a frame that did not fit the guest's buffer */
};

typedef struct { uint8_t *host; uint64_t guest; uint32_t len; } net_seg;

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static void net_fail(kvmig_net *n, int queue, const char *what, uint64_t value) {
    if (!n->failed) {
        snprintf(n->error, sizeof n->error, "queue %d: %s (%#llx)", queue, what, (unsigned long long)value);
        n->failed = 1;
        uint64_t one = 1;
        if (n->err_fd >= 0 && write(n->err_fd, &one, 8) < 0) { /* the device sees `failed` anyway */ }
    }
}

/* The host address of guest [addr, addr+len), wholly inside one region, or NULL. */
static uint8_t *net_host(kvmig_net *n, uint64_t addr, uint64_t len) {
    for (uint32_t i = 0; i < n->nregions; i++) {
        kvmig_net_region *r = &n->regions[i];
        if (addr >= r->guest_base && addr - r->guest_base < r->size && len <= r->size - (addr - r->guest_base))
            return r->host + (addr - r->guest_base);
    }
    return NULL;
}

static void net_dirty(kvmig_net *n, uint64_t addr, uint64_t len) {
    if (!len) return;
    for (uint32_t i = 0; i < n->nregions; i++) {
        kvmig_net_region *r = &n->regions[i];
        if (addr >= r->guest_base && addr - r->guest_base < r->size) {
            uint64_t first = (addr - r->guest_base) >> 12, last = (addr - r->guest_base + len - 1) >> 12;
            for (uint64_t p = first; p <= last; p++)
                __atomic_fetch_or(&r->dirty[p >> 6], 1ull << (p & 63), __ATOMIC_RELAXED);
            return;
        }
    }
}

static int net_u16(kvmig_net *n, int qi, uint64_t addr, uint16_t *out) {
    uint8_t *p = net_host(n, addr, 2);
    if (!p) { net_fail(n, qi, "ring outside guest RAM", addr); return -1; }
    *out = __atomic_load_n((uint16_t *)p, __ATOMIC_ACQUIRE);
    return 0;
}

/* How many chains the driver made available that the engine has not consumed, or -1. */
static int net_pending_chains(kvmig_net *n, int qi) {
    kvmig_net_queue *q = &n->q[qi];
    uint16_t idx;
    if (!q->num || net_u16(n, qi, q->driver + 2, &idx)) return q->num ? -1 : 0;
    uint16_t ahead = (uint16_t)(idx - q->last_avail_idx);
    if (ahead > q->num) { net_fail(n, qi, "available index runs ahead of the queue", ahead); return -1; }
    return ahead;
}

/* The chain at last_avail_idx, not consumed: its device-writable (rx) or readable (tx) buffers. */
static int net_walk(kvmig_net *n, int qi, net_seg *segs, uint16_t *head_out) {
    kvmig_net_queue *q = &n->q[qi];
    uint16_t head, index;
    if (net_u16(n, qi, q->driver + 4 + 2 * (q->last_avail_idx & (q->num - 1)), &head)) return -1;
    index = head;
    int nsegs = 0, seen_writable = 0;
    uint64_t total = 0;
    for (uint32_t step = 0; step < q->num; step++) {
        if (index >= q->num) { net_fail(n, qi, "descriptor index beyond the table", index); return -1; }
        uint8_t *d = net_host(n, q->desc + 16ull * index, 16);
        if (!d) { net_fail(n, qi, "descriptor table outside guest RAM", q->desc); return -1; }
        uint64_t addr; uint32_t len; uint16_t flags, next;
        memcpy(&addr, d, 8); memcpy(&len, d + 8, 4); memcpy(&flags, d + 12, 2); memcpy(&next, d + 14, 2);
        if (flags & DESC_F_INDIRECT) { net_fail(n, qi, "indirect descriptor (not offered)", index); return -1; }
        total += len;
        if (total > (1ull << 32)) { net_fail(n, qi, "chain longer than 4 GiB", head); return -1; }
        /* the rules queue.py's Virtqueue._walk applies (the reference): every buffer inside RAM,
           device-readable ones before device-writable ones */
        uint8_t *p = len ? net_host(n, addr, len) : NULL;
        if (len && !p) { net_fail(n, qi, "buffer outside guest RAM", addr); return -1; }
        if (flags & DESC_F_WRITE) seen_writable = 1;
        else if (seen_writable) { net_fail(n, qi, "device-readable descriptor after a device-writable one", index); return -1; }
        int wanted = qi == 0 ? (flags & DESC_F_WRITE) != 0 : (flags & DESC_F_WRITE) == 0;
        if (len && wanted) {
            if (nsegs == NET_SEGS) { net_fail(n, qi, "chain of more buffers than the engine follows", head); return -1; }
            segs[nsegs++] = (net_seg){p, addr, len};
        }
        if (!(flags & DESC_F_NEXT)) { *head_out = head; return nsegs; }
        index = next;
    }
    net_fail(n, qi, "descriptor chain loops", head);
    return -1;
}

/* Consume the chain at last_avail_idx: the used element first, then the index (release). */
static int net_push_used(kvmig_net *n, int qi, uint16_t head, uint32_t written) {
    kvmig_net_queue *q = &n->q[qi];
    uint64_t elem = q->device + 4 + 8ull * (q->used_idx & (q->num - 1));
    uint8_t *e = net_host(n, elem, 8), *idx = net_host(n, q->device + 2, 2);
    if (!e || !idx) { net_fail(n, qi, "used ring outside guest RAM", q->device); return -1; }
    uint32_t id = head;
    memcpy(e, &id, 4); memcpy(e + 4, &written, 4);
    q->used_idx++;
    q->last_avail_idx++;
    __atomic_store_n((uint16_t *)idx, q->used_idx, __ATOMIC_RELEASE);
    net_dirty(n, elem, 8);
    net_dirty(n, q->device + 2, 2);
    return 0;
}

static int net_tx(kvmig_net *n) {
    int used = 0;
    net_seg segs[NET_SEGS];
    struct iovec iov[NET_SEGS];
    while (used < NET_BATCH && !n->failed && net_pending_chains(n, 1) > 0) {
        uint16_t head;
        int nsegs = net_walk(n, 1, segs, &head);
        if (nsegs < 0) break;
        uint32_t skip = KVMIG_NET_HDR, niov = 0;
        uint64_t bytes = 0;
        for (int i = 0; i < nsegs; i++) {
            if (skip >= segs[i].len) { skip -= segs[i].len; continue; }
            iov[niov].iov_base = segs[i].host + skip;
            iov[niov].iov_len = segs[i].len - skip;
            bytes += iov[niov++].iov_len;
            skip = 0;
        }
        if (niov) {
            ssize_t w = writev(n->tap_fd, iov, (int)niov);
            if (w < 0 && errno == EAGAIN) break; /* the tap's queue is full: retry on the next pass */
            if (w >= 0) { n->stats.tx_packets++; n->stats.tx_bytes += bytes; }
        }
        if (net_push_used(n, 1, head, 0)) break;
        used++;
    }
    return used;
}

/* Fill one rx chain from `frame` (pending) or from the tap (frame NULL). 1: filled, 0: the tap
   is empty, -1: failed. */
static int net_rx_one(kvmig_net *n, const uint8_t *frame, uint32_t frame_len) {
    net_seg segs[NET_SEGS];
    uint16_t head;
    int nsegs = net_walk(n, 0, segs, &head);
    if (nsegs < 0) return -1;
    uint64_t room = 0;
    for (int i = 0; i < nsegs; i++) room += segs[i].len;
    if (room < KVMIG_NET_HDR) { net_fail(n, 0, "receive buffer smaller than the header", room); return -1; }
    /* A frame from the tap is read whole into `scratch` first (so an empty tap writes nothing),
       then the header and the frame are copied in the order they have in the chain, as one
       sequential write puts them: a chain whose buffers overlap ends as the reference leaves
       it (writing the frame straight from the tap and the header after it did not). */
    if (!frame) {
        ssize_t r = read(n->tap_fd, n->scratch, sizeof n->scratch);
        if (r < 0) return 0; /* EAGAIN (or the tap went away: nothing to deliver) */
        frame = n->scratch;
        frame_len = (uint32_t)r;
    }
    uint64_t space = room - KVMIG_NET_HDR;
    ssize_t got = frame_len;
    if ((uint64_t)got > space) { n->stats.rx_truncated++; got = (ssize_t)space; }
    uint8_t hdr[KVMIG_NET_HDR] = {0};
    hdr[10] = 1; /* num_buffers */
    uint64_t off = 0, total = KVMIG_NET_HDR + (uint64_t)got;
    for (int i = 0; i < nsegs && off < total; i++) {
        uint64_t c = segs[i].len < total - off ? segs[i].len : total - off, done = 0;
        if (off < KVMIG_NET_HDR) { /* the header's part of this segment */
            done = c < KVMIG_NET_HDR - off ? c : KVMIG_NET_HDR - off;
            memcpy(segs[i].host, hdr + off, done);
        }
        if (c > done) /* the frame's part */
            memcpy(segs[i].host + done, frame + (off + done - KVMIG_NET_HDR), c - done);
        off += c;
    }
    uint64_t dirty = KVMIG_NET_HDR + (uint64_t)got;
    for (int i = 0; i < nsegs && dirty; i++) {
        uint32_t c = segs[i].len < dirty ? segs[i].len : (uint32_t)dirty;
        net_dirty(n, segs[i].guest, c);
        dirty -= c;
    }
    if (net_push_used(n, 0, head, KVMIG_NET_HDR + (uint32_t)got)) return -1;
    n->stats.rx_packets++;
    n->stats.rx_bytes += (uint64_t)got;
    return 1;
}

/* Returns chains used; *want_tap: buffers remain, so the tap is worth polling. */
static int net_rx(kvmig_net *n, int *want_tap) {
    int used = 0;
    *want_tap = 0;
    while (used < NET_BATCH && !n->failed) {
        int avail = net_pending_chains(n, 0);
        if (avail <= 0) return used;
        int r;
        if (n->pending_n) {
            uint32_t i = n->pending_head;
            r = net_rx_one(n, n->pending[i], n->pending_len[i]);
            if (r == 1) {
                free(n->pending[i]);
                n->pending[i] = NULL;
                n->pending_head = (i + 1) % KVMIG_NET_PENDING;
                n->pending_n--;
            }
        } else {
            r = net_rx_one(n, NULL, 0);
            if (r == 0) { *want_tap = 1; return used; }
        }
        if (r < 0) return used;
        used++;
    }
    *want_tap = !n->failed;
    return used;
}

static void net_interrupt(kvmig_net *n, int used_rx, int used_tx) {
    int raise[2] = {0, 0};
    for (int qi = 0; qi < 2; qi++) {
        uint16_t flags = 0;
        if ((qi ? used_tx : used_rx) && !net_u16(n, qi, n->q[qi].driver, &flags) && !(flags & AVAIL_F_NO_INTERRUPT))
            raise[qi] = 1;
    }
    if (!raise[0] && !raise[1]) return;
    __atomic_fetch_or(&n->isr, 1u, __ATOMIC_SEQ_CST);
    uint64_t one = 1;
    for (int qi = 0; qi < 2; qi++) { /* one write per fd: virtio-mmio gives both queues the same */
        int fd = n->irq_fd[qi];
        if (!raise[qi] || (qi == 1 && raise[0] && fd == n->irq_fd[0])) continue;
        n->stats.interrupts++;
        if (fd >= 0 && write(fd, &one, 8) < 0) { /* polled drivers read InterruptStatus */ }
    }
}

static void net_announce_due(kvmig_net *n) {
    if (!n->announce_left) return;
    uint64_t t = now_ns();
    if (t < n->announce_next_ns) return;
    if (write(n->tap_fd, n->announce, n->announce_len) == (ssize_t)n->announce_len) n->stats.announces++;
    n->announce_left--;
    n->announce_next_ns = t + n->announce_delay_ns;
    n->announce_delay_ns += 100000000ull; /* QEMU's announce-self: 50 ms, then +100 ms a round */
}

static void *net_thread(void *arg) {
    kvmig_net *n = arg;
    pthread_mutex_lock(&n->lock);
    for (;;) {
        while ((!n->running || n->failed) && !n->stopping) pthread_cond_wait(&n->changed, &n->lock);
        if (n->stopping) break;
        int want_tap = 0;
        int used_tx = net_tx(n);
        int tx_told = used_tx && n->irq_fd[1] != n->irq_fd[0]; /* a vector of its own: at once, */
        if (tx_told)                                             /* not after the tap's read */
            net_interrupt(n, 0, used_tx);
        int used_rx = net_rx(n, &want_tap);
        net_interrupt(n, used_rx, tx_told ? 0 : used_tx);
        net_announce_due(n);
        int busy = used_tx == NET_BATCH || used_rx == NET_BATCH;
        int timeout = busy ? 0 : -1;
        if (n->announce_left) {
            uint64_t t = now_ns();
            int ms = n->announce_next_ns > t ? (int)((n->announce_next_ns - t + 999999) / 1000000) : 0;
            timeout = timeout < 0 || ms < timeout ? ms : timeout;
        }
        struct pollfd p[4] = {{n->wake_fd, POLLIN, 0}, {n->kick_fd[0], POLLIN, 0}, {n->kick_fd[1], POLLIN, 0},
                              {n->tap_fd, want_tap ? POLLIN : 0, 0}};
        pthread_mutex_unlock(&n->lock);
        poll(p, 4, timeout);
        uint64_t v;
        for (int i = 0; i < 3; i++)
            if (p[i].revents & POLLIN && read(p[i].fd, &v, 8) < 0) { /* a racing reader took it */ }
        pthread_mutex_lock(&n->lock);
    }
    pthread_mutex_unlock(&n->lock);
    return NULL;
}

static void net_wake(kvmig_net *n) {
    uint64_t one = 1;
    if (write(n->wake_fd, &one, 8) < 0) { /* already readable */ }
    pthread_cond_broadcast(&n->changed);
}

kvmig_net *kvmig_net_new(int tap_fd, const kvmig_net_region *regions, uint32_t nregions, int rx_kick_fd,
                         int tx_kick_fd, int err_fd, int wake_fd) {
    if (nregions > KVMIG_NET_REGIONS) return NULL;
    kvmig_net *n = calloc(1, sizeof *n);
    if (!n) return NULL;
    pthread_mutex_init(&n->lock, NULL);
    pthread_cond_init(&n->changed, NULL);
    n->tap_fd = tap_fd; n->irq_fd[0] = n->irq_fd[1] = -1; n->err_fd = err_fd; n->wake_fd = wake_fd;
    n->kick_fd[0] = rx_kick_fd; n->kick_fd[1] = tx_kick_fd;
    memcpy(n->regions, regions, nregions * sizeof *regions);
    n->nregions = nregions;
    if (pthread_create(&n->thread, NULL, net_thread, n)) { free(n); return NULL; }
    n->has_thread = 1;
    return n;
}

/* Go live with these queue positions (num 0: that queue is not ready); each queue's used
   buffers are signalled on its own eventfd (-1: none; the same fd for both is one signal). */
void kvmig_net_run(kvmig_net *n, const kvmig_net_queue *rx, const kvmig_net_queue *tx, int rx_irq_fd,
                   int tx_irq_fd) {
    pthread_mutex_lock(&n->lock);
    n->q[0] = *rx; n->q[1] = *tx;
    n->irq_fd[0] = rx_irq_fd; n->irq_fd[1] = tx_irq_fd;
    n->running = 1;
    net_wake(n);
    pthread_mutex_unlock(&n->lock);
}

/* Where each queue's interrupts go from now on (virtio-pci: a vector's irqfd while it is routed
   and unmasked, else the transport's own eventfd, which holds it pending). Under the lock, so a
   signal is never sent to an fd the caller has stopped handing out once this returns. */
void kvmig_net_set_irq(kvmig_net *n, int rx_irq_fd, int tx_irq_fd) {
    pthread_mutex_lock(&n->lock);
    n->irq_fd[0] = rx_irq_fd; n->irq_fd[1] = tx_irq_fd;
    pthread_mutex_unlock(&n->lock);
}

/* Stop (when this returns, the thread touches no guest memory) and give the positions back. */
void kvmig_net_halt(kvmig_net *n, kvmig_net_queue *rx, kvmig_net_queue *tx) {
    pthread_mutex_lock(&n->lock);
    n->running = 0;
    *rx = n->q[0]; *tx = n->q[1];
    net_wake(n);
    pthread_mutex_unlock(&n->lock);
}

/* The InterruptStatus bits raised, clearing those in `ack`. */
uint32_t kvmig_net_isr(kvmig_net *n, uint32_t ack) {
    return __atomic_fetch_and(&n->isr, ~ack, __ATOMIC_SEQ_CST);
}

/* Why the engine stopped on a bad ring (empty if it did not); clears the failure. */
int kvmig_net_take_error(kvmig_net *n, char *buf, size_t cap) {
    pthread_mutex_lock(&n->lock);
    int failed = n->failed;
    snprintf(buf, cap, "%s", failed ? n->error : "");
    n->failed = 0;
    pthread_mutex_unlock(&n->lock);
    return failed;
}

/* Read what the tap holds into `pending` (the device halted): returns frames taken. */
uint32_t kvmig_net_drain(kvmig_net *n) {
    uint32_t taken = 0;
    pthread_mutex_lock(&n->lock);
    while (!n->running && n->pending_n < KVMIG_NET_PENDING) {
        ssize_t got = read(n->tap_fd, n->scratch, sizeof n->scratch);
        if (got <= 0) break;
        uint8_t *copy = malloc((size_t)got);
        if (!copy) break;
        memcpy(copy, n->scratch, (size_t)got);
        uint32_t i = (n->pending_head + n->pending_n) % KVMIG_NET_PENDING;
        n->pending[i] = copy;
        n->pending_len[i] = (uint32_t)got;
        n->pending_n++;
        taken++;
    }
    n->stats.drained += taken;
    pthread_mutex_unlock(&n->lock);
    return taken;
}

uint32_t kvmig_net_pending_count(kvmig_net *n) {
    pthread_mutex_lock(&n->lock);
    uint32_t c = n->pending_n;
    pthread_mutex_unlock(&n->lock);
    return c;
}

/* Frame i of `pending` copied into buf (at most cap bytes); returns its length, or -1. */
int64_t kvmig_net_pending_get(kvmig_net *n, uint32_t i, uint8_t *buf, uint32_t cap) {
    int64_t len = -1;
    pthread_mutex_lock(&n->lock);
    if (i < n->pending_n) {
        uint32_t at = (n->pending_head + i) % KVMIG_NET_PENDING;
        len = n->pending_len[at];
        memcpy(buf, n->pending[at], n->pending_len[at] < cap ? n->pending_len[at] : cap);
    }
    pthread_mutex_unlock(&n->lock);
    return len;
}

void kvmig_net_pending_clear(kvmig_net *n) {
    pthread_mutex_lock(&n->lock);
    for (; n->pending_n; n->pending_n--) {
        free(n->pending[n->pending_head]);
        n->pending[n->pending_head] = NULL;
        n->pending_head = (n->pending_head + 1) % KVMIG_NET_PENDING;
    }
    pthread_mutex_unlock(&n->lock);
}

int kvmig_net_pending_add(kvmig_net *n, const uint8_t *frame, uint32_t len) {
    int ok = 0;
    pthread_mutex_lock(&n->lock);
    if (n->pending_n < KVMIG_NET_PENDING && len <= KVMIG_NET_FRAME_MAX) {
        uint8_t *copy = malloc(len ? len : 1);
        if (copy) {
            memcpy(copy, frame, len);
            uint32_t i = (n->pending_head + n->pending_n) % KVMIG_NET_PENDING;
            n->pending[i] = copy;
            n->pending_len[i] = len;
            n->pending_n++;
            ok = 1;
        }
    }
    if (ok && n->running) net_wake(n);
    pthread_mutex_unlock(&n->lock);
    return ok;
}

/* Send `frame` to the tap `rounds` times: at once (when running), then 50 ms later, and 100 ms
   longer between each next two (QEMU's announce-self timing). */
void kvmig_net_announce(kvmig_net *n, const uint8_t *frame, uint32_t len, uint32_t rounds) {
    pthread_mutex_lock(&n->lock);
    n->announce_len = len < sizeof n->announce ? len : sizeof n->announce;
    memcpy(n->announce, frame, n->announce_len);
    n->announce_left = rounds;
    n->announce_next_ns = 0;
    n->announce_delay_ns = 50000000ull;
    net_wake(n);
    pthread_mutex_unlock(&n->lock);
}

void kvmig_net_stats_get(kvmig_net *n, kvmig_net_stats *s) {
    pthread_mutex_lock(&n->lock);
    *s = n->stats;
    pthread_mutex_unlock(&n->lock);
}

void kvmig_net_free(kvmig_net *n) {
    pthread_mutex_lock(&n->lock);
    n->stopping = 1;
    net_wake(n);
    pthread_mutex_unlock(&n->lock);
    if (n->has_thread) pthread_join(n->thread, NULL);
    kvmig_net_pending_clear(n);
    pthread_mutex_destroy(&n->lock);
    pthread_cond_destroy(&n->changed);
    free(n);
}

/* OR `src` into `dst` word by word, clearing each `src` word atomically as it is taken: a bit the
   engine sets meanwhile lands in this take or the next, never in neither. */
void kvmig_bitmap_take_or(uint64_t *dst, uint64_t *src, size_t nwords) {
    for (size_t w = 0; w < nwords; w++)
        if (__atomic_load_n(&src[w], __ATOMIC_RELAXED)) dst[w] |= __atomic_exchange_n(&src[w], 0, __ATOMIC_ACQ_REL);
}
