/* Ring-0 part: finish the descriptor tables, and report exceptions. Kept tiny: it may be emulated. */
#include "layout.h"
#include "lib.h"

extern u64 gdt[];
extern u8 idt[];
extern u64 exception_stubs[32];
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

static struct tss tss = {
    .rsp = {(u64)0},
    .iomap_base = __builtin_offsetof(struct tss, iomap),
    .iomap_end = 0xFF,
};

void kernel_setup(void)
{
    tss.rsp[0] = (u64)boot_stack_top; /* exceptions from ring 3 land on the boot stack */
    u64 base = (u64)&tss, limit = sizeof(tss) - 1;
    gdt[TSS_SEL / 8] = (limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | (0x89ULL << 40) |
                       (((limit >> 16) & 0xF) << 48) | (((base >> 24) & 0xFF) << 56);
    gdt[TSS_SEL / 8 + 1] = base >> 32;
    for (int v = 0; v < 32; v++) {
        u64 h = exception_stubs[v];
        u64 *gate = (u64 *)(idt + 16 * v);
        gate[0] = (h & 0xFFFF) | ((u64)KERNEL_CS << 16) | (0x8EULL << 40) | ((h >> 16) << 48);
        gate[1] = h >> 32;
    }
}

struct exception_frame {
    u64 vector, error, rip, cs, rflags, rsp, ss;
};

void exception(struct exception_frame *f)
{
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
