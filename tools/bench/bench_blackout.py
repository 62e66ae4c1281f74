"""The guest-observed blackout of a live migration, measured from outside the guest, the same way
for kvmigrate and QEMU 7.2 (numbers, not asserts).

    .venv/bin/python tools/bench/bench_blackout.py [--runs N] [--scenario NAME ...] [--fill random|zero ...]
                                                   [--period-ms 5] [--peer kvmigrate|qemu ...] [--json]

Both peers boot the same image (`hv.guests.builtin.guest_image()`, a Multiboot ELF32) with the same
command line (`GuestParams(...).cmdline()`, the host's TSC rate in it) and migrate it on loopback
to a second process: kvmigrate as `hv run --kernel IMAGE --cmdline ... --api SOCK` ->
`migrate send` -> `migrate recv` (command-line tools only, run as subprocesses), QEMU as two
`qemu-system-x86_64` (tools/bench/qemu_driver.py's `Qemu`, `-incoming tcp:...`, QMP `migrate`,
max-bandwidth lifted, downtime-limit 300 ms). Each VMM keeps its other defaults (kvmigrate's
auto-converge is on, QEMU's is off).

The observer (tools/bench/echo_observer.py, threads of this process) writes `p<seq>` to the
guest's COM1 every `--period-ms` and stamps each echo with the monotonic clock: COM1 is the
stdin/stdout of `hv run` (source) and `migrate recv` (target), and a `-chardev socket` on both
QEMUs. The figures (tools/bench/echo_timeline.py): blackout = first echo from the target, less
the steady echo latency, minus the last echo from the source; echo p50/p99 on the source while it
is migrated; the steady latency before the migration, which must stay flat (else the period
saturates a console and the row is marked). Every figure is good to about one period, and to the
guest's COM1 poll interval: the workload checks for input once per 64 KiB it dirties, i.e. every
62.5 ms at 1 MiB/s (idle-*), 0.6 ms at 100 MiB/s, continuously at rate=0 (tiny-1g, hot256-max).

The window "while migrating" is the VMM's own total time, ending when it says the migration
completed (QMP `query-migrate`; the JSON `migrate send --json` prints as its control call
returns). `migrate send` is started with the source, and told to go when the migration is due:
its interpreter's start-up, which QEMU's already running QMP client has no counterpart of, is
over by then. Peers alternate run by run (A B, B A, A B, ...); each row gives the
median and the min-max spread of its runs, then the ratios kvmigrate/QEMU of the medians.
`--json` adds every run's figures (gap, lost and carried pings, the target's own latency, ...).

A little over 450 lines, on purpose: the two peers (each pre- and post-copy) must start, observe
and stop the guest the same way for their figures to compare, and that is easiest to check with
them side by side; the observer and the timeline it produces live apart (echo_*.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import bench_qemu as bq
import qemu_driver as qd
from echo_observer import Console, Observer, ObserverTimeoutError
from blackout_report import fmt_ms, print_scenario, ratios, scenario_title, summarise
from echo_timeline import SOURCE, TARGET, Timeline, TimelineError, analyse, matched_echoes, percentile

from hv.guests import builtin as bg

GUEST_POLL_BYTES = 16 * bg.PAGE_SIZE  # workload.c's CHUNK_PAGES: it looks at COM1 once per chunk
SETTLE = 0.3  # seconds of pings after `ready` before the steady window opens
STEADY = 1.5  # seconds of steady window before the migration starts
AFTER = 0.5  # seconds of pings to the target after its first echo
BIN = Path(sys.executable).parent  # .venv/bin: hv and migrate


@dataclass(frozen=True)
class Scenario:
    workload: qd.Workload
    every: int  # a pass line every N passes: a few a second at most, the console is for the pings
    fill: str = "random"

    @property
    def mem_mib(self) -> int:  # what bench_qemu.Qemu reads
        return self.workload.mem_mib

    def cmdline(self, tsc_khz: int) -> str:
        return bg.GuestParams(ws_mib=self.workload.ws_mib, rate_mib_s=self.workload.rate_mib_s, every=self.every,
                              tsc_khz=tsc_khz, fill=self.fill).cmdline()

    @property
    def poll_ms(self) -> float:
        rate = self.workload.rate_mib_s
        return GUEST_POLL_BYTES / (rate * qd.MiB) * 1000 if rate else 0.0


SCENARIOS = {  # the shared names (../shared/README.md) and tiny-1g: 1 GiB, ws=1, rate=0
    "tiny-1g": Scenario(qd.Workload(1024, 1, 0), every=1_000_000),  # ~3 us a pass undisturbed
    "idle-1g": Scenario(bq.IDLE_1G, every=1),
    "hot256-max": Scenario(bq.HOT256_MAX, every=1),
    "hot256-100": Scenario(bq.HOT256_100, every=1),
    "idle-4g": Scenario(bq.IDLE_4G, every=1),
}


@dataclass
class Reported:
    """What the VMM itself says about the migration."""
    outcome: str
    downtime_ms: float | None = None
    total_ms: float | None = None
    error: str | None = None
    completed_at: float | None = None  # monotonic seconds: when the VMM told us
    # post-copy, as kvmigrate reports it (QEMU's query-migrate has the page count only)
    fetched_pages: int | None = None
    fault_p50_ms: float | None = None
    fault_p99_ms: float | None = None
    vcpu_blocked_ms: float | None = None


class Peer(Protocol):
    name: str

    def consoles(self) -> tuple[Console, Console]: ...
    def migrate(self) -> Reported: ...


# --- QEMU ---------------------------------------------------------------------------------------


class ObservedQemu(qd.Qemu):
    """bench_qemu's Qemu with COM1 on a unix socket the observer connects to (the serial log file
    is kept as the chardev's logfile)."""

    def __init__(self, role: str, workdir: Path, image: Path, scenario: Scenario, tsc_khz: int,
                 incoming: str | None = None) -> None:
        super().__init__(role, workdir, image, scenario, tsc_khz, incoming)
        self.console_path = workdir / f"{role}.com1"
        i = self.args.index("-serial")
        self.args[i:i + 2] = ["-chardev", f"socket,id=com1,path={self.console_path},server=on,wait=off,"
                              f"logfile={self.serial}", "-serial", "chardev:com1"]
        self.console_sock: socket.socket | None = None

    def connect_console(self, timeout: float = 30.0) -> Console:
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.console_path))
                self.console_sock = sock
                return Console(self.role, sock.fileno(), sock.fileno())
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise qd.WaitTimeoutError(f"{self.role} COM1 socket", timeout) from None
                time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)  # killed first: the observer's reader then sees the socket end
        if self.console_sock is not None:
            self.console_sock.close()


