/*
 * A ring-3 virtio-net driver, on virtio-mmio (v2) or virtio-pci (modern), for the network tests
 * and benchmarks:
 * - answers ARP requests for its address (`net_ip=a.b.c.d` on the command line, 10.77.0.10 if
 *   absent) with its MAC (the device's configuration);
 * - echoes UDP datagrams to its port (`net_port=`, 7777), the payload followed by the workload's
 *   pass counter (u64, little endian: status->passes), so a client sees what the guest was doing;
 * - sends a gratuitous ARP once its card is up, as any OS does on link up;
 * - negotiates GUEST_ANNOUNCE: when the device sets VIRTIO_NET_S_ANNOUNCE (after a migration) it
 *   sends a gratuitous ARP and acknowledges on the control queue (VIRTIO_NET_CTRL_ANNOUNCE_ACK).
 * Receive buffers are 16 single descriptors of 2 KiB (no MRG_RXBUF: every frame fits one); an
 * answer is one descriptor holding the 12-byte header and the frame.
 * On virtio-mmio it polls: the used rings are read in memory, so an idle poll costs no exit, and
 * the configuration every ~10 ms. On virtio-pci it is driven by MSI-X: the configuration, rx and
 * tx each have a vector (the control queue none: its one request is waited for); the receive
 * ring is looked at only when rx's vector was taken since the last look, the status only when the
 * configuration's was (pci_irq.S counts them in the status page).
 */
#include "net.h"
#include "layout.h"
#include "pci.h"

