/* A 16550A UART in C, so that a guest's console I/O never waits for the Python interpreter.

   The model is the one hv/devices/serial_reference.py writes in Python (a property test runs both
   side by side): registers a driver programs, an instant transmitter, interrupts as on a PC (the
   line is raised while an enabled condition is pending and OUT2 is set), loopback.

   What Python cannot do without the interpreter lock is done here, on threads of their own:
   - the vCPU thread handles the UART's port exits here (vcpu_loop.c) and raises its IRQ with
     KVM_IRQ_LINE on the VM fd;
   - the output pump takes what the guest sent (the transmit ring), writes it to a raw file
     descriptor (a terminal, a console file) and copies it to the host ring, where a Python
     thread picks it up when it can (line parsing, display with prefixes): a slow or stalled
     reader never slows the guest; bytes it cannot keep up with are counted, not kept;
   - the input pump reads a file descriptor (stdin) into the receive buffer and raises the IRQ.
   While the device is paused the pumps take nothing: the bytes still in the transmit ring, and
   those not yet read from the input, stay where a snapshot or a migration finds them, so a byte
   is delivered once, by the side that runs the guest.

   Every field is guarded by `lock`.

   Over 450 lines, as one file on purpose: the register model, the two pumps and the state
   transfer all read and write one struct under one lock, and the rule that makes a byte
   delivered once (a paused UART's pumps take nothing) is only checkable with them side by side;
   split, the struct and its locking rules would move into a header for every part to touch. */

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/kvm.h>

#include "uart.h"

#define U_LCR_DLAB 0x80
#define U_IER_RDA 0x01
#define U_IER_THRE 0x02
#define U_IIR_NONE 0x01
#define U_IIR_THRE 0x02
#define U_IIR_RDA 0x04
#define U_IIR_FIFO 0xC0
#define U_FCR_ENABLE 0x01
#define U_FCR_CLEAR_RX 0x02
#define U_MCR_OUT2 0x08
#define U_MCR_LOOP 0x10
#define U_LSR_DR 0x01
#define U_LSR_THRE 0x20
#define U_LSR_TEMT 0x40

/* CLOCK_REALTIME `ms` from now, for pthread_cond_timedwait (vcpu_loop.c uses it too: the two
   files are one translation unit, see build.py). */
static struct timespec deadline_after(int ms) {
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) { t.tv_sec++; t.tv_nsec -= 1000000000L; }
    return t;
}

struct kvmig_uart {
    pthread_mutex_t lock;
    pthread_cond_t changed; /* tx gained bytes, rx gained room, running or stopping changed */
    kvmig_uart_regs r;
    uint8_t rx[KVMIG_UART_RX];
    uint8_t tx[KVMIG_UART_TX];
    uint32_t rx_head, tx_head;
    int irq_fd; /* the VM fd for KVM_IRQ_LINE, or -1: a line connected to nothing */
    uint32_t irq;
    int running, stopping;
    /* output pump */
    int out_fd;          /* raw copy of every byte sent, or -1 */
    int out_failed;      /* out_fd refused a write (EPIPE, ...): no more copies there */
    uint8_t *host;       /* ring for the Python reader, or NULL */
    uint32_t host_size, host_head, host_len;
    uint64_t host_dropped;
    int notify_fd;       /* eventfd: the host ring has bytes */
    int pumping_out;     /* the pump is writing bytes it took to out_fd */
    pthread_t out_thread;
    int has_out_thread;
    /* input pump */
    int in_fd;
    int wake_fd;         /* eventfd: wakes the input pump from poll() */
    pthread_t in_thread;
    int has_in_thread;
};

static uint8_t uart_iir(const kvmig_uart *u) {
    if ((u->r.ier & U_IER_RDA) && u->r.rx_len) return U_IIR_RDA;
    if ((u->r.ier & U_IER_THRE) && u->r.thre_pending) return U_IIR_THRE;
    return U_IIR_NONE;
}

/* Under the lock, so the kernel sees the line's changes in the order the model made them. */
static void uart_update_irq(kvmig_uart *u) {
    uint8_t level = uart_iir(u) != U_IIR_NONE && (u->r.mcr & U_MCR_OUT2);
    if (level == u->r.irq_level) return;
    u->r.irq_level = level;
    if (u->irq_fd >= 0) {
        struct kvm_irq_level line = {.irq = u->irq, .level = level};
        (void)ioctl(u->irq_fd, KVM_IRQ_LINE, &line);
    }
}

