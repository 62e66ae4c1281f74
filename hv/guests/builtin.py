"""The built-in test guest: its image, parameters, console protocol, status page and checker.

The guest (tools/guests/builtin) is a Multiboot v1 ELF32 that switches itself to long mode and runs
its workload in ring 3: it fills a working set of `ws_mib` MiB at `WS_ADDR`, then increments the
first byte of every page in order, pass after pass, at `rate_mib_s` (0 = flat out), printing one
line per `every` passes on COM1 and keeping a status page at `STATUS_ADDR` current.

Consistency rule, checked by `check_working_set`: with p completed passes, the counter bytes are
(p+1) mod 256 on pages [0, k) and p mod 256 on pages [k, N) for a single k; with fill=random every
other byte of a page is fixed (xorshift64 words seeded by the page index), so a working set that
went through a snapshot or a migration can be verified bit for bit.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from hv.errors import HvError
from hv.kvm.units import MiB, PAGE_SIZE

GUEST_DIR = Path(__file__).resolve().parents[2] / "tools" / "guests"
IMAGE_NAME = "kvmig-guest.elf"
# Built at install and test time (`make install`, `make test`, the tests' conftest); `make` decides
# whether the image is stale. Never at run time: `hv run` finds the image or says how to build it.
BUILD_COMMAND = ("make", "-s", "-C", str(GUEST_DIR))

STATUS_ADDR = 0x00F0_0000
WS_ADDR = 0x0100_0000
CPU_WS_BYTES = 1 * (1 << 20)  # after the working set: 1 MiB each secondary CPU dirties
STATUS_MAGIC = 0x3154535347494D4B  # "KMIGSST1"
GOLDEN = 0x9E3779B97F4A7C15


class GuestImageMissingError(HvError):
    """The guest's ELF has not been built: it is built at install time, never by `hv run`."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"the built-in guest is not built ({path} is missing): run "
                         f"`make install`, or `{' '.join(BUILD_COMMAND)}`")
        self.path = path


def guest_image() -> Path:
    """The guest's prebuilt ELF (tools/guests/build/kvmig-guest.elf)."""
    image = GUEST_DIR / "build" / IMAGE_NAME
    if not image.is_file():
        raise GuestImageMissingError(image)
    return image


@dataclass(frozen=True)
class GuestParams:
    ws_mib: int = 64
    rate_mib_s: int = 0  # 0: as fast as the guest can
    every: int = 1  # report every N passes
    passes: int = 0  # stop after N passes (0: run forever)
    tsc_khz: int = 0  # the guest paces itself by TSC; hv passes the vCPU's rate
    fill: str = "random"  # or "zero": only the counter bytes are non-zero
    cpus: int = 1  # CPUs the guest starts (INIT/SIPI); the secondary ones drive the virtio devices
    reset_after: int = 0  # after N passes, ask the i8042 controller for a CPU reset (0: never)
    idle: bool = False  # once ready, halt CPU 0 instead of running the workload
    extra: str = ""  # appended to the command line as is

    def cmdline(self) -> str:
        return (f"ws={self.ws_mib} rate={self.rate_mib_s} every={self.every} passes={self.passes} "
                f"tsc_khz={self.tsc_khz} fill={self.fill} cpus={self.cpus} reset={self.reset_after} "
                f"idle={int(self.idle)} "
                f"{self.extra}").strip()

    @property
    def min_mem(self) -> int:
        return WS_ADDR + self.ws_mib * MiB + (max(self.cpus, 1) - 1) * CPU_WS_BYTES


# --- console protocol ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    fields: dict[str, int]


@dataclass(frozen=True)
class Ready:
    pages: int
    touch_ms: int


@dataclass(frozen=True)
class Pass:
    number: int
    ms: int


@dataclass(frozen=True)
class Done:
    passes: int


@dataclass(frozen=True)
class CpuUp:
    cpu: int


@dataclass(frozen=True)
class Devices:
    cpu: int
    blk: int  # MMIO base of each device the guest drives (0: none)
    console: int
    rng: int


@dataclass(frozen=True)
class DeviceRound:
    cpu: int
    round: int
    ms: int


@dataclass(frozen=True)
class GuestError:
    message: str


@dataclass(frozen=True)
class Fault:
    vector: int
    error: int
    rip: int
    cr2: int


