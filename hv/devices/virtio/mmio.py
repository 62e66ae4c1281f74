"""The virtio-mmio transport (virtio 1.x, 4.2.2, register layout version 2) and its worker thread.

One 4 KiB window per device:

    0x000 MagicValue "virt"   0x004 Version (2)    0x008 DeviceID     0x00c VendorID
    0x010 DeviceFeatures      0x014 DeviceFeaturesSel
    0x020 DriverFeatures      0x024 DriverFeaturesSel
    0x030 QueueSel  0x034 QueueNumMax  0x038 QueueNum  0x044 QueueReady
    0x050 QueueNotify         0x060 InterruptStatus  0x064 InterruptACK  0x070 Status
    0x080/0x084 QueueDesc lo/hi   0x090/0x094 QueueDriver lo/hi   0x0a0/0x0a4 QueueDevice lo/hi
    0x0fc ConfigGeneration    0x100+ device configuration

Notifications: with an in-kernel irqchip, KVM turns a guest write of queue index i to QueueNotify
into a signal on queue i's eventfd (an ioeventfd with datamatch i), and a device worker thread
waiting on those eventfds processes the queue. Without ioeventfds the write arrives as an MMIO
exit and is processed inline on the vCPU thread. Interrupts: an irqfd on the device's GSI,
written after the used ring moved, with InterruptStatus bit 0 set.

Threads and the lock: register accesses (vCPU threads), the worker and host calls (pause, resume,
console input) share one condition lock; queues are processed only while holding it and only
while the device is not paused. A device starts paused: `Machine.start`/`resume` resume it, and
`Machine.pause` pauses it after the vCPUs stopped, so a paused machine has no device touching
guest memory. On resume every ready queue is looked at again, so a notification that arrived
(or was consumed) while paused is never lost, and a restored device finishes what the source
had made available but not processed.

Over 450 lines, as one room on purpose: registers, worker and state share the one lock above,
and reading them together is how their ordering is checked.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from hv.errors import GuestMemoryError, KvmIoctlError, StateRestoreError
from hv.kvm.memory import GuestMemory
from hv.persist import U32, U64, Persist, check_bool, check_equal, check_ints, check_type

from .errors import VirtioQueueError, VirtioWorkerError
from .queue import QUEUE_STATE_BOUNDS, QueueState, Virtqueue

if TYPE_CHECKING:
    from hv.kvm.vm import IoEventFdRegistration, Vm

log = logging.getLogger(__name__)

MMIO_WINDOW = 0x1000
MAGIC_VALUE = 0x74726976  # "virt"
MMIO_VERSION = 2
VENDOR_ID = 0x554D4551  # "QEMU", as most virtio-mmio devices report

# registers
MAGIC, VERSION, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# device status bits
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# InterruptStatus bits
INT_USED_BUFFER = 1
INT_CONFIG_CHANGE = 2

VIRTIO_F_VERSION_1 = 1 << 32

_ADDRESS_REGS = {
    QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
    QUEUE_DRIVER_LOW: ("driver", 0), QUEUE_DRIVER_HIGH: ("driver", 32),
    QUEUE_DEVICE_LOW: ("device", 0), QUEUE_DEVICE_HIGH: ("device", 32),
}


class VirtioBackend(Persist[Any], Protocol):
    """What a device type (blk, console, rng) gives the transport: its registers' contents and
    its own part of the state (`restore` validates that part before applying it)."""

    device_id: int
    owner: str  # the device's KIND, named by the refusals of `restore`
    features: int  # device feature bits besides VIRTIO_F_VERSION_1
    queue_sizes: tuple[int, ...]  # QueueNumMax of each queue

    def config(self) -> bytes: ...

    def process(self, queue: Virtqueue) -> int:
        """Consume what queue `queue.index` has available; returns how many chains were used."""
        ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class NativeQueues(Protocol):
    """A backend that serves some of its queues in C on a thread of its own (virtio-net's rx
    and tx): the worker leaves those queues' eventfds to it, and the transport hands the queues
    over while the device is live (`go_live`) and takes them back when it is not (`halt`)."""

    native_queues: tuple[int, ...]
    error_fd: int  # readable when the engine stopped on a bad ring (`take_error` says why)

    def go_live(self, queues: list[Virtqueue], irq_fds: tuple[int, ...], driver_features: int) -> bool:
        """`irq_fds`: where each native queue's used buffers are signalled (-1: nowhere). True
        when the configuration changed on the way (a config interrupt is due)."""
        ...

    def set_irq(self, irq_fds: tuple[int, ...]) -> None:
        """Signal the native queues on these fds from now on (an MSI-X vector masked, unmasked
        or moved)."""
        ...

    def halt(self, queues: list[Virtqueue]) -> int:
        """Positions back into `queues`; returns the InterruptStatus bits raised meanwhile."""
        ...

    def native_isr(self, ack: int) -> int: ...

    def take_error(self) -> str | None: ...


@dataclass(frozen=True)
class VirtioMmioState:
    """The transport registers and every queue's configuration and position."""

    device_id: int
    status: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    driver_features: int = 0  # all 64 bits the driver wrote
    queue_sel: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    queues: tuple[QueueState, ...] = ()


