/* The 16550A UART in C (uart.c): what the cffi build declares to Python and what vcpu_loop.c
   calls. The Python reference of the same model is hv/devices/serial_reference.py.

   Between the `cffi:` markers only what cffi's cdef parses: types, prototypes and integer
   #defines (hv/binding/build.py reads that part; the compiler reads the whole file). */
#ifndef KVMIG_UART_H
#define KVMIG_UART_H

#include <stddef.h>
#include <stdint.h>

/* cffi: begin */
#define KVMIG_UART_RX 4096           /* receive buffer: host input not yet read by the guest */
#define KVMIG_UART_TX 16384          /* transmit ring: guest output not yet taken by the pump */

typedef struct kvmig_uart kvmig_uart;
typedef struct {
    uint8_t ier, lcr, mcr, fcr, scr, dll, dlm;
    uint8_t thre_pending, irq_level;
    uint32_t rx_len, tx_len;         /* bytes in the receive buffer / the transmit ring */
    uint64_t dropped;                /* host input refused: the receive buffer was full */
    uint64_t tx_overrun;             /* guest bytes written while LSR said the ring was full */
} kvmig_uart_regs;

kvmig_uart *kvmig_uart_new(int irq_fd, uint32_t irq);
void kvmig_uart_free(kvmig_uart *u);
uint8_t kvmig_uart_read(kvmig_uart *u, uint32_t offset);
void kvmig_uart_write(kvmig_uart *u, uint32_t offset, uint8_t value);
size_t kvmig_uart_feed(kvmig_uart *u, const uint8_t *data, size_t n);
size_t kvmig_uart_take_tx(kvmig_uart *u, uint8_t *buf, size_t n);
void kvmig_uart_get(kvmig_uart *u, kvmig_uart_regs *regs, uint8_t *rx, uint8_t *tx);
int kvmig_uart_set(kvmig_uart *u, const kvmig_uart_regs *regs, const uint8_t *rx, const uint8_t *tx);
int kvmig_uart_start_output(kvmig_uart *u, int out_fd, uint32_t host_size, int notify_fd);
void kvmig_uart_set_out_fd(kvmig_uart *u, int out_fd);
size_t kvmig_uart_take_host(kvmig_uart *u, uint8_t *buf, size_t n, uint64_t *dropped);
int kvmig_uart_start_input(kvmig_uart *u, int in_fd);
void kvmig_uart_set_running(kvmig_uart *u, int running);
uint32_t kvmig_uart_flush(kvmig_uart *u, int timeout_ms);
void kvmig_uart_stop(kvmig_uart *u);
/* cffi: end */

#endif
