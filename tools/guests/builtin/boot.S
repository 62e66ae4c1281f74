/*
 * Multiboot v1 entry (32-bit protected mode, flat segments, paging off), the switch to long mode,
 * and the drop to ring 3. Everything here runs in ring 0, which some hosts (nested PVM) emulate one
 * instruction at a time: the page tables, GDT and TSS are therefore built by the assembler and the
 * run-time path is a few dozen instructions.
 */
#include "layout.h"

#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00000003 /* page-aligned modules, memory info */

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC, MB_FLAGS, -(MB_MAGIC + MB_FLAGS)

/* Paging (the assembled page tables), PAE, long mode: the same on every CPU. */
.macro ENTER_LONG_MODE
    lgdt gdt_ptr
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx /* EFER */
    rdmsr
    orl $(1 << 8), %eax /* LME */
    wrmsr
    movl %cr0, %eax
    andl $~(1 << 2), %eax /* EM off */
    orl $((1 << 31) | (1 << 1) | 1), %eax /* PG, MP, PE */
    movl %eax, %cr0
.endm

    .section .text.boot, "ax"
    .code32
    .globl _start
_start:
    cli
    movl $boot_stack_top, %esp
    movl %eax, mb_magic
    movl %ebx, mb_info
    ENTER_LONG_MODE
    ljmp $KERNEL_CS, $long_mode

/* Secondary CPUs arrive here from the real-mode trampoline, in 32-bit protected mode. */
    .globl ap_protected_mode
ap_protected_mode:
    movw $KERNEL_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    ENTER_LONG_MODE
    ljmp $KERNEL_CS, $ap_long_mode

    .code64
long_mode:
    call load_data_segments
    movq $boot_stack_top, %rsp
    call kernel_setup /* IDT gates, TSS descriptors, secondary CPUs started (INIT/SIPI) */
    xorl %edi, %edi
    call enter_cpu /* GDT, IDT, TSS of CPU 0 */
    /* iretq to ring 3. IOPL stays 0: the TSS I/O bitmap grants every port (an IOPL set from an
     * emulated ring 0 is not honoured on every host). Interrupts stay off in ring 3. */
    movl mb_info, %edi
    movq $user_stack_top, %rsi
    movq $user_main, %rdx
    jmp to_user

ap_long_mode: /* data segments are loaded (protected mode did it); no stack yet */
    movl $(LAPIC_BASE + 0x20), %eax /* LAPIC ID register: this CPU's number */
    movl (%rax), %edi
    shrl $24, %edi
    movq %rdi, %rax
    shlq $14, %rax
    leaq ap_kernel_stacks + 16384(%rax), %rsp
    call load_data_segments
    pushq %rdi
    call enter_cpu
    popq %rdi
    movq %rdi, %rax
    shlq $14, %rax
    leaq ap_user_stacks + 16384(%rax), %rsi
    movq $ap_main, %rdx
    jmp to_user

load_data_segments:
    movw $KERNEL_DS, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    ret

/* to_user(arg in rdi, stack in rsi, entry in rdx): iretq to ring 3, interrupts on (IF). */
to_user:
    pushq $USER_DS
    pushq %rsi
    pushq $0x202
    pushq $USER_CS
    pushq %rdx
    iretq

/* Exception entry: vectors with an error code push it themselves; the others push 0. */
.macro EXC vec, has_error
    .globl exc\vec
exc\vec:
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vec
    jmp exception_common
.endm

EXC 0,0; EXC 1,0; EXC 2,0; EXC 3,0; EXC 4,0; EXC 5,0; EXC 6,0; EXC 7,0
EXC 8,1; EXC 9,0; EXC 10,1; EXC 11,1; EXC 12,1; EXC 13,1; EXC 14,1; EXC 15,0
EXC 16,0; EXC 17,1; EXC 18,0; EXC 19,0; EXC 20,0; EXC 21,1; EXC 22,0; EXC 23,0
EXC 24,0; EXC 25,0; EXC 26,0; EXC 27,0; EXC 28,0; EXC 29,1; EXC 30,1; EXC 31,0