static void rx_push(kvmig_uart *u, uint8_t byte) { /* caller checked there is room */
    u->rx[(u->rx_head + u->r.rx_len) % KVMIG_UART_RX] = byte;
    u->r.rx_len++;
}

kvmig_uart *kvmig_uart_new(int irq_fd, uint32_t irq) {
    kvmig_uart *u = calloc(1, sizeof *u);
    if (!u) return NULL;
    pthread_mutex_init(&u->lock, NULL);
    pthread_cond_init(&u->changed, NULL);
    u->r.dll = 0x0C; /* 9600 baud, the usual power-on divisor */
    u->irq_fd = irq_fd;
    u->irq = irq;
    u->out_fd = u->in_fd = u->notify_fd = u->wake_fd = -1;
    return u;
}

uint8_t kvmig_uart_read(kvmig_uart *u, uint32_t offset) {
    uint8_t v = 0;
    pthread_mutex_lock(&u->lock);
    int dlab = (u->r.lcr & U_LCR_DLAB) != 0;
    switch (offset) {
    case 0:
        if (dlab) {
            v = u->r.dll;
        } else if (u->r.rx_len) {
            v = u->rx[u->rx_head];
            u->rx_head = (u->rx_head + 1) % KVMIG_UART_RX;
            u->r.rx_len--;
            uart_update_irq(u);
            pthread_cond_broadcast(&u->changed); /* room for the input pump */
        }
        break;
    case 1: v = dlab ? u->r.dlm : u->r.ier; break;
    case 2: {
        uint8_t iir = uart_iir(u);
        if (iir == U_IIR_THRE) { /* reading IIR takes the THRE interrupt */
            u->r.thre_pending = 0;
            uart_update_irq(u);
        }
        v = iir | ((u->r.fcr & U_FCR_ENABLE) ? U_IIR_FIFO : 0);
        break;
    }
    case 3: v = u->r.lcr; break;
    case 4: v = u->r.mcr; break;
    case 5:
        v = (u->r.rx_len ? U_LSR_DR : 0) | (u->r.tx_len < KVMIG_UART_TX ? U_LSR_THRE | U_LSR_TEMT : 0);
        break;
    case 6:
        if (u->r.mcr & U_MCR_LOOP) {
            uint8_t m = u->r.mcr; /* CTS, DSR, RI, DCD follow RTS, DTR, OUT1, OUT2 */
            v = ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4);
        } else {
            v = 0xB0; /* CTS, DSR, DCD: a cable with someone on the other end */
        }
        break;
    case 7: v = u->r.scr; break;
    }
    pthread_mutex_unlock(&u->lock);
    return v;
}

void kvmig_uart_write(kvmig_uart *u, uint32_t offset, uint8_t value) {
    pthread_mutex_lock(&u->lock);
    int dlab = (u->r.lcr & U_LCR_DLAB) != 0;
    switch (offset) {
    case 0:
        if (dlab) {
            u->r.dll = value;
        } else if (u->r.mcr & U_MCR_LOOP) {
            if (u->r.rx_len == KVMIG_UART_RX) { /* the newest bytes win, as the model's slice */
                u->rx_head = (u->rx_head + 1) % KVMIG_UART_RX;
                u->r.rx_len--;
            }
            rx_push(u, value);
            u->r.thre_pending = 1;
        } else if (u->r.tx_len < KVMIG_UART_TX) {
            u->tx[(u->tx_head + u->r.tx_len) % KVMIG_UART_TX] = value;
            if (u->r.tx_len++ == 0) pthread_cond_broadcast(&u->changed);
            /* empty again at once, unless the host is that far behind (then THRE comes back
               when the pump takes bytes) */
            u->r.thre_pending = u->r.tx_len < KVMIG_UART_TX;
        } else {
            u->r.tx_overrun++; /* written while LSR said full: lost, as on a real UART */
        }
        break;
    case 1:
        if (dlab) {
            u->r.dlm = value;
        } else {
            /* enabling THRE interrupts with the holding register empty raises one at once */
            if ((value & U_IER_THRE) && !(u->r.ier & U_IER_THRE) && u->r.tx_len < KVMIG_UART_TX)
                u->r.thre_pending = 1;
            u->r.ier = value & 0x0F;
        }
        break;
    case 2:
        u->r.fcr = value & 0xC9;
        if (value & U_FCR_CLEAR_RX) {
            u->r.rx_len = 0;
            pthread_cond_broadcast(&u->changed);
        }
        break;
    case 3: u->r.lcr = value; break;
    case 4: u->r.mcr = value & 0x1F; break;
    case 7: u->r.scr = value; break;
    }
    uart_update_irq(u);
    pthread_mutex_unlock(&u->lock);
}