@dataclass(frozen=True)
class IrqLatency:
    """`irq_bench=N`: N tx frames on a virtio-pci net card, each timed by the guest's TSC from its
    notification to tx's MSI-X handler, as percentiles in ns."""

    n: int
    p50_ns: int
    p99_ns: int
    min_ns: int
    max_ns: int


GuestEvent = Boot | Ready | Pass | Done | CpuUp | Devices | DeviceRound | GuestError | Fault | IrqLatency

_KV = re.compile(r"(\w+)=(0x[0-9a-f]+|\d+)")


def parse_line(line: str) -> GuestEvent | None:
    """One console line -> its event (None for lines that are not the guest's protocol)."""
    line = line.strip()
    if not line.startswith("kvmig: "):
        return None
    verb, _, rest = line[7:].partition(" ")
    # decimal or 0x-hex; a line garbled by interleaved output may carry "019": still a number
    kv = {k: int(v, 16) if v.startswith("0x") else int(v) for k, v in _KV.findall(rest)}
    try:
        match verb:
            case "boot":
                return Boot(kv)
            case "ready":
                return Ready(kv["pages"], kv["touch_ms"])
            case "pass":
                return Pass(int(rest.split()[0]), kv["ms"])
            case "done":
                return Done(kv["passes"])
            case "cpu":
                return CpuUp(int(rest.split()[0]))
            case "devices":
                return Devices(kv["cpu"], kv["blk"], kv["console"], kv["rng"])
            case "dev":
                return DeviceRound(kv["cpu"], kv["round"], kv["ms"])
            case "irqlat":
                return IrqLatency(kv["n"], kv["p50_ns"], kv["p99_ns"], kv["min_ns"], kv["max_ns"])
            case "error":
                return GuestError(rest)
            case "fault":
                return Fault(kv["vector"], kv["error"], kv["rip"], kv["cr2"])
    except (KeyError, ValueError, IndexError):
        return GuestError(f"unparsable line: {line!r}")
    return None


class GuestConsole:
    """A serial `console` callable that splits lines, parses events and lets threads wait on them."""

    def __init__(self, echo: Callable[[bytes], None] | None = None) -> None:
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._echo = echo
        self.lines: list[str] = []
        self.events: list[tuple[float, GuestEvent]] = []  # (monotonic time, event)

    def __call__(self, data: bytes) -> None:
        if self._echo:
            self._echo(data)
        self._buf.extend(data)
        while (nl := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:nl]).decode(errors="replace").rstrip("\r")
            del self._buf[: nl + 1]
            event = parse_line(line)
            with self._cond:
                self.lines.append(line)
                if event is not None:
                    self.events.append((time.monotonic(), event))
                self._cond.notify_all()

    @property
    def pending(self) -> bytes:
        """The start of a line not yet ended: a console moving with its VM carries it along."""
        return bytes(self._buf)

    @property
    def passes(self) -> list[int]:
        with self._cond:
            return [e.number for _, e in self.events if isinstance(e, Pass)]

    def last_pass(self) -> int:
        p = self.passes
        return p[-1] if p else 0

    def failure(self) -> GuestEvent | None:
        with self._cond:
            return next((e for _, e in self.events if isinstance(e, (GuestError, Fault))), None)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until `predicate()` holds; a guest error or fault, or the timeout, raises."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if (bad := next((e for _, e in self.events if isinstance(e, (GuestError, Fault))), None)):
                    raise GuestFailed(bad, self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; "
                                       f"console: {self.lines[-5:]}")
                self._cond.wait(min(left, 0.05))

    def wait_pass(self, number: int, timeout: float = 30.0) -> None:
        self.wait_for(lambda: any(isinstance(e, Pass) and e.number >= number for _, e in self.events),
                      timeout, f"pass {number}")

    def wait_ready(self, timeout: float = 30.0) -> None:
        self.wait_for(lambda: any(isinstance(e, Ready) for _, e in self.events), timeout, "ready")


class GuestFailed(HvError):
    def __init__(self, event: GuestEvent, lines: list[str]) -> None:
        super().__init__(f"the built-in guest reported {event}; console: {lines[-5:]}")
        self.event = event


# --- status page and working-set check -----------------------------------------------------------


