"""Dirty page bitmaps, handled whole: no Python loop per page.

KVM's layout: bit i of a little-endian array of u64 words is page i of a memory slot. The same
layout serves the VMM's own bitmap (pages devices wrote) so the two merge with one numpy OR.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hv.binding.ffi import ffi, lib
from hv.kvm.units import PAGE_SHIFT, PAGE_SIZE



@dataclass(frozen=True)
class PageRuns:
    """Runs of consecutive pages: `starts[i]` (page index) for `counts[i]` pages."""

    starts: np.ndarray  # uint64
    counts: np.ndarray  # uint64

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def total_pages(self) -> int:
        return int(self.counts.sum())

    def as_tuples(self) -> list[tuple[int, int]]:
        return list(zip(self.starts.tolist(), self.counts.tolist()))


def words_for(npages: int) -> int:
    """u64 words KVM uses for a slot of `npages` pages (rounded up to whole words)."""
    return (npages + 63) // 64


class DirtyBitmap:
    """One memory slot's dirty pages: `npages` bits over a uint64 numpy array."""

    __slots__ = ("npages", "words")

    def __init__(self, npages: int, words: np.ndarray | None = None) -> None:
        self.npages = npages
        if words is None:
            words = np.zeros(words_for(npages), dtype=np.uint64)
        elif words.dtype != np.uint64 or len(words) != words_for(npages):
            raise ValueError(f"bitmap for {npages} pages needs {words_for(npages)} uint64 words")
        self.words = words

    @classmethod
    def from_bools(cls, pages: np.ndarray) -> DirtyBitmap:
        """A bitmap with page i set where `pages[i]` is true."""
        words = np.packbits(pages, bitorder="little")
        padded = np.zeros(words_for(len(pages)) * 8, dtype=np.uint8)
        padded[: len(words)] = words
        return cls(len(pages), padded.view(np.uint64))

    @classmethod
    def from_pages(cls, npages: int, pages: np.ndarray | list[int]) -> DirtyBitmap:
        bitmap = cls(npages)
        bitmap.set_pages(np.asarray(pages, dtype=np.int64))
        return bitmap

    def set_pages(self, pages: np.ndarray) -> None:
        pages = np.asarray(pages, dtype=np.uint64)
        if len(pages) == 0:
            return
        if int(pages.max()) >= self.npages:
            raise IndexError(f"page {int(pages.max())} beyond bitmap of {self.npages} pages")
        bits = np.left_shift(np.uint64(1), pages & np.uint64(63))
        np.bitwise_or.at(self.words, (pages >> np.uint64(6)).astype(np.intp), bits)

    def set_range(self, first_page: int, count: int) -> None:
        """Mark pages [first_page, first_page + count) dirty, a word at a time."""
        if count <= 0:
            return
        end = first_page + count
        if first_page < 0 or end > self.npages:
            raise IndexError(f"pages [{first_page}, {end}) beyond bitmap of {self.npages} pages")
        w0, w1 = first_page >> 6, (end - 1) >> 6
        lo_mask = np.uint64((~0 << (first_page & 63)) & 0xFFFF_FFFF_FFFF_FFFF)
        hi_bits = ((end - 1) & 63) + 1
        hi_mask = np.uint64((1 << hi_bits) - 1)
        if w0 == w1:
            self.words[w0] |= lo_mask & hi_mask
        else:
            self.words[w0] |= lo_mask
            self.words[w0 + 1 : w1] = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
            self.words[w1] |= hi_mask

    def __or__(self, other: DirtyBitmap) -> DirtyBitmap:
        self._check_same(other)
        return DirtyBitmap(self.npages, self.words | other.words)

    def __and__(self, other: DirtyBitmap) -> DirtyBitmap:
        self._check_same(other)
        return DirtyBitmap(self.npages, self.words & other.words)

    def complement(self) -> DirtyBitmap:
        """The pages not set here."""
        words = ~self.words
        if self.npages % 64:
            words[-1] &= np.uint64((1 << (self.npages % 64)) - 1)
        return DirtyBitmap(self.npages, words)

    def without(self, other: DirtyBitmap) -> DirtyBitmap:
        """The pages set here and not in `other`."""
        self._check_same(other)
        return DirtyBitmap(self.npages, self.words & ~other.words)

    def __ior__(self, other: DirtyBitmap) -> DirtyBitmap:
        self._check_same(other)
        np.bitwise_or(self.words, other.words, out=self.words)
        return self

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, DirtyBitmap)
            and self.npages == other.npages
            and bool(np.array_equal(self.words, other.words))
        )

    def _check_same(self, other: DirtyBitmap) -> None:
        if other.npages != self.npages:
            raise ValueError(f"bitmaps of {self.npages} and {other.npages} pages do not merge")

    def count(self) -> int:
        """Set pages: popcounts of the dirty words only (the pass that finds them is the one
        cost that grows with the slot; a 16 GiB slot's whole-bitmap popcount took twice it)."""
        nz = self.nonzero_words()
        return int(np.bitwise_count(self.words[nz]).sum()) if len(nz) else 0

    def as_bools(self) -> np.ndarray:
        """One bool per page (little-endian bit order within each word)."""
        return np.unpackbits(self.words.view(np.uint8), bitorder="little")[: self.npages].astype(bool)

    def nonzero_words(self) -> np.ndarray:
        """Indices of the words with any page set, ascending (~20 us a 16 GiB slot: the one pass
        over the whole bitmap that sparse work needs)."""
        return np.flatnonzero(self.words != 0)

    def pages(self, nonzero_words: np.ndarray | None = None) -> np.ndarray:
        """Indices of the set bits, ascending: only the words with a bit set are unpacked, so the
        cost is the dirty pages', not the slot's (`nonzero_words` if the caller has them)."""
        nz = self.nonzero_words() if nonzero_words is None else nonzero_words
        bits = np.unpackbits(self.words[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
        rows, cols = np.nonzero(bits)
        pages = (nz[rows].astype(np.uint64) << np.uint64(6)) + cols.astype(np.uint64)
        return pages[pages < self.npages]  # a last word's bits past the slot are no pages

    def groups_with_pages(self, pages_per_group: int) -> np.ndarray:
        """One bool per group of `pages_per_group` consecutive pages (the last one partial): does
        it hold a set page. Sparse: a pass over the words, then work per dirty word only."""
        groups = -(-self.npages // pages_per_group)
        out = np.zeros(groups, dtype=bool)
        nz = self.nonzero_words()
        if len(nz) == 0:
            return out
        if pages_per_group % 64 == 0:  # a group is whole words
            out[nz // (pages_per_group // 64)] = True
        else:
            out[(self.pages(nz) // np.uint64(pages_per_group)).astype(np.intp)] = True
        return out

    def runs(self) -> PageRuns:
        """Runs of consecutive dirty pages, found by the C scanner (zero words skipped) over
        the span from the first dirty word to the last only: a few dirty pages in a large slot
        cost their span, not the slot."""
        nz = self.nonzero_words()
        if len(nz) == 0:
            return PageRuns(np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.uint64))
        first, last = int(nz[0]), int(nz[-1])
        span = self.words[first:last + 1]
        nbits = min(self.npages - first * 64, len(span) * 64)
        room = max(16, min(nbits // 2 + 1, 4096))
        while True:
            starts = np.empty(room, dtype=np.uint64)
            counts = np.empty(room, dtype=np.uint64)
            n = lib.kvmig_bitmap_runs(
                ffi.from_buffer("uint64_t[]", span), nbits,
                ffi.from_buffer("uint64_t[]", starts), ffi.from_buffer("uint64_t[]", counts), room,
            )
            if n < room:
                return PageRuns(starts[:n] + np.uint64(first * 64), counts[:n].copy())
            room *= 4

    def clear(self) -> None:
        self.words.fill(0)

    def __repr__(self) -> str:
        return f"DirtyBitmap(npages={self.npages}, dirty={self.count()})"
