/* A ring-3 virtio-net driver (virtio-mmio v2, polled; or virtio-pci modern, driven by MSI-X):
 * answers ARP for its address and echoes UDP on its port, each answer stamped with the
 * workload's pass counter. */
#ifndef KVMIG_NET_H
#define KVMIG_NET_H

#include "lib.h"

#define NET_DEFAULT_PORT 7777

extern const char *boot_cmdline; /* the Multiboot command line (workload.c): net_ip=, net_port= */

/* Take the virtio-net device at `regs` (reset, negotiate, queues, receive buffers); 0 on success. */
int net_init(volatile u32 *regs);
struct pci_virtio;
/* The same on virtio-pci: MSI-X entries 0 (configuration), 1 (rx), 2 (tx) on the next three of
 * the guest's MSI vectors (*next_vector), delivered to CPU `apic_id`, whose LAPIC is on. */
int net_init_pci(struct pci_virtio *dev, u32 *next_vector, u32 apic_id);
/* `irq_bench=N` on the command line: N tx frames, each timed from its notification to tx's MSI-X
 * handler; prints `kvmig: irqlat n=.. p50_ns=.. p99_ns=.. min_ns=.. max_ns=..` (virtio-pci only). */
void net_irq_bench(u32 rounds, u64 tsc_khz);
/* Answer what arrived since the last call; returns the frames handled. Cheap when idle: it reads
 * the used rings in memory, and the device's configuration (an exit) only every ~10 ms. */
u32 net_poll(u64 tsc_khz);

#endif
