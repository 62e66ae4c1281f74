/* The built-in guest's fixed guest-physical layout: hv/builtin_guest.py reads the same numbers. */
#ifndef KVMIG_LAYOUT_H
#define KVMIG_LAYOUT_H

#define LOAD_ADDR      0x00100000 /* the image (text, data, page tables, stacks) */
#define STATUS_ADDR    0x00F00000 /* one page the workload keeps current (see struct status) */
#define WS_ADDR        0x01000000 /* working set: W MiB from 16 MiB */
#define CPU_WS_BYTES   0x00100000 /* then 1 MiB per secondary CPU, which it dirties too */

#define STATUS_MAGIC   0x3154535347494D4BULL /* "KMIGSST1" */

#define COM1           0x3F8
#define DEBUG_EXIT     0xF4 /* QEMU's isa-debug-exit port; hv stops the VM on a write */

/* selectors */
#define KERNEL_CS      0x08
#define KERNEL_DS      0x10
#define USER_DS        0x1B
#define USER_CS        0x23
#define KERNEL_CS32    0x28
#define TSS_SEL(cpu)   (0x30 + 16 * (cpu))
#define MAX_CPUS       4

#define TRAMPOLINE_ADDR 0x7000 /* secondary CPUs start here (SIPI vector 0x07) */
#define LAPIC_BASE     0xFEE00000
#define IOAPIC_BASE    0xFEC00000

#define COM1_IRQ       4
#define COM1_VECTOR    0x24 /* the IDT vector the IOAPIC sends COM1's interrupts to */
#define IDT_VECTORS    64
#define UART_RX_ADDR   (STATUS_ADDR + 0x800) /* struct uart_rx: what the COM1 interrupt received */

/* IOAPIC pins nothing in the machine uses, which the host raises itself (irqfd, KVM_IRQ_LINE):
 * each interrupt the guest takes on them is counted per vector, where the host reads it. */
#define HOST_EDGE_IRQ     22   /* edge-triggered, active high */
#define HOST_LEVEL_IRQ    23   /* level-triggered, active high: KVM lowers it at the EOI */
#define HOST_EDGE_VECTOR  0x30 /* above virtio-pci's MSI-X vectors (pci.h) */
#define HOST_LEVEL_VECTOR 0x31
#define IRQ_COUNTS_ADDR   (STATUS_ADDR + 0xC00) /* u64 per IDT vector (to 0xE00): interrupts counted, MSI-X's too */
#define IRQ_TSC_ADDR      (STATUS_ADDR + 0xE00) /* u64 per MSI vector (pci.h): the TSC as its handler began, last time */

#endif
