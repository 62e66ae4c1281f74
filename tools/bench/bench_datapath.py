"""The migration data path in C against the Python reference: throughput, and what it costs the
guest's exit handling (the interpreter lock).

    .venv/bin/python tools/bench/bench_datapath.py [--json] [--runs N]

For each image (random, realistic, one-byte-per-page zero pattern; 64 MiB each) and each encoder
(`formats.PageEncoder`, `migrate.datapath.PageEncoderC`; zstd level 1, and level 1 with a 16 KiB
sample judging each frame), encode GB/s of guest memory, the wire size, and the longest delay a
Python thread that wants the GIL every 0.5 ms sees meanwhile (a vCPU thread handling port I/O
exits needs the GIL for each): the stall the encoder would impose on a guest. Then decode + place
into a receiver's memory, both ways. Medians of `--runs` runs (interleaved), min-max beside them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_formats import realistic_image  # noqa: E402

from formats import MemoryLayout, PageDecoder, PageEncoder  # noqa: E402
from formats.layout import PAGE_SIZE, RamRange  # noqa: E402
from migrate.datapath import PageDecoderC, PageEncoderC  # noqa: E402

MiB = 1 << 20
SIZE = 64 * MiB


def images() -> dict[str, bytearray]:
    one_byte = bytearray(SIZE)
    one_byte[::PAGE_SIZE] = bytes([7]) * (SIZE // PAGE_SIZE)
    return {"random": bytearray(np.random.default_rng(1).bytes(SIZE)),
            "realistic": realistic_image(SIZE), "one-byte": one_byte}


class GilProbe:
    """A thread that asks for the GIL every `period` s and records how late it got it."""

    def __init__(self, period: float = 0.0005) -> None:
        self.period, self.worst, self._stop = period, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.period)
            self.worst = max(self.worst, time.perf_counter() - t0 - self.period)

    def __enter__(self) -> GilProbe:
        self._thread.start()
        time.sleep(0.02)
        self.worst = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    with GilProbe() as probe:
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
    return dt, probe.worst, out


def body(section) -> bytes:
    return b"".join(bytes(p) for p in section.parts)


def run(name: str, mem: bytearray, runs: int) -> list[dict[str, object]]:
    encoders = {"python": lambda **k: PageEncoder(stable=True, **k), "C": lambda **k: PageEncoderC(stable=True, **k)}
    modes = {"zstd-1": {"level": 1}, "zstd-1 sampled": {"level": 1, "sample_bytes": 16384}, "raw": {"level": 0}}
    results: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for _ in range(runs):  # interleaved: python, C, python, C ...
        for mode, params in modes.items():
            for impl, make in encoders.items():
                encoder = make(**params)
                dt, worst, sections = timed(lambda: encoder.encode(0, memoryview(mem)))
                results.setdefault((mode, impl), []).append((dt, worst, sum(s.length for s in sections)))
    layout = MemoryLayout((RamRange(0, SIZE),))
    bodies = [body(s) for s in PageEncoderC(stable=True).encode(0, memoryview(mem))]
    target = bytearray(SIZE)
    for _ in range(runs):
        def python_apply() -> None:
            decoder = PageDecoder(layout)
            for b in bodies:
                runs_, _ = decoder.decode(b)
                for r in runs_:
                    if r.data is not None:
                        target[r.address:r.address + r.size] = r.data
        c_decoder = PageDecoderC(layout, [target], populate=False)
        for impl, fn in (("python", python_apply), ("C", lambda: [c_decoder.apply(b) for b in bodies])):
            dt, worst, _ = timed(fn)
            results.setdefault(("decode+place", impl), []).append((dt, worst, sum(map(len, bodies))))
    rows = []
    for (mode, impl), samples in results.items():
        dts, worsts = [s[0] for s in samples], [s[1] for s in samples]
        rows.append({"image": name, "work": mode, "impl": impl, "gb_s": SIZE / statistics.median(dts) / 1e9,
                     "gb_s_range": [SIZE / max(dts) / 1e9, SIZE / min(dts) / 1e9],
                     "wire_mib": samples[0][2] / MiB, "gil_wait_ms": statistics.median(worsts) * 1e3,
                     "gil_wait_ms_range": [min(worsts) * 1e3, max(worsts) * 1e3]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    with GilProbe() as idle:
        time.sleep(0.5)
    rows = [row for name, mem in images().items() for row in run(name, mem, args.runs)]
    if args.json:
        print(json.dumps({"idle_gil_wait_ms": idle.worst * 1e3, "rows": rows}, indent=1))
        return
    print(f"a probe thread's worst delay with nothing running: {idle.worst * 1e3:.2f} ms "
          f"(the floor of the GIL column); {args.runs} runs, medians [min-max]")
    print(f"{'image':10s} {'work':15s} {'impl':7s} {'GB/s':>18s} {'wire MiB':>9s} {'GIL wait ms':>18s}")
    for r in rows:
        lo, hi = r["gb_s_range"]
        wl, wh = r["gil_wait_ms_range"]
        print(f"{r['image']:10s} {r['work']:15s} {r['impl']:7s} {r['gb_s']:6.2f} [{lo:4.2f}-{hi:4.2f}] "
              f"{r['wire_mib']:9.1f} {r['gil_wait_ms']:6.2f} [{wl:5.2f}-{wh:5.2f}]")


if __name__ == "__main__":
    main()
