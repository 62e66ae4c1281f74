"""What a snapshot's disk copy adds to the guest's pause (numbers, not asserts).

    .venv/bin/python tools/bench/bench_snapshot_disk.py [--runs 5] [--dir DIR] [--live] [--json]

Sparse disks with some data (1 MiB chunks of random bytes spread over the disk; 64 MiB holding
8 MiB, 1 GiB holding 64 MiB, and 1 GiB written whole as the worst case) under the built-in guest
(64 MiB, one vCPU: its disk workload runs on a second one, so the disk stays as written). Each
run snapshots it (compressed) and reports the medians of the disk's parts, as `migrate snapshot
--json` gives them (`disk.copy_seconds` and `digest_seconds`, in the pause; `sync_seconds`, the
copy's fsync, after the guest resumed), and the whole pause beside the same guest's snapshot
without a disk, taken just before (the host's other load moves single figures). `--dir`: where the disk and
the snapshots go (the filesystem decides: a reflink on btrfs/XFS, a sparse copy on ext4/tmpfs).
`--live`: live snapshots (the pause holds the copy; the digest and the fsync come after it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

from hv.guests import builtin as bg
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig
from hv.vmm.builder import VirtioConfig, builtin_machine
from migrate.snapshot.snapshots import snapshot

MiB = 1 << 20
SCENARIOS = (("64m-8m", 64 * MiB, 8 * MiB), ("1g-64m", 1024 * MiB, 64 * MiB), ("1g-1g", 1024 * MiB, 1024 * MiB))


def make_disk(path: Path, size: int, data: int) -> None:
    """A sparse file of `size` bytes holding `data` bytes in 1 MiB chunks at random places."""
    rng = random.Random(size ^ data)
    chunk = os.urandom(MiB)
    with open(path, "wb") as f:
        f.truncate(size)
        for index in sorted(rng.sample(range(size // MiB), data // MiB)):
            os.pwrite(f.fileno(), chunk, index * MiB)
    os.sync()  # clean in the page cache, as a disk the guest wrote a while ago is


def pauses(kvm: Kvm, where: Path, disk: Path | None, runs: int, live: bool) -> tuple[list[dict[str, float]], str]:
    """Each run's pause and disk parts (ms, MiB), and how the disk was copied ("" without one)."""
    machine = builtin_machine(kvm, bg.GuestParams(ws_mib=4, rate_mib_s=40), VmConfig(mem_size=64 * MiB),
                              bg.GuestConsole(), virtio=VirtioConfig(disk) if disk else None)
    machine.start()
    rows, kind = [], ""
    try:
        for run in range(runs):
            path = where / f"bench-{run}.snap"
            info = snapshot(machine, path, live=live)
            row = {"pause_ms": info.pause_seconds * 1000}
            if info.disk is not None:
                row.update(copy_ms=info.disk.copy_seconds * 1000, digest_ms=info.disk.digest_seconds * 1000,
                           sync_ms=info.disk.sync_seconds * 1000, copied_mib=info.disk.copied / MiB)
                kind = info.disk.copy
            rows.append(row)
            for leftover in (path, path.with_name(path.name + ".disk")):
                leftover.unlink(missing_ok=True)
        return rows, kind
    finally:
        machine.stop()
        machine.vm.close()


def median(rows: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where the disks and snapshots go (default: a temporary directory)")
    ap.add_argument("--live", action="store_true", help="live snapshots")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, dict[str, object]] = {}
    with Kvm() as kvm, tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        where = Path(tmp)
        for name, size, data in SCENARIOS:
            disk = where / f"{name}.img"
            make_disk(disk, size, data)
            base = median(pauses(kvm, where, None, args.runs, args.live)[0], "pause_ms")  # the same guest, before
            rows, kind = pauses(kvm, where, disk, args.runs, args.live)
            disk.unlink()
            row: dict[str, object] = {key: median(rows, key)
                                      for key in ("pause_ms", "copy_ms", "digest_ms", "sync_ms", "copied_mib")}
            row.update(kind=kind, pause_without_disk_ms=base, added_ms=round(median(rows, "pause_ms") - base, 2))
            out[name] = row
            if not args.json:
                digest = f"digest {row['digest_ms']:.1f} ms"
                print(f"{name}: {kind} copy of {row['copied_mib']:.0f} MiB; in the pause: copy {row['copy_ms']:.1f} ms"
                      f"{'' if args.live else ', ' + digest}; after it: {digest + ', ' if args.live else ''}fsync "
                      f"{row['sync_ms']:.1f} ms; the pause {row['pause_ms']:.1f} ms, {row['added_ms']:.1f} ms more "
                      f"than without the disk ({base:.1f} ms)", flush=True)
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