/* Host input for the guest, under the lock; returns how many bytes were taken. */
static size_t uart_feed_locked(kvmig_uart *u, const uint8_t *data, size_t n, int count_drops) {
    size_t room = KVMIG_UART_RX - u->r.rx_len, taken = n < room ? n : room;
    for (size_t i = 0; i < taken; i++) rx_push(u, data[i]);
    if (count_drops) u->r.dropped += n - taken;
    uart_update_irq(u);
    return taken;
}

size_t kvmig_uart_feed(kvmig_uart *u, const uint8_t *data, size_t n) {
    pthread_mutex_lock(&u->lock);
    size_t taken = uart_feed_locked(u, data, n, 1);
    pthread_mutex_unlock(&u->lock);
    return taken;
}

/* Bytes the guest sent and nobody took yet, oldest first; taking them gives THRE back. */
static size_t tx_take_locked(kvmig_uart *u, uint8_t *buf, size_t n) {
    size_t k = u->r.tx_len < n ? u->r.tx_len : n;
    int was_full = u->r.tx_len == KVMIG_UART_TX;
    for (size_t i = 0; i < k; i++) buf[i] = u->tx[(u->tx_head + i) % KVMIG_UART_TX];
    u->tx_head = (u->tx_head + k) % KVMIG_UART_TX;
    u->r.tx_len -= k;
    if (was_full && k) {
        u->r.thre_pending = 1;
        uart_update_irq(u);
    }
    return k;
}

size_t kvmig_uart_take_tx(kvmig_uart *u, uint8_t *buf, size_t n) {
    pthread_mutex_lock(&u->lock);
    size_t k = tx_take_locked(u, buf, n);
    pthread_mutex_unlock(&u->lock);
    return k;
}

void kvmig_uart_get(kvmig_uart *u, kvmig_uart_regs *regs, uint8_t *rx, uint8_t *tx) {
    pthread_mutex_lock(&u->lock);
    *regs = u->r;
    for (uint32_t i = 0; i < u->r.rx_len; i++) rx[i] = u->rx[(u->rx_head + i) % KVMIG_UART_RX];
    for (uint32_t i = 0; i < u->r.tx_len; i++) tx[i] = u->tx[(u->tx_head + i) % KVMIG_UART_TX];
    pthread_mutex_unlock(&u->lock);
}

/* The caller checked every value (hv/devices/serial.py). A raised line is raised again: the
   interrupt controller's own state came with the VM's, and this keeps the kernel's view of this
   source's level the same as the model's. */
int kvmig_uart_set(kvmig_uart *u, const kvmig_uart_regs *regs, const uint8_t *rx, const uint8_t *tx) {
    if (regs->rx_len > KVMIG_UART_RX || regs->tx_len > KVMIG_UART_TX) return -1;
    pthread_mutex_lock(&u->lock);
    u->r = *regs;
    u->rx_head = u->tx_head = 0;
    memcpy(u->rx, rx, regs->rx_len);
    memcpy(u->tx, tx, regs->tx_len);
    if (u->r.irq_level && u->irq_fd >= 0) {
        struct kvm_irq_level line = {.irq = u->irq, .level = 1};
        (void)ioctl(u->irq_fd, KVM_IRQ_LINE, &line);
    }
    pthread_cond_broadcast(&u->changed);
    pthread_mutex_unlock(&u->lock);
    return 0;
}

/* --- the pumps ------------------------------------------------------------------------------ */

