"""The snapshot / migration stream: a header, then checksummed sections, then END.

Sans-IO on both sides. `StreamWriter` methods return the bytes to send or write; `StreamReader`
is fed bytes in any chunking and returns the typed records completed so far. Neither touches a
file or a socket. Byte layout and versioning rules: SPEC.md.

Each record's xxh3-64 covers its kind, flags, length and body and is seeded with the previous
record's checksum (the header's for the first), so flipping, dropping, reordering or inserting
whole records is caught as well as corrupted bytes.

Over 450 lines, as one room on purpose: the writer and the reader are the two halves of one
byte layout (SPEC.md sections 1, 2, 6, 7), and keeping them side by side is what lets a reader
of either check it against the other; the page and schema codecs they call live apart.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from .errors import (
    BadMagic,
    ChecksumError,
    DigestMismatch,
    FlagsError,
    FormatError,
    LayoutMismatch,
    SchemaError,
    SectionTooLarge,
    SequenceError,
    SizeMismatch,
    TotalsMismatch,
    TrailingDataError,
    TruncatedError,
    UnknownSection,
    VersionError,
)
from .digest import KnownZero, memory_digest
from .index import (INDEX_RUN_DTYPE, MemoryIndex, decode_memory_index, encode_memory_index,
                    section_runs)
from .workingset import WorkingSet, decode_working_set
from .layout import DeviceEntry, DeviceLayout, MemoryDifference, MemoryLayout, check
from .pages import (
    PageDecoder,
    PageDecoding,
    PageLimits,
    PageRun,
    PageSection,
    PageTotals,
)
from .schema import SchemaRegistry

MAGIC = b"KVMIGSNP"
FORMAT_MAJOR = 2  # 2.0: device kinds are declared ids, no longer class names (SPEC.md section 6)
FORMAT_MINOR = 1  # 2.1: a snapshot's CONFIG records its disk's copy (SPEC.md section 6.2); MEMORY_INDEX
                 # and WORKING_SET, both skippable (sections 10, 11)
SUPPORTED_MAJORS = (2,)  # a 1.x stream names its devices by class: refused, not guessed at

# magic, major, minor, flags, producer (UTF-8, NUL padded), reserved, xxh3-64 of bytes 0..55
HEADER = struct.Struct("<8sHHI32s8xQ")
# kind, flags, body length, chained xxh3-64 of (kind, flags, length, body)
FRAME = struct.Struct("<HHIQ")
END_BODY = struct.Struct("<QQQQQQ")
assert HEADER.size == 64 and FRAME.size == 16 and END_BODY.size == 48

FLAG_SKIPPABLE = 0x0001
KNOWN_FLAGS = FLAG_SKIPPABLE


class SectionKind(enum.IntEnum):
    INVALID = 0
    CONFIG = 1
    LAYOUT = 2
    VCPU = 3
    VM_STATE = 4
    DEVICE = 5
    PAGES = 6
    END = 7
    MEMORY_INDEX = 8  # 2.1, always SKIPPABLE: where every page is, and the digest's block hashes
    WORKING_SET = 9  # 2.1, always SKIPPABLE: the pages a restored guest touched first, in order


def _section_name(kind: int) -> str:
    try:
        return SectionKind(kind).name.lower()
    except ValueError:
        return f"kind {kind}"


# --- records -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    flags: int
    producer: str


@dataclass(frozen=True)
class ConfigRecord:
    config: Any


@dataclass(frozen=True)
class LayoutRecord:
    layout: DeviceLayout


@dataclass(frozen=True)
class VcpuRecord:
    state: Any


@dataclass(frozen=True)
class VmStateRecord:
    state: Any


@dataclass(frozen=True)
class DeviceSection:
    """DEVICE body: where the device sits and its state (any registered type; the tag carries
    the state type's name and version)."""

    entry: DeviceEntry
    state: Any


@dataclass(frozen=True)
class DeviceRecord:
    entry: DeviceEntry
    state: Any


@dataclass(frozen=True)
class PagesRecord:
    runs: tuple[PageRun, ...]
    totals: PageTotals


@dataclass(frozen=True)
class MemoryIndexRecord:
    """MEMORY_INDEX, checked against the PAGES sections before it (and END's digest after it)."""

    index: MemoryIndex


@dataclass(frozen=True)
class WorkingSetRecord:
    """WORKING_SET, its place in the stream checked (right after the record it names)."""

    working_set: WorkingSet


@dataclass(frozen=True)
class SkippedRecord:
    """A skippable section of a kind this reader does not know (newer minor version)."""

    kind: int
    length: int
    offset: int


@dataclass(frozen=True)
class StreamTotals:
    pages: int
    zero_pages: int
    raw_bytes: int
    payload_bytes: int
    sections: int  # records between the header and END


@dataclass(frozen=True)
class EndRecord:
    totals: StreamTotals
    digest: int  # memory_digest() of the sender's guest memory


Record = (Header | ConfigRecord | LayoutRecord | VcpuRecord | VmStateRecord | DeviceRecord
          | PagesRecord | MemoryIndexRecord | WorkingSetRecord | SkippedRecord | EndRecord)


def register_format_types(registry: SchemaRegistry) -> SchemaRegistry:
    """Register the types the stream itself encodes (layout, device envelope)."""
    from .layout import IoRange, PciBar, PciEntry, RamRange

    for cls, name in ((RamRange, "formats.ram_range"), (MemoryLayout, "formats.memory_layout"),
                      (IoRange, "formats.io_range"), (PciBar, "formats.pci_bar"), (PciEntry, "formats.pci_entry"),
                      (DeviceEntry, "formats.device_entry"),
                      (DeviceLayout, "formats.device_layout"),
                      (DeviceSection, "formats.device")):
        if cls not in registry.names().values():
            registry.register(cls, name, version=1)
    return registry


def _seed_of(header_bytes: bytes) -> int:
    return xxhash.xxh3_64_intdigest(header_bytes[:HEADER.size - 8])


def _record_digest(prefix: bytes | memoryview, body_digest: int, seed: int) -> int:
    """A record's check: xxh3-64, seeded with the previous record's check, over its kind,
    flags, length and the xxh3-64 of its body (so bodies can be hashed in parallel)."""
    return xxhash.xxh3_64_intdigest(bytes(prefix) + struct.pack("<Q", body_digest), seed)


# --- writer ------------------------------------------------------------------------------


class StreamWriter:
    """Produces a stream: `header()`, any sections, `end(digest)`. Each call returns bytes."""

    def __init__(self, registry: SchemaRegistry, producer: str = "kvmigrate",
                 max_section: int = 64 << 20, *, index: bool = False) -> None:
        """`index`: keep where each PAGES run's payload lands (`position` counts every byte this
        writer made), for `memory_index` before END; a file's writer does, a stream's need not."""
        self.registry = register_format_types(registry)
        self.producer = producer.encode()[:32]
        self.max_section = max_section
        self.position = 0  # bytes made so far: the stream offset of the next record
        self._chain: int | None = None
        self._ended = False
        self._sections = 0
        self._pages = PageTotals()
        self._index: list[np.ndarray] | None = [] if index else None
        self._data_start: int | None = None  # of the first PAGES record
        self._previous = 0  # offset of the last record made

    @classmethod
    def continuing(cls, check: int, position: int) -> StreamWriter:
        """A writer that goes on with a stream after the record whose check is `check`, at stream
        offset `position` (a file's tail written anew: its sections framed by `section`, END's
        body given whole)."""
        writer = cls(SchemaRegistry())
        writer._chain, writer.position = check, position
        return writer

    def header(self) -> bytes:
        if self._chain is not None:
            raise SequenceError("header", None, "header already written")
        head = HEADER.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0, self.producer, 0)
        self._chain = _seed_of(head)
        self.position = HEADER.size
        return head[:-8] + struct.pack("<Q", self._chain)

    def section(self, kind: int, body: bytes, *, skippable: bool = False) -> bytes:
        """Frame one section body. Unknown-to-old-readers extensions pass skippable=True."""
        return self._frame(kind, len(body), xxhash.xxh3_64_intdigest(body), skippable) + body

    def _frame(self, kind: int, length: int, body_digest: int, skippable: bool) -> bytes:
        """The 16-byte record header for a body of `length` bytes hashing to `body_digest`."""
        if self._chain is None or self._ended:
            raise SequenceError(_section_name(kind), None,
                                "sections go between the header and END")
        if length > self.max_section:
            raise SectionTooLarge(_section_name(kind), 0, length, self.max_section)
        prefix = struct.pack("<HHI", kind, FLAG_SKIPPABLE if skippable else 0, length)
        digest = _record_digest(prefix, body_digest, self._chain)
        self._chain = digest
        self._previous = self.position
        self.position += FRAME.size + length
        if kind == SectionKind.END:
            self._ended = True
        else:
            self._sections += 1
        return prefix + struct.pack("<Q", digest)

    def config(self, config: Any) -> bytes:
        return self.section(SectionKind.CONFIG, self.registry.encode(config))

    def layout(self, layout: DeviceLayout) -> bytes:
        return self.section(SectionKind.LAYOUT, self.registry.encode(layout))

    def vcpu(self, state: Any) -> bytes:
        return self.section(SectionKind.VCPU, self.registry.encode(state))

    def vm_state(self, state: Any) -> bytes:
        return self.section(SectionKind.VM_STATE, self.registry.encode(state))

    def device(self, entry: DeviceEntry, state: Any) -> bytes:
        return self.section(SectionKind.DEVICE, self.registry.encode(DeviceSection(entry, state)))

    def pages(self, section: PageSection) -> bytes:
        return b"".join(self.pages_parts(section))

    def pages_parts(self, section: PageSection) -> list[bytes | memoryview]:
        """`pages` without joining: the record header, then the body's pieces (payloads may be
        views of guest memory), for a vectored write. Only the 16-byte header is computed here:
        the body was hashed by the encoder."""
        at = self.position
        head = self._frame(SectionKind.PAGES, section.length, section.digest, False)
        self._pages = self._pages + section.totals
        if self._index is not None:  # the run table is the body's first part (PageSection)
            self._index.append(section_runs(section.parts[0], at))
            self._data_start = at if self._data_start is None else self._data_start
        return [head, *section.parts]

    def memory_index(self, memory: MemoryLayout, block_hashes: Iterable[np.ndarray]) -> bytes:
        """The MEMORY_INDEX record (skippable) of the PAGES sections made so far, with the memory
        digest's `block_hashes` per RAM range of `memory`; written right before END, whose digest
        must be the one they combine into (`MemoryIndex.digest`)."""
        if self._index is None:
            raise SequenceError("memory_index", self.position, "a writer made without index=True")
        runs = np.concatenate(self._index) if self._index else np.zeros(0, dtype=INDEX_RUN_DTYPE)
        index = MemoryIndex(memory, runs, tuple(block_hashes), len(self._index),
                            self.position if self._data_start is None else self._data_start, self._previous)
        return self.section(SectionKind.MEMORY_INDEX, encode_memory_index(index), skippable=True)

    @property
    def totals(self) -> StreamTotals:
        p = self._pages
        return StreamTotals(p.pages, p.zero_pages, p.raw_bytes, p.payload_bytes, self._sections)

    def end(self, digest: int) -> bytes:
        t = self.totals
        return self.section(SectionKind.END, END_BODY.pack(
            t.pages, t.zero_pages, t.raw_bytes, t.payload_bytes, t.sections, digest))


