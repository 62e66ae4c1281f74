"""Fuzz every decoder that faces a peer: a small, seeded mutation fuzzer over real inputs.

    .venv/bin/python tools/bench/fuzz.py [--inputs N] [--target NAME ...] [--seed S] [--json] [--save DIR]

Targets (each: real seed inputs, the decoder as the peer meets it, the errors it may raise):

- `stream`: a snapshot's bytes into `formats.StreamReader` (the migration stream's reader too),
  in two chunks: records or a `FormatError`;
- `snapshot`: the whole reader a restore runs, to the state checked in staging (`Collected`,
  shape and the vCPUs' architectural rules): a `FormatError` or a `MigrateError`;
- `message`: a migration frame (header and body) as `Connection.receive` takes it (the cap per
  kind, then `transport.decode`): a message or a `ProtocolViolation`;
- `control-request`: a control socket's request line (`parse_request`): a command or `BadRequest`;
- `control-answer`: a control socket's reply line as a client reads it (`parse_reply`, and
  `migrate status`'s `expect` and `describe`): a reply, its line, or `BadReply`.

Anything else a decoder raises is a finding: its type, where, and the input (saved with --save).
Each input is a seed mutated 1-8 times (bytes set, flipped, inserted, deleted, a slice repeated or
spliced from another seed, the end cut, an integer field made extreme), or random bytes. The
suite runs each target for a few hundred inputs (tests/test_fuzz.py); this command for 10^6 each
by default, and prints inputs per second (a loaded host's figure is indicative only).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import formats  # noqa: E402
from formats import StreamReader  # noqa: E402
from migrate.errors import MigrateError, ProtocolViolation  # noqa: E402


@dataclass
class Target:
    name: str
    seeds: list[bytes]
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    structured: Callable[[random.Random], bytes] | None = None  # mutants past the checksums, half the time


@dataclass
class Finding:
    error: str
    where: str
    data: bytes


@dataclass
class Result:
    target: str
    inputs: int = 0
    refused: int = 0  # inputs the decoder refused with an allowed error
    seconds: float = 0.0
    slowest_ms: float = 0.0  # the slowest input, timed again alone (best of 3): a loaded host's pause is not it
    slowest: bytes = b""
    findings: dict[str, Finding] = field(default_factory=dict)  # one per (error, where)

    def as_dict(self) -> dict:
        return {"target": self.target, "inputs": self.inputs, "refused": self.refused,
                "inputs_per_s": round(self.inputs / self.seconds) if self.seconds else 0,
                "slowest_ms": round(self.slowest_ms, 2),
                "findings": [{"error": f.error, "where": f.where, "size": len(f.data)} for f in self.findings.values()]}


# --- the targets ------------------------------------------------------------------------------------


def _snapshot_bytes() -> bytes:
    """A real snapshot of the built-in guest's machine, built and never run (32 MiB)."""
    from hv.guests import builtin as bg
    from hv.kvm.kvm import Kvm
    from hv.kvm.vm import VmConfig
    from hv.vmm.builder import builtin_machine
    from hv.vmm.machine import discard
    from migrate.snapshot.snapshots import snapshot

    with Kvm() as kvm, tempfile.TemporaryDirectory() as tmp:
        machine = builtin_machine(kvm, bg.GuestParams(ws_mib=1), VmConfig(mem_size=32 << 20))
        try:
            machine.start(paused=True)
            snapshot(machine, Path(tmp) / "seed.snap", level=1)
        finally:
            discard(machine)
        return (Path(tmp) / "seed.snap").read_bytes()


def _host_features() -> tuple:
    from hv.kvm.archcheck import host_features
    from hv.kvm.kvm import Kvm

    with Kvm() as kvm:
        return host_features(kvm)


def _state_sections(snap: bytes) -> list[tuple[int, bytes]]:
    """The seed snapshot's sections but its page data (PAGES, and the MEMORY_INDEX and
    WORKING_SET that describe them: tests/formats/test_fmt_index.py fuzzes those) and END, as
    (kind, body): what a structured mutant changes before it is framed again with valid
    checksums (so the decoders past them see it)."""
    from formats.stream import FRAME, HEADER

    out, at = [], HEADER.size
    while at + FRAME.size <= len(snap):
        kind, _flags, length, _digest = FRAME.unpack_from(snap, at)
        body = snap[at + FRAME.size:at + FRAME.size + length]
        at += FRAME.size + length
        if kind not in (formats.SectionKind.PAGES, formats.SectionKind.MEMORY_INDEX, formats.SectionKind.WORKING_SET,
                        formats.SectionKind.END):
            out.append((kind, body))
    return out


