/* PCI for the built-in guest: bus 0 enumerated through ports 0xCF8/0xCFC (ring 3: the TSS I/O
 * bitmap grants them), BARs sized and mapped (the 4 GiB identity map covers them), capability
 * lists walked, virtio-pci (modern) devices found and brought up with MSI-X, one vector per queue.
 * The vectors' ring-0 handlers (pci_irq.S) count each interrupt in the status page and EOI. */
#ifndef KVMIG_PCI_H
#define KVMIG_PCI_H

#include "layout.h"

#define MSI_FIRST_VECTOR 0x28 /* IDT vectors 0x28-0x2F (inside IDT_VECTORS) */
#define MSI_VECTORS      8
#define MSI_COUNTS_ADDR  (IRQ_COUNTS_ADDR + 8 * MSI_FIRST_VECTOR) /* the per-vector counts, from the first MSI-X vector */
#define MSI_TSC_ADDR     IRQ_TSC_ADDR /* per vector from the first: the TSC its handler last began at */

#ifndef __ASSEMBLER__
#include "lib.h"

struct pci_virtio {
    u32 bdf;            /* bus << 8 | device << 3 | function */
    u32 virtio_id;      /* PCI device id - 0x1040 */
    volatile u8 *common, *isr, *config, *notify;
    u32 notify_multiplier;
    volatile u32 *msix_table;
    u32 msix_vectors;
    u32 bar_sizes[6];
};

/* Every modern virtio-pci function of bus 0 (at most `max`), decoding and bus mastering on;
 * the number found. */
u32 pci_find_virtio(struct pci_virtio *found, u32 max);

/* MSI-X entry `entry` -> IDT vector `vector` on CPU `apic_id`, unmasked; MSI-X enabled. */
void pci_msix_route(struct pci_virtio *d, u32 entry, u32 vector, u32 apic_id);

#endif
#endif