/* The raw copy. Never blocks for long: a terminal that stops reading (a full pipe, a paused
   pager) must not hold the pump (and so a pause or a stop) forever. Each write waits for room
   first and writes at most PIPE_BUF, which a pipe with room takes whole; a stopping device gives
   a stuck reader STOP_GRACE_MS, then drops the copy. */
#define STOP_GRACE_MS 1000

static void write_all(kvmig_uart *u, int fd, const uint8_t *p, size_t n) {
    int waited_stopping = 0;
    while (n && !u->out_failed) {
        struct pollfd pf = {.fd = fd, .events = POLLOUT};
        int ready = poll(&pf, 1, 100);
        if (ready < 0 && errno != EINTR) { u->out_failed = 1; return; }
        if (ready <= 0) {
            if (__atomic_load_n(&u->stopping, __ATOMIC_RELAXED) && (waited_stopping += 100) >= STOP_GRACE_MS)
                return;
            continue;
        }
        ssize_t w = write(fd, p, n < 4096 ? n : 4096);
        if (w < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (w <= 0) { u->out_failed = 1; return; } /* the reader went away: keep the guest going */
        p += w;
        n -= (size_t)w;
    }
}

static void host_append_locked(kvmig_uart *u, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (u->host_len == u->host_size) { /* a reader that fell this far behind loses the oldest */
            u->host_head = (u->host_head + 1) % u->host_size;
            u->host_len--;
            u->host_dropped++;
        }
        u->host[(u->host_head + u->host_len) % u->host_size] = p[i];
        u->host_len++;
    }
}

static void *out_pump(void *arg) {
    kvmig_uart *u = arg;
    uint8_t chunk[4096];
    pthread_mutex_lock(&u->lock);
    for (;;) {
        /* a stopping device delivers what it still holds only if it was running: a paused one's
           bytes went with its state to whoever runs the guest now */
        while (!u->stopping && !(u->running && u->r.tx_len))
            pthread_cond_wait(&u->changed, &u->lock);
        if (u->stopping && !(u->running && u->r.tx_len)) break;
        size_t n = tx_take_locked(u, chunk, sizeof chunk);
        int out_fd = u->out_failed ? -1 : u->out_fd;
        if (u->host) { /* Python's copy first: a stuck terminal does not hold it back */
            host_append_locked(u, chunk, n);
            uint64_t one = 1;
            (void)!write(u->notify_fd, &one, sizeof one);
        }
        u->pumping_out = 1;
        pthread_mutex_unlock(&u->lock);
        if (out_fd >= 0) write_all(u, out_fd, chunk, n);
        pthread_mutex_lock(&u->lock);
        u->pumping_out = 0;
        pthread_cond_broadcast(&u->changed);
    }
    pthread_mutex_unlock(&u->lock);
    return NULL;
}

/* Starts the output pump: a raw copy to out_fd (-1: none) and, with host_size > 0, a ring the
   Python side reads with kvmig_uart_take_host after notify_fd (an eventfd) says so. */
int kvmig_uart_start_output(kvmig_uart *u, int out_fd, uint32_t host_size, int notify_fd) {
    if (u->has_out_thread) return -1;
    u->out_fd = out_fd;
    if (host_size) {
        u->host = malloc(host_size);
        if (!u->host) return -1;
        u->host_size = host_size;
        u->notify_fd = notify_fd;
    }
    if (pthread_create(&u->out_thread, NULL, out_pump, u) != 0) return -1;
    u->has_out_thread = 1;
    return 0;
}

void kvmig_uart_set_out_fd(kvmig_uart *u, int out_fd) {
    pthread_mutex_lock(&u->lock);
    u->out_fd = out_fd;
    u->out_failed = 0;
    pthread_mutex_unlock(&u->lock);
}

size_t kvmig_uart_take_host(kvmig_uart *u, uint8_t *buf, size_t n, uint64_t *dropped) {
    pthread_mutex_lock(&u->lock);
    size_t k = u->host_len < n ? u->host_len : n;
    for (size_t i = 0; i < k; i++) buf[i] = u->host[(u->host_head + i) % u->host_size];
    if (u->host_size) u->host_head = (u->host_head + k) % u->host_size;
    u->host_len -= k;
    *dropped = u->host_dropped;
    pthread_mutex_unlock(&u->lock);
    return k;
}

