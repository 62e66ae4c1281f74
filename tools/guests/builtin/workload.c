/*
 * The ring-3 workload: touch a working set of W MiB at WS_ADDR, then loop forever incrementing the
 * first byte of each page in order, at R MiB/s (0 = as fast as it can), reporting on COM1.
 *
 * Consistency rule (what hv/builtin_guest.py checks): with p = status->passes, at any instant the
 * counter bytes are (p+1) mod 256 on pages [0, k) and p mod 256 on pages [k, N) for one k in [0, N].
 * With fill=random the other bytes of page i are words 1..511 of xorshift64 seeded (i+1)*GOLDEN and
 * never change, so a whole working set can be checked bit for bit.
 */
#include "layout.h"
#include "lib.h"
#include "virtio.h"
#include "net.h"

#define PAGE 4096ULL
#define CHUNK_PAGES 16ULL /* rate pacing granularity: 64 KiB */
#define GOLDEN 0x9E3779B97F4A7C15ULL

struct multiboot_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

struct status {
    u64 magic;
    u64 passes;        /* completed passes */
    u64 ws_pages;
    u64 position;      /* page the incrementer works on (updated every CHUNK_PAGES) */
    u64 tsc_ready;     /* TSC when the working set was touched */
    u64 tsc_last_pass; /* TSC at the end of the latest pass */
    u64 rate_mib_s;
    u64 fill_random;
    u64 cpus_up;            /* CPUs running their ring-3 code */
    u64 cpu_work[MAX_CPUS]; /* per secondary CPU: units of work done (device rounds or ticks) */
};

struct params {
    u64 ws_mib, rate, every, passes, tsc_khz, fill_random, reset_after, cpus, idle;
};

static volatile u32 console_lock;

/* COM1 is shared by every CPU: one whole line at a time. */
void console_send(struct line *l)
{
    while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE))
        cpu_relax();
    line_send(l);
    __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
}

static u64 arg(const char *cmdline, const char *key, u64 dflt)
{
    const char *v = find_arg(cmdline, key);
    return v && *v >= '0' && *v <= '9' ? parse_u64(v, 0) : dflt;
}

static void fail(const char *why)
{
    struct line l = {0};
    line_str(&l, "kvmig: error ");
    line_str(&l, why);
    console_send(&l);
    debug_exit(2);
}

struct uart_rx {
    u64 irqs, head;
    u8 buf[256];
};

/* Lines typed on COM1 arrive through its interrupt (kernel.c); print each one back. */
static void uart_poll(u64 *tail, struct line *typed)
{
    volatile struct uart_rx *rx = (volatile struct uart_rx *)UART_RX_ADDR;
    while (*tail != rx->head) {
        u8 c = rx->buf[*tail % sizeof(rx->buf)];
        (*tail)++;
        if (c != '\n' && c != '\r' && typed->len < 100) {
            typed->buf[typed->len++] = (char)c;
            continue;
        }
        if (c == '\r' || !typed->len)
            continue;
        struct line l = {0};
        line_str(&l, "kvmig: uart-rx irqs=");
        line_dec(&l, rx->irqs);
        line_str(&l, " text=");
        for (u32 i = 0; i < typed->len; i++)
            l.buf[l.len++] = typed->buf[i];
        console_send(&l);
        typed->len = 0;
    }
}

static u64 ms_since(u64 tsc0, const struct params *p)
{
    return p->tsc_khz ? (rdtsc() - tsc0) / p->tsc_khz : 0;
}

static void fill_page(u64 *page, u64 index)
{
    u64 s = (index + 1) * GOLDEN;
    page[0] = 0;
    for (int w = 1; w < 512; w++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        page[w] = s;
    }
}

static struct params boot_params;
static volatile u32 params_ready;

/* A secondary CPU's ring-3 life: the device drivers' workload if there are devices, else ticks. */
void ap_main(u64 cpu) __attribute__((noreturn));
void ap_main(u64 cpu)
{
    volatile struct status *st = (volatile struct status *)STATUS_ADDR;
    while (!__atomic_load_n(&params_ready, __ATOMIC_ACQUIRE))
        cpu_relax();
    __atomic_fetch_add(&st->cpus_up, 1, __ATOMIC_RELAXED);
    struct line l = {0};
    line_str(&l, "kvmig: cpu ");
    line_dec(&l, cpu);
    line_str(&l, " up");
    console_send(&l);
    u64 region = WS_ADDR + boot_params.ws_mib * 1024 * 1024 + (cpu - 1) * CPU_WS_BYTES;
    device_workload(cpu, &st->cpu_work[cpu], boot_params.tsc_khz, (volatile u8 *)region);
}

