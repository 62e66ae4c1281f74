#include "lib.h"
#include "layout.h"

void line_str(struct line *l, const char *s)
{
    while (*s && l->len < sizeof(l->buf) - 2)
        l->buf[l->len++] = *s++;
}

void line_dec(struct line *l, u64 v)
{
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && l->len < sizeof(l->buf) - 2)
        l->buf[l->len++] = tmp[--n];
}

void line_hex(struct line *l, u64 v)
{
    static const char digits[] = "0123456789abcdef";
    int shift = 60;
    line_str(l, "0x");
    while (shift > 0 && !((v >> shift) & 0xF))
        shift -= 4;
    for (; shift >= 0 && l->len < sizeof(l->buf) - 2; shift -= 4)
        l->buf[l->len++] = digits[(v >> shift) & 0xF];
}

void line_send(struct line *l)
{
    l->buf[l->len++] = '\n';
    for (u32 i = 0; i < l->len; i++) {
        while (!(inb(COM1 + 5) & 0x20)) /* LSR: transmit holding register empty */
            cpu_relax();
        outb(COM1, (u8)l->buf[i]);
    }
    l->len = 0;
}

void debug_exit(u32 code)
{
    outl(DEBUG_EXIT, code);
    for (;;) /* a host without the debug-exit port: stay quiet and runnable */
        cpu_relax();
}

u64 parse_u64(const char *s, const char **end)
{
    u64 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u64)(*s++ - '0');
    if (end)
        *end = s;
    return v;
}

const char *find_arg(const char *cmdline, const char *key)
{
    for (const char *p = cmdline; p && *p; p++) {
        if (p != cmdline && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k)
            k++, q++;
        if (!*k && *q == '=')
            return q + 1;
    }
    return 0;
}
