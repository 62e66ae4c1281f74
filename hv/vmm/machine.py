"""A running VM: one thread per vCPU, exits routed to device buses, and a lifecycle.

    Created --start--> Running --pause--> Paused --resume--> Running
       |                  |                  |
       +------stop--------+-------stop-------+--> Stopped        (a fatal exit: --> Error --stop--> Stopped)

Pausing really stops the guest. `pause()` sets `immediate_exit` in every vCPU's kvm_run and sends
the kick signal to its thread: a vCPU inside KVM_RUN returns EINTR at once; one that is handling
an exit in Python returns EINTR from its next KVM_RUN, which first completes the pending I/O
(api.rst: re-entering with immediate_exit "completes pending operations without allowing any
further instructions to be executed"). A vCPU parks only after that EINTR, so a paused VM has no
half-done I/O and its state can be read and saved. It parks in C, inside the vCPU loop
(`kvmig_park`), and resumes from there: neither a pause nor a resume waits for the interpreter
lock, which whatever else runs in the VMM (a migration) may hold.

Over 450 lines, as one room on purpose: `Machine` is one state machine (the run states above,
the vCPU threads, pause/resume/stop and the devices' lifecycle), whose transitions share one lock
and one condition; what stands alone already lives apart (buses, ownership, the builder).
"""

from __future__ import annotations

import enum
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from hv.binding.ffi import ffi, lib
from hv.errors import ConfigError, DeviceFault, GuestFatalExit, HvError, LifecycleError
from hv.kvm.exits import (
    FATAL_EXITS,
    Hlt,
    Interrupted,
    IoIn,
    IoOut,
    MmioRead,
    MmioWrite,
    SystemEvent,
    VcpuExit,
)
from hv.kvm.vcpu import Vcpu
from hv.kvm.vm import Vm
from hv.persist import Device, Lifecycle
from hv.devices.pci.virtio_pci import VirtioPci
from hv.vmm.bus import Bus
from hv.vmm.pci import register_pci_device
from hv.vmm.placement import VIRTIO_TRANSPORTS, DevicePlacement, PciPlacement, VirtioDeviceSpec, place_virtio_device

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGRTMIN
_kick_installed = threading.Lock()
_kick_ready = False


def _install_kick_handler() -> None:
    global _kick_ready
    with _kick_installed:
        if not _kick_ready:
            if lib.kvmig_install_kick_handler(KICK_SIGNAL) != 0:
                raise OSError("sigaction failed for the vCPU kick signal")
            _kick_ready = True


class RunState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    ERROR = "error"


class _Control(enum.Enum):
    RUN = 1
    PAUSE = 2
    STOP = 3


@dataclass
class VcpuStats:
    """Exits Python handled; `fast_io_exits`: port exits the vCPU loop handled in C, `parks`:
    pauses it spent parked in C."""

    exits: int = 0
    io_exits: int = 0
    mmio_exits: int = 0
    kicks: int = 0
    fast_io_exits: int = 0
    parks: int = 0


@runtime_checkable
class NativePortDevice(Protocol):
    """A port device modelled in C as well (a kvmig_uart): the vCPU loop serves its exits."""

    native: Any


@dataclass(frozen=True)
class StopReason:
    """Why a VM stopped: asked by the host, or decided by the guest (shutdown, reset, halt)."""

    source: str  # "host", "guest-shutdown", "guest-reset", "guest-halt", "guest-exit", "fatal"
    detail: str = ""
    exit_code: int | None = None  # "guest-exit": the code the guest wrote to the debug-exit port


ExitHook = Callable[[Vcpu, VcpuExit], bool]
D = TypeVar("D")


@dataclass
class _VcpuSlot:
    vcpu: Vcpu
    thread: threading.Thread | None = None
    stats: VcpuStats = field(default_factory=VcpuStats)
    parked: bool = False