# --- reader ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamLimits:
    max_section: int = 64 << 20  # body bytes of one section
    pages: PageLimits = PageLimits()


class StreamReader:
    """Feed bytes, get records. Validates framing, checksums, versions, schemas, page addresses
    and END totals; `finish()` at end of input raises if the stream stopped early.

    `memory` is the RAM the receiver has: page runs outside it are refused before any page of
    their section is returned. Without it, `expected_layout.memory` is used, or else the
    stream's own LAYOUT section (which must then come before PAGES). `expected_layout`, when
    given, is checked against the stream's LAYOUT (`LayoutMismatch` listing every difference).
    `expect` pins the type of CONFIG / VCPU / VM_STATE bodies.
    """

    def __init__(self, registry: SchemaRegistry, *, memory: MemoryLayout | None = None,
                 expected_layout: DeviceLayout | None = None,
                 expect: Mapping[SectionKind, type] | None = None,
                 limits: StreamLimits | None = None, index: bool = False) -> None:
        self.registry = register_format_types(registry)
        self.limits = limits or StreamLimits()
        self.expected_layout = expected_layout
        self.expect = dict(expect or {})
        if memory is None and expected_layout is not None:
            memory = expected_layout.memory
        self._memory_given = memory is not None
        self._pages: PageDecoding | None = (PageDecoder(memory, self.limits.pages)
                                             if memory is not None else None)
        self._buf = bytearray()
        self._pos = 0  # stream offset of _buf[0]
        self._chain: int | None = None
        self.header: Header | None = None
        self.end: EndRecord | None = None
        self.layout: DeviceLayout | None = None
        self._sections = 0
        self._seen = PageTotals()
        self._failed: FormatError | None = None
        # `index`: a MEMORY_INDEX is checked against the PAGES sections read (a running hash of
        # the entries they make, their count, where they began) and END's digest; without it, it
        # is skipped as a reader of 2.0 skips it
        self._index_runs = xxhash.xxh3_64() if index else None
        self._index_sections = 0
        self._data_start: int | None = None
        self._previous = 0
        self._record_at = 0
        self.index: MemoryIndex | None = None

    @property
    def done(self) -> bool:
        return self.end is not None

    @property
    def page_memory(self) -> MemoryLayout | None:
        """The RAM that PAGES sections are checked against, once known."""
        return self._pages.memory if self._pages is not None else None

    def decode_pages_with(self, decoder: PageDecoding) -> None:
        """Decode PAGES bodies with `decoder` from now on (say, one that places the pages in the
        receiver's memory itself), for the same memory layout as this reader's."""
        if self.page_memory is None or decoder.memory != self.page_memory:
            raise SequenceError("pages", self._pos, "a page decoder for another memory layout")
        self._pages = decoder

    def feed(self, data: bytes | bytearray | memoryview, *, stable: bool = False) -> list[Record]:
        """Records completed by `data`. When nothing is buffered and `data` is immutable
        (`bytes`, or `stable`: the caller will not change it), records are parsed in place and
        their bodies are views of `data` (no copy: a migration's page payloads go from the
        socket buffer to guest memory once)."""
        if self._failed is not None:
            raise SequenceError("stream", self._pos, f"reader already failed: {self._failed}")
        out: list[Record] = []
        try:
            if self._buf or not (stable or isinstance(data, bytes)):
                self._buf += data
                while n := self._parse(self._buf, out, copy=True):
                    self._consume(n)
            else:
                view, at = memoryview(data), 0
                while at < len(view) and (n := self._parse(view[at:], out, copy=False)):
                    at += n
                    self._pos += n
                self._buf += view[at:]
        except FormatError as exc:
            self._failed = exc
            raise
        return out

    def finish(self) -> None:
        """End of input: raise unless a complete stream (through END) was read."""
        if self._failed is not None:
            raise SequenceError("stream", self._pos, f"reader already failed: {self._failed}")
        if self.header is None:
            raise TruncatedError("header", 0, HEADER.size, len(self._buf))
        if self.end is None:
            if len(self._buf) >= FRAME.size:
                kind, _, length, _ = FRAME.unpack_from(self._buf)
                raise TruncatedError(_section_name(kind), self._pos, FRAME.size + length,
                                     len(self._buf))
            raise TruncatedError("record", self._pos, FRAME.size, len(self._buf))

    # --- one item ---

    def _parse(self, buf: bytearray | memoryview, out: list[Record], *, copy: bool) -> int:
        """Parse one item at the start of `buf` (stream offset `self._pos`); the bytes it took,
        0 if `buf` does not hold a whole one yet. `copy`: bodies must not be views of `buf`."""
        if self.end is not None:
            if len(buf):
                raise TrailingDataError("end", self._pos, len(buf))
            return 0
        if self.header is None:
            if len(buf) < HEADER.size:
                self._check_magic_prefix(buf)
                return 0
            out.append(self._read_header(bytes(buf[:HEADER.size])))
            return HEADER.size
        if len(buf) < FRAME.size:
            return 0
        kind, flags, length, digest = FRAME.unpack_from(buf)
        name = _section_name(kind)
        if length > self.limits.max_section:
            raise SectionTooLarge(name, self._pos, length, self.limits.max_section)
        if len(buf) < FRAME.size + length:
            return 0
        with memoryview(buf) as view:
            body: bytes | memoryview = view[FRAME.size:FRAME.size + length]
            if copy:
                body = bytes(body)
            assert self._chain is not None  # set with the header, read above
            found = _record_digest(view[:8], xxhash.xxh3_64_intdigest(body), self._chain)
        if found != digest:
            raise ChecksumError(name, self._pos, digest, found)
        offset = self._pos + FRAME.size
        self._chain = digest
        self._previous, self._record_at = self._record_at, self._pos
        record = self._dispatch(kind, flags, body, offset)
        if record is not None:
            out.append(record)
        return FRAME.size + length

    def _consume(self, n: int) -> None:
        del self._buf[:n]
        self._pos += n

    def _check_magic_prefix(self, buf: bytearray | memoryview) -> None:
        have = bytes(buf[:len(MAGIC)])
        if not MAGIC.startswith(have):
            raise BadMagic(MAGIC, have)

    def _read_header(self, raw: bytes) -> Header:
        magic, major, minor, flags, producer, digest = HEADER.unpack(raw)
        if magic != MAGIC:
            raise BadMagic(MAGIC, magic)
        # Major and minor sit at fixed offsets in every version, so a newer major is reported
        # as such even if it changed the rest of the header.
        if major not in SUPPORTED_MAJORS:
            raise VersionError((major, minor), (max(SUPPORTED_MAJORS), FORMAT_MINOR))
        found = _seed_of(raw)
        if found != digest:
            raise ChecksumError("header", 0, digest, found)
        if flags:
            raise FlagsError("header", 12, flags)
        try:
            text = producer.rstrip(b"\0").decode()
        except UnicodeDecodeError:
            raise SchemaError("header", "producer", "UTF-8", "undecodable bytes",
                              section="header", offset=16) from None
        self._chain = digest
        self.header = Header(major, minor, flags, text)
        return self.header

    def _decode(self, kind: SectionKind, body: bytes | memoryview, offset: int, expect: type | None) -> Any:
        try:
            return self.registry.decode(body, expect)
        except SchemaError as exc:
            raise SchemaError(exc.type, exc.field, exc.expected, exc.found,
                              section=kind.name.lower(), offset=offset) from None

    def _dispatch(self, kind: int, flags: int, body: bytes | memoryview, offset: int) -> Record | None:
        name = _section_name(kind)
        try:
            skind = SectionKind(kind)
        except ValueError:
            skind = SectionKind.INVALID
        if skind in (SectionKind.MEMORY_INDEX, SectionKind.WORKING_SET) and self._index_runs is None:
            skind = SectionKind.INVALID  # read as a 2.0 reader reads them
        if skind is SectionKind.INVALID:
            if not flags & FLAG_SKIPPABLE:
                raise UnknownSection(kind, offset - FRAME.size)
            self._sections += 1
            return SkippedRecord(kind, len(body), offset - FRAME.size)
        if flags & ~KNOWN_FLAGS:
            raise FlagsError(name, offset - FRAME.size + 2, flags)
        if skind is SectionKind.END:
            return self._read_end(body, offset)
        self._sections += 1
        if skind is SectionKind.PAGES:
            if self._pages is None:
                raise SequenceError(name, offset, "PAGES before any memory layout is known")
            if self.expected_layout is not None and self.layout is None:
                # the device-layout check runs before any page is handed out
                raise SequenceError(name, offset, "PAGES before the LAYOUT section")
            runs, totals = self._pages.decode(body, offset)
            self._seen = self._seen + totals
            if self._index_runs is not None:
                self._index_runs.update(section_runs(body, offset - FRAME.size).tobytes())
                self._index_sections += 1
                self._data_start = offset - FRAME.size if self._data_start is None else self._data_start
            return PagesRecord(tuple(runs), totals)
        if skind is SectionKind.MEMORY_INDEX:
            return self._read_index(body, offset)
        if skind is SectionKind.WORKING_SET:
            return self._read_working_set(body, offset)
        if skind is SectionKind.LAYOUT:
            return self._read_layout(body, offset)
        if skind is SectionKind.DEVICE:
            dev = self._decode(skind, body, offset, DeviceSection)
            return DeviceRecord(dev.entry, dev.state)
        value = self._decode(skind, body, offset, self.expect.get(skind))
        if skind is SectionKind.CONFIG:
            return ConfigRecord(value)
        if skind is SectionKind.VCPU:
            return VcpuRecord(value)
        return VmStateRecord(value)

    def _read_layout(self, body: bytes | memoryview, offset: int) -> LayoutRecord:
        if self.layout is not None:
            raise SequenceError("layout", offset, "a second LAYOUT section")
        layout = self._decode(SectionKind.LAYOUT, body, offset, DeviceLayout)
        if self.expected_layout is not None:
            check(self.expected_layout, layout)
        elif self._pages is not None and self._memory_given:
            if layout.memory != self._pages.memory:
                raise LayoutMismatch([MemoryDifference(self._pages.memory, layout.memory)])
        if self._pages is None:
            self._pages = PageDecoder(layout.memory, self.limits.pages)
        self.layout = layout
        return LayoutRecord(layout)

    def _read_index(self, body: bytes | memoryview, offset: int) -> MemoryIndexRecord | SkippedRecord:
        """A MEMORY_INDEX of a version this reader knows, its runs the ones of the PAGES sections
        read, its positions theirs; a newer version is skipped (the section is skippable)."""
        at = offset - FRAME.size
        try:
            index = decode_memory_index(body, at, self.limits.pages)
        except VersionError:
            return SkippedRecord(SectionKind.MEMORY_INDEX, len(body), at)
        assert self._index_runs is not None  # (_dispatch reads it only then)
        data_start = at if self._data_start is None else self._data_start
        if self.index is not None or self.page_memory is None or index.memory != self.page_memory:
            raise SequenceError("memory_index", at, "a second index, or one for another memory layout")
        found = (xxhash.xxh3_64_intdigest(index.runs.tobytes()), index.pages_sections, index.data_start,
                 index.previous)
        expected = (self._index_runs.intdigest(), self._index_sections, data_start, self._previous)
        if found != expected:
            raise SequenceError("memory_index", at, f"does not describe the PAGES sections before it "
                                f"(runs hash, sections, data start, previous record: {found} != {expected})")
        self.index = index
        return MemoryIndexRecord(index)

    def _read_working_set(self, body: bytes | memoryview, offset: int) -> WorkingSetRecord | SkippedRecord:
        at = offset - FRAME.size
        if self.page_memory is None:
            raise SequenceError("working_set", at, "a working set before any memory layout is known")
        try:
            ws = decode_working_set(body, at, self.page_memory)
        except VersionError:
            return SkippedRecord(SectionKind.WORKING_SET, len(body), at)
        if ws.previous != self._previous or self.index is not None:
            raise SequenceError("working_set", at, f"names the record at {ws.previous} as the one before it "
                                f"(it is at {self._previous}), or comes after the index")
        self._data_start = at if self._data_start is None else self._data_start
        return WorkingSetRecord(ws)

    def _read_end(self, body: bytes | memoryview, offset: int) -> EndRecord:
        if len(body) != END_BODY.size:
            raise SizeMismatch("end", offset, END_BODY.size, len(body), "END body length")
        pages, zero, raw, payload, sections, digest = END_BODY.unpack(body)
        declared = StreamTotals(pages, zero, raw, payload, sections)
        seen = StreamTotals(self._seen.pages, self._seen.zero_pages, self._seen.raw_bytes,
                            self._seen.payload_bytes, self._sections)
        for field in ("sections", "pages", "zero_pages", "raw_bytes", "payload_bytes"):
            if getattr(declared, field) != getattr(seen, field):
                raise TotalsMismatch(field, getattr(declared, field), getattr(seen, field),
                                     offset=offset)
        if self.index is not None and self.index.digest() != digest:
            raise DigestMismatch(digest, self.index.digest())  # the index's block hashes are not END's
        self.end = EndRecord(declared, digest)
        return self.end


def verify_digest(end: EndRecord, ranges: Iterable[tuple[int, object]], *, known_zero: KnownZero | None = None,
                  workers: int = 1) -> None:
    """Compare END's digest with the receiver's own memory (after writing every page);
    `known_zero` and `workers` are `memory_digest`'s."""
    found = memory_digest(ranges, known_zero=known_zero, workers=workers)
    if found != end.digest:
        raise DigestMismatch(end.digest, found)
