"""`migrate recv`: a migration target on this host, the guest run here once it arrives."""

from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING

from hv.kvm.kvm import Kvm
from hv.vmm.cli import LineConsole, MachineRun, run_machine, terminal
from hv.vmm.command import ExitStatus, say
from hv.vmm.control import extensions as control_extensions
from hv.vmm.signals import CaughtSignals
from migrate.errors import PostcopyFailed
from migrate.commands.common import guest_console, read_key, tls_of

if TYPE_CHECKING:
    from hv.vmm.machine import Machine
    from migrate.transport.listener import Listener


SETTLE_SECONDS = 0.1  # the guest runs alone this long after it arrives (issue: a quiet switchover)


def cmd_recv(args: argparse.Namespace) -> int:
    from migrate.transport.listener import Listener

    control_extensions()  # found and imported now, not beside the guest's first moments here
    # Every resource the guest needs here once it runs is taken before the target says Ready:
    # the control socket now (a bad --api refuses before anything is accepted), the rest as
    # each migration builds its machine (`prepare`). After Commit nothing is left that can fail.
    with MachineRun(args.api) as run:
        listener = Listener(args.listen, read_key(args.key_file), tls_of(args))
        return _receive(args, run, listener)


def _receive(args: argparse.Namespace, run: MachineRun, listener: Listener) -> int:
    from migrate.live.receiver import Receiver
    from migrate.options import ReceiveOptions

    console, watch = guest_console()

    def prepare(machine: Machine) -> None:
        run.prepare(machine, watch=watch, extra={"console": console})

    with Kvm() as kvm:
        # Queries from a source in doubt are answered for as long as this process runs
        options = ReceiveOptions(console=console, terminal=terminal(), disk=args.disk, disk_dir=args.disk_dir,
                                 max_mem=args.mem, virtio_console=LineConsole(),
                                 postcopy_wait=args.postcopy_wait or None, prepare=prepare, max_vcpus=args.max_vcpus)
        receiver = Receiver(listener, kvm, options, once=args.once)
        try:
            say("migrate", f"listening on {listener.address}")  # once connections are taken
            try:
                incoming = receiver.receive(args.accept_timeout or None)
            except PostcopyFailed as e:
                return _hold_a_stranded_guest(e, args.timeout)
            if incoming.machine is None:
                say("migrate", "dry run: this host would accept the guest")
                return ExitStatus.OK
            return run_machine(incoming.machine, run, timeout=args.timeout, start=False, settle=SETTLE_SECONDS,
                               announce=f"migrate: received the guest from {incoming.source} "
                                        f"({incoming.pages} pages, {incoming.seconds:.2f} s); it runs here now")
        finally:
            receiver.close()
            listener.close()


def _hold_a_stranded_guest(error: PostcopyFailed, timeout: float) -> int:
    """Post-copy broke off past --postcopy-wait: the guest stays paused here with the pages it
    has (it cannot run without the rest, which only its source held) until Ctrl-C, SIGTERM or
    --timeout; then it is given up."""
    ended = threading.Event()
    try:
        with CaughtSignals(lambda _signum: ended.set()):
            say("migrate", f"{error}. The guest is kept paused here; Ctrl-C or SIGTERM gives it up", "red")
            ended.wait(timeout or None)
    finally:
        error.discard()
    return ExitStatus.IN_DOUBT
