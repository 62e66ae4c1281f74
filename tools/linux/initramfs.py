"""Build a busybox initramfs with the kernel package's virtio modules.

    python tools/linux/initramfs.py OUT.cpio.gz

Debian's kernel has VIRTIO_MMIO, VIRTIO_PCI, VIRTIO_BLK, VIRTIO_CONSOLE and HW_RANDOM_VIRTIO as
modules, so the initramfs carries them and /init loads them (dependencies first, read from each
module's own `.modinfo`, since the package ships no modules.dep). Compressed modules (.ko.xz,
.ko.zst) are decompressed here: busybox `insmod` may not read them.
"""

from __future__ import annotations

import gzip
import lzma
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from linux.debian import debian_busybox, debian_kernel  # noqa: E402

WANTED_MODULES = ("virtio_mmio", "virtio_pci", "virtio_blk", "virtio_console", "virtio-rng")

INIT_SCRIPT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
echo "kvmigrate-initramfs: ready"
ls /sys/bus/virtio/devices 2>/dev/null
exec sh
"""


@dataclass(frozen=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""


def cpio_newc(entries: list[Entry]) -> bytes:
    """An archive in the `newc` format the kernel unpacks into its rootfs."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, e in enumerate([*entries, Entry("TRAILER!!!", 0)], start=1):
        name = e.name.encode() + b"\0"
        fields = (ino, e.mode, 0, 0, 2 if stat.S_ISDIR(e.mode) else 1, 0, len(e.data), 0, 0, 0, 0,
                  len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name)
        pad4()
        out.extend(e.data)
        pad4()
    return bytes(out)


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    if path.suffix == ".gz":
        return gzip.decompress(data)
    return data


def module_name(path: Path) -> str:
    return path.name.split(".ko")[0]


def module_depends(data: bytes) -> list[str]:
    m = re.search(rb"\0depends=([^\0]*)\0", data)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def module_closure(modules_root: Path, wanted: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """`wanted` and everything they depend on, dependencies first."""
    index = {}
    for path in modules_root.rglob("*.ko*"):
        index[module_name(path)] = path
        index[module_name(path).replace("-", "_")] = path
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        seen.add(key)
        if name not in index and key not in index:
            return  # built into the kernel
        path = index.get(name, index.get(key))
        data = read_module(path)
        for dep in module_depends(data):
            visit(dep)
        ordered.append((module_name(path), data))

    for name in wanted:
        visit(name)
    return ordered


def build(kernel: Path | None = None, busybox: Path | None = None) -> bytes:
    kernel = kernel or debian_kernel()
    busybox = busybox or debian_busybox()
    package_root = kernel.parent.parent
    modules_root = next((package_root / "lib" / "modules").iterdir())
    modules = module_closure(modules_root, WANTED_MODULES)
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [Entry(p, d) for p in ("bin", "dev", "etc", "proc", "sys", "lib", "lib/modules")]
    entries += [
        Entry("bin/busybox", x, busybox.read_bytes()),
        Entry("init", x, INIT_SCRIPT.encode()),
        Entry("etc/modules.order", f, "".join(f"{n}\n" for n, _ in modules).encode()),
    ]
    entries += [Entry(f"lib/modules/{name}.ko", f, data) for name, data in modules]
    return gzip.compress(cpio_newc(entries), compresslevel=6)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "initramfs.cpio.gz")
    out.write_bytes(build())
    print(f"{out}: {out.stat().st_size} bytes")
