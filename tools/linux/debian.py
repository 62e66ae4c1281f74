"""Debian's stock kernel and busybox, fetched with apt and cached, for the Linux boot tests.

    python tools/linux/debian.py            # fetch (if needed) and print the paths

Uses `apt-get download` (no install, nothing changes on the host) into a cache directory
($KVMIGRATE_CACHE or ~/.cache/kvmigrate), and unpacks with `dpkg-deb`.
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

KERNEL_PACKAGE = "linux-image-amd64"  # the plain flavour: the -cloud one lacks X86_MPPARSE
BUSYBOX_PACKAGE = "busybox-static"


class FetchError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = Path(os.environ.get("KVMIGRATE_CACHE", Path.home() / ".cache" / "kvmigrate"))
    path = root / "debian"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return proc.stdout


def _resolve(package: str, cwd: Path) -> str:
    """A metapackage (linux-image-amd64) to the real package it depends on."""
    out = _run(["apt-cache", "depends", package], cwd)
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends:") and "linux-image-" in line:
            return line.split()[1]
    return package


def _fetch(package: str) -> Path:
    """Download and unpack `package` once; return its unpacked root."""
    cache = cache_dir()
    unpacked = cache / package
    if (unpacked / ".done").exists():
        return unpacked
    debs = glob.glob(str(cache / f"{package}_*.deb"))
    if not debs:
        try:
            _run(["apt-get", "download", package], cache)
        except FetchError:
            _run(["apt-get", "update", "-qq"], cache)
            _run(["apt-get", "download", package], cache)
        debs = glob.glob(str(cache / f"{package}_*.deb"))
    if not debs:
        raise FetchError(f"apt-get download {package} produced no .deb in {cache}")
    unpacked.mkdir(exist_ok=True)
    _run(["dpkg-deb", "-x", sorted(debs)[-1], str(unpacked)], cache)
    (unpacked / ".done").touch()
    return unpacked


def debian_kernel() -> Path:
    """Path to Debian's stock vmlinuz (bzImage)."""
    root = _fetch(_resolve(KERNEL_PACKAGE, cache_dir()))
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise FetchError(f"no vmlinuz in {root / 'boot'}")
    return kernels[-1]


def debian_busybox() -> Path:
    path = _fetch(BUSYBOX_PACKAGE) / "bin" / "busybox"
    if not path.exists():
        raise FetchError(f"no busybox in {path.parent}")
    return path


if __name__ == "__main__":
    print(debian_kernel())
    print(debian_busybox())
