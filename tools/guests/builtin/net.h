/* A polling ring-3 virtio-net driver (virtio-mmio v2): answers ARP for its address and echoes
 * UDP on its port, each answer stamped with the workload's pass counter. */
#ifndef KVMIG_NET_H
#define KVMIG_NET_H

#include "lib.h"

#define NET_DEFAULT_PORT 7777

extern const char *boot_cmdline; /* the Multiboot command line (workload.c): net_ip=, net_port= */

/* Take the virtio-net device at `regs` (reset, negotiate, queues, receive buffers); 0 on success. */
int net_init(volatile u32 *regs);
/* Answer what arrived since the last call; returns the frames handled. Cheap when idle: it reads
 * the used rings in memory, and the device's configuration (an exit) only every ~10 ms. */
u32 net_poll(u64 tsc_khz);

#endif
