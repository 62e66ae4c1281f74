"""Post-copy's missing pages: their bitmap on the wire (checked against this side's RAM), the
pages given back to the host, the page digest that proves the memory (the argument is
`migrate.live.postcopy`'s)."""

from __future__ import annotations

import logging
import os
import struct
import threading

import numpy as np

import formats
from hv.kvm.dirty import PAGE_SIZE, DirtyBitmap, words_for
from hv.kvm.memory import GuestMemory
from migrate.errors import ProtocolViolation

log = logging.getLogger(__name__)

FETCH_MAX = 512  # addresses per Fetch
URGENT_NICE = -10  # the fetch threads' (per-thread nice on Linux)
FETCH_AROUND = 16  # pages a fault's answer carries: the faulted one and the unsent ones after it
_REGION = struct.Struct("<QQ")

Missing = dict[int, DirtyBitmap]  # region guest base -> pages the target lacks


# --- the bitmap on the wire -------------------------------------------------------------------------


def encode_missing(missing: Missing) -> bytes:
    """`Postcopy.missing`: per RAM region, in address order, `le64 base ‖ le64 pages ‖ the
    bitmap's le64 words` (bit i: page i of the region)."""
    return b"".join(_REGION.pack(base, bits.npages) + bits.words.astype("<u8").tobytes()
                    for base, bits in sorted(missing.items()))


def decode_missing(data: bytes, memory: GuestMemory) -> Missing:
    """The bitmap a peer sent, checked against this side's RAM: every region once, in order,
    its page count exactly, no bit past its end (a `ProtocolViolation` otherwise)."""
    view, at, out = memoryview(data), 0, {}
    for region in memory.regions:
        if len(view) - at < _REGION.size:
            raise ProtocolViolation(f"missing-page bitmap: ends before the region at {region.guest_base:#x}")
        base, npages = _REGION.unpack_from(view, at)
        at += _REGION.size
        if base != region.guest_base or npages != region.npages:
            raise ProtocolViolation(f"missing-page bitmap: a region of {npages} pages at {base:#x}, this guest "
                                    f"has {region.npages} at {region.guest_base:#x}")
        nbytes = words_for(npages) * 8
        if len(view) - at < nbytes:
            raise ProtocolViolation("missing-page bitmap: truncated")
        words = np.frombuffer(view[at:at + nbytes], dtype="<u8").astype(np.uint64)
        at += nbytes
        if npages % 64 and int(words[-1]) >> (npages % 64):
            raise ProtocolViolation(f"missing-page bitmap: bits past the {npages} pages of {base:#x}")
        out[base] = DirtyBitmap(npages, words)
    if at != len(view):
        raise ProtocolViolation(f"missing-page bitmap: {len(view) - at} bytes past its regions")
    return out


def count_missing(missing: Missing) -> int:
    return sum(bits.count() for bits in missing.values())


def urgent() -> None:
    """Run this thread ahead of the busy ones (the push, the guest's vCPUs): a fault's round trip
    is what a vCPU waits for. Best effort (a lower nice value needs CAP_SYS_NICE)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), URGENT_NICE)
    except OSError:
        pass


def give_back(memory: GuestMemory, missing: Missing) -> None:
    """MADV_DONTNEED over the pages of `missing` (their older copies), in C without the GIL: the
    kernel frees about a page a microsecond here (256 MiB: ~30 ms; a second thread did not help,
    measured). Nothing may read these pages until they are registered: a read would map the zero
    page, which userfaultfd then never reports missing."""
    for region in memory.regions:
        for first, count in missing[region.guest_base].runs().as_tuples():
            memory.zero_pages(region.guest_base + first * PAGE_SIZE, count * PAGE_SIZE)


def read_since(memory: GuestMemory, given_back: Missing) -> Missing:
    """The pages given back that something mapped again before registration: KVM reads guest
    memory as the vCPU state is applied (descriptor tables, seen on these hosts), which maps
    the zero page; registered so, the guest would read zeros there and never fault (a pure
    post-copy start lost its first pages that way). Costs a read of their pagemap entries."""
    out = {}
    for region in memory.regions:
        bits = given_back[region.guest_base]
        again = DirtyBitmap(region.npages)
        for first, count in bits.runs().as_tuples():
            mapped = np.flatnonzero(region.mapped_pages(first, count))
            if len(mapped):
                again.set_pages(mapped + first)
        out[region.guest_base] = again
    return out


def page_digest(hashes: dict[int, np.ndarray], memory: GuestMemory) -> int:
    return formats.combine_block_hashes((r.guest_base, r.size, hashes[r.guest_base]) for r in memory.regions)


def describe_missing(count: int) -> str:
    return f"{count} pages ({count * PAGE_SIZE / (1 << 20):.1f} MiB)"
