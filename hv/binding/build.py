"""cffi API-mode build of the KVM binding (the only place that talks C).

The declarations below are checked by the C compiler against the machine's ``<linux/kvm.h>`` when the
package is installed: fully declared structs have their size and every field offset verified, partial
ones (``...;``) take their layout from the header, and ``#define X ...`` constants take the header's
value. Nothing about the kernel ABI is hand-copied as numbers.

A few tiny C helpers live here too, because they are on hot paths or must run outside Python:
the vCPU kick signal handler, and dirty-bitmap scans; and in uart.c and vcpu_loop.c, the guest's
console (a 16550 and the KVM_RUN loop that serves its port exits) without the interpreter lock; and
in userfault.c, the userfaultfd fault path (hv/kvm/userfault.py), which must not need it either,
and its write-protect counterpart for live snapshots in write_protect.c (hv/kvm/write_protect.py).
Each of those declares what Python may call in its header (uart.h, vcpu_loop.h, userfault.h),
which this build reads for cdef, so the declarations exist once, in C, checked by the compiler.
"""

from __future__ import annotations

from pathlib import Path

import cffi

ffibuilder = cffi.FFI()

_IOCTLS = """
KVM_GET_API_VERSION KVM_CREATE_VM KVM_GET_MSR_INDEX_LIST KVM_GET_MSR_FEATURE_INDEX_LIST
KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE KVM_GET_SUPPORTED_CPUID
KVM_CREATE_VCPU KVM_GET_DIRTY_LOG KVM_CLEAR_DIRTY_LOG KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR
KVM_SET_IDENTITY_MAP_ADDR KVM_CREATE_IRQCHIP KVM_IRQ_LINE KVM_IRQ_LINE_STATUS KVM_GET_IRQCHIP
KVM_SET_IRQCHIP KVM_CREATE_PIT2 KVM_GET_PIT2 KVM_SET_PIT2 KVM_IRQFD KVM_IOEVENTFD KVM_SET_CLOCK
KVM_GET_CLOCK KVM_ENABLE_CAP KVM_SET_BOOT_CPU_ID KVM_SIGNAL_MSI KVM_SET_GSI_ROUTING
KVM_RUN KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_MSRS KVM_SET_MSRS KVM_SET_CPUID2 KVM_GET_CPUID2 KVM_GET_LAPIC KVM_SET_LAPIC KVM_GET_MP_STATE
KVM_SET_MP_STATE KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_GET_XSAVE KVM_GET_XSAVE2 KVM_SET_XSAVE KVM_GET_XCRS KVM_SET_XCRS KVM_GET_TSC_KHZ KVM_SET_TSC_KHZ
KVM_INTERRUPT KVM_NMI KVM_TRANSLATE KVM_KVMCLOCK_CTRL
""".split()

_CONSTANTS = """
KVM_API_VERSION
KVM_CAP_IRQCHIP KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR KVM_CAP_EXT_CPUID KVM_CAP_NR_VCPUS
KVM_CAP_NR_MEMSLOTS KVM_CAP_MP_STATE KVM_CAP_IRQFD KVM_CAP_PIT2 KVM_CAP_IOEVENTFD KVM_CAP_ADJUST_CLOCK
KVM_CAP_VCPU_EVENTS KVM_CAP_DEBUGREGS KVM_CAP_XSAVE KVM_CAP_XCRS KVM_CAP_TSC_CONTROL KVM_CAP_GET_TSC_KHZ
KVM_CAP_MAX_VCPUS KVM_CAP_MAX_VCPU_ID KVM_CAP_READONLY_MEM KVM_CAP_IMMEDIATE_EXIT
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 KVM_CAP_DIRTY_LOG_RING KVM_CAP_XSAVE2 KVM_CAP_SET_IDENTITY_MAP_ADDR
KVM_CAP_KVMCLOCK_CTRL KVM_CAP_SYNC_REGS KVM_CAP_SPLIT_IRQCHIP KVM_CAP_IRQ_ROUTING KVM_CAP_SIGNAL_MSI
KVM_CAP_TSC_DEADLINE_TIMER KVM_CAP_X2APIC_API
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE KVM_DIRTY_LOG_INITIALLY_SET
KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC KVM_IOAPIC_NUM_PINS
KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI
KVM_PIT_SPEAKER_DUMMY KVM_PIT_FLAGS_HPET_LEGACY
KVM_CLOCK_TSC_STABLE
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG KVM_EXIT_HLT
KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR
KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT
KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX KVM_INTERNAL_ERROR_DELIVERY_EV
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED KVM_MP_STATE_HALTED
KVM_MP_STATE_SIPI_RECEIVED
KVM_VCPUEVENT_VALID_NMI_PENDING KVM_VCPUEVENT_VALID_SIPI_VECTOR KVM_VCPUEVENT_VALID_SHADOW
KVM_VCPUEVENT_VALID_SMM KVM_VCPUEVENT_VALID_PAYLOAD KVM_VCPUEVENT_VALID_TRIPLE_FAULT
KVM_CPUID_FLAG_SIGNIFCANT_INDEX KVM_MAX_XCRS KVM_APIC_REG_SIZE
KVM_NR_INTERRUPTS
""".split()

