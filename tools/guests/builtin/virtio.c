/*
 * Polling virtio-mmio drivers that run in ring 3 (the device pages are user-accessible): no
 * interrupts are needed, so the guest's ring 0 stays out of the I/O path. One request at a time
 * per queue: post the chain, notify, spin until the used index moves.
 *
 * The block workload writes 4 KiB to slot (round mod 64), reads it back and compares, so a
 * disk image can be checked from outside: slot s holds words w[i] = round << 32 | s << 16 | i
 * for the latest round with round mod 64 == s.
 */
#include "virtio.h"
#include "layout.h"
#include "net.h"
#include "pci.h"

enum {
    REG_MAGIC = 0x000, REG_VERSION = 0x004, REG_DEVICE_ID = 0x008, REG_DEVICE_FEATURES = 0x010,
    REG_DEVICE_FEATURES_SEL = 0x014, REG_DRIVER_FEATURES = 0x020, REG_DRIVER_FEATURES_SEL = 0x024,
    REG_QUEUE_SEL = 0x030, REG_QUEUE_NUM_MAX = 0x034, REG_QUEUE_NUM = 0x038, REG_QUEUE_READY = 0x044,
    REG_QUEUE_NOTIFY = 0x050, REG_INTERRUPT_STATUS = 0x060, REG_INTERRUPT_ACK = 0x064,
    REG_STATUS = 0x070, REG_QUEUE_DESC_LOW = 0x080, REG_QUEUE_DESC_HIGH = 0x084,
    REG_QUEUE_DRIVER_LOW = 0x090, REG_QUEUE_DRIVER_HIGH = 0x094, REG_QUEUE_DEVICE_LOW = 0x0a0,
    REG_QUEUE_DEVICE_HIGH = 0x0a4,
};
enum { S_ACKNOWLEDGE = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8 };
enum { ID_NET = 1, ID_BLK = 2, ID_CONSOLE = 3, ID_RNG = 4 };
enum { DESC_NEXT = 1, DESC_WRITE = 2 };
enum { BLK_IN = 0, BLK_OUT = 1, BLK_FLUSH = 4 };

#define MAGIC 0x74726976u /* "virt" */

static struct queue_page queue_pages[4];
static u8 blk_data[4096] __attribute__((aligned(4096)));
static u8 blk_check[4096] __attribute__((aligned(4096)));
static struct {
    u32 type, reserved;
    u64 sector;
} blk_header __attribute__((aligned(16)));
static volatile u8 blk_status;
static u8 rng_data[64];
static char console_text[64];
static u64 irq_wait_cycles = 20000000000ULL; /* how long a used buffer's interrupt may take */
static struct pci_virtio pci_found[4];
static u32 next_vector; /* the guest's MSI vectors (pci.h) given out so far, one per queue */

static inline u32 rd(volatile u32 *regs, u32 off) { return regs[off / 4]; }
static inline void wr(volatile u32 *regs, u32 off, u32 v) { regs[off / 4] = v; }

static void die(const char *why, u64 a, u64 b)
{
    struct line l = {0};
    line_str(&l, "kvmig: error ");
    line_str(&l, why);
    line_str(&l, " ");
    line_dec(&l, a);
    line_str(&l, " ");
    line_hex(&l, b);
    console_send(&l);
    debug_exit(4);
}

