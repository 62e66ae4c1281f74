"""What decoding a msgpack blob may cost, checked before msgpack allocates anything.

msgpack's own limits (`max_str_len`, `max_array_len`, ...) bound each container and each string
by what it declares, but not how many of them a blob holds: one byte (`0x90`, an empty array)
becomes a 56-byte Python list, so a 24 MiB blob of them costs ~1.8 GB once decoded. `scan` walks
the blob's headers without building anything (str, bin and ext payloads are skipped, not read)
and refuses it when it holds more values than `max_items` or nests deeper than `max_depth`, so
the decoded objects of any accepted blob cost at most its length plus `max_items` small objects
(formats/SPEC.md section 8 states the bound). The depth bound also keeps every recursive
decoder above msgpack (the schema codec, the wire checks) far from Python's recursion limit.

Malformed headers are left to msgpack, which refuses them with its own error: `scan` only says
whether the blob is within budget as far as it is well formed.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Budget", "BudgetExceeded", "scan"]

# What each first byte is, as (skip, width, per): a value that ends `skip` bytes after its type
# byte (width 0), or one with a `width`-byte big-endian field after the type byte that is a
# payload length (per 0; `skip` then counts the bytes between the field and the payload: ext's
# type) or a count of `per` values each (arrays 1, maps 2). Fixmaps, fixarrays and fixstrs carry
# their size in the type byte and are entered below; 0xC1 (never used) is None.
_SKIP, _LENGTH, _COUNT = 0, 1, 2
_KINDS: list[tuple[int, int, int] | None] = [(_SKIP, 0, 0)] * 256
for _b in range(0x80, 0x90):
    _KINDS[_b] = (_COUNT, 0, (_b & 0x0F) * 2)
for _b in range(0x90, 0xA0):
    _KINDS[_b] = (_COUNT, 0, _b & 0x0F)
for _b in range(0xA0, 0xC0):
    _KINDS[_b] = (_SKIP, _b & 0x1F, 0)
_KINDS[0xC1] = None
for _b, _n in {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
               0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17}.items():
    _KINDS[_b] = (_SKIP, _n, 0)
for _b, (_w, _extra) in {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xC7: (1, 1), 0xC8: (2, 1),
                         0xC9: (4, 1), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}.items():
    _KINDS[_b] = (_LENGTH, _w, _extra)
for _b, (_w, _per) in {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}.items():
    _KINDS[_b] = (_COUNT, _w, _per)


@dataclass(frozen=True)
class Budget:
    """The most a blob may hold: values (every scalar, container and map key counts one) and
    nesting of arrays and maps (a scalar at the top is depth 0)."""

    max_items: int
    max_depth: int


@dataclass(frozen=True)
class BudgetExceeded:
    """Why a blob is over budget: `what` ("items" or "depth"), the limit, and where (offset)."""

    what: str
    limit: int
    offset: int

    def __str__(self) -> str:
        return f"more than {self.limit} {'values' if self.what == 'items' else 'levels of nesting'} " \
               f"(at byte {self.offset})"


def scan(data: bytes | bytearray | memoryview, budget: Budget) -> BudgetExceeded | None:
    """None if every value of the msgpack blob `data` fits `budget`, else why not. Reads only
    headers: the cost is one step per value, at most `budget.max_items` of them."""
    buf = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B")  # no copy
    end, at, items = len(buf), 0, 0
    max_items, max_depth, kinds = budget.max_items, budget.max_depth, _KINDS
    pending = [1]  # values still to read at each open level; the top level holds one
    while at < end:
        while pending[-1] == 0:
            pending.pop()
            if not pending:
                return None
        pending[-1] -= 1
        items += 1
        if items > max_items:
            return BudgetExceeded("items", max_items, at)
        kind = kinds[buf[at]]
        if kind is None:
            return None  # 0xC1, never used: msgpack refuses it
        what, width, n = kind
        start, at = at, at + 1
        if what == _SKIP:
            at += width
            continue
        if width:
            if at + width > end:
                return None  # truncated: msgpack says so
            size = int.from_bytes(buf[at:at + width], "big")
            at += width
            if what == _LENGTH:
                at += n + size
                continue
            n *= size
        if len(pending) > max_depth:  # opening a container one level deeper than allowed
            return BudgetExceeded("depth", max_depth, start)
        if n > max_items - items:  # more values declared than the budget has left
            return BudgetExceeded("items", max_items, start)
        pending.append(n)
    return None
