/* KVM_RUN in a loop that handles the exits of devices modelled in C (the UART) without coming
   back to Python: the guest's console I/O then never waits for the interpreter lock, whatever
   the rest of the VMM (a migration's encoder, a control command, logging) is doing.

   An exit the table does not claim, or a KVM_RUN that fails (EINTR from a kick or from
   immediate_exit), returns to the caller with kvm_run as KVM left it: Python decodes and handles
   it as before. A kick that lands while this loop is handling an exit is not lost: whoever kicks
   sets immediate_exit first, and the next KVM_RUN returns EINTR at once. */

#include <errno.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

static int fast_pio(const kvmig_fast_pio *fast, struct kvm_run *run) {
    uint16_t port = run->io.port;
    for (uint32_t i = 0; i < fast->n; i++) {
        if (port < fast->base[i] || port >= fast->base[i] + fast->len[i]) continue;
        kvmig_uart *u = fast->uart[i];
        uint32_t offset = port - fast->base[i], size = run->io.size;
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        /* a wider access reaches the register at its first port, zero-extended (as the bus
           does for the Python models) */
        for (uint32_t k = 0; k < run->io.count; k++, data += size) {
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                kvmig_uart_write(u, offset, data[0]);
            } else {
                for (uint32_t b = 0; b < size; b++) data[b] = 0;
                data[0] = kvmig_uart_read(u, offset);
            }
        }
        return 1;
    }
    return 0;
}

/* Returns KVM_RUN's result for the exit it stopped at (0, or -1 with errno). */
int kvmig_vcpu_run(int vcpu_fd, struct kvm_run *run, const kvmig_fast_pio *fast, kvmig_run_counts *counts) {
    for (;;) {
        int ret = ioctl(vcpu_fd, KVM_RUN, 0);
        if (ret < 0) return ret;
        if (run->exit_reason == KVM_EXIT_IO && fast->n && fast_pio(fast, run)) {
            counts->fast_io_exits++;
            continue;
        }
        return ret;
    }
}