/* Reset, negotiate VIRTIO_F_VERSION_1 only, set up `nqueues` queues, DRIVER_OK. */
static int device_init(struct device *dev, struct queue *queues, u32 nqueues, u32 *next_page)
{
    if (dev->pci)
        return virtio_pci_init(dev, queues, nqueues, queue_pages, next_page,
                               sizeof(queue_pages) / sizeof(queue_pages[0]), &next_vector, 1);
    volatile u32 *r = dev->regs;
    wr(r, REG_STATUS, 0);
    wr(r, REG_STATUS, S_ACKNOWLEDGE);
    wr(r, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    wr(r, REG_DEVICE_FEATURES_SEL, 1);
    if (!(rd(r, REG_DEVICE_FEATURES) & 1))
        return -1; /* not a virtio 1.x device */
    wr(r, REG_DRIVER_FEATURES_SEL, 1);
    wr(r, REG_DRIVER_FEATURES, 1);
    wr(r, REG_DRIVER_FEATURES_SEL, 0);
    wr(r, REG_DRIVER_FEATURES, 0);
    wr(r, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if (!(rd(r, REG_STATUS) & S_FEATURES_OK))
        return -2;
    for (u32 q = 0; q < nqueues; q++) {
        wr(r, REG_QUEUE_SEL, q);
        u32 max = rd(r, REG_QUEUE_NUM_MAX);
        if (max == 0 || *next_page >= sizeof(queue_pages) / sizeof(queue_pages[0]))
            return -3;
        struct queue *vq = &queues[q];
        vq->page = &queue_pages[(*next_page)++];
        vq->regs = r;
        vq->index = (u16)q;
        vq->num = max < QUEUE_SIZE ? (u16)max : QUEUE_SIZE;
        vq->last_used = 0;
        wr(r, REG_QUEUE_NUM, vq->num);
        u64 d = (u64)vq->page->desc, a = (u64)&vq->page->avail, u = (u64)&vq->page->used;
        wr(r, REG_QUEUE_DESC_LOW, (u32)d);
        wr(r, REG_QUEUE_DESC_HIGH, (u32)(d >> 32));
        wr(r, REG_QUEUE_DRIVER_LOW, (u32)a);
        wr(r, REG_QUEUE_DRIVER_HIGH, (u32)(a >> 32));
        wr(r, REG_QUEUE_DEVICE_LOW, (u32)u);
        wr(r, REG_QUEUE_DEVICE_HIGH, (u32)(u >> 32));
        wr(r, REG_QUEUE_READY, 1);
    }
    wr(r, REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    return 0;
}

/* Post a chain of `n` buffers starting at descriptor 0, notify, wait; the used length. */
static u32 transact(struct queue *vq, const u64 *addr, const u32 *len, const u16 *flags, u32 n)
{
    volatile struct queue_page *p = vq->page;
    for (u32 i = 0; i < n; i++) {
        p->desc[i].addr = addr[i];
        p->desc[i].len = len[i];
        p->desc[i].flags = (u16)(flags[i] | (i + 1 < n ? DESC_NEXT : 0));
        p->desc[i].next = (u16)(i + 1);
    }
    u16 idx = p->avail.idx;
    p->avail.ring[idx % vq->num] = 0;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    p->avail.idx = (u16)(idx + 1);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (vq->notify)
        *vq->notify = vq->index;
    else
        wr(vq->regs, REG_QUEUE_NOTIFY, vq->index);
    while (p->used.idx == vq->last_used)
        cpu_relax();
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    u32 written = p->used.ring[vq->last_used % vq->num].len;
    vq->last_used++;
    if (vq->irqs) { /* virtio-pci: the used buffer comes with its queue's MSI-X interrupt */
        u64 until = rdtsc() + irq_wait_cycles;
        while (*vq->irqs == vq->irqs_seen)
            if (rdtsc() > until)
                die("msi-x interrupt missing for queue", vq->index, vq->irqs_seen);
        vq->irqs_seen = *vq->irqs;
        return written;
    }
    u32 isr = rd(vq->regs, REG_INTERRUPT_STATUS);
    if (isr)
        wr(vq->regs, REG_INTERRUPT_ACK, isr);
    return written;
}

/* header, data (none for a flush), status byte */
static void blk_request(struct queue *vq, u32 type, u64 sector, u8 *data)
{
    blk_header.type = type;
    blk_header.reserved = 0;
    blk_header.sector = sector;
    blk_status = 0xFF;
    u64 addr[3] = {(u64)&blk_header, (u64)data, (u64)&blk_status};
    u32 len[3] = {sizeof(blk_header), 4096, 1};
    u16 flags[3] = {0, (u16)(type == BLK_IN ? DESC_WRITE : 0), DESC_WRITE};
    if (!data) { /* drop the data descriptor */
        addr[1] = addr[2];
        len[1] = len[2];
        flags[1] = flags[2];
    }
    transact(vq, addr, len, flags, data ? 3 : 2);
    if (blk_status != 0)
        die("blk status", type, blk_status);
}

static void blk_round(struct queue *vq, u64 round)
{
    u64 slot = round % BLK_SLOTS;
    u64 *w = (u64 *)blk_data;
    for (u64 i = 0; i < 512; i++)
        w[i] = (round << 32) | (slot << 16) | i;
    blk_request(vq, BLK_OUT, slot * 8, blk_data);
    blk_request(vq, BLK_IN, slot * 8, blk_check);
    const u64 *c = (const u64 *)blk_check;
    for (u64 i = 0; i < 512; i++)
        if (c[i] != w[i])
            die("blk read back differs at word", i, c[i]);
}

static void rng_round(struct queue *vq)
{
    for (u32 i = 0; i < sizeof(rng_data); i++)
        rng_data[i] = 0;
    u64 addr = (u64)rng_data;
    u32 len = sizeof(rng_data);
    u16 flags = DESC_WRITE;
    u32 got = transact(vq, &addr, &len, &flags, 1);
    u64 any = 0;
    for (u32 i = 0; i < got; i++)
        any |= rng_data[i];
    if (got == 0 || !any)
        die("rng gave nothing", got, 0);
}

static void console_round(struct queue *tx, u64 round)
{
    struct line l = {0};
    line_str(&l, "kvmig-vcon: round ");
    line_dec(&l, round);
    l.buf[l.len++] = '\n';
    for (u32 i = 0; i < l.len; i++)
        console_text[i] = l.buf[i];
    u64 addr = (u64)console_text;
    u32 len = l.len;
    u16 flags = 0;
    transact(tx, &addr, &len, &flags, 1);
}

void device_workload(u64 cpu, volatile u64 *work, u64 tsc_khz, volatile u8 *region)
{
    struct device blk = {0}, con = {0}, rng = {0};
    for (u64 i = 0; cpu == 1 && i < VIRTIO_MMIO_SLOTS; i++) { /* CPU 1 drives; others tick */
        volatile u32 *regs = (volatile u32 *)(VIRTIO_MMIO_BASE + i * 0x1000);
        if (rd(regs, REG_MAGIC) != MAGIC || rd(regs, REG_VERSION) != 2)
            continue;
        u32 id = rd(regs, REG_DEVICE_ID);
        if (id == ID_NET && net_init(regs)) /* net.c: its own queues and features */
            die("net init", i, 0);
        struct device *d = id == ID_BLK ? &blk : id == ID_CONSOLE ? &con : id == ID_RNG ? &rng : 0;
        if (d && !d->regs) {
            d->regs = regs;
            d->id = id;
        }
    }
    u32 on_pci = cpu == 1 ? pci_find_virtio(pci_found, 4) : 0;
    struct pci_virtio *net_pci = 0; /* brought up after the others: its vectors follow theirs */
    if (on_pci)
        *(volatile u32 *)(LAPIC_BASE + 0xF0) = 0x1FF; /* this CPU's LAPIC on: MSI-X vectors come here */
    for (u32 i = 0; i < on_pci; i++) { /* and on PCI */
        u32 id = pci_found[i].virtio_id;
        if (id == ID_NET && !net_pci)
            net_pci = &pci_found[i];
        struct device *d = id == ID_BLK ? &blk : id == ID_CONSOLE ? &con : id == ID_RNG ? &rng : 0;
        if (d && !d->regs) {
            d->regs = (volatile u32 *)pci_found[i].common;
            d->id = id;
            d->pci = &pci_found[i];
        }
    }
    if (tsc_khz)
        irq_wait_cycles = tsc_khz * 5000; /* 5 s */
    struct queue blkq[1] = {0}, conq[2] = {0}, rngq[1] = {0};
    u32 next_page = 0;
    if (blk.regs && device_init(&blk, blkq, 1, &next_page))
        die("blk init", cpu, 0);
    if (con.regs && device_init(&con, conq, 2, &next_page))
        die("console init", cpu, 0);
    if (rng.regs && device_init(&rng, rngq, 1, &next_page))
        die("rng init", cpu, 0);
    if (net_pci && net_init_pci(net_pci, &next_vector, 1)) /* net.c: its own queues and vectors */
        die("net init pci", net_pci->bdf, 0);
    const char *bench = boot_cmdline ? find_arg(boot_cmdline, "irq_bench") : 0;
    if (bench)
        net_irq_bench((u32)parse_u64(bench, 0), tsc_khz);
    struct line l = {0};
    line_str(&l, "kvmig: devices cpu=");
    line_dec(&l, cpu);
    line_str(&l, " blk=");
    line_hex(&l, (u64)blk.regs);
    line_str(&l, " console=");
    line_hex(&l, (u64)con.regs);
    line_str(&l, " rng=");
    line_hex(&l, (u64)rng.regs);
    console_send(&l);

    u64 t0 = rdtsc();
    for (u64 round = 1;; round++) {
        for (u64 page = 0; page < CPU_WS_BYTES / 4096; page++)
            region[page * 4096]++;
        net_poll(tsc_khz);
        if (blk.regs) {
            blk_round(blkq, round);
            if (round % 64 == 0)
                blk_request(blkq, BLK_FLUSH, 0, 0); /* the last 64 rounds on stable storage */
        }
        if (rng.regs && round % 16 == 0)
            rng_round(rngq);
        if (con.regs && round % 64 == 0)
            console_round(&conq[1], round);
        if (!blk.regs && !rng.regs && !con.regs) {
            u64 until = rdtsc() + (tsc_khz ? tsc_khz : 1000000); /* about 1 ms a round */
            while (rdtsc() < until)
                if (!net_poll(tsc_khz))
                    cpu_relax();
        }
        *work = round;
        if (round % 256 == 0) {
            line_str(&l, "kvmig: dev cpu=");
            line_dec(&l, cpu);
            line_str(&l, " round=");
            line_dec(&l, round);
            line_str(&l, " ms=");
            line_dec(&l, tsc_khz ? (rdtsc() - t0) / tsc_khz : 0);
            console_send(&l);
        }
    }
}
