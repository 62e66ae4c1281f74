"""Throughput of the snapshot stream format on three memory images.

    .venv/bin/python tools/bench/bench_formats.py [--json] [--level N] [--repeat N]

Images: all-zero (256 MiB), random (64 MiB), and a realistic one: the machine's own binaries
(/boot/vmlinuz-*, shared libraries) concatenated and zero-padded to 256 MiB, roughly what a
guest's page cache and heap look like. For each: encode and decode GB/s of guest memory (encode =
zero detection + compression + hashing + framing; decode = parse + checks + decompression +
copy into a receiver buffer), compression ratio, the stream's size and encode time against a
plain `ZstdCompressor(level).compress` of the same bytes, and encode with two threads
(independent PAGES sections; zstd and xxhash release the GIL).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from formats import (  # noqa: E402
    MemoryLayout,
    PageEncoder,
    PageSection,
    PagesRecord,
    SchemaRegistry,
    StreamReader,
    StreamWriter,
    ZeroRanges,
    memory_digest,
)

MiB = 1 << 20
CHUNK = 16 * MiB  # unit of work handed to a thread


def realistic_image(size: int) -> bytearray:
    files = sorted(glob.glob("/boot/vmlinuz-*")) + sorted(
        glob.glob("/usr/lib/x86_64-linux-gnu/*.so*")) + sorted(glob.glob("/usr/bin/*"))
    out = bytearray()
    limit = size * 5 // 8  # the rest stays zero, like untouched guest RAM
    for name in files:
        if len(out) >= limit:
            break
        try:
            if os.path.isfile(name) and not os.path.islink(name):
                out += Path(name).read_bytes()[:limit - len(out)]
        except OSError:
            continue
    out += bytes(size - len(out))
    return out


def best_of(repeat: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t)
    return best, result


def encode(mem: bytearray, level: int, threads: int) -> list[bytes | memoryview]:
    """The stream as the buffers a transport would hand to one vectored write."""
    reg = SchemaRegistry()
    w = StreamWriter(reg, producer="bench")
    parts = [w.header()]
    view = memoryview(mem)
    chunks = [(a, view[a:a + CHUNK]) for a in range(0, len(mem), CHUNK)]
    zero = ZeroRanges()  # what the encoder finds zero, the digest need not read again
    if threads == 1:
        enc = PageEncoder(level=level, stable=True, zero_ranges=zero)  # memory at rest, as a paused guest's
        sections = [s for a, c in chunks for s in enc.encode(a, c)]
    else:
        local = threading.local()

        def work(item: tuple[int, memoryview]) -> list[PageSection]:
            if not hasattr(local, "enc"):
                local.enc = PageEncoder(level=level, stable=True, zero_ranges=zero)  # a zstd context each
            return local.enc.encode(*item)

        with ThreadPoolExecutor(threads) as pool:
            sections = [s for batch in pool.map(work, chunks) for s in batch]
    for s in sections:
        parts += w.pages_parts(s)
    parts.append(w.end(memory_digest([(0, view)], known_zero=zero, workers=threads)))
    return parts


def decode(stream: bytes, target: bytearray) -> bytearray:
    """Into `target`, the receiver's (already zeroed, already allocated) guest memory."""
    size = len(target)
    reader = StreamReader(SchemaRegistry(), memory=MemoryLayout.of((0, size)))
    view = memoryview(stream)
    for pos in range(0, len(stream), 4 * MiB):  # as a transport would deliver it
        for rec in reader.feed(view[pos:pos + 4 * MiB]):
            if isinstance(rec, PagesRecord):
                for run in rec.runs:
                    if run.data is not None:  # the target is fresh, zero runs need no write
                        target[run.address:run.address + run.size] = run.data
    reader.finish()
    return target


def bench(name: str, mem: bytearray, level: int, repeat: int) -> dict[str, object]:
    gb = len(mem) / 1e9
    t1, parts = best_of(repeat, lambda: encode(mem, level, 1))
    t2, parts2 = best_of(repeat, lambda: encode(mem, level, 2))
    stream = b"".join(parts)  # type: ignore[arg-type]
    assert stream == b"".join(parts2)  # type: ignore[arg-type]
    del parts, parts2
    target = bytearray(len(mem))
    td, out = best_of(repeat, lambda: decode(stream, target))
    assert out == mem
    cctx = zstandard.ZstdCompressor(level=level)
    tz, plain = best_of(repeat, lambda: cctx.compress(mem))
    return {
        "image": name, "size_mib": len(mem) // MiB,
        "encode_gbps": gb / t1, "encode_2t_gbps": gb / t2, "speedup_2t": t1 / t2,
        "decode_gbps": gb / td, "ratio": len(mem) / len(stream),
        "stream_bytes": len(stream), "zstd_bytes": len(plain),
        "size_overhead_pct": 100 * (len(stream) / len(plain) - 1),
        "zstd_gbps": gb / tz, "time_vs_zstd_pct": 100 * (t1 / tz - 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    images = [
        ("zero", bytearray(256 * MiB)),
        ("random", bytearray(np.random.default_rng(0).bytes(64 * MiB))),
        ("realistic", realistic_image(256 * MiB)),
    ]
    load = os.getloadavg()  # other work on the host skews the two-thread figures
    rows = [bench(name, mem, args.level, args.repeat) for name, mem in images]
    if args.json:
        print(json.dumps({"level": args.level, "cpus": os.cpu_count(), "loadavg": load,
                          "results": rows},
                         indent=2))
        return
    cols = [("image", "{}"), ("size_mib", "{}"), ("encode_gbps", "{:.2f}"),
            ("encode_2t_gbps", "{:.2f}"), ("speedup_2t", "{:.2f}x"), ("decode_gbps", "{:.2f}"),
            ("ratio", "{:.2f}"), ("size_overhead_pct", "{:+.2f}%"), ("zstd_gbps", "{:.2f}"),
            ("time_vs_zstd_pct", "{:+.0f}%")]
    table = [[c for c, _ in cols]] + [[f.format(r[c]) for c, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    print(f"zstd level {args.level}, {os.cpu_count()} CPUs, load average before "
          f"{load[0]:.2f}, GB/s of guest memory (best of {args.repeat})")
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))


if __name__ == "__main__":
    main()