def _reframer(sections: list[tuple[int, bytes]]) -> Callable[[random.Random], bytes]:
    """A stream of `sections` with one body mutated (or a section dropped or repeated), framed
    with valid checksums and an END that counts them."""
    from formats import StreamWriter
    from migrate.state import PRODUCER, registry

    bodies = [body for _, body in sections]

    def build(rng: random.Random) -> bytes:
        chosen = list(sections)
        i = rng.randrange(len(chosen))
        op = rng.random()
        if op < 0.8:
            chosen[i] = (chosen[i][0], mutate(rng, [chosen[i][1], *rng.sample(bodies, 1)]))
        elif op < 0.9:
            del chosen[i]
        else:
            chosen.insert(i, chosen[rng.randrange(len(chosen))])
        writer = StreamWriter(registry(), producer=PRODUCER)
        return b"".join([writer.header(), *(writer.section(k, b) for k, b in chosen), writer.end(0)])

    return build


def stream_target(snap: bytes) -> Target:
    from migrate.records import EXPECT
    from migrate.state import registry

    def run(data: bytes) -> None:
        reader = StreamReader(registry(), expect=EXPECT)
        cut = len(data) // 2
        reader.feed(data[:cut])
        reader.feed(data[cut:])
        reader.finish()

    return Target("stream", [snap], run, (formats.FormatError,), _reframer(_state_sections(snap)))


def snapshot_target(snap: bytes, host: tuple) -> Target:
    from migrate.records import EXPECT, Collected
    from migrate.state import registry

    def run(data: bytes) -> None:
        reader = StreamReader(registry(), expect=EXPECT)
        loaded = Collected()
        loaded.take(reader.feed(data))
        reader.finish()
        loaded.state(host)

    return Target("snapshot", [snap], run, (formats.FormatError, MigrateError), _reframer(_state_sections(snap)))


def message_target(snap: bytes) -> Target:
    from migrate.protocol import (Accept, Cancel, Channel, Commit, Complete, Discard, Error, ErrorCode, Fetch,
                                  Finished, Hello, Missing, Pages, Postcopy, Query, Ready, Reconnect, Reject,
                                  Resumed, RoundDone, State, Verdict)
    from migrate.transport.framing import FRAME, FRAME_CAPS, decode, encode

    samples = [Hello(1, "2.0", "kvmigrate", snap[:200], snap[200:300], b"\x90", streams=2, postcopy=True),
               Accept(b"s" * 16), Reject(("too big", "no disk")), Pages(3, snap[:512]), RoundDone(2, 100),
               State(snap[:256]), Complete(snap[-64:]), Ready(5, 6), Commit(), Resumed(7), Cancel("why"),
               Error(ErrorCode.PROTOCOL, "bad"), Channel(b"s" * 16, 1), Query(b"q" * 16),
               Verdict(b"q" * 16, "committed", "detail"), Postcopy(b"\x00" * 24, 0), Fetch(b"\x00" * 16),
               Finished(1, 2, 3, 4, 5), Reconnect(b"r" * 16), Missing(b"\x00" * 24, 0), Discard(b"\x00" * 24, 0)]
    seeds = [b"".join(bytes(p) for p in encode(m)) for m in samples]

    def run(data: bytes) -> None:
        if len(data) < FRAME.size:
            raise ProtocolViolation("short")
        length, kind = FRAME.unpack_from(data)
        body = data[FRAME.size:]
        if length > FRAME_CAPS.get(kind, 0) or length != len(body):
            raise ProtocolViolation("refused from the header")  # as Connection.receive does
        decode(kind, body)

    return Target("message", seeds, run, (ProtocolViolation,))


def control_request_target() -> Target:
    from hv.vmm.control import MAX_REQUEST, ControlError, parse_request

    seeds = [b'{"command": "status"}', b'{"command": "migrate-send", "to": "127.0.0.1:7380", "options": '
             b'{"downtime_ms": 300, "streams": 2, "key": "00ff"}}', b'{"command": "snapshot", "out": "/tmp/x"}',
             b'{"command": "migrate-resolve", "force": null}']

    def run(data: bytes) -> None:
        parse_request(data[:MAX_REQUEST])

    return Target("control-request", seeds, run, (ControlError,))


def control_answer_target() -> Target:
    from hv.vmm.control import MAX_REPLY, ControlError, expect, parse_reply
    from migrate.commands.common import STATUS_FIELDS
    from migrate.commands.sending import describe

    seeds = [b'{"progress": {"stage": "pages", "round": 1}}',
             b'{"ok": true, "result": {"phase": "precopy", "round": 2, "round_pages_total": 100, '
             b'"round_pages_done": 5, "dirty_rate_mib_s": 1.5, "throttle": 0.2, "eta_seconds": null}}',
             b'{"ok": false, "error": {"type": "Busy", "message": "held", "facts": {"owner": "x"}}}']

    def run(data: bytes) -> None:
        reply = parse_reply(data[:MAX_REPLY], "fuzz")
        if reply.get("ok"):  # as `migrate status` reads it, to its one line
            describe(expect(reply["result"], "fuzz", "migrate-status", {"phase": str}, STATUS_FIELDS))

    return Target("control-answer", seeds, run, (ControlError,))