# what each register can hold (as the guest may write it: selectors are not range-checked on write)
_TRANSPORT_BOUNDS = {"status": (0, 0xFF), "device_features_sel": (0, U32), "driver_features_sel": (0, U32),
                     "driver_features": (0, U64), "queue_sel": (0, U32),
                     "interrupt_status": (0, INT_USED_BUFFER | INT_CONFIG_CHANGE),
                     "config_generation": (0, U32)}


class VirtioMmio:
    """A virtio-mmio device: the register block over a backend, its queues and worker thread.

    Subclasses (`VirtioBlk`, ...) name the backend, the state type and the wire kind: `save()`
    returns `state_type(transport, backend_state)`.
    """

    KIND: ClassVar[str]
    state_type: ClassVar[type]

    def __init__(self, backend: VirtioBackend, memory: GuestMemory, *, queue_fds: tuple[int, ...] = ()) -> None:
        self.backend = backend
        backend.owner = self.KIND  # whose state its refusals name
        self._native = backend if isinstance(backend, NativeQueues) else None
        self._native_live = False
        self.memory = memory
        self.queues = [Virtqueue(memory, i, n) for i, n in enumerate(backend.queue_sizes)]
        self._regs = VirtioMmioState(backend.device_id, queues=())
        self._cond = threading.Condition()
        self._paused = True
        self._parked = False
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._ctl_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # the first queues' eventfds may come from the backend, which polls them itself
        self.queue_fds = [*queue_fds, *(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                                        for _ in self.queues[len(queue_fds):])]
        self._irq_fd: int | None = None
        # eventfd -> native queue: a native queue's interrupt the worker raises through
        # `_interrupt` (virtio-pci: while its MSI-X vector is masked, or INTx); empty on MMIO
        self._interrupt_requests: dict[int, int] = {}
        self._vm: Vm | None = None
        self._gsi: int | None = None
        self._ioeventfds: list[IoEventFdRegistration] = []
        self._reraise = False  # a restored interrupt status is raised again on resume
        self.interrupts = 0  # interrupts raised (for tests and stats)
        self.last_error: str | None = None  # why the device last went to NEEDS_RESET

    # --- KVM wiring -----------------------------------------------------------------------------

    def connect(self, vm: Vm, mmio_base: int, gsi: int) -> None:
        """Route QueueNotify writes at `mmio_base` to the queues' eventfds (ioeventfd, datamatch
        = queue index) and interrupts to `gsi` (irqfd). Without an irqchip neither exists: the
        notify arrives as an MMIO exit and the guest polls InterruptStatus."""
        if not vm.has_irqchip:
            return
        self._vm, self._gsi = vm, gsi
        for i, fd in enumerate(self.queue_fds):
            self._ioeventfds.append(vm.register_ioeventfd(fd, mmio_base + QUEUE_NOTIFY, 4, datamatch=i))
        self._irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vm.register_irqfd(self._irq_fd, gsi)

    def _interrupt(self, bits: int, queues: tuple[int, ...] = ()) -> None:
        """Raise `bits` in InterruptStatus (`queues`: those whose used ring moved; a transport
        with a vector per queue, virtio-pci's MSI-X, signals each)."""
        self._set(interrupt_status=self._regs.interrupt_status | bits)
        self.interrupts += 1
        if self._irq_fd is not None:
            os.eventfd_write(self._irq_fd, 1)

    # --- registers (vCPU threads) -------------------------------------------------------------

    def _set(self, **changes: Any) -> None:
        self._regs = replace(self._regs, **changes)

    def _device_features(self) -> int:
        return self.backend.features | VIRTIO_F_VERSION_1

    def _queue(self) -> Virtqueue | None:
        sel = self._regs.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def read(self, offset: int, size: int) -> int:
        with self._cond:
            if offset >= CONFIG:
                cfg = self.backend.config()
                start = offset - CONFIG
                return int.from_bytes(cfg[start : start + size].ljust(size, b"\0"), "little")
            return self._read_register(offset) & ((1 << (8 * size)) - 1)

    def _read_register(self, offset: int) -> int:
        r, q = self._regs, self._queue()
        match offset:
            case 0x000:
                return MAGIC_VALUE
            case 0x004:
                return MMIO_VERSION
            case 0x008:
                return self.backend.device_id
            case 0x00C:
                return VENDOR_ID
            case 0x010:
                return (self._device_features() >> (32 * r.device_features_sel)) & 0xFFFF_FFFF \
                    if r.device_features_sel < 2 else 0
            case 0x034:
                return q.max_size if q else 0
            case 0x038:
                return q.state.num if q else 0
            case 0x044:
                return int(q.state.ready) if q else 0
            case 0x060:
                return r.interrupt_status | (self._native.native_isr(0) if self._native else 0)
            case 0x070:
                return r.status
            case 0x0FC:
                return r.config_generation
            case _ if offset in _ADDRESS_REGS and q:
                name, shift = _ADDRESS_REGS[offset]
                return (getattr(q.state, name) >> shift) & 0xFFFF_FFFF
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == QUEUE_NOTIFY:
            self.notify(value)
            return
        with self._cond:
            self._write_register(offset, value & 0xFFFF_FFFF)

    def _write_register(self, offset: int, value: int) -> None:
        r, q = self._regs, self._queue()
        match offset:
            case 0x014:
                self._set(device_features_sel=value)
            case 0x020 if r.driver_features_sel < 2 and not r.status & STATUS_FEATURES_OK:
                shift = 32 * r.driver_features_sel
                self._set(driver_features=(r.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift))
            case 0x024:
                self._set(driver_features_sel=value)
            case 0x030:
                self._set(queue_sel=value)
            case 0x038 if q and not q.state.ready:
                q.configure(num=value)
            case 0x044 if q:
                self._set_ready(q, bool(value & 1))
            case 0x064:
                self._set(interrupt_status=r.interrupt_status & ~value)
                if self._native:
                    self._native.native_isr(value)
            case 0x070:
                self._write_status(value)
            case _ if offset in _ADDRESS_REGS and q and not q.state.ready:
                name, shift = _ADDRESS_REGS[offset]
                old = getattr(q.state, name)
                q.configure(**{name: (old & ~(0xFFFF_FFFF << shift)) | (value << shift)})

    def _set_ready(self, q: Virtqueue, ready: bool) -> None:
        if not ready:
            q.configure(ready=False)
            return
        try:
            q.check()
        except VirtioQueueError as e:
            self._needs_reset(e)
            return
        q.configure(ready=True)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        r = self._regs
        if value & STATUS_FEATURES_OK and not r.status & STATUS_FEATURES_OK:
            offered = self._device_features()
            if r.driver_features & ~offered or not r.driver_features & VIRTIO_F_VERSION_1:
                value &= ~STATUS_FEATURES_OK  # the driver reads Status back and gives up
        self._set(status=value | (r.status & STATUS_NEEDS_RESET))
        self._update_native()
        if value & STATUS_DRIVER_OK:
            self._kick_all()

    def _reset(self) -> None:
        self._halt_native()
        for q in self.queues:
            q.reset()
        self.backend.reset()
        self._regs = VirtioMmioState(self.backend.device_id, config_generation=self._regs.config_generation)
        self.last_error = None

    def _needs_reset(self, error: Exception) -> None:
        log.warning("virtio device %d needs reset: %s", self.backend.device_id, error)
        self.last_error = str(error)
        self._set(status=self._regs.status | STATUS_NEEDS_RESET)
        self._halt_native()
        self._interrupt(INT_CONFIG_CHANGE)

    # --- queues served natively (NativeQueues) --------------------------------------------------

    def _update_native(self) -> None:
        """Under the lock, whenever `_live()` may have changed: hand the native queues over, or
        take them back."""
        if self._native is None:
            return
        if not self._live():
            self._halt_native()
        elif not self._native_live:
            self._native_live = True
            if self._native.go_live(self.queues, self._native_irq_fds(), self._regs.driver_features):
                self._set(config_generation=(self._regs.config_generation + 1) & 0xFFFF_FFFF)
                self._interrupt(INT_CONFIG_CHANGE)

    def _native_irq_fds(self) -> tuple[int, ...]:
        """Where each native queue's interrupts go: virtio-mmio's one irqfd for all."""
        fd = -1 if self._irq_fd is None else self._irq_fd
        return tuple(fd for _ in self._native.native_queues) if self._native else ()

    def _halt_native(self) -> None:
        if self._native is not None and self._native_live:
            self._native_live = False
            self._set(interrupt_status=self._regs.interrupt_status | self._native.halt(self.queues))

    # --- queue processing ---------------------------------------------------------------------

    def notify(self, queue: int) -> None:
        """A QueueNotify that came as an MMIO write (no ioeventfd): processed on this thread,
        or left for the sweep on resume when paused."""
        if queue >= len(self.queues):
            return
        self._process((queue,))

    def _driver_ok(self) -> bool:
        s = self._regs.status
        return bool(s & STATUS_DRIVER_OK) and not s & (STATUS_NEEDS_RESET | STATUS_FAILED)

    def _live(self) -> bool:
        return not self._paused and self._driver_ok()

    def _process(self, queues: tuple[int, ...] | list[int]) -> None:
        with self._cond:
            if not self._live():
                return
            signalled = []  # queues that used buffers and whose driver wants to hear of it
            try:
                for i in queues:
                    q = self.queues[i]
                    if q.state.ready and self.backend.process(q) and not q.interrupt_suppressed():
                        signalled.append(i)
            except (VirtioQueueError, GuestMemoryError) as e:
                self._needs_reset(e)
                return
            if signalled:
                self._interrupt(INT_USED_BUFFER, tuple(signalled))

    def kick(self, queue: int) -> None:
        """Have the worker look at `queue` (from a host thread, e.g. console input arriving)."""
        os.eventfd_write(self.queue_fds[queue], 1)

    def _kick_all(self) -> None:
        for fd in self.queue_fds:
            os.eventfd_write(fd, 1)

    def _worker_loop(self) -> None:
        native = self._native.native_queues if self._native else ()
        fds = [self._ctl_fd, *(fd for i, fd in enumerate(self.queue_fds) if i not in native)]
        if self._native:
            fds.append(self._native.error_fd)
        fds.extend(self._interrupt_requests)
        while True:
            with self._cond:
                while self._paused and not self._stopping:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                self._parked = False
                if self._stopping:
                    return
            readable, _, _ = select.select(fds, [], [])
            kicked = []
            for fd in readable:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue  # another reader (a racing sweep) took it
                if self._native and fd == self._native.error_fd:
                    with self._cond:
                        if (why := self._native.take_error()) is not None:
                            self._needs_reset(VirtioQueueError(-1, why))
                elif fd in self._interrupt_requests:
                    with self._cond:  # raised even if a pause came meanwhile: the ring moved before it
                        if self._driver_ok():
                            self._interrupt(INT_USED_BUFFER, (self._interrupt_requests[fd],))
                elif fd != self._ctl_fd:
                    kicked.append(self.queue_fds.index(fd))
            if kicked:
                try:
                    self._process(sorted(kicked))
                except Exception as e:  # noqa: BLE001 - the thread boundary: a device bug must
                    with self._cond:    # not end the worker silently (as Machine's DeviceFault)
                        self._needs_reset(e)

    # --- lifecycle (called by Machine after/before its vCPUs) ---------------------------------

    def pause(self, timeout: float = 5.0) -> None:
        """Stop processing: when this returns no queue work is running nor will start."""
        with self._cond:
            self._paused = True
            self._halt_native()
            os.eventfd_write(self._ctl_fd, 1)
            worker = self._worker
            if worker is not None and worker.is_alive() and worker is not threading.current_thread():
                alive = worker.is_alive
                if not self._cond.wait_for(lambda: self._parked or not alive(), timeout):
                    raise VirtioWorkerError(self.KIND, timeout)

    def resume(self) -> None:
        """Start (or restart) the worker and look at every queue again."""
        with self._cond:
            if self._stopping:
                return
            self._paused = False
            if self._worker is None:
                self._worker = threading.Thread(target=self._worker_loop, daemon=True,
                                                name=f"virtio-{self.backend.device_id}")
                self._worker.start()
            self._cond.notify_all()
            self._update_native()
            if self._reraise:
                # the source's irqfd pulse may not have reached the guest before the save; a
                # spurious one is harmless (the driver reads InterruptStatus)
                self._reraise = False
                if self._regs.interrupt_status:
                    self._interrupt(0)
        self._kick_all()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def worker_parked(self) -> bool:
        return self._parked

    def stop(self, timeout: float = 5.0) -> None:
        """End the worker, take the eventfds back from KVM and close them, close the backend."""
        with self._cond:
            if self._stopping:
                return
            self._stopping = True
            self._paused = True
            self._halt_native()
            self._cond.notify_all()
            os.eventfd_write(self._ctl_fd, 1)
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join(timeout)
        if self._vm is not None:
            try:
                for reg in self._ioeventfds:
                    self._vm.unregister_ioeventfd(reg)
                if self._irq_fd is not None and self._gsi is not None:
                    self._vm.unregister_irqfd(self._irq_fd, self._gsi)
            except KvmIoctlError as e:  # the VM is already closed: its registrations went with it
                log.debug("virtio: eventfds not unregistered: %s", e)
        for fd in (self._ctl_fd, *self.queue_fds, *((self._irq_fd,) if self._irq_fd is not None else ()),
                   *self._interrupt_requests):
            os.close(fd)
        self._ioeventfds, self._irq_fd, self._interrupt_requests = [], None, {}
        self.backend.close()

    # --- state --------------------------------------------------------------------------------

    def save_transport(self) -> VirtioMmioState:
        with self._cond:
            return replace(self._regs, queues=tuple(q.state for q in self.queues))

    def save(self) -> Any:
        with self._cond:
            return self.state_type(self.save_transport(), self.backend.save())

    def restore(self, state: Any) -> None:
        """Validate everything first, then apply; a live device then processes what was left."""
        check_type(self.KIND, state, self.state_type)
        self.check_transport(state.transport)
        self.apply_transport(state.transport, state.backend)

    def check_transport(self, t: VirtioMmioState) -> None:
        """The transport registers and queues of a saved state fit this device (the backend's
        part is checked by its own `restore`)."""
        kind = self.KIND
        check_type(kind, t, VirtioMmioState)
        check_equal(kind, "device_id", self.backend.device_id, t.device_id)
        check_ints(kind, t, _TRANSPORT_BOUNDS)
        if type(t.queues) is not tuple or len(t.queues) != len(self.queues):
            found = f"{len(t.queues)} queues" if type(t.queues) is tuple else t.queues
            raise StateRestoreError(kind, "queues", f"{len(self.queues)} queues", found)
        scratch = [Virtqueue(self.memory, i, q.max_size) for i, q in enumerate(self.queues)]
        for vq, qs in zip(scratch, t.queues, strict=True):
            where = f"queues[{vq.index}]"
            check_type(f"{kind} {where}", qs, QueueState)
            check_ints(f"{kind} {where}", qs, QUEUE_STATE_BOUNDS)
            check_bool(f"{kind} {where}", "ready", qs.ready)
            if qs.ready:
                vq.state = qs
                try:
                    vq.check()
                except VirtioQueueError as e:
                    raise StateRestoreError(kind, where, "a usable queue", str(e)) from None

    def apply_transport(self, t: VirtioMmioState, backend: Any) -> None:
        """Apply a checked transport state and the backend's (which validates its own first)."""
        with self._cond:
            self.backend.restore(backend)  # validates its part before applying it
            self._halt_native()
            self._regs = replace(t, queues=())
            for q, qs in zip(self.queues, t.queues, strict=True):
                q.state = qs
            self._reraise = bool(t.interrupt_status)
            self._update_native()
        if not self._paused:
            self._kick_all()
