/* Ring-0 part: finish the descriptor tables, and report exceptions. Kept tiny: it may be emulated. */
#include "layout.h"
#include "pci.h"
#include "lib.h"

extern u64 gdt[];
extern u8 idt[];
extern u64 exception_stubs[32];
extern u8 irq_com1[], idle_forever[];
extern u8 irq_host_edge[], irq_host_level[];
extern u64 msi_stubs[MSI_VECTORS];
extern u8 boot_stack_top[];

/* 64-bit TSS followed by an all-zero I/O permission bitmap (every port allowed in ring 3) and the
 * terminating 0xff byte the architecture requires. */
struct tss {
    u32 reserved0;
    u64 rsp[3];
    u64 reserved1;
    u64 ist[7];
    u64 reserved2;
    u16 reserved3;
    u16 iomap_base;
    u8 iomap[8192];
    u8 iomap_end;
} __attribute__((packed, aligned(16)));

#define TSS_INIT {.iomap_base = __builtin_offsetof(struct tss, iomap), .iomap_end = 0xFF}
static struct tss tss[MAX_CPUS] = {TSS_INIT, TSS_INIT, TSS_INIT, TSS_INIT};

extern u8 ap_kernel_stacks[];
extern u8 trampoline_start[], trampoline_end[];
extern u32 mb_info;

struct descriptor_pointer {
    u16 limit;
    u64 base;
} __attribute__((packed));

static u32 cpus_wanted(void)
{
    const u32 *mbi = (const u32 *)(u64)mb_info;
    if (!(mbi[0] & (1u << 2)))
        return 1;
    const char *v = find_arg((const char *)(u64)mbi[4], "cpus");
    u64 n = v ? parse_u64(v, 0) : 1;
    return n < 1 ? 1 : n > MAX_CPUS ? MAX_CPUS : (u32)n;
}

/* INIT, then SIPI: each secondary CPU starts in real mode at TRAMPOLINE_ADDR. */
static void start_secondary_cpus(u32 cpus)
{
    volatile u32 *lapic = (volatile u32 *)LAPIC_BASE;
    for (u8 *src = trampoline_start, *dst = (u8 *)TRAMPOLINE_ADDR; src < trampoline_end;)
        *dst++ = *src++;
    for (u32 cpu = 1; cpu < cpus; cpu++) {
        lapic[0x310 / 4] = cpu << 24;
        lapic[0x300 / 4] = 0x4500; /* INIT, level assert */
        lapic[0x310 / 4] = cpu << 24;
        lapic[0x300 / 4] = 0x4600 | (TRAMPOLINE_ADDR >> 12); /* STARTUP */
    }
}

static void set_gate(int vector, u64 handler)
{
    u64 *gate = (u64 *)(idt + 16 * vector);
    gate[0] = (handler & 0xFFFF) | ((u64)KERNEL_CS << 16) | (0x8EULL << 40) | ((handler >> 16) << 48);
    gate[1] = handler >> 32;
}

/* The 8259s masked (a BIOS may have left them ticking), this CPU's LAPIC on, COM1's IOAPIC pin
 * sent to COM1_VECTOR on CPU 0: edge-triggered, active high, as ISA interrupts are. */
static void setup_interrupts(void)
{
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
    volatile u32 *lapic = (volatile u32 *)LAPIC_BASE;
    lapic[0xF0 / 4] = 0x1FF; /* spurious vector register: APIC software-enabled */
    volatile u32 *ioapic = (volatile u32 *)IOAPIC_BASE;
    ioapic[0] = 0x10 + 2 * COM1_IRQ + 1; /* redirection entry, high half: destination APIC 0 */
    ioapic[4] = 0;
    ioapic[0] = 0x10 + 2 * COM1_IRQ; /* low half: vector, fixed delivery, unmasked */
    ioapic[4] = COM1_VECTOR;
}

