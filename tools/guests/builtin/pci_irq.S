/* The MSI-X vectors' handlers (ring 0, kept to a handful of instructions: it may be emulated):
 * the TSC at entry kept per vector (the interrupt-latency benchmark's guest-side timestamp),
 * the interrupt counted in the status page, EOI, back to where the CPU was. */
#include "pci.h"

.macro MSI n
msi_\n:
    pushq %rax
    pushq %rdx
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq %rax, (MSI_TSC_ADDR + 8 * \n)
    movq $(MSI_COUNTS_ADDR + 8 * \n), %rax
    lock incq (%rax)
    movq $(LAPIC_BASE + 0xB0), %rax
    movl $0, (%rax)
    popq %rdx
    popq %rax
    iretq
.endm

    .section .text
    .code64
MSI 0; MSI 1; MSI 2; MSI 3; MSI 4; MSI 5; MSI 6; MSI 7

    .section .data
    .globl msi_stubs
    .align 8
msi_stubs:
    .quad msi_0, msi_1, msi_2, msi_3, msi_4, msi_5, msi_6, msi_7

    .section .note.GNU-stack, "", @progbits
