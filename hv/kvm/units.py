"""Sizes, each defined once for hv and whatever stands on it: the x86 page (what KVM's dirty log,
userfaultfd and the memory slots count in) and binary multiples. `formats` has its own PAGE_SIZE,
the page of the wire format (formats/SPEC.md), which may not import hv; tests/test_constants.py
holds the two equal and finds any second definition."""

from __future__ import annotations

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT  # an x86 base page
MiB = 1 << 20
GiB = 1 << 30