void user_main(u32 mbi_addr) __attribute__((noreturn));
void user_main(u32 mbi_addr)
{
    const struct multiboot_info *mbi = (const struct multiboot_info *)(u64)mbi_addr;
    const char *cmdline = (mbi->flags & (1u << 2)) ? (const char *)(u64)mbi->cmdline : "";
    const char *fill = find_arg(cmdline, "fill");
    struct params p = {
        .ws_mib = arg(cmdline, "ws", 64),
        .rate = arg(cmdline, "rate", 0),
        .every = arg(cmdline, "every", 1),
        .passes = arg(cmdline, "passes", 0),
        .tsc_khz = arg(cmdline, "tsc_khz", 0),
        .fill_random = !(fill && fill[0] == 'z'),
        .reset_after = arg(cmdline, "reset", 0),
        .cpus = arg(cmdline, "cpus", 1),
        .idle = arg(cmdline, "idle", 0),
    };
    u64 mem_mib = (mbi->flags & 1u) ? (mbi->mem_upper / 1024 + 1) : 0;
    struct line l = {0};
    line_str(&l, "kvmig: boot ws_mib=");
    line_dec(&l, p.ws_mib);
    line_str(&l, " rate=");
    line_dec(&l, p.rate);
    line_str(&l, " every=");
    line_dec(&l, p.every);
    line_str(&l, " passes=");
    line_dec(&l, p.passes);
    line_str(&l, " tsc_khz=");
    line_dec(&l, p.tsc_khz);
    line_str(&l, " mem_mib=");
    line_dec(&l, mem_mib);
    console_send(&l);

    if (!p.every)
        p.every = 1;
    if (p.cpus < 1)
        p.cpus = 1;
    if (mem_mib && WS_ADDR / (1024 * 1024) + p.ws_mib + (p.cpus - 1) > mem_mib)
        fail("working set does not fit in memory");
    if (WS_ADDR + p.ws_mib * 1024 * 1024 > 0xC0000000ULL)
        fail("working set reaches the MMIO hole");
    if (p.rate && !p.tsc_khz)
        fail("rate needs tsc_khz");

    volatile struct status *st = (volatile struct status *)STATUS_ADDR;
    boot_params = p;
    boot_cmdline = cmdline; /* net.c reads its address and port there */
    __atomic_store_n(&params_ready, 1, __ATOMIC_RELEASE);
    u64 pages = p.ws_mib * 256;
    __atomic_fetch_add(&st->cpus_up, 1, __ATOMIC_RELAXED);
    st->magic = 0;
    st->passes = 0;
    st->ws_pages = pages;
    st->position = 0;
    st->rate_mib_s = p.rate;
    st->fill_random = p.fill_random;

    u64 t0 = rdtsc();
    for (u64 i = 0; i < pages; i++) {
        u64 *page = (u64 *)(WS_ADDR + i * PAGE);
        if (p.fill_random)
            fill_page(page, i);
        else
            *(volatile u8 *)page = 0;
    }
    st->tsc_ready = rdtsc();
    st->magic = STATUS_MAGIC;
    line_str(&l, "kvmig: ready pages=");
    line_dec(&l, pages);
    line_str(&l, " touch_ms=");
    line_dec(&l, ms_since(t0, &p));
    console_send(&l);

    if (p.idle) /* ready, and nothing to do: `hlt` faults in ring 3, and ring 0 halts for us */
        __asm__ volatile("hlt");
    outb(COM1 + 4, 0x0B); /* MCR: DTR, RTS, OUT2 (the PC's gate for the UART's interrupt) */
    outb(COM1 + 1, 0x01); /* IER: interrupt on received data */
    u64 uart_tail = 0;
    struct line typed = {0};
    volatile struct uart_rx *rx = (volatile struct uart_rx *)UART_RX_ADDR;

    volatile u8 *ws = (volatile u8 *)WS_ADDR;
    u64 tsc_start = rdtsc(), paced = 0;
    /* TSC ticks per CHUNK_PAGES at the requested rate */
    u64 chunk_ticks = p.rate ? p.tsc_khz * 1000ULL * CHUNK_PAGES / (p.rate * 256) : 0;
    for (u64 pass = 1;; pass++) {
        for (u64 i = 0; i < pages; i += CHUNK_PAGES) {
            u64 end = i + CHUNK_PAGES < pages ? i + CHUNK_PAGES : pages;
            st->position = i;
            for (u64 j = i; j < end; j++)
                ws[j * PAGE]++;
            if (rx->head != uart_tail)
                uart_poll(&uart_tail, &typed);
            if (chunk_ticks) {
                paced += chunk_ticks;
                while (rdtsc() - tsc_start < paced)
                    cpu_relax();
            }
        }
        st->position = pages;
        st->tsc_last_pass = rdtsc();
        st->passes = pass;
        if (pass % p.every == 0) {
            line_str(&l, "kvmig: pass ");
            line_dec(&l, pass);
            line_str(&l, " ms=");
            line_dec(&l, ms_since(tsc_start, &p));
            console_send(&l);
        }
        if (p.reset_after && pass >= p.reset_after) {
            line_str(&l, "kvmig: reset passes=");
            line_dec(&l, pass);
            console_send(&l);
            outb(0x64, 0xFE); /* i8042: pulse the CPU reset line */
            for (;;)
                cpu_relax();
        }
        if (p.passes && pass >= p.passes) {
            line_str(&l, "kvmig: done passes=");
            line_dec(&l, pass);
            console_send(&l);
            debug_exit(0);
        }
    }
}