enum {
    R_MAGIC = 0x000, R_DEVICE_FEATURES = 0x010, R_DEVICE_FEATURES_SEL = 0x014, R_DRIVER_FEATURES = 0x020,
    R_DRIVER_FEATURES_SEL = 0x024, R_QUEUE_SEL = 0x030, R_QUEUE_NUM_MAX = 0x034, R_QUEUE_NUM = 0x038,
    R_QUEUE_READY = 0x044, R_QUEUE_NOTIFY = 0x050, R_INTERRUPT_STATUS = 0x060, R_INTERRUPT_ACK = 0x064,
    R_STATUS = 0x070, R_QUEUE_DESC = 0x080, R_QUEUE_DRIVER = 0x090, R_QUEUE_DEVICE = 0x0a0, R_CONFIG = 0x100,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { F_MAC = 1u << 5, F_STATUS = 1u << 16, F_CTRL_VQ = 1u << 17, F_GUEST_ANNOUNCE = 1u << 21 };
enum { NET_S_ANNOUNCE = 2, RXQ = 0, TXQ = 1, CTRLQ = 2, QN = 16, BUF = 2048, HDR = 12 };
enum { DESC_NEXT = 1, DESC_WRITE = 2 };

struct desc { u64 addr; u32 len; u16 flags, next; };
struct qpage { /* descriptors at 0, available ring at 512, used ring at 1024 */
    struct desc desc[QN];
    u8 pad0[512 - QN * sizeof(struct desc)];
    u16 avail_flags, avail_idx, avail_ring[QN], used_event;
    u8 pad1[512 - (4 + 2 * QN + 2)];
    u16 used_flags, used_idx;
    struct { u32 id, len; } used_ring[QN];
} __attribute__((aligned(4096)));

static struct qpage qp[3];
static u8 rx_buf[QN][BUF] __attribute__((aligned(4096)));
static u8 tx_buf[QN][BUF] __attribute__((aligned(4096)));
static u8 ctrl_buf[16] __attribute__((aligned(16)));
static volatile u32 *nregs;      /* virtio-mmio's registers (0 on PCI) */
static struct pci_virtio *npci;  /* virtio-pci: its structures (0 on MMIO) */
static volatile u16 *notify_at[3];
static volatile u64 *irq_count[3]; /* virtio-pci: the MSI-X counts of rx's, the configuration's, tx's vectors */
static volatile u64 *tx_irq_tsc;   /* virtio-pci: the TSC at which tx's handler last began */
static u64 irq_seen[2];
enum { IRQ_RX = 0, IRQ_CONFIG = 1, IRQ_TX = 2 };
static u16 rx_seen, tx_avail, tx_seen, ctrl_seen;
static u8 mac[6], ip[4];
static u16 port = NET_DEFAULT_PORT;
static u64 next_config_check, answers;
const char *boot_cmdline;

static inline u32 rd(u32 off) { return nregs[off / 4]; }
static inline void wr(u32 off, u32 v) { nregs[off / 4] = v; }

/* virtio-pci's common configuration (virtio 1.x, 4.1.4.3) */
enum {
    C_DEVICE_FEATURE_SELECT = 0x00, C_DEVICE_FEATURE = 0x04, C_DRIVER_FEATURE_SELECT = 0x08,
    C_DRIVER_FEATURE = 0x0C, C_CONFIG_MSIX_VECTOR = 0x10, C_DEVICE_STATUS = 0x14, C_QUEUE_SELECT = 0x16,
    C_QUEUE_SIZE = 0x18, C_QUEUE_MSIX_VECTOR = 0x1A, C_QUEUE_ENABLE = 0x1C, C_QUEUE_NOTIFY_OFF = 0x1E,
    C_QUEUE_DESC = 0x20, C_QUEUE_DRIVER = 0x28, C_QUEUE_DEVICE = 0x30,
};
#define C8(off)  (*(volatile u8 *)(npci->common + (off)))
#define C16(off) (*(volatile u16 *)(npci->common + (off)))
#define C32(off) (*(volatile u32 *)(npci->common + (off)))

/* The transport's operations, one body each for MMIO and PCI. */
static void set_status(u32 v) { if (npci) C8(C_DEVICE_STATUS) = (u8)v; else wr(R_STATUS, v); }
static u32 get_status(void) { return npci ? C8(C_DEVICE_STATUS) : rd(R_STATUS); }
static u32 device_features(u32 sel)
{
    if (!npci) {
        wr(R_DEVICE_FEATURES_SEL, sel);
        return rd(R_DEVICE_FEATURES);
    }
    C32(C_DEVICE_FEATURE_SELECT) = sel;
    return C32(C_DEVICE_FEATURE);
}
static void driver_features(u32 sel, u32 v)
{
    if (!npci) {
        wr(R_DRIVER_FEATURES_SEL, sel);
        wr(R_DRIVER_FEATURES, v);
        return;
    }
    C32(C_DRIVER_FEATURE_SELECT) = sel;
    C32(C_DRIVER_FEATURE) = v;
}
static u8 config_byte(u32 i) { return npci ? npci->config[i] : ((volatile u8 *)nregs)[R_CONFIG + i]; }
static void notify(u16 q)
{
    if (npci)
        *notify_at[q] = q;
    else
        wr(R_QUEUE_NOTIFY, q);
}
/* Queue q of QN entries on qp[q]; on PCI, its MSI-X entry `vector` (0xFFFF: none). 0 on success. */
static int queue_setup(u32 q, u16 vector)
{
    u64 areas[3] = {(u64)qp[q].desc, (u64)&qp[q].avail_flags, (u64)&qp[q].used_flags};
    if (!npci) {
        wr(R_QUEUE_SEL, q);
        if (rd(R_QUEUE_NUM_MAX) < QN)
            return -3;
        wr(R_QUEUE_NUM, QN);
        for (u32 a = 0; a < 3; a++) {
            wr(R_QUEUE_DESC + 0x10 * a, (u32)areas[a]);
            wr(R_QUEUE_DESC + 0x10 * a + 4, (u32)(areas[a] >> 32));
        }
        wr(R_QUEUE_READY, 1);
        return 0;
    }
    C16(C_QUEUE_SELECT) = (u16)q;
    if (C16(C_QUEUE_SIZE) < QN)
        return -3;
    C16(C_QUEUE_SIZE) = QN;
    C16(C_QUEUE_MSIX_VECTOR) = vector;
    if (C16(C_QUEUE_MSIX_VECTOR) != vector)
        return -4; /* the device could not take that vector */
    notify_at[q] = (volatile u16 *)(npci->notify + (u32)C16(C_QUEUE_NOTIFY_OFF) * npci->notify_multiplier);
    for (u32 a = 0; a < 3; a++) { /* two 32-bit halves, as Linux writes them */
        C32(C_QUEUE_DESC + 8 * a) = (u32)areas[a];
        C32(C_QUEUE_DESC + 8 * a + 4) = (u32)(areas[a] >> 32);
    }
    C16(C_QUEUE_ENABLE) = 1;
    return 0;
}
static inline u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static inline void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void copy(u8 *d, const u8 *s, u32 n) { for (u32 i = 0; i < n; i++) d[i] = s[i]; }
static int same(const u8 *a, const u8 *b, u32 n) { for (u32 i = 0; i < n; i++) if (a[i] != b[i]) return 0; return 1; }

static void publish(int q, u16 head)
{
    struct qpage *p = &qp[q];
    p->avail_ring[p->avail_idx % QN] = head;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    p->avail_idx++;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

static void arp_send(u16 op, const u8 *to, const u8 *tha, const u8 *tpa);

static void parse_ip(const char *v)
{
    for (int i = 0; i < 4 && v; i++) {
        const char *end;
        ip[i] = (u8)parse_u64(v, &end);
        v = *end == '.' ? end + 1 : 0;
    }
}

static void parse_args(void)
{
    const char *v = boot_cmdline ? find_arg(boot_cmdline, "net_ip") : 0;
    ip[0] = 10, ip[1] = 77, ip[2] = 0, ip[3] = 10;
    if (v)
        parse_ip(v);
    v = boot_cmdline ? find_arg(boot_cmdline, "net_port") : 0;
    if (v)
        port = (u16)parse_u64(v, 0);
}

/* Reset, negotiate, queues (`vectors`: MSI-X entries of rx, tx, control on PCI), buffers,
 * DRIVER_OK, the gratuitous ARP. */
static int bring_up(const u16 *vectors)
{
    parse_args();
    set_status(0);
    while (npci && get_status())
        cpu_relax(); /* virtio-pci: the reset is done when status reads 0 */
    set_status(S_ACK | S_DRIVER);
    u32 offered = device_features(0);
    if (!(device_features(1) & 1))
        return -1;
    u32 want = offered & (F_MAC | F_STATUS | F_CTRL_VQ | F_GUEST_ANNOUNCE);
    driver_features(0, want);
    driver_features(1, 1);
    set_status(S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(get_status() & S_FEATURES_OK) || !(want & F_MAC))
        return -2;
    for (int i = 0; i < 6; i++)
        mac[i] = config_byte((u32)i);
    if (npci) { /* after the reset, which forgets it (as QEMU's does): configuration changes on entry 0 */
        C16(C_CONFIG_MSIX_VECTOR) = 0;
        if (C16(C_CONFIG_MSIX_VECTOR) != 0)
            return -4;
    }
    u32 nq = want & F_CTRL_VQ ? 3 : 2;
    for (u32 q = 0; q < nq; q++) {
        int err = queue_setup(q, vectors ? vectors[q] : 0);
        if (err)
            return err;
    }
    for (u16 i = 0; i < QN; i++) { /* every receive buffer posted; transmit descriptors fixed */
        qp[RXQ].desc[i] = (struct desc){(u64)rx_buf[i], BUF, DESC_WRITE, 0};
        qp[TXQ].desc[i] = (struct desc){(u64)tx_buf[i], 0, 0, 0};
        publish(RXQ, i);
    }
    set_status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    notify(RXQ);
    static const u8 zero[6];
    arp_send(1, 0, zero, ip); /* gratuitous, as any OS on link up: switches learn our port */
    return 0;
}

int net_init(volatile u32 *regs)
{
    nregs = regs;
    return bring_up(0);
}

int net_init_pci(struct pci_virtio *dev, u32 *next_vector, u32 apic_id)
{
    npci = dev;
    if (dev->msix_vectors < 3 || *next_vector + 3 > MSI_VECTORS)
        return -5;
    /* MSI-X entries: 0 the configuration, 1 rx, 2 tx; each to a guest vector of its own */
    u32 config = (*next_vector)++, rx = (*next_vector)++, tx = (*next_vector)++;
    pci_msix_route(dev, 0, MSI_FIRST_VECTOR + config, apic_id);
    pci_msix_route(dev, 1, MSI_FIRST_VECTOR + rx, apic_id);
    pci_msix_route(dev, 2, MSI_FIRST_VECTOR + tx, apic_id);
    irq_count[IRQ_RX] = (volatile u64 *)MSI_COUNTS_ADDR + rx;
    irq_count[IRQ_CONFIG] = (volatile u64 *)MSI_COUNTS_ADDR + config;
    irq_count[IRQ_TX] = (volatile u64 *)MSI_COUNTS_ADDR + tx;
    tx_irq_tsc = (volatile u64 *)MSI_TSC_ADDR + tx;
    irq_seen[IRQ_RX] = *irq_count[IRQ_RX];
    irq_seen[IRQ_CONFIG] = *irq_count[IRQ_CONFIG];
    static const u16 vectors[3] = {1, 2, 0xFFFF}; /* the control queue: none */
    return bring_up(vectors);
}

/* A transmit buffer whose previous frame the device has used (waits if all 16 are in flight). */
static u8 *tx_slot(void)
{
    while ((u16)(tx_avail - qp[TXQ].used_idx) >= QN)
        cpu_relax();
    u8 *b = tx_buf[tx_avail % QN];
    for (int i = 0; i < HDR; i++)
        b[i] = 0;
    return b + HDR;
}

static void tx_send(u32 frame_len)
{
    u16 slot = tx_avail % QN;
    qp[TXQ].desc[slot].len = HDR + frame_len;
    publish(TXQ, slot);
    tx_avail++;
    notify(TXQ);
}

/* An ARP packet from us (op 1 request / 2 reply) to `tha`/`tpa`, broadcast if `to` is 0. */
static void arp_send(u16 op, const u8 *to, const u8 *tha, const u8 *tpa)
{
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    u8 *f = tx_slot();
    copy(f, to ? to : bcast, 6);
    copy(f + 6, mac, 6);
    put16(f + 12, 0x0806);
    put16(f + 14, 1), put16(f + 16, 0x0800), f[18] = 6, f[19] = 4, put16(f + 20, op);
    copy(f + 22, mac, 6), copy(f + 28, ip, 4), copy(f + 32, tha, 6), copy(f + 38, tpa, 4);
    for (int i = 42; i < 60; i++)
        f[i] = 0;
    tx_send(60);
}

static u16 ip_checksum(const u8 *h)
{
    u32 sum = 0;
    for (int i = 0; i < 20; i += 2)
        sum += be16(h + i);
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (u16)~sum;
}

static void handle(const u8 *f, u32 len)
{
    if (len < 42)
        return;
    u16 type = be16(f + 12);
    if (type == 0x0806 && be16(f + 20) == 1 && same(f + 38, ip, 4)) {
        arp_send(2, f + 6, f + 22, f + 28);
        answers++;
        return;
    }
    if (type != 0x0800 || (f[14] & 0xF) != 5 || f[23] != 17 || !same(f + 30, ip, 4) || be16(f + 36) != port)
        return;
    u32 udp_len = be16(f + 38);
    if (udp_len < 8 || 34 + udp_len > len || udp_len + 8 > BUF - HDR - 42)
        return;
    u64 passes = ((volatile u64 *)STATUS_ADDR)[1];
    u8 *o = tx_slot();
    copy(o, f + 6, 6), copy(o + 6, mac, 6), put16(o + 12, 0x0800);
    copy(o + 14, f + 14, 20); /* IPv4 header: addresses swapped, length and checksum redone */
    copy(o + 26, f + 30, 4), copy(o + 30, f + 26, 4);
    put16(o + 16, (u16)(20 + udp_len + 8));
    o[22] = 64;
    put16(o + 24, 0);
    put16(o + 24, ip_checksum(o + 14));
    put16(o + 34, be16(f + 36)), put16(o + 36, be16(f + 34)); /* ports swapped */
    put16(o + 38, (u16)(udp_len + 8));
    put16(o + 40, 0); /* no UDP checksum (allowed over IPv4) */
    copy(o + 42, f + 42, udp_len - 8);
    for (int i = 0; i < 8; i++)
        o[42 + udp_len - 8 + i] = (u8)(passes >> (8 * i));
    tx_send(42 + udp_len);
    answers++;
}

/* A vector taken since the last look (virtio-pci), read before the ring it signals. */
static int irq_taken(int which)
{
    u64 now = *irq_count[which];
    if (now == irq_seen[which])
        return 0;
    irq_seen[which] = now;
    return 1;
}

static void announce_if_asked(u64 tsc_khz)
{
    if (npci) {
        if (!irq_taken(IRQ_CONFIG)) /* the status changes with the configuration's interrupt */
            return;
    } else {
        u64 now = rdtsc();
        if (now < next_config_check)
            return;
        next_config_check = now + (tsc_khz ? tsc_khz * 10 : 10000000); /* ~10 ms */
        u32 isr = rd(R_INTERRUPT_STATUS);
        if (isr)
            wr(R_INTERRUPT_ACK, isr);
    }
    if (!(config_byte(6) & NET_S_ANNOUNCE))
        return;
    static const u8 zero[6];
    arp_send(1, 0, zero, ip); /* gratuitous: who-has our own address, from us */
    ctrl_buf[0] = 3, ctrl_buf[1] = 0, ctrl_buf[2] = 0xFF; /* VIRTIO_NET_CTRL_ANNOUNCE_ACK */
    qp[CTRLQ].desc[0] = (struct desc){(u64)ctrl_buf, 2, DESC_NEXT, 1};
    qp[CTRLQ].desc[1] = (struct desc){(u64)ctrl_buf + 2, 1, DESC_WRITE, 0};
    publish(CTRLQ, 0);
    notify(CTRLQ);
    while (qp[CTRLQ].used_idx == ctrl_seen)
        cpu_relax();
    ctrl_seen++;
}

u32 net_poll(u64 tsc_khz)
{
    if (!nregs && !npci)
        return 0;
    u32 handled = 0;
    if (!npci || irq_taken(IRQ_RX)) { /* PCI: the ring moved only if its interrupt came */
        while (rx_seen != qp[RXQ].used_idx) {
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            u32 id = qp[RXQ].used_ring[rx_seen % QN].id, len = qp[RXQ].used_ring[rx_seen % QN].len;
            rx_seen++;
            if (id < QN && len > HDR)
                handle(rx_buf[id] + HDR, len - HDR);
            publish(RXQ, (u16)(id % QN));
            handled++;
        }
    }
    if (handled)
        notify(RXQ);
    tx_seen = qp[TXQ].used_idx;
    announce_if_asked(tsc_khz);
    return handled;
}

/* The interrupt-latency benchmark (virtio-pci only): `rounds` frames sent one at a time, each
 * timed from just before its notification to the moment tx's MSI-X handler began (its TSC,
 * pci_irq.S): the device thread took the frame, wrote it to the tap, used the buffer and
 * signalled the vector. Prints `kvmig: irqlat n=.. p50_ns=.. p99_ns=.. min_ns=.. max_ns=..`
 * (the TSC turned into ns with tsc_khz) or `kvmig: error ...` when an interrupt never came. */
#define BENCH_MAX 4096
static u64 bench_cycles[BENCH_MAX];

void net_irq_bench(u32 rounds, u64 tsc_khz)
{
    struct line l = {0};
    if (!npci || !tsc_khz) {
        line_str(&l, "kvmig: error irqlat needs a virtio-pci net card and tsc_khz");
        console_send(&l);
        return;
    }
    if (rounds > BENCH_MAX)
        rounds = BENCH_MAX;
    static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    while (qp[TXQ].used_idx != tx_avail) /* the frames sent so far done, and their interrupts in */
        cpu_relax();
    for (u64 settle = rdtsc() + tsc_khz * 2; rdtsc() < settle;) /* 2 ms */
        cpu_relax();
    for (u32 i = 0; i < rounds; i++) { /* rx is not served meanwhile: its frames wait */
        u8 *f = tx_slot();
        copy(f, bcast, 6), copy(f + 6, mac, 6), put16(f + 12, 0x88B5); /* local experimental ethertype */
        for (int b = 14; b < 60; b++)
            f[b] = (u8)i;
        u16 slot = tx_avail % QN;
        qp[TXQ].desc[slot].len = HDR + 60;
        /* counted and timed before the frame is published: the device thread may take it
         * before the notification (woken by a frame for rx), and its interrupt must count */
        u64 before = *irq_count[IRQ_TX], t0 = rdtsc(), until = t0 + tsc_khz * 5000; /* 5 s */
        publish(TXQ, slot);
        tx_avail++;
        notify(TXQ);
        for (;;) {
            while (*irq_count[IRQ_TX] == before) {
                if (rdtsc() > until) {
                    line_str(&l, "kvmig: error irqlat tx interrupt missing at round ");
                    line_dec(&l, i);
                    console_send(&l);
                    return;
                }
                cpu_relax();
            }
            if (*tx_irq_tsc >= t0)
                break;
            before = *irq_count[IRQ_TX]; /* an earlier frame's interrupt, late: not this one's */
        }
        bench_cycles[i] = *tx_irq_tsc - t0;
    }
    for (u32 i = 1; i < rounds; i++) { /* insertion sort: ring 3 runs natively, N is small */
        u64 v = bench_cycles[i];
        u32 j = i;
        for (; j > 0 && bench_cycles[j - 1] > v; j--)
            bench_cycles[j] = bench_cycles[j - 1];
        bench_cycles[j] = v;
    }
    u32 at[4] = {rounds / 2, rounds * 99 / 100, 0, rounds - 1};
    const char *name[4] = {" p50_ns=", " p99_ns=", " min_ns=", " max_ns="};
    line_str(&l, "kvmig: irqlat n=");
    line_dec(&l, rounds);
    for (int k = 0; k < 4; k++) {
        line_str(&l, name[k]);
        line_dec(&l, bench_cycles[at[k]] * 1000000 / tsc_khz);
    }
    console_send(&l);
}