class QemuPeer:
    name = "qemu"
    postcopy = False

    def __init__(self, stack: ExitStack, workdir: Path, image: Path, scenario: Scenario, tsc_khz: int) -> None:
        self.uri = f"tcp:127.0.0.1:{qd.free_port()}"
        self.source = stack.enter_context(ObservedQemu(SOURCE, workdir, image, scenario, tsc_khz))
        self.target = stack.enter_context(ObservedQemu(TARGET, workdir, image, scenario, tsc_khz,
                                                       incoming="defer" if self.postcopy else self.uri))
        self.qmp = self.source.connect()
        target = self.target.connect()
        if self.postcopy:  # both sides need the capability before the stream starts
            for qmp in (target, self.qmp):
                qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
            target.execute("migrate-incoming", uri=self.uri)

    def consoles(self) -> tuple[Console, Console]:
        return self.source.connect_console(), self.target.connect_console()

    def migrate(self) -> Reported:
        self.qmp.execute("migrate-set-parameters", **{"downtime-limit": bq.DOWNTIME_LIMIT_MS,
                                                      "max-bandwidth": bq.LIFTED_BANDWIDTH})
        self.qmp.execute("migrate", uri=self.uri)
        if self.postcopy:
            self._start_postcopy()
        info, _ = qd.wait_migration(self.qmp, bq.CONVERGENCE_TIMEOUT)
        completed_at = time.monotonic()
        status = info.get("status")
        if status == "completed":
            return Reported("completed", info.get("downtime"), info.get("total-time"), completed_at=completed_at)
        if status not in ("failed", "cancelled"):
            self.qmp.execute("migrate_cancel")
            return Reported("no convergence")
        return Reported("failed", error=info.get("error-desc", status))

    def _start_postcopy(self) -> None:
        """After one full pre-copy pass (so post-copy fetches only what the guest dirtied since)."""
        while True:
            info = self.qmp.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return
            if info.get("ram", {}).get("dirty-sync-count", 0) >= 2:
                self.qmp.execute("migrate-start-postcopy")
                return
            time.sleep(0.005)