# Kernel numbers the layers above use that are not KVM ioctls or capabilities: from <linux/kvm.h>,
# <linux/userfaultfd.h>, <sys/mman.h> (or <linux/mman.h>) and <asm/kvm_para.h>.
_OTHER_KERNEL_CONSTANTS = """
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES UFFD_PAGEFAULT_FLAG_WRITE MADV_POPULATE_WRITE
MSR_KVM_WALL_CLOCK MSR_KVM_SYSTEM_TIME MSR_KVM_WALL_CLOCK_NEW MSR_KVM_SYSTEM_TIME_NEW
""".split()

_CDEF_STRUCTS = """
/* The kernel's own integer types, so the compiler compares like with like. */
typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;
typedef long long __s64;

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

/* dirty_bitmap sits in an anonymous union with padding: let the header place it. */
struct kvm_dirty_log { __u32 slot; void *dirty_bitmap; ...; };
struct kvm_clear_dirty_log { __u32 slot; __u32 num_pages; __u64 first_page;
                             void *dirty_bitmap; ...; };

struct kvm_irq_level { __u32 irq; __u32 level; ...; };
struct kvm_irqfd { __u32 fd; __u32 gsi; __u32 flags; __u32 resamplefd; ...; };
struct kvm_ioeventfd { __u64 datamatch; __u64 addr; __u32 len; __s32 fd; __u32 flags;
                       ...; };
struct kvm_clock_data { __u64 clock; __u32 flags; __u64 realtime; __u64 host_tsc; ...; };
struct kvm_enable_cap { __u32 cap; __u32 flags; __u64 args[4]; ...; };
struct kvm_pit_config { __u32 flags; ...; };
struct kvm_interrupt { __u32 irq; };
/* GSI routing: the entry's payload is a union named u; only the members used are declared. */
struct kvm_irq_routing_irqchip { __u32 irqchip; __u32 pin; };
struct kvm_irq_routing_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 devid; };
struct kvm_irq_routing_entry { __u32 gsi; __u32 type; __u32 flags; __u32 pad;
                               union { struct kvm_irq_routing_irqchip irqchip;
                                       struct kvm_irq_routing_msi msi; __u32 pad[8]; } u; ...; };
struct kvm_irq_routing { __u32 nr; __u32 flags; struct kvm_irq_routing_entry entries[]; };
struct kvm_msi { __u32 address_lo; __u32 address_hi; __u32 data; __u32 flags; __u32 devid; ...; };
struct kvm_translation {
    __u64 linear_address;
    __u64 physical_address;
    __u8 valid;
    __u8 writeable;
    __u8 usermode;
    ...;
};

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx;
    __u64 rsi, rdi, rsp, rbp;
    __u64 r8,  r9,  r10, r11;
    __u64 r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8  type;
    __u8  present, dpl, db, s, l, g, avl;
    __u8  unusable;
    __u8  padding;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    __u16 padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    __u64 interrupt_bitmap[4];
};

struct kvm_fpu {
    __u8  fpr[8][16];
    __u16 fcw;
    __u16 fsw;
    __u8  ftwx;
    __u8  pad1;
    __u16 last_opcode;
    __u64 last_ip;
    __u64 last_dp;
    __u8  xmm[16][16];
    __u32 mxcsr;
    __u32 pad2;
};

struct kvm_msr_entry { __u32 index; __u32 reserved; __u64 data; };
struct kvm_msrs { __u32 nmsrs; __u32 pad; struct kvm_msr_entry entries[]; };
struct kvm_msr_list { __u32 nmsrs; __u32 indices[]; };

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax;
    __u32 ebx;
    __u32 ecx;
    __u32 edx;
    __u32 padding[3];
};
struct kvm_cpuid2 { __u32 nent; __u32 padding; struct kvm_cpuid_entry2 entries[]; };

struct kvm_lapic_state { char regs[1024]; };

struct kvm_vcpu_events {
    struct { __u8 injected; __u8 nr; __u8 has_error_code; __u8 pending;
             __u32 error_code; } exception;
    struct { __u8 injected; __u8 nr; __u8 soft; __u8 shadow; } interrupt;
    struct { __u8 injected; __u8 pending; __u8 masked; __u8 pad; } nmi;
    __u32 sipi_vector;
    __u32 flags;
    struct { __u8 smm; __u8 pending; __u8 smm_inside_nmi; __u8 latched_init; } smi;
    struct { __u8 pending; } triple_fault;
    __u8 reserved[26];
    __u8 exception_has_payload;
    __u64 exception_payload;
};

struct kvm_debugregs {
    __u64 db[4];
    __u64 dr6;
    __u64 dr7;
    __u64 flags;
    __u64 reserved[9];
};

struct kvm_xsave { __u32 region[1024]; __u32 extra[]; };

struct kvm_xcr { __u32 xcr; __u32 reserved; __u64 value; };
struct kvm_xcrs {
    __u32 nr_xcrs;
    __u32 flags;
    struct kvm_xcr xcrs[16];
    __u64 padding[16];
};

struct kvm_mp_state { __u32 mp_state; };

struct kvm_pic_state {
    __u8 last_irr, irr, imr, isr, priority_add, irq_base, read_reg_select, poll, special_mask,
            init_state, auto_eoi, rotate_on_auto_eoi, special_fully_nested_mode, init4, elcr,
            elcr_mask;
};

/* The redirection table is a union of a u64 and a bitfield struct: read it as raw u64s at
   KVMIG_IOAPIC_REDIRTBL_OFFSET instead of re-declaring the bitfields. */
struct kvm_ioapic_state { __u64 base_address; __u32 ioregsel; __u32 id; __u32 irr; ...; };

/* The chip union: addressed through KVMIG_IRQCHIP_CHIP_OFFSET, sized by the header. */
struct kvm_irqchip { __u32 chip_id; ...; };

struct kvm_pit_channel_state {
    __u32 count;
    __u16 latched_count;
    __u8 count_latched;
    __u8 status_latched;
    __u8 status;
    __u8 read_state;
    __u8 write_state;
    __u8 write_latch;
    __u8 rw_mode;
    __u8 mode;
    __u8 bcd;
    __u8 gate;
    __s64 count_load_time;
};
struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    __u32 flags;
    __u32 reserved[9];
};

/* kvm_run: the exit payloads live in an anonymous union; each payload type is named through
   __typeof__ in the C source below and found at KVMIG_RUN_EXIT_OFFSET. */
struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    ...;
};
typedef struct { __u64 hardware_exit_reason; } kvmig_exit_hw;
typedef struct { __u64 hardware_entry_failure_reason; __u32 cpu; ...; } kvmig_exit_fail_entry;
typedef struct { __u32 exception; __u32 error_code; } kvmig_exit_ex;
typedef struct { __u8 direction; __u8 size; __u16 port; __u32 count;
                 __u64 data_offset; } kvmig_exit_io;
typedef struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write;
                 ...; } kvmig_exit_mmio;
typedef struct { __u32 suberror; __u32 ndata; __u64 data[16]; } kvmig_exit_internal;
typedef struct { __u32 type; __u32 ndata; ...; } kvmig_exit_system_event;
"""