/* An interrupt handler's C call: the registers the SysV ABI lets the callee clobber, saved
 * around it (9 pushes after the 5-word frame keep the stack 16-byte aligned at the call). */
.macro SAVE_CALLER_SAVED
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
.endm
.macro RESTORE_CALLER_SAVED
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
.endm

/* COM1's interrupt (IOAPIC pin 4): the handler reads what arrived; then back where we were. */
    .globl irq_com1
irq_com1:
    SAVE_CALLER_SAVED
    call serial_interrupt
    RESTORE_CALLER_SAVED
    iretq

/* Interrupts on the host's own pins (layout.h HOST_*): counted per vector, then EOI. */
.macro COUNTED name, vec
    .globl \name
\name:
    SAVE_CALLER_SAVED
    movq $\vec, %rdi
    call count_interrupt
    RESTORE_CALLER_SAVED
    iretq
.endm
COUNTED irq_host_edge, HOST_EDGE_VECTOR
COUNTED irq_host_level, HOST_LEVEL_VECTOR

/* Ring 3 asked to idle (kernel.c): halt with interrupts on, forever (a COM1 interrupt is served
 * and the CPU halts again). The host sees a sleeping vCPU. */
    .globl idle_forever
idle_forever:
    sti
1:  hlt
    jmp 1b

exception_common:
    movq %rsp, %rdi /* struct exception_frame */
    call exception
1:  hlt
    jmp 1b

    .section .data
    .globl exception_stubs
    .align 8
exception_stubs:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad exc\v
    .endr

    .globl mb_magic, mb_info
    .align 4
mb_magic: .long 0
mb_info:  .long 0

    .align 16
    .globl gdt
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF /* 0x08 kernel code, 64-bit */
    .quad 0x00CF92000000FFFF /* 0x10 kernel data */
    .quad 0x00CFF2000000FFFF /* 0x18 user data, DPL 3 */
    .quad 0x00AFFA000000FFFF /* 0x20 user code, 64-bit, DPL 3 */
    .quad 0x00CF9A000000FFFF /* 0x28 kernel code, 32-bit (the secondary CPUs' way up) */
    .quad 0, 0, 0, 0, 0, 0, 0, 0 /* 0x30.. one 16-byte TSS per CPU, filled by kernel_setup */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

    .globl idt
    .align 16
idt:
    .fill IDT_VECTORS * 2, 8, 0
idt_end:
idt_ptr:
    .word idt_end - idt - 1
    .quad idt

/* Identity map of the low 4 GiB with 2 MiB pages, user-accessible (the workload runs in ring 3). */
    .align 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x0000 + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set addr, 0
    .rept 2048
    .quad addr + 0x87 /* present, writable, user, 2 MiB page */
    .set addr, addr + 0x200000
    .endr

/* The secondary CPUs' first instructions: copied to TRAMPOLINE_ADDR (below 1 MiB, where a SIPI
 * can start a CPU) and entered in real mode with CS = TRAMPOLINE_ADDR >> 4, IP = 0. */
    .section .rodata
    .code16
    .globl trampoline_start, trampoline_end
trampoline_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (trampoline_gdt_ptr - trampoline_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KERNEL_CS32, $ap_protected_mode
    .align 4
trampoline_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
trampoline_end:
    .code64

    .section .bss
    .align 4096
    .globl ap_kernel_stacks, ap_user_stacks
ap_kernel_stacks:
    .space 16384 * MAX_CPUS
ap_user_stacks:
    .space 16384 * MAX_CPUS
    .space 16384
    .globl boot_stack_top
boot_stack_top:
    .space 65536
    .globl user_stack_top
user_stack_top:
    .section .note.GNU-stack, "", @progbits
