"""`migrate verify`: the oracle a user can run on a snapshot or on a running VM.

A snapshot: its chain restored into a paused VM with the memory digest checked against the END
record's (every page as the snapshot's producer had it), then thrown away. A running VM (its
control socket): paused for the check, its memory digest computed. Either way, when the memory
holds the built-in guest (its status page is valid), the guest's working-set rule is checked
bit for bit (hv/guests/builtin.py: counters one pass apart at a single split, the fill intact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import formats
from hv.errors import GuestAddressError, HvError
from hv.guests import builtin as builtin_guest
from hv.kvm.kvm import Kvm
from hv.kvm.memory import GuestMemory
from hv.vmm.machine import Machine, RunState, discard
from migrate import digest
from migrate.errors import MigrateError


def guest_rule(memory: GuestMemory) -> dict[str, Any]:
    """The built-in guest's working-set rule over `memory` (a paused or stopped guest's), or
    `applies: false` when the memory does not hold that guest."""
    try:
        status = builtin_guest.read_status(memory)
    except GuestAddressError:  # too little RAM to hold the status page: another guest
        status = None
    if status is None or not status.valid:
        return {"applies": False, "summary": "not the built-in guest (no valid status page): no rule to check"}
    check = builtin_guest.check_memory(memory)
    return {"applies": True, "ok": check.ok, "summary": str(check), "passes": status.passes,
            "split": check.split, "bad_counters": list(check.bad_counters), "bad_fill": list(check.bad_fill)}


def verify_machine(machine: Machine) -> dict[str, Any]:
    """A live machine's memory, briefly paused: its digest now and the guest's rule."""
    was_running = machine.state is RunState.RUNNING
    if was_running:
        machine.pause()
    try:
        result: dict[str, Any] = {"memory_digest": f"{digest.digest(machine.vm.memory):#018x}",
                  "guest": guest_rule(machine.vm.memory)}
    finally:
        if was_running:
            machine.resume()
    result["ok"] = result["guest"].get("ok", True)
    return result


def verify_snapshot(path: str | Path, kvm: Kvm) -> dict[str, Any]:
    """A snapshot (and its chain) restored and checked: the END digest against the memory, then
    the guest's rule. `ok` is False, with `error`, if either fails."""
    from migrate.snapshot.snapshots import restore

    result: dict[str, Any] = {"path": str(path)}
    try:
        machine = restore(path, kvm, verify_memory=True)
    except (formats.FormatError, MigrateError, HvError) as e:
        result.update(ok=False, digest="refused", error={"type": type(e).__name__, "message": str(e)})
        return result
    try:
        result["digest"] = "verified: the memory is what the snapshot's producer had"
        result["guest"] = guest_rule(machine.vm.memory)
    finally:
        discard(machine)
    result["ok"] = result["guest"].get("ok", True)
    return result