def all_targets() -> list[Target]:
    snap = _snapshot_bytes()
    return [stream_target(snap), snapshot_target(snap, _host_features()), message_target(snap),
            control_request_target(), control_answer_target()]


# --- the mutator ------------------------------------------------------------------------------------

EXTREMES = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x80",
            b"\xff" * 8, b"\xcf" + b"\xff" * 8, b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
            b"9" * 20, b"-", b"[", b"{", b'"', b"\\u0000", b"1e999"]


def mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    if rng.random() < 0.05:
        return rng.randbytes(rng.randrange(64))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(8)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and pos < len(data):
            data[pos] = rng.randrange(256)
        elif op == 1 and pos < len(data):
            data[pos] ^= 1 << rng.randrange(8)
        elif op == 2:
            data[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            del data[pos:pos + rng.randint(1, 16)]
        elif op == 4 and data:
            start = rng.randrange(len(data))
            chunk = data[start:start + rng.randint(1, 64)]
            data[pos:pos] = chunk * rng.randint(1, 4)
        elif op == 5:
            other = rng.choice(seeds)
            start = rng.randrange(len(other) + 1)
            data[pos:pos] = other[start:start + rng.randint(1, 128)]
        elif op == 6:
            del data[pos:]
        else:
            value = rng.choice(EXTREMES)
            data[pos:pos + len(value)] = value
    return bytes(data)


def fuzz(target: Target, inputs: int, seed: int = 0, deadline: float | None = None) -> Result:
    """Run `target` on `inputs` mutants (fewer if `deadline`, a monotonic time, passes first)."""
    rng = random.Random(f"{seed}:{target.name}")
    result = Result(target.name)
    t0 = time.perf_counter()
    for seed_input in target.seeds:  # the seeds themselves must decode
        target.run(seed_input)
    for i in range(inputs):
        if deadline is not None and i % 64 == 0 and time.monotonic() > deadline:
            break
        data = target.structured(rng) if target.structured and rng.random() < 0.5 else mutate(rng, target.seeds)
        started = time.perf_counter()
        try:
            target.run(data)
        except target.allowed:
            result.refused += 1
        except Exception as e:  # noqa: BLE001 - a finding
            frame = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
            key = f"{type(e).__name__} at {where}"
            if key not in result.findings:
                result.findings[key] = Finding(f"{type(e).__name__}: {str(e)[:200]}", where, data)
        took = (time.perf_counter() - started) * 1000
        if took > result.slowest_ms:
            result.slowest_ms, result.slowest = took, data
        result.inputs += 1
    result.seconds = time.perf_counter() - t0
    if result.slowest:
        result.slowest_ms = min(_timed(target, result.slowest) for _ in range(3))
    return result


def _timed(target: Target, data: bytes) -> float:
    started = time.perf_counter()
    try:
        target.run(data)
    except Exception:  # noqa: BLE001 - (its kind was judged already)
        pass
    return (time.perf_counter() - started) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=1_000_000, help="mutants per target")
    ap.add_argument("--target", action="append", help="only these (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0, help="stop each target after this long (0: no limit)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", metavar="DIR", help="write each finding's input here")
    args = ap.parse_args(argv)
    results = []
    for target in all_targets():
        if args.target and target.name not in args.target:
            continue
        deadline = time.monotonic() + args.seconds if args.seconds else None
        result = fuzz(target, args.inputs, args.seed, deadline)
        results.append(result)
        if args.save:
            out = Path(args.save)
            out.mkdir(parents=True, exist_ok=True)
            for n, f in enumerate(result.findings.values()):
                (out / f"{target.name}-{n}.bin").write_bytes(f.data)
            (out / f"{target.name}-slowest.bin").write_bytes(result.slowest)
        if not args.json:
            r = result.as_dict()
            print(f"{r['target']:16} {r['inputs']:>9,} inputs  {r['refused']:>9,} refused  "
                  f"{r['inputs_per_s']:>7,}/s  slowest {r['slowest_ms']:.1f} ms  findings {len(r['findings'])}")
            for f in r["findings"]:
                print(f"    {f['error']} at {f['where']} ({f['size']} bytes)")
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    return 1 if any(r.findings for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
