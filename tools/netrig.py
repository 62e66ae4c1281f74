"""Two hosts on one machine: network namespaces "host A" and "host B" joined by veth pairs to a
bridge in a third, "the network", for the tests and benchmarks of a guest's network.

    host A (ns <id>-a)              the network (ns <id>-n)              host B (ns <id>-b)
    tap(guest) -- br0 (10.77.0.3) -- up0 ==veth== pa -- br0 (10.77.0.2) -- pb ==veth== up0 -- br0 (10.77.0.4) -- tap
                                                 observer's address

The guest's tap joins the bridge of the host that runs it (`attach_tap`), so its frames reach
the network through that host's veth link; a link may carry a `tc netem` rate and delay
(`NetRig(rate_mbit=, delay_ms=)`, both hosts' links: `tc netem`, or a token bucket when
only a rate is asked for, since some kernels here, 6.18-fc among them, lack sch_netem). Every address is inside these namespaces.
Everything the rig creates it removes on exit, also when the body raised or was interrupted;
names carry the creating process's id, so `cleanup_leftovers` removes what a killed run left
(namespaces of a prefix whose process is gone) without touching a concurrent run's.

`in_namespace(ns, fn)` runs `fn` on a thread that entered `ns` (setns is per thread): a socket
made there stays in that namespace, whichever thread uses it later.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
PREFIX = "kvr"
SUBNET = "10.77.0"
NETWORK_ADDRESS = f"{SUBNET}.2"  # the observer's, on the middle bridge
HOST_ADDRESSES = {"a": f"{SUBNET}.3", "b": f"{SUBNET}.4"}
GUEST_ADDRESS = f"{SUBNET}.10"
CLONE_NEWNET = 0x40000000
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


class RigError(RuntimeError):
    """A command setting up or using the rig failed: which, and what it said."""

    def __init__(self, command: list[str], detail: str) -> None:
        self.command, self.detail = command, detail
        super().__init__(f"{' '.join(command)}: {detail}")


def _ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode:
        raise RigError(command, done.stderr.strip())
    return done.stdout


def namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces a run of this prefix left behind (its process is gone)."""
    removed = []
    for ns in namespaces():
        m = re.fullmatch(rf"{re.escape(prefix)}(\d+)x\d+-[abn]", ns)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _ip("netns", "delete", ns, check=False)
            removed.append(ns)
    return removed


def in_namespace(ns: str, fn: Callable[[], T]) -> T:
    """`fn()` run on a thread inside network namespace `ns`; its result (or its exception)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET):
                    raise OSError(ctypes.get_errno(), f"setns into {ns}")
            finally:
                os.close(fd)
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


@dataclass
class NetRig:
    """The three namespaces (see the module docstring); a context manager."""

    rate_mbit: float | None = None
    delay_ms: float | None = None
    prefix: str = PREFIX

    def __post_init__(self) -> None:
        self.id = f"{self.prefix}{os.getpid()}x{next(_counter)}"
        self.ns = {side: f"{self.id}-{side}" for side in ("a", "b", "n")}
        self._made: list[str] = []

    @property
    def network(self) -> str:
        return self.ns["n"]

    def host(self, side: str) -> str:
        return self.ns[side]

    def __enter__(self) -> NetRig:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        for ns in self.ns.values():
            _ip("netns", "add", ns)
            self._made.append(ns)
            quiet = ["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1"]  # no router solicitations, no MLD
            if (done := subprocess.run(quiet, capture_output=True, text=True)).returncode:
                raise RigError(quiet, done.stderr.strip())
            _ip("link", "set", "lo", "up", netns=ns)
            _ip("link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0",
                "mcast_snooping", "0", netns=ns)  # no multicast router discovery frames
            # a fixed address: a bridge otherwise takes its lowest port's, so a tap joining it would
            # change the host's MAC under its neighbours' ARP caches
            _ip("link", "set", "br0", "address", f"02:6b:76:00:00:{0x0a + 'abn'.index(ns[-1]):02x}", netns=ns)
            _ip("link", "set", "br0", "up", netns=ns)
        _ip("addr", "add", f"{NETWORK_ADDRESS}/24", "dev", "br0", netns=self.network)
        for side in ("a", "b"):
            host = self.ns[side]
            port = f"p{side}"
            _ip("link", "add", "up0", "netns", host, "type", "veth", "peer", "name", port, "netns", self.network)
            _ip("link", "set", port, "master", "br0", "up", netns=self.network)
            _ip("link", "set", "up0", "master", "br0", "up", netns=host)
            _ip("addr", "add", f"{HOST_ADDRESSES[side]}/24", "dev", "br0", netns=host)
            if self.rate_mbit or self.delay_ms:
                shape = ["tc", "-n", host, "qdisc", "add", "dev", "up0", "root"]
                if self.delay_ms:  # netem: rate and delay (a kernel without sch_netem refuses it)
                    shape += ["netem", "delay", f"{self.delay_ms}ms"]
                    shape += ["rate", f"{self.rate_mbit}mbit"] if self.rate_mbit else []
                else:  # a rate alone: a token bucket, which every kernel here has
                    burst = max(int(self.rate_mbit * 1e6 / 8 / 250), 16 * 1024)  # 4 ms of the rate
                    shape += ["tbf", "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "50ms"]
                done = subprocess.run(shape, capture_output=True, text=True)
                if done.returncode:
                    raise RigError(shape, done.stderr.strip())
        self.wait_forwarding()

    def wait_forwarding(self, timeout: float = 10.0) -> None:
        """Until every bridge port of the rig forwards: a veth's carrier reaches its bridge
        through the kernel's link watch, up to a second after the link came up."""
        deadline = time.monotonic() + timeout
        while True:
            states = []
            for ns in self.ns.values():
                out = subprocess.run(["bridge", "-n", ns, "link", "show"], capture_output=True, text=True).stdout
                states += [line for line in out.splitlines() if "master br0" in line]
            if states and all("state forwarding" in line for line in states):
                return
            if time.monotonic() > deadline:
                raise RigError(["bridge", "link", "show"], f"ports not forwarding after {timeout}s: {states}")
            time.sleep(0.02)

    def attach_tap(self, side: str, tap: str) -> None:
        """Move tap `tap` (opened in this process's namespace) into host `side` and onto its
        bridge; a tap opened inside the host already is only put on the bridge."""
        host = self.ns[side]
        if tap not in _ip("-o", "link", "show", netns=host, check=False):
            _ip("link", "set", tap, "netns", host)
        _ip("link", "set", tap, "master", "br0", "up", netns=host)
        self.wait_forwarding()

    def bridge_port_of(self, mac: str) -> str | None:
        """The port the network's bridge learned `mac` behind ("pa", "pb"), or None."""
        out = subprocess.run(["bridge", "-n", self.network, "fdb", "show", "br", "br0"],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            fields = line.split()
            if fields and fields[0].lower() == mac.lower() and "dev" in fields and "permanent" not in fields:
                return fields[fields.index("dev") + 1]
        return None

    def close(self) -> None:
        for ns in reversed(self._made):
            _ip("netns", "delete", ns, check=False)
        self._made.clear()
