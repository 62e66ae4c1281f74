/* Freestanding helpers shared by the ring-0 setup and the ring-3 workload. */
#ifndef KVMIG_LIB_H
#define KVMIG_LIB_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* A line-buffered writer to COM1: one line is formatted, then sent byte by byte. */
struct line {
    char buf[160];
    u32 len;
};
void line_str(struct line *l, const char *s);
void line_dec(struct line *l, u64 v);
void line_hex(struct line *l, u64 v);
void line_send(struct line *l); /* appends "\n", writes the line, resets it */
void console_send(struct line *l); /* line_send under the lock every CPU's ring-3 code takes */

void debug_exit(u32 code) __attribute__((noreturn));

u64 parse_u64(const char *s, const char **end);
const char *find_arg(const char *cmdline, const char *key); /* value after "key=", or 0 */

#endif
