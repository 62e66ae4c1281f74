"""`migrate`: snapshots and live migration from the command line.

    migrate snapshot --api SOCK --out FILE [--live] [--incremental-from FILE] [--mappable] [--track-dirty]
    migrate restore FILE [--api SOCK]            run the snapshot's guest, console attached, on the
                 [--disk F|--disk-dir D [--disk-from-snapshot]]   disk as it was at the snapshot
    migrate restore --wait --api SOCK [--mem SIZE --cpus N]   a VMM ready to restore when asked
    migrate restore FILE --into SOCK [--json]    restore FILE into that waiting VMM
    migrate inspect FILE [--json]                what a snapshot holds, and whether it checks out
    migrate verify FILE|SOCK [--json]            the memory digest and the built-in guest's rule
    migrate recv --listen HOST:PORT [--api SOCK] [--key-file F] [--once]
    migrate send --api SOCK --to HOST:PORT [--downtime-ms N] [--bandwidth MiB/s] [--streams N]
                 [--no-auto-converge] [--dry-run] [--json] [--plot FILE.png]
    migrate status SOCK [--json]                 how a migration from that VM goes (phase, round, ETA)
    migrate cancel SOCK                          stop it; the guest runs on at the source
    migrate resolve SOCK [--force-resume-source | --force-stop-source]
                                                 end an in-doubt hand-over: ask the target, or force
    migrate plot STATS.json --out FILE.png       draw the rounds of a `migrate send --json`
    migrate demo                                 the built-in guest, migrated live to a second process

The VM to snapshot or send runs in another process (`hv run --api SOCK`, `migrate restore`,
`migrate recv`); these commands talk to its control socket, and a migration runs in that
process: killing `migrate send` leaves it running (watch it with `migrate status`, stop it with
`migrate cancel`); Ctrl-C in `migrate send` cancels it. Status, progress and logs go to stderr,
results (tables, JSON) and the guest console to stdout. `migrate COMMAND --help` for each
command's options (with their defaults and units) and examples.
"""

from __future__ import annotations

import argparse
import sys

from hv.vmm.cli import add_answer_timeout
from hv.vmm.command import dispatch, parse_size, run_parser
from migrate.commands.common import address
from migrate.commands.demo import cmd_demo
from migrate.commands.exits import EXITS
from migrate.commands.receiving import cmd_recv
from migrate.commands.sending import cmd_cancel, cmd_plot, cmd_resolve, cmd_send, cmd_start_postcopy, cmd_status
from migrate.commands.snapshotting import cmd_inspect, cmd_restore, cmd_snapshot, cmd_verify


