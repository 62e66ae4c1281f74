"""Dirty bitmaps (property tests against a plain reference) and KVM's dirty log (exactness)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tinyguest import Recorder, multiboot_elf, store_then_report, wait_for

from hv.kvm.dirty import DirtyBitmap, words_for
from hv.kvm.kvm import Kvm
from hv.kvm.vm import VmConfig

MiB = 1 << 20


def reference_runs(bits: list[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for i, b in enumerate(bits + [False]):
        if b and start is None:
            start = i
        elif not b and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


# n pages and their dirty bits, drawn as one n-bit integer: hypothesis makes it from bytes, several
# times faster than n booleans drawn one by one (5.8 s -> 0.7 s for the 300 examples)
bitmaps = st.integers(1, 700).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(0, (1 << n) - 1).map(lambda v: [bool(v >> i & 1) for i in range(n)]))
)


@given(bitmaps)
@settings(max_examples=300)
def test_runs_match_reference(case) -> None:
    n, bits = case
    bm = DirtyBitmap.from_pages(n, [i for i, b in enumerate(bits) if b])
    assert bm.runs().as_tuples() == reference_runs(bits)
    assert bm.count() == sum(bits)
    assert bm.pages().tolist() == [i for i, b in enumerate(bits) if b]


@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n - 1), st.integers(1, n))))
def test_set_range_equals_set_pages(case) -> None:
    n, first, count = case
    count = min(count, n - first)
    by_range, by_pages = DirtyBitmap(n), DirtyBitmap(n)
    by_range.set_range(first, count)
    by_pages.set_pages(np.arange(first, first + count))
    assert by_range == by_pages
    assert by_range.runs().as_tuples() == [(first, count)]


def test_bits_beyond_npages_are_ignored() -> None:
    # KVM bitmaps are whole words; the tail bits past the slot must never become pages.
    words = np.full(words_for(70), np.uint64(0xFFFF_FFFF_FFFF_FFFF))
    bm = DirtyBitmap(70, words)
    assert bm.runs().as_tuples() == [(0, 70)]
    assert bm.pages().tolist() == list(range(70))
    assert bm.groups_with_pages(1).tolist() == [True] * 70


@given(bitmaps, st.sampled_from([1, 3, 16, 64, 128, 512]))
@settings(max_examples=200)
def test_groups_with_pages_match_the_dense_reference(case, per_group) -> None:
    # the sparse form (work per dirty word) against the plain one over every page
    n, bits = case
    bm = DirtyBitmap.from_pages(n, [i for i, b in enumerate(bits) if b])
    dense = np.zeros(-(-n // per_group) * per_group, dtype=bool)
    dense[:n] = bm.as_bools()
    assert bm.groups_with_pages(per_group).tolist() == dense.reshape(-1, per_group).any(axis=1).tolist()


def test_many_runs_grow_the_output_buffer() -> None:
    n = 1 << 18  # 1 GiB of pages, every other page dirty: 131072 runs
    bm = DirtyBitmap.from_pages(n, np.arange(0, n, 2))
    runs = bm.runs()
    assert len(runs) == n // 2 and runs.total_pages == n // 2


def test_merge_and_range_errors() -> None:
    a, b = DirtyBitmap.from_pages(100, [1, 2]), DirtyBitmap.from_pages(100, [2, 99])
    assert (a | b).pages().tolist() == [1, 2, 99]
    with pytest.raises(ValueError):
        a | DirtyBitmap(101)
    with pytest.raises(IndexError):
        a.set_range(99, 2)
    with pytest.raises(IndexError):
        a.set_pages(np.array([100]))


def test_kvm_dirty_log_reports_exactly_the_guest_writes(kvm: Kvm, write_image) -> None:
    from hv.vmm.builder import multiboot_machine

    targets = [0x0020_0000, 0x0020_0FFC, 0x0030_5000, 0x01FF_F000]  # pages 512 (twice), 773, 8191
    machine = multiboot_machine(kvm, write_image(multiboot_elf(store_then_report(targets))), "",
                                VmConfig(mem_size=32 * MiB))
    done = Recorder()
    machine.io_bus.insert(0x501, 1, done, "done")
    vm = machine.vm
    region = vm.memory.regions[0]
    try:
        vm.enable_dirty_log()
        assert vm.fetch_dirty_log(region).count() > 0  # the loader's writes (VMM-marked)
        assert vm.fetch_dirty_log(region).count() == 0  # taken
        machine.start()
        wait_for(lambda: done.writes)
        machine.pause()
        guest = vm.fetch_dirty_log(region)
        assert guest.pages().tolist() == [512, 773, 8191]
        assert vm.memory.read_u32(0x0030_5000) == 0xA5A5A5A5
        # VMM writes are merged in; KVM's log was cleared by the previous fetch
        vm.memory.write(0x0040_0010, b"dev")
        assert vm.fetch_dirty_log(region).pages().tolist() == [1024]
        assert vm.fetch_dirty_log(region).count() == 0
    finally:
        machine.stop()
        vm.close()
