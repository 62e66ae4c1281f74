"""The binding: the cffi build of <linux/kvm.h>, the one ioctl choke point, the fd classes, and
the struct <-> dataclass mapping. The only code that builds cffi objects from the header; no policy."""