def _add_tls_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="FILE", help="our certificate (PEM): mutual TLS, checked both ways; "
                   "with --tls-key and --tls-ca")
    p.add_argument("--tls-key", metavar="FILE", help="our private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="the CA (PEM) that signed the peer's certificate")


def _add_disk_arguments(p: argparse.ArgumentParser) -> None:
    disks = p.add_mutually_exclusive_group()
    disks.add_argument("--disk", metavar="FILE", help="this host's file for the guest's virtio disk "
                       "(the stream's disk path is only a name, never opened)")
    disks.add_argument("--disk-dir", metavar="DIR", help="find the guest's disk here, by the file name the "
                       "stream gives it (a regular file, no symbolic link)")


# --- parser -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap, command = run_parser("migrate", __doc__)

    p = command("snapshot", "snapshot a running VM through its control socket", """\
  migrate snapshot --api /tmp/vm.sock --out vm.snap --track-dirty
  migrate snapshot --api /tmp/vm.sock --out vm.inc --incremental-from vm.snap
  migrate snapshot --api /tmp/vm.sock --out vm.snap --mappable --json
  migrate snapshot --api /tmp/vm.sock --out vm.snap --live      the guest runs while it is written""")
    p.add_argument("--api", required=True, metavar="SOCK", help="the VM's control socket (hv run --api SOCK)")
    p.add_argument("--out", required=True, metavar="FILE", help="the snapshot file to write")
    p.add_argument("--incremental-from", metavar="FILE", help="store only pages changed since FILE "
                   "(a snapshot of this VM taken with --track-dirty)")
    p.add_argument("--mappable", action="store_true", help="raw memory in FILE.mem: `migrate restore` "
                   "copies it in (checked), or with --share-mem maps it")
    p.add_argument("--track-dirty", action="store_true", help="keep dirty logging on for a later incremental")
    p.add_argument("--live", action="store_true", help="pause the guest only to capture its state and "
                   "write-protect its RAM, then write while it runs (the file is the instant of the pause)")
    p.add_argument("--level", type=int, default=3, metavar="N", help="zstd compression level, 1..22")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.set_defaults(func=cmd_snapshot)

    p = command("restore", "restore a snapshot and run it (here, or in a VMM waiting for it)", """\
  migrate restore vm.snap                       checked (digest), then run; console on this terminal
  migrate restore vm.inc --api /tmp/vm2.sock    the whole chain, with a control socket
  migrate restore vm.snap --timeout 10
  migrate restore vm.snap --disk disk.img       the guest on disk.img, if it holds the snapshot's disk
  migrate restore vm.snap --disk disk.img --disk-from-snapshot   disk.img becomes the snapshot's disk
  migrate restore vm.snap --lazy --json         runs at once, memory loaded on fault and in the background
  migrate restore vm.snap --lazy --record-ms 500
                                                ... and its first 500 ms of pages stored for the next restore
  migrate restore --wait --api /tmp/vm.sock --mem 1G    ready (a 1 GiB VM built ahead); waits for:
  migrate restore vm.snap --into /tmp/vm.sock   restored there; prints the time to its first instruction""")
    p.add_argument("file", metavar="FILE", nargs="?", help="the snapshot (the last of a chain); not with --wait")
    p.add_argument("--api", metavar="SOCK", help="serve a control socket at this path")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="stop the guest after this many seconds; 0: never")
    p.add_argument("--no-verify", action="store_true", help="skip the memory digest check")
    _add_disk_arguments(p)
    p.add_argument("--disk-from-snapshot", action="store_true", help="write the snapshot's disk (FILE.disk) "
                   "to --disk FILE or to its name in --disk-dir, replacing what is there once the restore is "
                   "checked; without it a disk given must hold the snapshot's disk, and with no disk given "
                   "the guest runs on a private copy of FILE.disk, gone when it ends")
    p.add_argument("--share-mem", action="store_true", help="a mappable snapshot's .mem is mapped, not copied: "
                   "faster (with --no-verify, milliseconds), but the file must not change while the VM runs")
    p.add_argument("--lazy", action="store_true", help="run the guest before reading its memory: pages come in "
                   "on fault and in the background, each block checked on its way in (any kind of snapshot)")
    p.add_argument("--record-ms", type=int, default=0, metavar="MS", help="with --lazy: record the pages the "
                   "guest touches in its first MS ms and store them in the snapshot, for later restores to load first")
    p.add_argument("--wait", action="store_true", help="start, get ready and wait for a `restore` request on the "
                   "--api socket (migrate restore FILE --into SOCK); then run that guest")
    p.add_argument("--mem", type=parse_size, metavar="SIZE",
                   help="with --wait: the RAM of the VM built ahead, as hv run's --mem (default 256M; a snapshot "
                        "of another shape gets a VM built on request)")
    p.add_argument("--cpus", type=int, metavar="N", help="with --wait: the vCPUs of the VM built ahead (default 1)")
    p.add_argument("--into", metavar="SOCK", help="restore FILE into the VMM waiting at SOCK (migrate restore "
                   "--wait) and print what it took")
    p.add_argument("--json", action="store_true", help="the restore's timings as JSON on stdout (with --into: "
                   "when answered; here: when the run ends)")
    p.set_defaults(func=cmd_restore)

    p = command("inspect", "show and check a snapshot", """\
  migrate inspect vm.snap
  migrate inspect vm.snap --json --no-verify""")
    p.add_argument("file", metavar="FILE", help="the snapshot")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.add_argument("--no-verify", action="store_true", help="check framing and checksums only")
    p.set_defaults(func=cmd_inspect)

    p = command("verify", "check a snapshot or a running VM: the memory digest, and the built-in guest's "
                "working-set rule when it is that guest", """\
  migrate verify vm.snap                        the END digest against the restored memory, then the rule
  migrate verify /tmp/vm.sock --json            a running VM, paused for the check""")
    p.add_argument("target", metavar="FILE|SOCK", help="a snapshot file, or a VM's control socket")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.set_defaults(func=cmd_verify)

    p = command("recv", "wait for a migrating guest and run it", """\
  migrate recv                                  on 127.0.0.1:7380, loopback only
  migrate recv --listen 0.0.0.0:7380 --key-file key --api /tmp/target.sock
  migrate recv --listen 10.0.0.2:7380 --tls-cert t.pem --tls-key t.key --tls-ca ca.pem""")
    p.add_argument("--listen", type=address, default="127.0.0.1:7380", metavar="HOST:PORT",
                   help="where to listen; off loopback needs --key-file or TLS")
    p.add_argument("--api", metavar="SOCK", help="serve the received VM's control socket at this path")
    p.add_argument("--key-file", metavar="FILE", help="pre-shared key (also $KVMIGRATE_KEY); required off loopback")
    p.add_argument("--accept-timeout", type=float, default=0, metavar="SECONDS",
                   help="give up if no guest has arrived after this long; 0: wait on")
    p.add_argument("--once", action="store_true",
                   help="one shot: end after the first connection, whatever it was (by default a refused, "
                        "failed, stray or dry-run connection is logged and the next one awaited)")
    _add_disk_arguments(p)
    p.add_argument("--mem", type=parse_size, metavar="SIZE",
                   help="the most guest RAM to take: MiB, or with a suffix K, M, G, T (default: what this host "
                        "can reserve, MemAvailable)")
    p.add_argument("--max-vcpus", type=int, metavar="N",
                   help="the most vCPUs a guest may have to be taken (default: 4 per host CPU, at most what KVM "
                        "allows)")
    _add_tls_arguments(p)
    p.add_argument("--postcopy-wait", type=float, default=60, metavar="SECONDS",
                   help="post-copy: after a lost link, how long the source may take to come back before the "
                        "guest is paused here for good with the pages it has; 0: wait without end")
    p.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="stop the received guest after this long; 0: never")
    p.set_defaults(func=cmd_recv)

    p = command("send", "migrate a running VM live to a `migrate recv`", """\
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380
  migrate send --api /tmp/vm.sock --to 10.0.0.2:7380 --key-file key --bandwidth 1000 --downtime-ms 100
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380 --dry-run          only ask the target
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380 --json > stats.json --plot rounds.png
Ctrl-C cancels (the guest runs on at the source). Killing this command does not: the migration
runs in the VM's process; see migrate status and migrate cancel.""")
    p.add_argument("--api", required=True, metavar="SOCK", help="the VM's control socket")
    p.add_argument("--to", type=address, metavar="HOST:PORT", help="the target (migrate recv); required unless --resume")
    p.add_argument("--resume", action="store_true",
                   help="post-copy whose link stayed down past --postcopy-reconnect (the VM waits, paused, in "
                        "doubt): reconnect to its target and send it the pages it still lacks")
    p.add_argument("--downtime-ms", type=float, default=300, metavar="MS",
                   help="stop and copy once the rest fits in this pause, ms")
    p.add_argument("--bandwidth", type=float, default=0, metavar="MiB/s", help="cap what is sent, MiB/s; 0: none")
    p.add_argument("--streams", type=int, default=1, metavar="N", help="page streams: connections sending in "
                   "parallel (QEMU's multifd channels)")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="page-encoding threads")
    p.add_argument("--no-auto-converge", action="store_true",
                   help="never throttle the guest (default: throttle one that outruns the link)")
    p.add_argument("--max-rounds", type=int, default=30, metavar="N", help="give up after this many rounds")
    p.add_argument("--max-seconds", type=float, default=120, metavar="SECONDS", help="give up after this long")
    p.add_argument("--finish-anyway", action="store_true",
                   help="at max rounds/time, stop and copy anyway (longer downtime) instead of giving up")
    p.add_argument("--dry-run", action="store_true", help="only check that the target would accept (memory, "
                   "disk, CPUID, TSC, layout); nothing is sent")
    postcopy = p.add_mutually_exclusive_group()
    postcopy.add_argument("--postcopy", action="store_true",
                          help="post-copy after the first pre-copy round: the guest runs on the target at once "
                               "and fetches the pages it still lacks from here. RISK: from the switch until the "
                               "last page is in, the guest needs both hosts; if this one dies or the link stays "
                               "down, the target pauses the guest with what it has (a lost link is reconnected "
                               "within --postcopy-reconnect SECONDS)")
    postcopy.add_argument("--postcopy-after", type=int, metavar="N",
                          help="as --postcopy, after N pre-copy rounds (unless pre-copy has finished by then); "
                               "0: pure post-copy, the switch before any page is sent")
    postcopy.add_argument("--postcopy-after-ms", type=float, metavar="MS",
                          help="as --postcopy, MS after the pages began (mid-round if need be), unless pre-copy "
                               "has finished by then: QEMU's migrate-start-postcopy at a chosen moment")
    postcopy.add_argument("--postcopy-ready", action="store_true",
                          help="negotiate post-copy, but switch only when asked: the control socket's "
                               "migrate-start-postcopy (QEMU's), or `migrate start-postcopy --api SOCK`")
    postcopy.add_argument("--postcopy-auto", action="store_true",
                          help="as --postcopy, but only when pre-copy would not converge within --downtime-ms "
                               "(instead of throttling the guest or giving up)")
    p.add_argument("--postcopy-reconnect", type=float, default=30, metavar="SECONDS",
                   help="after the post-copy switch, how long to try to reconnect a lost link")
    p.add_argument("--final-copy-margin-ms", type=float, default=1000, metavar="MS",
                   help="the paused final copy waits for the target at most twice its downtime budget plus "
                        "this; past it the source resumes (or, after Commit, is in doubt)")
    p.add_argument("--key-file", metavar="FILE", help="pre-shared key (also $KVMIGRATE_KEY)")
    _add_tls_arguments(p)
    p.add_argument("--json", action="store_true", help="the stats as JSON on stdout")
    p.add_argument("--plot", metavar="FILE.png", help="draw the rounds into this PNG (needs kvmigrate[plot])")
    p.set_defaults(func=cmd_send)

    p = command("resolve", "end an in-doubt hand-over: ask the target whether it runs the guest, "
                "then stop or resume the source's copy", """\
  migrate resolve /tmp/vm.sock                  ask the target; exit 6 if it cannot say
  migrate resolve /tmp/vm.sock --force-stop-source""")
    p.add_argument("sock", metavar="SOCK", help="the source VM's control socket")
    force = p.add_mutually_exclusive_group()
    force.add_argument("--force-resume-source", action="store_true",
                       help="if the target cannot say: run the source's copy (RISK: two running copies if "
                            "the target runs the guest)")
    force.add_argument("--force-stop-source", action="store_true",
                       help="if the target cannot say: stop the source's copy (RISK: no running copy if the "
                            "target does not run the guest)")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    add_answer_timeout(p)
    p.set_defaults(func=cmd_resolve)

    p = command("status", "how a VM's migration goes: phase, round, pages and bytes done and left, "
                "rates, throttle, ETA", """\
  migrate status /tmp/vm.sock
  migrate status /tmp/vm.sock --json            phase none: no migration started yet""")
    p.add_argument("socket", metavar="SOCK", help="the migrating VM's control socket")
    p.add_argument("--json", action="store_true", help="the status as JSON on stdout")
    add_answer_timeout(p)
    p.set_defaults(func=cmd_status)

    p = command("cancel", "cancel a VM's running migration; the guest runs on at the source", """\
  migrate cancel /tmp/vm.sock""")
    p.add_argument("socket", metavar="SOCK", help="the migrating VM's control socket")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    add_answer_timeout(p)
    p.set_defaults(func=cmd_cancel)

    p = command("start-postcopy", "switch a VM's running migration to post-copy now (QEMU's "
                "migrate-start-postcopy; the migration must have negotiated it, e.g. --postcopy-ready)", """\
  migrate send --api /tmp/vm.sock --to 10.0.0.2:7380 --postcopy-ready &
  migrate start-postcopy /tmp/vm.sock""")
    p.add_argument("socket", metavar="SOCK", help="the migrating VM's control socket")
    p.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    p.set_defaults(func=cmd_start_postcopy)

    p = command("plot", "draw a migration's rounds (the stats of migrate send --json) into a PNG", """\
  migrate send --api /tmp/vm.sock --to 127.0.0.1:7380 --json > stats.json
  migrate plot stats.json --out rounds.png""")
    p.add_argument("stats", metavar="STATS.json", help="what migrate send --json printed")
    p.add_argument("--out", metavar="FILE.png", help="the PNG to write (default: STATS with .png)")
    p.set_defaults(func=cmd_plot)

    p = command("demo", "live-migrate the built-in guest to a second process", "  migrate demo\n"
                "  migrate demo --mem 4G --ws 1024 --rate 0")
    p.add_argument("--mem", type=parse_size, default=parse_size("1G"), metavar="SIZE",
                   help="guest RAM: MiB, or with a suffix K, M, G, T (default: 1G)")
    p.add_argument("--ws", type=int, default=256, metavar="MiB", help="working set, MiB")
    p.add_argument("--rate", type=int, default=100, metavar="MiB/s", help="dirty rate, MiB/s (0: as fast as it can)")
    p.add_argument("--every", type=int, default=1, metavar="N", help="report every N passes")
    p.add_argument("--passes-before", type=int, default=2, metavar="N", help="passes to wait for before migrating")
    p.add_argument("--downtime-ms", type=float, default=300, metavar="MS", help="downtime target, ms")
    p.add_argument("--json", action="store_true", help="the stats as JSON on stdout")
    p.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv, EXITS)


if __name__ == "__main__":
    sys.exit(main())
