"""The memory digest END carries: its one definition, by 2 MiB block (SPEC.md, "Memory digest").

xxh3-64 (seed 0), over each RAM range in address order, of `le64(address) ‖ le64(length) ‖ le64
xxh3-64 of each 2 MiB block` (the last block of a range may be shorter). Defined by block so that
a side may skip reading blocks it knows are zero, and so that a side which keeps block hashes
current as memory changes (`migrate.digest.BlockHashes`) can combine them without re-reading
everything: `block_hash`, `zero_block_hashes` and `combine_block_hashes` are the pieces, and
`memory_digest` is them put together.

The disk digest a snapshot's disk record carries (SPEC.md, "Disk digest") is built the same way
over a disk file's bytes, 128 bits wide (a disk's identity, compared across hosts and time):
xxh3-128 of `le64(size) ‖ xxh3-128 of each 1 MiB block`, so a hole in a sparse file costs
nothing to hash (`disk_block_digests`, `combine_disk_digest`).
"""

from __future__ import annotations

import functools
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from .layout import as_bytes_view

DIGEST_BLOCK = 2 << 20  # bytes per block hash in the memory digest
# The post-copy digest is the same construction by 4 KiB page (SPEC.md, "Post-copy"): a target
# that runs the guest before every page is in can hash each page as it is placed, and no longer
# holds whole 2 MiB blocks as they were at the switch.
POSTCOPY_DIGEST_BLOCK = 4096

DISK_DIGEST_BLOCK = 1 << 20  # bytes per block digest in the disk digest
DISK_DIGEST_SIZE = 16  # xxh3-128, canonical (big-endian) bytes

KnownZero = Callable[[int, int], np.ndarray]  # (address, length) -> one bool per block