@dataclass(frozen=True)
class GuestStatus:
    valid: bool  # the magic is set once the working set is filled
    passes: int
    ws_pages: int
    position: int
    tsc_ready: int
    tsc_last_pass: int
    rate_mib_s: int
    fill_random: bool
    cpus_up: int = 0
    cpu_work: tuple[int, ...] = (0, 0, 0, 0)  # per CPU: device rounds done (secondary CPUs)

    @classmethod
    def from_bytes(cls, page: bytes | memoryview) -> GuestStatus:
        w = np.frombuffer(page, dtype="<u8", count=STATUS_WORDS)
        return cls(int(w[0]) == STATUS_MAGIC, int(w[1]), int(w[2]), int(w[3]), int(w[4]), int(w[5]),
                   int(w[6]), bool(w[7]), int(w[8]), tuple(int(x) for x in w[9:13]))


STATUS_WORDS = 13


class GuestMemoryReader(Protocol):
    """What the checks read guest memory with: a `GuestMemory`, or a snapshot's scratch memory
    (this module needs no KVM, so it names the two methods, not the class)."""

    def read(self, address: int, length: int) -> bytes: ...

    def view(self, address: int, length: int) -> memoryview: ...

    def read_u64(self, address: int) -> int: ...


# The guest counts each interrupt it takes, per IDT vector, at IRQ_COUNTS_ADDR (a u64 per vector,
# layout.h): on IOAPIC pins nothing in the machine uses, which a host raises itself (HOST_*), and
# on virtio-pci's MSI-X vectors (pci.h MSI_*).
IRQ_COUNTS_ADDR = STATUS_ADDR + 0xC00
IDT_VECTORS = 64
HOST_EDGE_IRQ, HOST_EDGE_VECTOR = 22, 0x30
HOST_LEVEL_IRQ, HOST_LEVEL_VECTOR = 23, 0x31  # level-triggered: KVM lowers it at the guest's EOI
MSI_FIRST_VECTOR, MSI_VECTORS = 0x28, 8
MSI_COUNTS_ADDR = IRQ_COUNTS_ADDR + 8 * MSI_FIRST_VECTOR


def read_msi_counts(memory: GuestMemoryReader) -> tuple[int, ...]:
    """The interrupts the guest's MSI-X handlers counted, per vector (from MSI_FIRST_VECTOR), as
    its virtio-pci drivers assign them: a vector per queue, blk's, the console's two, rng's, in
    the order the devices are found."""
    return tuple(int(w) for w in np.frombuffer(memory.read(MSI_COUNTS_ADDR, 8 * MSI_VECTORS), dtype="<u8"))


def read_status(memory: GuestMemoryReader) -> GuestStatus:
    """The status page, from a `GuestMemory` (or anything with `read(address, size)`)."""
    return GuestStatus.from_bytes(memory.read(STATUS_ADDR, STATUS_WORDS * 8))


def interrupt_count(memory: GuestMemoryReader, vector: int) -> int:
    """How many interrupts the guest has taken on `vector` (HOST_EDGE_VECTOR, HOST_LEVEL_VECTOR)."""
    if not 0 <= vector < IDT_VECTORS:
        raise ValueError(f"the guest's IDT has vectors 0-{IDT_VECTORS - 1}, not {vector}")
    return memory.read_u64(IRQ_COUNTS_ADDR + 8 * vector)


def expected_fill(first_page: int, count: int) -> np.ndarray:
    """Words 0..511 of pages [first_page, first_page+count) as fill=random writes them (counter 0)."""
    out = np.empty((count, 512), dtype=np.uint64)
    s = (np.arange(first_page + 1, first_page + count + 1, dtype=np.uint64) * np.uint64(GOLDEN))
    out[:, 0] = 0
    thirteen, seven, seventeen = np.uint64(13), np.uint64(7), np.uint64(17)
    for w in range(1, 512):
        s ^= s << thirteen
        s ^= s >> seven
        s ^= s << seventeen
        out[:, w] = s
    return out


@dataclass(frozen=True)
class WorkingSetCheck:
    passes: int
    split: int  # k: pages [0, k) are one pass ahead
    bad_counters: tuple[int, ...] = ()  # page indexes whose counter breaks the rule (first 16)
    bad_fill: tuple[int, ...] = ()  # page indexes whose other bytes changed (first 16)

    @property
    def ok(self) -> bool:
        return not self.bad_counters and not self.bad_fill

    def __str__(self) -> str:
        if self.ok:
            return f"working set consistent: {self.passes} passes, split at page {self.split}"
        return (f"working set INCONSISTENT after {self.passes} passes: counters wrong on pages "
                f"{list(self.bad_counters)}, fill wrong on pages {list(self.bad_fill)}")