class Machine:
    """Runs a `Vm`'s vCPUs on threads, with pause/resume/stop that really stop the guest."""

    def __init__(self, vm: Vm, *, io_bus: Bus | None = None, mmio_bus: Bus | None = None) -> None:
        if not vm.vcpus:
            raise LifecycleError("without vCPUs", "build a machine from a VM")
        self.vm = vm
        self.io_bus = io_bus or Bus("port I/O")
        self.mmio_bus = mmio_bus or Bus("MMIO")
        self._slots = [_VcpuSlot(v) for _, v in sorted(vm.vcpus.items())]
        self._cond = threading.Condition()
        self._control = _Control.RUN
        self._state = RunState.CREATED
        self._ran = False
        self._parking = ffi.gc(lib.kvmig_park_new(), lib.kvmig_park_free)  # where paused vCPUs wait
        self.error: HvError | None = None
        self.stop_reason: StopReason | None = None
        self.exit_hooks: list[ExitHook] = []
        self.devices: dict[str, Device] = {}  # device id -> model, for save/restore by id
        self.placements: dict[str, DevicePlacement] = {}
        # devices with threads of their own (virtio workers) follow the vCPUs, so a paused
        # machine has no device touching guest memory; sans-IO devices have no lifecycle
        self._running_devices: list[Lifecycle] = []
        self.last_pause_seconds = 0.0
        self._throttle = 0.0  # fraction of each period the vCPUs sleep (auto-converge)
        self._throttle_slice = 0.01  # what a throttled vCPU runs between two sleeps
        self._throttle_thread: threading.Thread | None = None

    # --- devices ------------------------------------------------------------------------------

    def add_device(
        self, device_id: str, device: Device, *, pio: tuple[int, int] | None = None,
        mmio: tuple[int, int] | None = None, irqs: tuple[int, ...] = (), pci: PciPlacement | None = None,
    ) -> DevicePlacement:
        """Attach a device model at a port range and/or MMIO range, and record where it is. A
        device that implements `Lifecycle` is paused, resumed and stopped with the vCPUs."""
        if device_id in self.devices:
            raise LifecycleError(self._state, f"add a second device with id {device_id!r}")
        if pio:
            self.io_bus.insert(pio[0], pio[1], device, device_id)
            if isinstance(device, NativePortDevice):
                for vcpu in self.vcpus:  # its exits handled in C, inside KVM_RUN's loop
                    vcpu.serve_ports(pio[0], pio[1], device.native)
        if mmio:
            self.mmio_bus.insert(mmio[0], mmio[1], device, device_id)
        placement = DevicePlacement(device_id, device.KIND, (pio,) if pio else (),
                                    (mmio,) if mmio else (), tuple(irqs), pci)
        self.devices[device_id] = device
        self.placements[device_id] = placement
        if isinstance(device, Lifecycle):
            self._running_devices.append(device)
        return placement

    def add_virtio_device(self, spec: VirtioDeviceSpec, transport: str = "mmio") -> DevicePlacement:
        """Build the virtio device `spec` declares, place it (`place_virtio_device`), wire it to
        KVM (ioeventfd for its notifications, irqfd for its interrupt) and attach it; only before
        any vCPU entered the guest (arcbox VirtualMachine::add_virtio_device): created, or
        started paused (a VM built ahead of the restore that fills it), whose vCPUs are parked
        and read no bus. A device added to a paused machine starts with its next `resume`."""
        if self._state not in (RunState.CREATED, RunState.PAUSED) or self._ran:
            raise LifecycleError(self._state, f"add virtio device {spec.device_id!r} (only before it runs)")
        if transport not in VIRTIO_TRANSPORTS:
            raise ConfigError("transport", transport, f"not one of {VIRTIO_TRANSPORTS}")
        if transport == "pci":
            device = spec.build(self.vm.memory, transport)
            try:
                if not isinstance(device, VirtioPci):
                    raise ConfigError("transport", transport, f"{type(device).__name__} is not a virtio-pci function")
                register_pci_device(self, device, spec.device_id)
            except BaseException:
                device.stop()
                raise
            return self.placements[spec.device_id]
        placement = place_virtio_device(self.device_layout(), spec.device_id, spec.kind, transport)
        (base, size), = placement.mmio
        device = spec.build(self.vm.memory)
        try:
            device.connect(self.vm, base, placement.irqs[0])
            return self.add_device(spec.device_id, device, mmio=(base, size), irqs=placement.irqs)
        except BaseException:
            device.stop()
            raise

    def snapshot_devices(self) -> dict[str, Any]:
        """Every device's state by id (arcbox VirtualMachine::snapshot_devices); the machine
        paused, or not yet started, so no device moves while it is read."""
        self._require("snapshot its devices", RunState.CREATED, RunState.PAUSED)
        return {device_id: device.save() for device_id, device in self.devices.items()}

    def restore_devices(self, states: dict[str, Any]) -> None:
        """Put `states` (from `snapshot_devices`) back, by id: the ids checked to be this
        machine's before any is applied, and each device validates its own state first
        (arcbox VirtualMachine::restore_devices)."""
        self._require("restore its devices", RunState.CREATED, RunState.PAUSED)
        if set(states) != set(self.devices):
            raise ConfigError("devices", sorted(states), f"this machine has {sorted(self.devices)}")
        for device_id, state in states.items():
            self.devices[device_id].restore(state)

    def device(self, device_id: str, model: type[D]) -> D:
        """The device `device_id`, which must be a `model` (for its own methods, e.g. `feed`)."""
        device = self.devices.get(device_id)
        if not isinstance(device, model):
            raise ConfigError("device", device_id, f"is {type(device).__name__}, not a {model.__name__}")
        return device

    def device_layout(self) -> tuple[DevicePlacement, ...]:
        return tuple(self.placements[d] for d in sorted(self.placements))

    # --- state --------------------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def ever_ran(self) -> bool:
        """Whether any vCPU was let into the guest. A machine started paused has not: its vCPUs
        parked after a KVM_RUN that `immediate_exit` ended before any guest instruction, so a
        state can still go into it as into a created one (KVM counts a vCPU as run only once
        it entered the guest)."""
        return self._ran

    @property
    def vcpus(self) -> list[Vcpu]:
        return [s.vcpu for s in self._slots]

    @property
    def unparked_ns(self) -> int:
        """When the last of its vCPUs left the park for KVM_RUN (`time.monotonic_ns`'s clock; 0
        if one never parked): after `resume(wait_running=True)`, the moment the guest runs on
        every vCPU, as the threads themselves saw it (not when the resuming thread woke)."""
        times = [v.unparked_ns for v in self.vcpus]
        return 0 if 0 in times else max(times)

    @property
    def stats(self) -> list[VcpuStats]:
        for slot in self._slots:  # what the C loop counted, as of now
            slot.stats.fast_io_exits, slot.stats.parks = slot.vcpu.fast_io_exits, slot.vcpu.parks
        return [s.stats for s in self._slots]

    def _require(self, action: str, *allowed: RunState) -> None:
        if self._state not in allowed:
            raise LifecycleError(self._state, action)

    def _refuse_if_stopping(self, action: str) -> None:
        """Under the lock: a VM whose stop is under way (the guest asked, a vCPU failed) is still
        RUNNING until `stop()` finishes it; `action` is refused with the reason, not done."""
        if self._control is _Control.STOP:
            reason = self.stop_reason
            facts = [] if reason is None else [reason.source, reason.detail] + \
                ([f"exit code {reason.exit_code}"] if reason.exit_code is not None else [])
            raise LifecycleError(self._state, action, "it is stopping (" + ", ".join(filter(None, facts)) + ")")

    # --- transitions --------------------------------------------------------------------------

    def start(self, *, paused: bool = False) -> None:
        """Start the vCPU threads; with `paused`, they park before running any guest code
        (a restored VM is handed over this way)."""
        with self._cond:
            self._require("start", RunState.CREATED)
            _install_kick_handler()
            self._control = _Control.PAUSE if paused else _Control.RUN
            self._state = RunState.PAUSED if paused else RunState.RUNNING
            self._ran = not paused
            lib.kvmig_park_hold(self._parking, 1 if paused else 0)
            for slot in self._slots:
                slot.vcpu.immediate_exit = paused  # the first KVM_RUN returns at once
                slot.thread = threading.Thread(
                    target=self._vcpu_thread, args=(slot,), name=f"vcpu{slot.vcpu.vcpu_id}", daemon=True
                )
                slot.thread.start()
        if paused and not self._wait_quiet(5.0):
            raise LifecycleError(self._state, "start paused (a vCPU did not park)")
        if not paused:
            for device in self._running_devices:
                device.resume()

    @property
    def throttle(self) -> float:
        return self._throttle

    def set_throttle(self, fraction: float, run_slice: float = 0.01) -> None:
        """Make every vCPU sleep `fraction` of its time (0 turns it off): the guest then dirties
        memory more slowly, as QEMU's auto-converge does. As QEMU's throttle, a vCPU runs
        `run_slice` between sleeps and sleeps `run_slice * fraction / (1 - fraction)`: the run
        slice stays long against the host's timer jitter even at 99%."""
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"throttle fraction must be in [0, 1), got {fraction}")
        with self._cond:
            self._throttle, self._throttle_slice = fraction, run_slice
            if fraction and self._throttle_thread is None:
                self._throttle_thread = threading.Thread(target=self._throttle_loop, name="throttle",
                                                         daemon=True)
                self._throttle_thread.start()
            self._cond.notify_all()

    def _throttle_loop(self) -> None:
        while True:
            with self._cond:
                if not self._throttle or self._control is _Control.STOP:
                    self._throttle_thread = None
                    return
                period = self._throttle_slice / (1 - self._throttle)
                if self._control is _Control.RUN:
                    self._kick_all()  # each vCPU sleeps on its next Interrupted exit
            # one kick a period: a vCPU sleeps `throttle` of it, then runs the rest until the next
            time.sleep(period)

    def _throttle_sleep(self, slot: _VcpuSlot) -> None:
        """A kick while running: sleep the throttle slice (waking early for pause/stop), then
        clear immediate_exit under the lock (pause sets it under the same lock, so it cannot be
        lost). After the sleep, not before: a kick that came during it would otherwise end the
        next run slice before it began, and the guest would hardly run at all."""
        with self._cond:
            if self._control is not _Control.RUN:
                return
            if self._throttle:  # set_throttle(0) and pause/stop end the sleep early
                self._cond.wait_for(lambda: self._control is not _Control.RUN or not self._throttle,
                                    self._throttle_slice * self._throttle / (1 - self._throttle))
            if self._control is _Control.RUN:
                slot.vcpu.immediate_exit = False

    def _kick_all(self) -> None:
        for slot in self._slots:
            slot.vcpu.immediate_exit = True
            thread = slot.thread
            ident = thread.ident if thread else None
            if thread is not None and ident is not None and thread.is_alive():
                try:
                    signal.pthread_kill(ident, KICK_SIGNAL)
                except ProcessLookupError:
                    pass  # the thread ended between the check and the kill

    def _running_slots(self) -> list[_VcpuSlot]:
        """vCPUs whose thread lives and is not parked in Python (it may be parked in C)."""
        return [s for s in self._slots if s.thread is not None and s.thread.is_alive() and not s.parked]

    def _all_quiet(self) -> bool:
        return len(self._running_slots()) <= self._parked_in_c()

    def _parked_in_c(self) -> int:
        return lib.kvmig_park_wait(self._parking, 0, 1, 0)  # "at least 0": the count, at once

    def _wait_quiet(self, timeout: float) -> bool:
        """Wait until every vCPU is parked (or its thread ended). Not under the lock: a vCPU on
        its way to the park may need it."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if self._all_quiet():
                    return True
                in_c = len(self._running_slots())
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # the interpreter lock is released in here; wake often enough to see a thread end
            lib.kvmig_park_wait(self._parking, in_c, 1, max(1, int(min(left, 0.05) * 1000)))

    def _end_park(self) -> None:
        """Under the lock, with _control STOP: vCPUs parked in C go back to Python to end."""
        lib.kvmig_park_stop(self._parking)

    def pause(self, timeout: float = 5.0) -> float:
        """Stop guest execution on every vCPU; returns how long that took (seconds)."""
        t0 = time.perf_counter()
        with self._cond:
            self._require("pause", RunState.RUNNING)
            self._refuse_if_stopping("pause")  # a pause must not overwrite the guest's request to stop
            lib.kvmig_park_hold(self._parking, 1)  # before the kick: its EINTR parks in C
            self._control = _Control.PAUSE
            self._cond.notify_all()  # a throttled vCPU asleep in its slice (0.99 s at 99%) stops now
            self._kick_all()
        if not self._wait_quiet(timeout):
            raise LifecycleError(self._state, f"pause within {timeout}s (a vCPU did not stop)")
        with self._cond:
            self._refuse_if_stopping("pause")  # the guest asked to stop (or a vCPU failed) meanwhile
            if self._state is RunState.RUNNING:
                self._state = RunState.PAUSED
        for device in self._running_devices:  # after the vCPUs: nothing can notify a paused device
            device.pause()
        self.last_pause_seconds = time.perf_counter() - t0
        return self.last_pause_seconds

    def resume(self, *, wait_running: bool = False, timeout: float = 5.0) -> float:
        """Let the vCPUs run again; returns how long the hand-off took (seconds). With
        `wait_running`, until every vCPU thread has left its park for KVM_RUN: the time to the
        guest's first instruction, as a downtime must count it."""
        t0 = time.perf_counter()
        with self._cond:
            self._require("resume", RunState.PAUSED)
            for device in self._running_devices:  # before the vCPUs: a notify finds it live
                device.resume()
            for slot in self._slots:
                slot.vcpu.immediate_exit = False  # before the release: they enter the guest again
            self._control = _Control.RUN
            self._state = RunState.RUNNING
            self._ran = True
            self._cond.notify_all()
            lib.kvmig_park_hold(self._parking, 0)
            if wait_running:
                self._cond.wait_for(lambda: self._control is not _Control.RUN
                                    or not any(s.parked for s in self._slots), timeout)
        if wait_running:  # those parked in C left without the interpreter lock
            lib.kvmig_park_wait(self._parking, 0, 0, int(timeout * 1000))
        return time.perf_counter() - t0

    def stop(self, timeout: float = 5.0) -> None:
        """End the VM's execution for good (the Vm itself stays open for inspection)."""
        with self._cond:
            if self._state is RunState.STOPPED:
                return
            self._require("stop", RunState.CREATED, RunState.RUNNING, RunState.PAUSED, RunState.ERROR)
            self._control = _Control.STOP
            if self.stop_reason is None:
                self.stop_reason = StopReason("host")
            self._end_park()
            self._kick_all()
            self._cond.notify_all()
        self._join(timeout)
        for device in self._running_devices:
            device.stop()
        with self._cond:
            self._state = RunState.STOPPED
            self._cond.notify_all()

    def _join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if slot.thread is not None and slot.thread is not threading.current_thread():
                slot.thread.join(max(0.0, deadline - time.monotonic()))

    def wait(self, timeout: float | None = None) -> RunState:
        """Block until the guest stops by itself (or fails); returns the state then."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._state in (RunState.STOPPED, RunState.ERROR)
                or (self._control is _Control.STOP and self._all_quiet()),
                timeout,
            )
        if self._control is _Control.STOP and self._state in (RunState.RUNNING, RunState.PAUSED):
            self.stop()  # the guest asked to stop: finish it; an ERROR stays visible until stop()
        return self._state

    # --- the vCPU thread ----------------------------------------------------------------------

    def _park(self, slot: _VcpuSlot) -> bool:
        """Wait while paused; False when the vCPU must end."""
        with self._cond:
            slot.parked = True
            self._cond.notify_all()
            while self._control is _Control.PAUSE:
                self._cond.wait()
            slot.parked = False
            self._cond.notify_all()  # resume(wait_running=True) waits for this
            return self._control is _Control.RUN

    def request_stop(self, reason: StopReason) -> None:
        """Stop without waiting: for devices and hooks running on a vCPU thread (the guest asked)."""
        with self._cond:
            if self.stop_reason is None:
                self.stop_reason = reason
            self._control = _Control.STOP
            self._end_park()
            self._kick_all()
            self._cond.notify_all()

    def _fail(self, slot: _VcpuSlot, error: HvError) -> None:
        log.error("vCPU %d failed: %s", slot.vcpu.vcpu_id, error)
        with self._cond:
            self.error = error
            self.stop_reason = StopReason("fatal", str(error))
            self._state = RunState.ERROR
            self._control = _Control.STOP
            self._end_park()
            self._kick_all()
            self._cond.notify_all()

    def _vcpu_thread(self, slot: _VcpuSlot) -> None:
        vcpu = slot.vcpu
        vcpu.attach_thread()
        stats = slot.stats
        io, mmio = self.io_bus, self.mmio_bus
        ex: VcpuExit | None = None
        try:
            while True:
                ex = vcpu.run(self._parking)
                stats.exits += 1
                match ex:
                    case IoOut(port=port, size=size, data=data, count=count):
                        stats.io_exits += 1
                        for i in range(count):
                            io.write(port, size, int.from_bytes(data[i * size : (i + 1) * size], "little"))
                    case IoIn(port=port, size=size, count=count):
                        stats.io_exits += 1
                        vcpu.set_io_result(b"".join(
                            io.read(port, size).to_bytes(size, "little") for _ in range(count)))
                    case MmioWrite(address=address, data=data):
                        stats.mmio_exits += 1
                        mmio.write(address, len(data), int.from_bytes(data, "little"))
                    case MmioRead(address=address, length=length):
                        stats.mmio_exits += 1
                        vcpu.set_mmio_result(mmio.read(address, length).to_bytes(length, "little"))
                    case Interrupted():
                        stats.kicks += 1
                        if self._control is _Control.RUN:
                            self._throttle_sleep(slot)
                        elif not self._park(slot):
                            return
                    case _ if any(hook(vcpu, ex) for hook in self.exit_hooks):
                        pass
                    case SystemEvent(type=kind):
                        reset = kind == lib.KVM_SYSTEM_EVENT_RESET
                        self.request_stop(StopReason("guest-reset" if reset else "guest-shutdown", str(ex)))
                    case Hlt():
                        # Only seen without an in-kernel LAPIC: nothing can wake the vCPU.
                        self.request_stop(StopReason("guest-halt", f"vCPU {vcpu.vcpu_id} halted"))
                    case _ if isinstance(ex, FATAL_EXITS):
                        raise GuestFatalExit(vcpu.vcpu_id, ex)
                    case _:
                        log.warning("vCPU %d: unhandled exit %s", vcpu.vcpu_id, ex)
        except HvError as e:
            self._fail(slot, e)
        except Exception as e:
            self._fail(slot, DeviceFault(vcpu.vcpu_id, ex, e))
        finally:
            with self._cond:
                slot.parked = False
                self._cond.notify_all()


@contextmanager
def discard_on_error(machine: Machine) -> Iterator[Machine]:
    """Stop and close `machine` if the block raises, then re-raise: the one teardown of a machine
    that failed while being built (or filled by a restore). `stop()` comes first because a
    half-built machine may already have device workers (virtio) running on its memory."""
    try:
        yield machine
    except BaseException:
        discard(machine)
        raise


def discard(machine: Machine) -> None:
    """Stop `machine` and close its VM: a half-built machine's end, however it failed. `stop()`
    comes first because device workers (virtio) may be running on its memory."""
    machine.stop()
    machine.vm.close()