_CDEF_HELPERS = """
#define MAP_NORESERVE ...
#define KVMIG_RUN_EXIT_OFFSET ...
#define KVMIG_IOAPIC_REDIRTBL_OFFSET ...
#define KVMIG_IRQCHIP_CHIP_OFFSET ...
#define KVMIG_IRQCHIP_CHIP_SIZE ...
#define KVMIG_SYSTEM_EVENT_DATA_OFFSET ...

int kvmig_ioctl_ptr(int fd, unsigned long request, void *arg);
int kvmig_ioctl_int(int fd, unsigned long request, unsigned long arg);
void *kvmig_mmap_shared(int fd, size_t length);
int kvmig_munmap(void *addr, size_t length);
int kvmig_install_kick_handler(int signo);

size_t kvmig_bitmap_runs(const uint64_t *bitmap, size_t nbits, uint64_t *starts, uint64_t *counts,
                         size_t max_runs);
void kvmig_memcopy(void *dst, const void *src, size_t n);
int kvmig_discard(void *addr, size_t n);
int kvmig_move_mapping(void *dst, void *src, size_t n);
"""

_HERE = Path(__file__).resolve().parent
# The C parts beside this file, one translation unit with the helpers below (uart.c and
# vcpu_loop.c share a static helper); each declares what Python may call in its header.
# net: virtio-net's packet engine; write_protect: live snapshots (after userfault, whose opening it shares)
_C_PARTS = ("uart", "vcpu_loop", "userfault", "write_protect", "net")


