/*
 * Ring-3 PCI enumeration and virtio-pci discovery (virtio 1.x, 4.1): configuration mechanism #1,
 * BAR sizing (all ones written, the size read back, the address put back), the capability list
 * (virtio's vendor-specific structures and MSI-X), then memory decoding and bus mastering on.
 * The BARs keep the addresses firmware gave them (hv's placement, SeaBIOS's under QEMU).
 */
#include "pci.h"

#define CFG_ADDRESS 0xCF8
#define CFG_DATA    0xCFC

static inline u32 inl(u16 port)
{
    u32 v;
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

static u32 cfg_read(u32 bdf, u32 reg)
{
    outl(CFG_ADDRESS, 0x80000000u | bdf << 8 | (reg & 0xFC));
    return inl(CFG_DATA);
}

static void cfg_write(u32 bdf, u32 reg, u32 value)
{
    outl(CFG_ADDRESS, 0x80000000u | bdf << 8 | (reg & 0xFC));
    outl(CFG_DATA, value);
}

static u8 cfg_byte(u32 bdf, u32 reg) { return (u8)(cfg_read(bdf, reg) >> (8 * (reg & 3))); }

/* BAR i's address (64-bit BARs: both halves) and, by sizing, its size. */
static u64 bar_probe(u32 bdf, u32 i, u32 *size)
{
    u32 reg = 0x10 + 4 * i, low = cfg_read(bdf, reg);
    cfg_write(bdf, reg, 0xFFFFFFFFu);
    u32 mask = cfg_read(bdf, reg);
    cfg_write(bdf, reg, low);
    if (low & 1) {
        *size = ~(mask & ~3u) + 1;
        return low & ~3u;
    }
    *size = ~(mask & ~15u) + 1;
    u64 address = low & ~15u;
    if ((low & 6) == 4)
        address |= (u64)cfg_read(bdf, reg + 4) << 32;
    return address;
}

u32 pci_find_virtio(struct pci_virtio *found, u32 max)
{
    u32 n = 0;
    for (u32 dev = 0; dev < 32 && n < max; dev++) {
        u32 bdf = dev << 3, id = cfg_read(bdf, 0);
        if ((id & 0xFFFF) != 0x1AF4 || (id >> 16) < 0x1040 || (id >> 16) > 0x107F)
            continue; /* not a modern virtio device */
        struct pci_virtio *d = &found[n];
        d->bdf = bdf;
        d->virtio_id = (id >> 16) - 0x1040;
        u64 bars[6] = {0};
        for (u32 i = 0; i < 6; i++) {
            bars[i] = bar_probe(bdf, i, &d->bar_sizes[i]);
            if ((cfg_read(bdf, 0x10 + 4 * i) & 7) == 4)
                i++; /* the upper half of a 64-bit BAR */
        }
        if (!(cfg_read(bdf, 0x04) >> 16 & 0x10))
            continue; /* no capability list */
        for (u32 at = cfg_byte(bdf, 0x34) & 0xFC; at; at = cfg_byte(bdf, at + 1) & 0xFC) {
            u8 cap = cfg_byte(bdf, at);
            if (cap == 0x11) { /* MSI-X */
                u32 table = cfg_read(bdf, at + 4);
                d->msix_table = (volatile u32 *)(bars[table & 7] + (table & ~7u));
                d->msix_vectors = (cfg_read(bdf, at) >> 16 & 0x7FF) + 1;
            } else if (cap == 0x09) { /* virtio: cfg_type, bar, offset */
                u8 type = cfg_byte(bdf, at + 3), bar = cfg_byte(bdf, at + 4);
                volatile u8 *where = (volatile u8 *)(bars[bar % 6] + cfg_read(bdf, at + 8));
                if (type == 1 && !d->common)
                    d->common = where;
                else if (type == 2 && !d->notify) {
                    d->notify = where;
                    d->notify_multiplier = cfg_read(bdf, at + 16);
                } else if (type == 3 && !d->isr)
                    d->isr = where;
                else if (type == 4 && !d->config)
                    d->config = where;
            }
        }
        if (!d->common || !d->notify || !d->isr || !d->msix_table)
            continue;
        cfg_write(bdf, 0x04, (cfg_read(bdf, 0x04) & 0xFFFF) | 0x6); /* memory space, bus master */
        n++;
    }
    return n;
}

void pci_msix_route(struct pci_virtio *d, u32 entry, u32 vector, u32 apic_id)
{
    volatile u32 *e = d->msix_table + 4 * entry;
    e[0] = 0xFEE00000u | apic_id << 12; /* physical destination */
    e[1] = 0;
    e[2] = vector; /* fixed delivery, edge */
    e[3] = 0;      /* unmasked */
    for (u32 at = cfg_byte(d->bdf, 0x34) & 0xFC; at; at = cfg_byte(d->bdf, at + 1) & 0xFC)
        if (cfg_byte(d->bdf, at) == 0x11)
            cfg_write(d->bdf, at, (cfg_read(d->bdf, at) & 0x3FFFFFFFu) | 0x80000000u); /* enable, no function mask */
}