static void *in_pump(void *arg) {
    kvmig_uart *u = arg;
    uint8_t buf[KVMIG_UART_RX];
    for (;;) {
        pthread_mutex_lock(&u->lock);
        while (!u->stopping && !(u->running && u->r.rx_len < KVMIG_UART_RX))
            pthread_cond_wait(&u->changed, &u->lock);
        int stop = u->stopping;
        pthread_mutex_unlock(&u->lock);
        if (stop) break;
        struct pollfd pf[2] = {{.fd = u->in_fd, .events = POLLIN}, {.fd = u->wake_fd, .events = POLLIN}};
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        if (pf[1].revents) {
            uint64_t v;
            (void)!read(u->wake_fd, &v, sizeof v);
            continue; /* paused, stopping, or a spurious wake: look again */
        }
        if (!pf[0].revents) continue;
        /* Read under the lock: a pause (which takes the lock) then finds no byte between the
           input and the receive buffer. poll() said the input is readable, so this is short. */
        pthread_mutex_lock(&u->lock);
        if (!u->running || u->stopping || u->r.rx_len == KVMIG_UART_RX) {
            pthread_mutex_unlock(&u->lock);
            continue;
        }
        ssize_t n = read(u->in_fd, buf, KVMIG_UART_RX - u->r.rx_len);
        if (n > 0) uart_feed_locked(u, buf, (size_t)n, 0);
        pthread_mutex_unlock(&u->lock);
        if (n == 0 || (n < 0 && errno != EINTR && errno != EAGAIN)) break; /* end of input */
    }
    return NULL;
}

int kvmig_uart_start_input(kvmig_uart *u, int in_fd) {
    if (u->has_in_thread) return -1;
    u->wake_fd = eventfd(0, EFD_CLOEXEC);
    if (u->wake_fd < 0) return -1;
    u->in_fd = in_fd;
    if (pthread_create(&u->in_thread, NULL, in_pump, u) != 0) return -1;
    u->has_in_thread = 1;
    return 0;
}

static void wake_input(kvmig_uart *u) {
    if (u->wake_fd >= 0) {
        uint64_t one = 1;
        (void)!write(u->wake_fd, &one, sizeof one);
    }
}

/* Under the lock, so once it returns no pump takes another byte: the state is then complete.
   (A chunk the output pump took before is the source's own: it goes on to its terminal.) */
void kvmig_uart_set_running(kvmig_uart *u, int running) {
    pthread_mutex_lock(&u->lock);
    u->running = running;
    pthread_cond_broadcast(&u->changed);
    pthread_mutex_unlock(&u->lock);
    wake_input(u);
}

/* Waits (up to timeout_ms) until the output pump has delivered what it took and, while the
   device runs, every byte of the transmit ring (a paused device's ring is its state); returns
   the bytes still undelivered of those. */
uint32_t kvmig_uart_flush(kvmig_uart *u, int timeout_ms) {
    struct timespec deadline = deadline_after(timeout_ms);
    pthread_mutex_lock(&u->lock);
    while (u->has_out_thread && ((u->running && u->r.tx_len) || u->pumping_out))
        if (pthread_cond_timedwait(&u->changed, &u->lock, &deadline) == ETIMEDOUT) break;
    uint32_t left = (u->running ? u->r.tx_len : 0) + (uint32_t)u->pumping_out;
    pthread_mutex_unlock(&u->lock);
    return left;
}

/* Ends the pumps (the output pump first delivers what a running device still holds). */
void kvmig_uart_stop(kvmig_uart *u) {
    pthread_mutex_lock(&u->lock);
    u->stopping = 1;
    pthread_cond_broadcast(&u->changed);
    pthread_mutex_unlock(&u->lock);
    wake_input(u);
    if (u->has_out_thread) pthread_join(u->out_thread, NULL);
    if (u->has_in_thread) pthread_join(u->in_thread, NULL);
    u->has_out_thread = u->has_in_thread = 0;
}

void kvmig_uart_free(kvmig_uart *u) {
    if (!u) return;
    kvmig_uart_stop(u);
    if (u->wake_fd >= 0) close(u->wake_fd);
    free(u->host);
    pthread_cond_destroy(&u->changed);
    pthread_mutex_destroy(&u->lock);
    free(u);
}