def header_declarations(header: Path) -> str:
    """The part of `header` between its `/* cffi: begin */` and `/* cffi: end */` markers: the
    declarations cffi's cdef reads (types, prototypes, integer #defines), written once, in C."""
    text = header.read_text()
    begin, end = text.index("/* cffi: begin */"), text.index("/* cffi: end */")
    return text[begin + len("/* cffi: begin */"):end]


_SOURCE = r"""
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <asm/kvm_para.h>
#if !defined(MADV_POPULATE_WRITE) || !defined(MREMAP_DONTUNMAP)
#include <linux/mman.h>  /* a C library older than the kernel's header: the kernel's own number */
#endif

typedef __typeof__(((struct kvm_run *)0)->hw) kvmig_exit_hw;
typedef __typeof__(((struct kvm_run *)0)->fail_entry) kvmig_exit_fail_entry;
typedef __typeof__(((struct kvm_run *)0)->ex) kvmig_exit_ex;
typedef __typeof__(((struct kvm_run *)0)->io) kvmig_exit_io;
typedef __typeof__(((struct kvm_run *)0)->mmio) kvmig_exit_mmio;
typedef __typeof__(((struct kvm_run *)0)->internal) kvmig_exit_internal;
typedef __typeof__(((struct kvm_run *)0)->system_event) kvmig_exit_system_event;

#define KVMIG_RUN_EXIT_OFFSET offsetof(struct kvm_run, io)
#define KVMIG_IOAPIC_REDIRTBL_OFFSET offsetof(struct kvm_ioapic_state, redirtbl)
#define KVMIG_IRQCHIP_CHIP_OFFSET offsetof(struct kvm_irqchip, chip)
#define KVMIG_IRQCHIP_CHIP_SIZE sizeof(((struct kvm_irqchip *)0)->chip)
#define KVMIG_SYSTEM_EVENT_DATA_OFFSET offsetof(kvmig_exit_system_event, data)

/* Non-variadic ioctl entry points: cffi releases the GIL around them, so a vCPU thread blocked in
   KVM_RUN does not stop the rest of the VMM. */
int kvmig_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int kvmig_ioctl_int(int fd, unsigned long request, unsigned long arg) {
    return ioctl(fd, request, arg);
}

void *kvmig_mmap_shared(int fd, size_t length) {
    void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    return p == MAP_FAILED ? NULL : p;
}
int kvmig_munmap(void *addr, size_t length) { return munmap(addr, length); }

/* The kick signal only has to interrupt KVM_RUN (which then returns EINTR); the handler does
   nothing. It is installed in C, without SA_RESTART, so it works from any thread and never
   runs Python code in signal context. */
static void kvmig_kick_handler(int signo) { (void)signo; }
int kvmig_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvmig_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;
    return sigaction(signo, &sa, NULL);
}

/* Dirty bitmap (KVM layout: bit i of the little-endian u64 array = page i) to runs of set bits.
   Zero words are skipped a word at a time, set runs are measured with ctz, so the cost follows the
   number of runs, not the number of pages. Returns the number of runs written; if it equals
   max_runs the caller must retry with more room. */
size_t kvmig_bitmap_runs(const uint64_t *bitmap, size_t nbits, uint64_t *starts, uint64_t *counts,
                         size_t max_runs) {
    size_t nwords = (nbits + 63) / 64, n = 0, w = 0;
    int in_run = 0;
    uint64_t start = 0;
    for (w = 0; w < nwords; w++) {
        uint64_t word = bitmap[w];
        if (w == nwords - 1 && (nbits & 63))
            word &= (UINT64_C(1) << (nbits & 63)) - 1;
        if (!in_run && word == 0) continue;
        if (in_run && word == UINT64_MAX) continue;
        uint64_t base = (uint64_t)w * 64;
        unsigned bit = 0;
        while (bit < 64) {
            if (!in_run) {
                uint64_t rest = word >> bit;
                if (rest == 0) break;
                bit += (unsigned)__builtin_ctzll(rest);
                start = base + bit;
                in_run = 1;
            } else {
                uint64_t rest = (~word) >> bit;
                if (rest == 0) break;
                bit += (unsigned)__builtin_ctzll(rest);
                if (n == max_runs) return n;
                starts[n] = start;
                counts[n] = base + bit - start;
                n++;
                in_run = 0;
            }
        }
    }
    if (in_run) {
        if (n == max_runs) return n;
        starts[n] = start;
        counts[n] = nbits - start;
        n++;
    }
    return n;
}

/* A copy to or from guest memory called without the interpreter lock: if the guest page is
   missing (post-copy: userfaultfd), the calling thread waits in the kernel while the page
   fetcher, which needs the lock, keeps running. */
void kvmig_memcopy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }

/* MADV_DONTNEED without the interpreter lock: freeing a large range costs the kernel about a
   microsecond a page, and several threads can free parts of one mapping at once. */
int kvmig_discard(void *addr, size_t n) { return madvise(addr, n, MADV_DONTNEED) ? -errno : 0; }

/* The pages of [src, src + n) moved to [dst, dst + n), replacing what was mapped there: page
   tables move, no byte is copied. MREMAP_DONTUNMAP (Linux 5.7; any private mapping, a file's
   too, since 5.13) leaves src mapped and empty, so whoever owns that range still owns a mapping
   (Python's mmap objects unmap their own range when closed). A VM's memory slot over dst keeps
   its address: KVM follows the new pages through its MMU notifier. */
int kvmig_move_mapping(void *dst, void *src, size_t n) {
    void *p = mremap(src, n, n, MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP, dst);
    return p == MAP_FAILED ? -errno : 0;
}
"""

ffibuilder.cdef(
    "\n".join(f"#define {name} ..." for name in _IOCTLS + _CONSTANTS + _OTHER_KERNEL_CONSTANTS)
    + _CDEF_STRUCTS
    + _CDEF_HELPERS
    + "".join(header_declarations(_HERE / f"{part}.h") for part in _C_PARTS)
)
ffibuilder.set_source("hv.binding._kvm", _SOURCE + "".join(f'#include "{part}.c"\n' for part in _C_PARTS),
                      include_dirs=[str(_HERE)], extra_compile_args=["-O2", "-Wall", "-pthread"],
                      extra_link_args=["-pthread"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