def check_working_set(ws: memoryview | bytes | np.ndarray, passes: int, fill_random: bool = True,
                      chunk_pages: int = 8192) -> WorkingSetCheck:
    """Check the consistency rule over a working set's bytes (whole pages, whole arrays)."""
    pages = np.frombuffer(ws, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    n = len(pages)
    counters = pages[:, 0]
    ahead = counters == (passes + 1) % 256
    split = int(np.argmin(ahead)) if not ahead.all() else n
    bad_counters = np.flatnonzero(counters[split:] != passes % 256)[:16] + split
    bad_fill: list[int] = []
    words = pages.view(np.uint64).reshape(n, 512)
    for first in range(0, n, chunk_pages):
        part = words[first : first + chunk_pages]
        if fill_random:
            want = expected_fill(first, len(part))
            wrong = (part[:, 1:] != want[:, 1:]).any(axis=1)
        else:
            wrong = part[:, 1:].any(axis=1)
        wrong |= (part[:, 0] >> np.uint64(8)) != 0  # bytes 1..7 of the first word stay zero
        bad_fill.extend((np.flatnonzero(wrong) + first)[: 16 - len(bad_fill)].tolist())
        if len(bad_fill) >= 16:
            break
    return WorkingSetCheck(passes, split, tuple(bad_counters.tolist()), tuple(bad_fill))


BLK_SLOTS = 64  # the disk area the guest's block workload cycles through, 4 KiB a slot


def check_disk(image: bytes | memoryview, rounds: int) -> list[str]:
    """Problems with a disk the guest's virtio-blk workload wrote through `rounds` completed
    rounds (its status page's cpu_work). Round r (from 1) writes slot r mod 64 with the words
    r << 32 | slot << 16 | i; so slot s holds the latest completed round for it, or round
    rounds + 1 if that write was in flight when the guest was stopped, or nothing yet."""
    words = np.frombuffer(image, dtype="<u8", count=BLK_SLOTS * 512).reshape(BLK_SLOTS, 512)
    index = np.arange(512, dtype=np.uint64)
    problems = []
    for slot in range(BLK_SLOTS):
        latest = rounds - (rounds - slot) % BLK_SLOTS  # the last completed round with this slot
        allowed = {r for r in (latest, rounds + 1) if r >= 1 and r % BLK_SLOTS == slot}
        if not words[slot].any():
            if latest >= 1:
                problems.append(f"slot {slot}: empty, expected round {latest}")
            continue
        found = int(words[slot, 0]) >> 32
        want = (np.uint64(found) << np.uint64(32)) | np.uint64(slot << 16) | index
        if found not in allowed:
            problems.append(f"slot {slot}: round {found}, expected one of {sorted(allowed)}")
        elif not np.array_equal(words[slot], want):
            problems.append(f"slot {slot}: round {found}'s words are damaged")
    return problems


def check_memory(memory: GuestMemoryReader) -> WorkingSetCheck:
    """Read the status page and check the working set in `memory` (a paused or stopped guest's),
    and each secondary CPU's region (same rule, its rounds as passes, zero fill): the first
    problem found, or CPU 0's result when all hold."""
    status = read_status(memory)
    if not status.valid:
        raise GuestFailed(GuestError("status page not valid (the guest has not finished its fill)"), [])
    main = check_working_set(memory.view(WS_ADDR, status.ws_pages * PAGE_SIZE), status.passes,
                             status.fill_random)
    if not main.ok:
        return main
    for cpu in range(1, min(status.cpus_up, len(status.cpu_work))):
        base = WS_ADDR + status.ws_pages * PAGE_SIZE + (cpu - 1) * CPU_WS_BYTES
        region = check_working_set(memory.view(base, CPU_WS_BYTES), status.cpu_work[cpu], False)
        if not region.ok:
            return region
    return main


class EndWatch:
    """A console line callback that notices the guest's last line: `done` is set when it says it
    finished (`kvmig: done`), failed (`kvmig: error ...`) or faulted; `failure` then says which
    failure, or stays None when the guest finished well. The VMM ends the run on `done` and exits
    1 on a failure."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.failure: str | None = None

    def __call__(self, line: str) -> None:
        event = parse_line(line)
        if isinstance(event, (GuestError, Fault)):
            self.failure = line.strip()
            self.done.set()
        elif isinstance(event, Done):
            self.done.set()