def block_count(length: int, block: int = DIGEST_BLOCK) -> int:
    """How many digest blocks (of `block` bytes) a RAM range of `length` bytes has."""
    return -(-length // block)


def block_hash(memory: memoryview, index: int) -> int:
    """The hash of block `index` of a RAM range's bytes `memory`."""
    return xxhash.xxh3_64_intdigest(memory[index * DIGEST_BLOCK:(index + 1) * DIGEST_BLOCK])


@functools.cache
def zero_block_hash(size: int = DIGEST_BLOCK) -> int:
    """The block hash of `size` zero bytes."""
    return xxhash.xxh3_64_intdigest(bytes(size))


def zero_block_hashes(length: int, block: int = DIGEST_BLOCK) -> np.ndarray:
    """The block hashes of a RAM range of `length` zero bytes."""
    hashes = np.full(block_count(length, block), zero_block_hash(block), dtype="<u8")
    if length % block:
        hashes[-1] = zero_block_hash(length % block)
    return hashes


def combine_block_hashes(ranges: Iterable[tuple[int, int, np.ndarray]]) -> int:
    """The memory digest from each RAM range's (address, length, block hashes): what
    `memory_digest` computes, for a caller that keeps block hashes current itself."""
    h = xxhash.xxh3_64()
    for address, length, hashes in sorted(ranges, key=lambda r: r[0]):
        h.update(struct.pack("<QQ", address, length))
        h.update(np.asarray(hashes, dtype="<u8").tobytes())
    return h.intdigest()


def _block_hashes(mv: memoryview, zero: np.ndarray | None) -> np.ndarray:
    hashes = zero_block_hashes(len(mv))
    todo = range(len(hashes)) if zero is None else np.flatnonzero(~zero).tolist()
    for i in todo:  # per 2 MiB block, not per page: 512 blocks a GiB
        hashes[i] = block_hash(mv, i)
    return hashes


def memory_digest(ranges: Iterable[tuple[int, object]], *, known_zero: KnownZero | None = None,
                  workers: int = 1) -> int:
    """The digest of guest memory that END carries, over `ranges` of (address, bytes).

    `known_zero(address, length)` returns one bool per block (say, memory the guest never
    touched): those contribute the hash of zeros without being read. Blocks are hashed on
    `workers` threads (xxhash releases the GIL)."""
    return combine_block_hashes(memory_block_hashes(ranges, known_zero=known_zero, workers=workers))


def memory_block_hashes(ranges: Iterable[tuple[int, object]], *, known_zero: KnownZero | None = None,
                        workers: int = 1) -> list[tuple[int, int, np.ndarray]]:
    """`memory_digest`'s pieces: (address, length, block hashes) of each range, in address order
    (what a MEMORY_INDEX carries)."""
    items = [(address, as_bytes_view(mem)) for address, mem in sorted(ranges, key=lambda r: r[0])]

    def hashes(address: int, mv: memoryview) -> np.ndarray:
        zero = known_zero(address, len(mv)) if known_zero else None
        n = block_count(len(mv))
        to_read = n if zero is None else n - int(np.count_nonzero(zero))
        if workers <= 1 or to_read <= 4:  # threads started and joined would cost more than the blocks
            return _block_hashes(mv, zero)
        step = -(-n // workers)
        with ThreadPoolExecutor(workers) as pool:
            parts = pool.map(lambda a: _block_hashes(
                mv[a * DIGEST_BLOCK:(a + step) * DIGEST_BLOCK],
                None if zero is None else zero[a:a + step]), range(0, n, step))
            return np.concatenate(list(parts))

    return [(address, len(mv), hashes(address, mv)) for address, mv in items]


class ZeroRanges:
    """Guest ranges known to be all zero (an encoder's ZERO runs), thread-safe to add to; as
    `known_zero` for `memory_digest`, they spare the digest a second read of that memory."""

    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def add(self, address: int, size: int) -> None:
        with self._lock:
            self._ranges.append((address, size))

    def __call__(self, address: int, length: int) -> np.ndarray:
        """One bool per DIGEST_BLOCK of [address, address+length): wholly inside a zero range."""
        n = block_count(length)
        starts = address + np.arange(n, dtype=np.int64) * DIGEST_BLOCK
        ends = np.minimum(starts + DIGEST_BLOCK, address + length)
        known = np.zeros(n, dtype=bool)
        with self._lock:
            ranges = [(a, z) for a, z in self._ranges if a < address + length and a + z > address]
        for a, z in ranges:  # per zero run, vectorized over blocks
            known |= (starts >= a) & (ends <= a + z)
        return known


@functools.cache
def zero_disk_block_digest(size: int = DISK_DIGEST_BLOCK) -> bytes:
    """The block digest of `size` zero bytes (a hole in the file reads as that)."""
    return xxhash.xxh3_128_digest(bytes(size))


def disk_block_digests(size: int, blocks: Iterable[tuple[int, bytes | bytearray | memoryview]]
                       ) -> Iterator[tuple[int, bytes]]:
    """(index, 16-byte digest) of each block given as (index, its bytes) of a disk of `size`
    bytes: in increasing index order, each whole (DISK_DIGEST_BLOCK bytes, the last one what is
    left). A block not given is zeros; `combine_disk_digest` fills it in without reading it."""
    count, after = block_count(size, DISK_DIGEST_BLOCK), 0
    for index, data in blocks:  # per MiB, not per byte or page: 1,024 blocks a GiB
        if not after <= index < count or len(data) != min(DISK_DIGEST_BLOCK, size - index * DISK_DIGEST_BLOCK):
            raise ValueError(f"block {index} of {len(data)} bytes is not the next block of a {size}-byte disk")
        after = index + 1
        yield index, xxhash.xxh3_128_digest(data)


def combine_disk_digest(size: int, block_digests: Iterable[tuple[int, bytes]]) -> bytes:
    """The disk digest of a `size`-byte disk from the (index, digest) of its blocks that hold
    data (`disk_block_digests`, increasing); every other block is zeros. Streams: its memory does
    not grow with the disk, whatever size a hostile record names."""
    h = xxhash.xxh3_128()
    h.update(struct.pack("<Q", size))
    count, after = block_count(size, DISK_DIGEST_BLOCK), 0

    def zeros(upto: int) -> None:  # the digests of the zero blocks [after, upto), fed in bulk
        whole = min(upto, size // DISK_DIGEST_BLOCK) - after
        while whole > 0:
            n = min(whole, 1 << 16)
            h.update(zero_disk_block_digest() * n)
            whole -= n
        if upto == count and size % DISK_DIGEST_BLOCK and after < count:
            h.update(zero_disk_block_digest(size % DISK_DIGEST_BLOCK))

    for index, digest in block_digests:
        if not after <= index < count:
            raise ValueError(f"block {index} is not the next block of a {size}-byte disk")
        zeros(index)
        h.update(digest)
        after = index + 1
    zeros(count)
    return h.digest()