class QemuPostcopyPeer(QemuPeer):
    """QEMU switching to post-copy after its first pass (userfaultfd on the target): optional,
    compared with kvmigrate-postcopy."""

    name = "qemu-postcopy"
    postcopy = True


# --- kvmigrate ----------------------------------------------------------------------------------


# `migrate send ARGS` (the console script's entry point, as .venv/bin/migrate runs it), its
# interpreter started and the command imported ahead, run on a line on stdin: its start-up
# (seconds of CPU on a busy host) is then over before the steady window, as QEMU's QMP client's is
SEND_WHEN_TOLD = """\
import sys
from importlib.metadata import entry_points
(command,) = entry_points(group="console_scripts", name="migrate")
main = command.load()
sys.stdin.readline()
sys.exit(main(sys.argv[1:]))
"""


class KvmigratePeer:
    name = "kvmigrate"
    send_options: tuple[str, ...] = ()

    def __init__(self, stack: ExitStack, workdir: Path, image: Path, scenario: Scenario, tsc_khz: int) -> None:
        self.api, self.address = workdir / "source.sock", f"127.0.0.1:{qd.free_port()}"
        self.workdir = workdir
        self.source = self._spawn(stack, SOURCE, [str(BIN / "hv"), "run", "--kernel", str(image), "--mem",
                                                  f"{scenario.mem_mib}M", "--cmdline", scenario.cmdline(tsc_khz),
                                                  "--api", str(self.api)])
        self.target = self._spawn(stack, TARGET, [str(BIN / "migrate"), "recv", "--listen", self.address,
                                                  "--accept-timeout", "300"])
        self.send = self._spawn(stack, "send", [sys.executable, "-c", SEND_WHEN_TOLD, "send", "--api", str(self.api),
                                                "--to", self.address, "--downtime-ms", str(bq.DOWNTIME_LIMIT_MS),
                                                "--json", *self.send_options])

    def _spawn(self, stack: ExitStack, role: str, argv: list[str]) -> subprocess.Popen:
        with open(self.workdir / f"{role}.stderr", "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        stack.callback(self._end, proc)
        return proc

    @staticmethod
    def _end(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # a clean stop (the VM closed), then the hard way
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    def consoles(self) -> tuple[Console, Console]:
        return (Console(SOURCE, self.source.stdin.fileno(), self.source.stdout.fileno()),
                Console(TARGET, self.target.stdin.fileno(), self.target.stdout.fileno()))

    def _wait_for(self, what: str, ready, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            for role, proc in ((SOURCE, self.source), (TARGET, self.target)):
                if proc.poll() is not None:
                    raise qd.BenchError(f"{role} exited with {proc.returncode}: "
                                        f"{(self.workdir / f'{role}.stderr').read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise qd.WaitTimeoutError(what, timeout)
            time.sleep(0.01)

    def migrate(self) -> Reported:
        self._wait_for("the source's control socket", self.api.exists)
        self._wait_for("the target to listen",
                       lambda: b"listening on" in (self.workdir / "target.stderr").read_bytes())
        self.send.stdin.write(b"go\n")
        self.send.stdin.flush()
        text, completed_at = b"", None
        for line in self.send.stdout:  # the result is printed as the control call returns: stamp it
            text += line
            if line == b"}\n":
                completed_at = time.monotonic()
        self.send.wait()
        try:
            stats = json.loads(text)
        except json.JSONDecodeError:
            stderr = (self.workdir / "send.stderr").read_text(errors="replace")
            return Reported("failed", error=(stderr or text.decode(errors="replace")).strip()[-2000:])
        if stats["outcome"] != "completed":
            return Reported(stats["outcome"], error=stats.get("reason"))
        postcopy = {}
        if (pc := stats.get("postcopy")) is not None:
            postcopy = {"fetched_pages": pc["fetched_pages"], "fault_p50_ms": pc["fault_p50_us"] / 1000,
                        "fault_p99_ms": pc["fault_p99_us"] / 1000, "vcpu_blocked_ms": pc["vcpu_blocked_ms"]}
        return Reported("completed", stats["downtime_ms"], stats["total_seconds"] * 1000, completed_at=completed_at,
                        **postcopy)


class KvmigratePostcopyPeer(KvmigratePeer):
    """kvmigrate switching to post-copy after round 0 (`migrate send --postcopy`), as the
    qemu-postcopy peer does after its first pass: compared with it."""

    name = "kvmigrate-postcopy"
    send_options = ("--postcopy",)


PEERS = {"kvmigrate": KvmigratePeer, "qemu": QemuPeer, "qemu-postcopy": QemuPostcopyPeer,
         "kvmigrate-postcopy": KvmigratePostcopyPeer}


# --- one run ------------------------------------------------------------------------------------


def _ready_timeout(scenario: Scenario) -> float:
    return 60.0 + scenario.workload.mem_mib / 256  # boot and the working set's first fill, generously


def run_once(peer_name: str, scenario: Scenario, image: Path, tsc_khz: int, period: float) -> dict:
    observer = Observer(period)
    with tempfile.TemporaryDirectory(prefix="bench-blackout-") as tmp, ExitStack() as stack:
        peer: Peer = PEERS[peer_name](stack, Path(tmp), image, scenario, tsc_khz)
        for console in peer.consoles():
            observer.attach(console)
        observer.wait_line(SOURCE, lambda line: line.startswith("kvmig: ready"), _ready_timeout(scenario),
                           "`kvmig: ready` from the source guest")
        observer.start_pinging()
        steady_from = time.monotonic() + SETTLE
        time.sleep(SETTLE + STEADY)
        now = time.monotonic()
        steady = Timeline(period, *observer.seen(), steady_from, now, now, now)
        observer.arm_target(quiet_after=max(4 * period, 2 * steady_p99(steady)))
        asked = time.monotonic()
        reported = peer.migrate()
        end = reported.completed_at or time.monotonic()
        # the window "while migrating" is the VMM's own total time, which ends as it tells us:
        # kvmigrate's `migrate send` start-up is left out, as QEMU has none
        start = max(asked, end - reported.total_ms / 1000) if reported.total_ms else asked
        if reported.outcome == "completed" and observer.wait_echo(TARGET, timeout=30):
            time.sleep(AFTER)
        timeline = Timeline(period, *observer.stop(), steady_from, asked, start, end)
    row = {"peer": peer_name, "asked_to_completed_ms": (end - asked) * 1000, **asdict(reported),
           **pass_times(observer.lines, asked, end)}
    del row["completed_at"]
    if reported.outcome != "completed":
        return row
    try:
        figures = analyse(timeline)
    except TimelineError as e:
        return row | {"outcome": "unmeasured", "error": e.what}
    return row | asdict(figures) | {"saturated": figures.saturated}


def pass_times(lines: dict[str, list[tuple[float, str]]], asked: float, end: float) -> dict[str, float | None]:
    """The guest's own pace (its `kvmig: pass N ms=T` lines, T from one TSC on both hosts):
    the median pass before the migration was asked for (source), while it ran (target passes
    done before it completed: post-copy's slowdown), the pass the switch fell in, and after."""
    passes = []  # (arrived, side, number, ms)
    for side, seen in lines.items():
        for arrived, line in seen:
            parts = line.split()
            if len(parts) == 4 and parts[:2] == ["kvmig:", "pass"] and parts[3].startswith("ms="):
                passes.append((arrived, side, int(parts[2]), int(parts[3][3:])))
    passes.sort(key=lambda p: p[2])
    spans = [(b[0], b[1], b[3] - a[3]) for a, b in zip(passes, passes[1:]) if b[2] == a[2] + 1]

    def median(values: list[int]) -> float | None:
        return statistics.median(values) if values else None

    first_target = next((i for i, (_, side, _) in enumerate(spans) if side == TARGET), None)
    return {"pass_ms_before": median([ms for at, side, ms in spans if side == SOURCE and at < asked]),
            "pass_ms_switch": spans[first_target][2] if first_target is not None else None,
            "pass_ms_during": median([ms for i, (at, side, ms) in enumerate(spans)
                                      if side == TARGET and i != first_target and at <= end]),
            "pass_ms_after": median([ms for at, side, ms in spans if side == TARGET and at > end])}


def steady_p99(timeline: Timeline) -> float:
    """Seconds: the p99 of the source's latency so far (what `quiet` must exceed)."""
    source = [seconds for (side, _), seconds in matched_echoes(timeline).latency.items() if side == SOURCE]
    return percentile(source, 99) if source else 0.0


# --- runs --------------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


PROGRESS = [("blackout", "blackout_ms"), ("gap", "gap_ms"), ("self downtime", "downtime_ms"),
            ("echo p50", "during_p50_ms"), ("p99", "during_p99_ms"), ("steady", "steady_p50_ms"),
            ("total", "total_ms")]  # ms, one line per run on stderr


def run_scenario(name: str, scenario: Scenario, peers: list[str], runs: int, image: Path, tsc_khz: int,
                 period: float) -> dict:
    done: dict[str, list[dict]] = {peer: [] for peer in peers}
    order = []
    for i in range(runs):
        for peer in peers if i % 2 == 0 else reversed(peers):  # A B, B A, A B, ...
            try:
                run = run_once(peer, scenario, image, tsc_khz, period)
            except (qd.BenchError, ObserverTimeoutError) as e:
                run = {"peer": peer, "outcome": "failed", "error": str(e)}
            order.append(peer)
            done[peer].append(run)
            if "blackout_ms" in run:
                figures = ", ".join(f"{label} {fmt_ms(run[key])}" for label, key in PROGRESS)
                figures += " SATURATED" if run["saturated"] else ""
            else:
                figures = run.get("error") or ""
            _progress(f"{name} run {i + 1}/{runs} {peer}: {run['outcome']}, {figures}")
    summary = {peer: summarise(done[peer]) for peer in peers}
    return {"scenario": asdict(scenario), "order": order, "runs": done, "summary": summary,
            "ratios": ratios(summary)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="runs per scenario and peer")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), metavar="NAME",
                    help=f"repeatable; default all: {', '.join(SCENARIOS)}")
    ap.add_argument("--fill", action="append", choices=("random", "zero"),
                    help="the guest's fill (repeatable; default random)")
    ap.add_argument("--peer", action="append", choices=list(PEERS),
                    help="repeatable; default kvmigrate and qemu (the post-copy peers only when named)")
    ap.add_argument("--period-ms", type=float, default=5.0, help="ping period: the figures' resolution")
    ap.add_argument("--json", action="store_true", help="one JSON document instead of the tables")
    args = ap.parse_args()
    peers = args.peer or ["kvmigrate", "qemu"]
    image, tsc_khz = bg.guest_image(), qd.host_tsc_khz()
    qemu = subprocess.run([qd.QEMU, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    result: dict = {"qemu": qemu, "tsc_khz": tsc_khz, "image": str(image), "runs": args.runs, "peers": peers,
                    "period_ms": args.period_ms,
                    "settings": {"downtime_limit_ms": bq.DOWNTIME_LIMIT_MS, "qemu_max_bandwidth": bq.LIFTED_BANDWIDTH,
                                 "settle_s": SETTLE, "steady_s": STEADY},
                    "scenarios": {}}
    for name in args.scenario or list(SCENARIOS):
        for fill in args.fill or ["random"]:
            scenario = Scenario(SCENARIOS[name].workload, SCENARIOS[name].every, fill)
            key = f"{name} fill={fill}"
            out = run_scenario(key, scenario, peers, args.runs, image, tsc_khz, args.period_ms / 1000)
            result["scenarios"][key] = out
            if not args.json:
                w = scenario.workload
                title = scenario_title(key, w.mem_mib, w.ws_mib, w.rate_mib_s, scenario.poll_ms, args.runs,
                                       args.period_ms)
                print_scenario(title, out["summary"], out["ratios"])
    if args.json:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
