"""A tap device (`/dev/net/tun`, IFF_TAP | IFF_NO_PI): the host end of a guest's network card.

Opened non-blocking, frames without the packet-information prefix and without a vnet header
(virtio-net offers no offloads, so the header the guest sees is always empty and the engine
writes it). A name that no interface has yet creates a tap that lives as long as the descriptor
(as QEMU's `-netdev tap,ifname=`); an existing persistent tap is attached to. Either way the tap
is in the network namespace of the thread that opens it.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from hv.errors import ConfigError

TUNSETIFF = 0x400454CA
SIOCGIFFLAGS, SIOCSIFFLAGS, SIOCGIFINDEX, SIOCBRADDIF = 0x8913, 0x8914, 0x8933, 0x89A2
IFF_UP = 0x1
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def open_tap(name: str, bridge: str | None = None) -> int:
    """A non-blocking descriptor on tap `name` (created if absent); ConfigError if it cannot be.
    With `bridge`, the tap is brought up and made a port of that bridge (what QEMU's bridge
    helper does), before any frame can flow: a migration target's card is on its network
    before the guest runs there."""
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise ConfigError("tap", name, f"not an interface name (1-{IFNAMSIZ - 1} bytes, no '/' or spaces)")
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError("tap", name, f"/dev/net/tun: {e.strerror}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise ConfigError("tap", name, f"TUNSETIFF: {e.strerror} (a tun device of that name, or no CAP_NET_ADMIN?)") \
            from None
    if bridge is not None:
        try:
            _join_bridge(name, bridge)
        except OSError as e:
            os.close(fd)
            raise ConfigError("bridge", bridge, f"tap {name} cannot join it: {e.strerror}") from None
    return fd


def _join_bridge(tap: str, bridge: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16s24x", tap.encode())
        index = struct.unpack("16si20x", fcntl.ioctl(s, SIOCGIFINDEX, request))[1]
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH22x", tap.encode(), flags | IFF_UP))
        fcntl.ioctl(s, SIOCBRADDIF, struct.pack("16si20x", bridge.encode(), index))
