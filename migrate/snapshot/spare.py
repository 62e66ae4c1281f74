"""The VM a restore fills: built for it (`fresh_machine`), or built before the snapshot was known
(`SpareMachine`), which is what a VMM waiting for a restore (`migrate restore --wait`) prepares
so that the request pays for none of it.

Why a VM built ahead: on this project's hosts (nested PVM, 2 cores) building one costs more than
the rest of a small guest's restore. Registering a memory slot (KVM_SET_USER_MEMORY_REGION) and
creating the irqchip each wait for a grace period of the kernel's: 0-8 ms each, in ~4 ms steps
(one per slot: a guest of more than 3 GiB has two), measured 2026-12-08; starting the vCPU threads
and parking them 0.4-2.7 ms more. A `SpareMachine` does all of that for one shape (memory size,
vCPUs): RAM anonymous and empty, vCPU threads started and parked, the standard devices on the
console it was given. A restore of a snapshot of that shape takes it: the staging memory the
snapshot was read and checked in is moved into its regions (page tables move, no byte is copied:
`MemoryRegion.take_pages`; the memory slots keep their addresses), the snapshot's virtio devices
are added, and the state goes in as into any machine that never ran. A snapshot of another
shape gets a machine built on request, as `migrate restore` builds one.

The checks stay where they were: a corrupt or foreign snapshot is refused while its pages are in
staging memory, in no VM, so a refusal leaves the spare as it was. Once taken, the machine is the
restore's (a failure after that discards it, as any machine being filled), and the waiting VMM
builds another.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Protocol

from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory, RamBacking, pages_movable
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, add_virtio_config, blank_machine
from hv.vmm.machine import Machine, discard, discard_on_error
from migrate.snapshot.files import config_problems

log = logging.getLogger(__name__)

Console = Callable[[bytes], None]


class MachineFactory(Protocol):
    """Makes the machine a restore fills: of `config`, COM1 writing to `console`, the virtio
    devices `virtio` asks for, and RAM holding `staging`'s pages (the snapshot's, checked; with
    `shared`, a mappable snapshot's file mapped), or empty anonymous RAM (None: a lazy restore's,
    filled on fault). The machine has not run; it may be started paused already."""

    def __call__(self, kvm: Kvm, config: VmConfig, console: Console, *, virtio: VirtioConfig | None,
                 staging: GuestMemory | None, shared: bool) -> Machine: ...


def fresh_machine(kvm: Kvm, config: VmConfig, console: Console, *, virtio: VirtioConfig | None,
                  staging: GuestMemory | None, shared: bool) -> Machine:
    """A new machine whose RAM is `staging`'s mappings themselves (handed over, not copied), or
    empty anonymous RAM."""
    if staging is None:
        return blank_machine(kvm, config, console, virtio=virtio, backing=RamBacking.host_filled)
    by_base = {r.guest_base: r for r in staging.regions}
    return blank_machine(kvm, config, console, virtio=virtio, backing=lambda base, size: RamBacking(
        by_base[base].mapping, anonymous=not shared))


class SpareMachine:
    """A blank machine of `config`'s shape, built now, started paused, for one restore to take
    (it is a `MachineFactory`: a restore of any other shape, or with another console, gets a
    fresh machine and leaves this one be). `RamMoveError` if this kernel cannot move a restore's
    pages into it."""

    def __init__(self, kvm: Kvm, config: VmConfig, console: Console) -> None:
        if (cannot := pages_movable()) is not None:  # a kernel before 5.13: restores build their VM
            raise cannot
        self.kvm, self.config, self.console = kvm, config, console
        machine = blank_machine(kvm, config, console, backing=RamBacking.host_filled)
        with discard_on_error(machine):
            machine.start(paused=True)  # its vCPU threads up and parked: none has entered the guest
        self._machine: Machine | None = machine

    @property
    def machine(self) -> Machine | None:
        """The machine built ahead, while no restore has taken it."""
        return self._machine

    @property
    def taken(self) -> bool:
        """A restore took it (or it was closed): it is no longer this spare's."""
        return self._machine is None

    def fits(self, kvm: Kvm, config: VmConfig, console: Console) -> bool:
        return (self._machine is not None and kvm is self.kvm and console is self.console
                and not config_problems(config, self.config))

    def __call__(self, kvm: Kvm, config: VmConfig, console: Console, *, virtio: VirtioConfig | None,
                 staging: GuestMemory | None, shared: bool) -> Machine:
        machine = self._machine
        if machine is None or not self.fits(kvm, config, console):
            return fresh_machine(kvm, config, console, virtio=virtio, staging=staging, shared=shared)
        self._machine = None  # from here on it is the restore's, whatever happens
        try:
            with discard_on_error(machine):
                for region, staged in zip(machine.vm.memory.regions, staging.regions if staging else [],
                                          strict=staging is not None):  # (none: its empty RAM is the lazy one's)
                    region.take_pages(staged)
        except BaseException:
            if virtio is not None and virtio.disk_fd is not None:
                os.close(virtio.disk_fd)  # handed to this machine, which will have no disk now
            raise
        if virtio is not None:
            add_virtio_config(machine, virtio)  # (the machine discarded if that fails)
        log.info("restoring into the VM built ahead (%d MiB, %d vCPU)", config.mem_size >> 20, config.vcpus)
        return machine

    def close(self) -> None:
        """Discard it if no restore took it."""
        machine, self._machine = self._machine, None
        if machine is not None:
            discard(machine)