static void route_pin(int pin, u32 low)
{
    volatile u32 *ioapic = (volatile u32 *)IOAPIC_BASE;
    ioapic[0] = 0x10 + 2 * pin + 1; /* destination APIC 0 */
    ioapic[4] = 0;
    ioapic[0] = 0x10 + 2 * pin;
    ioapic[4] = low;
}

/* An interrupt on one of the host's pins: counted where the host reads it (IRQ_COUNTS_ADDR). */
void count_interrupt(u64 vector)
{
    ((volatile u64 *)IRQ_COUNTS_ADDR)[vector]++;
    *(volatile u32 *)(LAPIC_BASE + 0xB0) = 0; /* EOI: KVM lowers a level line here (resample) */
}

struct uart_rx {
    u64 irqs, head;
    u8 buf[256];
};

/* Ring 0, interrupts off: take every byte the UART holds into the ring the workload reads. */
void serial_interrupt(void)
{
    volatile struct uart_rx *rx = (volatile struct uart_rx *)UART_RX_ADDR;
    rx->irqs++;
    (void)inb(COM1 + 2); /* IIR: what was pending */
    while (inb(COM1 + 5) & 1) {
        rx->buf[rx->head % sizeof(rx->buf)] = inb(COM1);
        rx->head++;
    }
    *(volatile u32 *)(LAPIC_BASE + 0xB0) = 0; /* EOI */
}

void kernel_setup(void)
{
    for (int cpu = 0; cpu < MAX_CPUS; cpu++) {
        /* exceptions from ring 3 land on the CPU's ring-0 stack */
        tss[cpu].rsp[0] = cpu == 0 ? (u64)boot_stack_top : (u64)ap_kernel_stacks + 16384ULL * (cpu + 1);
        u64 base = (u64)&tss[cpu], limit = sizeof(tss[cpu]) - 1;
        gdt[TSS_SEL(cpu) / 8] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ULL << 40) |
                                (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
        gdt[TSS_SEL(cpu) / 8 + 1] = base >> 32;
    }
    for (int v = 0; v < 32; v++)
        set_gate(v, exception_stubs[v]);
    set_gate(COM1_VECTOR, (u64)irq_com1);
    for (int v = 0; v < MSI_VECTORS; v++) /* virtio-pci's MSI-X vectors (pci_irq.S) */
        set_gate(MSI_FIRST_VECTOR + v, msi_stubs[v]);
    setup_interrupts();
    set_gate(HOST_EDGE_VECTOR, (u64)irq_host_edge);
    set_gate(HOST_LEVEL_VECTOR, (u64)irq_host_level);
    route_pin(HOST_EDGE_IRQ, HOST_EDGE_VECTOR);
    route_pin(HOST_LEVEL_IRQ, HOST_LEVEL_VECTOR | 1 << 15); /* bit 15: level-triggered */
    u32 cpus = cpus_wanted();
    if (cpus > 1)
        start_secondary_cpus(cpus);
}

/* Per CPU: the shared IDT and the CPU's own TSS (ring-0 stack, I/O bitmap). */
void enter_cpu(u64 cpu)
{
    struct descriptor_pointer idtr = {IDT_VECTORS * 16 - 1, (u64)idt};
    __asm__ volatile("lidt %0" ::"m"(idtr));
    __asm__ volatile("ltr %w0" ::"r"((u16)TSS_SEL(cpu)));
}

struct exception_frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

void exception(struct exception_frame *f)
{
    /* ring 3 executing `hlt` (a #GP there) is how the workload asks to idle */
    if (f->vector == 13 && (f->cs & 3) == 3 && *(const u8 *)f->rip == 0xF4)
        ((void (*)(void))idle_forever)();
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    struct line l = {0};
    line_str(&l, "kvmig: fault vector=");
    line_dec(&l, f->vector);
    line_str(&l, " error=");
    line_hex(&l, f->error);
    line_str(&l, " rip=");
    line_hex(&l, f->rip);
    line_str(&l, " cs=");
    line_hex(&l, f->cs);
    line_str(&l, " cr2=");
    line_hex(&l, cr2);
    line_send(&l);
    debug_exit(3);
}
