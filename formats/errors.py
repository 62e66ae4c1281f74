"""Every way a stream, a state blob or a layout can be refused.

One root (`FormatError`), one subclass per failing check, each carrying the fields a caller needs
to act on it or report it (section, byte offset, expected vs found): nothing is matched by message
text. `offset` is the byte offset in the stream (or in the blob) where the failing item starts, or
None when the check is not about a position (totals, layouts).
"""

from __future__ import annotations

from collections.abc import Sequence


class FormatError(Exception):
    """Root of every error `formats` raises on bad input."""

    def __init__(self, message: str, *, section: str | None = None,
                 offset: int | None = None) -> None:
        self.section = section
        self.offset = offset
        where = []
        if section is not None:
            where.append(f"section {section}")
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class BadMagic(FormatError):
    def __init__(self, expected: bytes, found: bytes, *, offset: int = 0) -> None:
        self.expected, self.found = expected, found
        super().__init__(f"bad magic: expected {expected!r}, found {found!r}",
                         section="header", offset=offset)


class VersionError(FormatError):
    """A format (or per-type schema) version this reader does not read."""

    def __init__(self, found: object, supported: object, *, section: str = "header",
                 offset: int | None = 0) -> None:
        self.found, self.supported = found, supported
        super().__init__(f"version {found} is not readable; this reader supports {supported}",
                         section=section, offset=offset)


class TruncatedError(FormatError):
    """The input ended inside an item: `expected` bytes were needed, `found` were there."""

    def __init__(self, section: str, offset: int, expected: int, found: int) -> None:
        self.expected, self.found = expected, found
        super().__init__(f"truncated: needed {expected} bytes, found {found}",
                         section=section, offset=offset)


class TrailingDataError(FormatError):
    def __init__(self, section: str, offset: int, count: int) -> None:
        self.count = count
        super().__init__(f"{count} bytes of trailing data", section=section, offset=offset)


class ChecksumError(FormatError):
    def __init__(self, section: str, offset: int, expected: int, found: int) -> None:
        self.expected, self.found = expected, found
        super().__init__(f"checksum mismatch: expected {expected:#018x}, found {found:#018x}",
                         section=section, offset=offset)


class SectionTooLarge(FormatError):
    def __init__(self, section: str, offset: int, length: int, limit: int) -> None:
        self.length, self.limit = length, limit
        super().__init__(f"length {length} exceeds the limit {limit}",
                         section=section, offset=offset)


class UnknownSection(FormatError):
    """A section kind this reader does not know and the writer did not mark skippable."""

    def __init__(self, kind: int, offset: int) -> None:
        self.kind = kind
        super().__init__(f"unknown section kind {kind} is not skippable",
                         section=f"kind {kind}", offset=offset)


class FlagsError(FormatError):
    def __init__(self, section: str, offset: int, flags: int) -> None:
        self.flags = flags
        super().__init__(f"reserved flag bits set: {flags:#x}", section=section, offset=offset)


class SequenceError(FormatError):
    """A section in a place the format does not allow (pages before any memory layout, a second
    header, anything after END)."""

    def __init__(self, section: str, offset: int | None, detail: str) -> None:
        self.detail = detail
        super().__init__(detail, section=section, offset=offset)


class SchemaError(FormatError):
    """A msgpack state blob that does not match the registered schema of `type`."""

    def __init__(self, type: str, field: str | None, expected: str, found: str, *,
                 section: str | None = None, offset: int | None = None) -> None:
        self.type, self.field, self.expected, self.found = type, field, expected, found
        name = f"{type}.{field}" if field else type
        super().__init__(f"{name}: expected {expected}, found {found}",
                         section=section, offset=offset)


class PageRangeError(FormatError):
    """A page run outside the caller's memory layout, unaligned, empty or overlapping."""

    def __init__(self, address: int, count: int, detail: str, *, section: str = "pages",
                 offset: int | None = None) -> None:
        self.address, self.count, self.detail = address, count, detail
        super().__init__(f"page run {address:#x}+{count} pages: {detail}",
                         section=section, offset=offset)


class SizeMismatch(FormatError):
    """A payload whose (decompressed) size is not the size its descriptor declares."""

    def __init__(self, section: str, offset: int | None, expected: int, found: int,
                 detail: str = "size mismatch") -> None:
        self.expected, self.found = expected, found
        super().__init__(f"{detail}: expected {expected} bytes, found {found}",
                         section=section, offset=offset)


class TotalsMismatch(FormatError):
    """END's totals disagree with what the reader counted."""

    def __init__(self, field: str, expected: int, found: int, *, offset: int | None = None) -> None:
        self.field, self.expected, self.found = field, expected, found
        super().__init__(f"END total {field}: sender declared {expected}, reader counted {found}",
                         section="end", offset=offset)


class DigestMismatch(FormatError):
    def __init__(self, expected: int, found: int) -> None:
        self.expected, self.found = expected, found
        super().__init__(f"memory digest mismatch: sender {expected:#018x}, "
                         f"receiver {found:#018x}", section="end")


class LayoutMismatch(FormatError):
    """The device layout in the stream differs from the one the receiver built; lists all."""

    def __init__(self, differences: Sequence[object]) -> None:
        self.differences = tuple(differences)
        lines = "\n  ".join(str(d) for d in self.differences)
        super().__init__(f"{len(self.differences)} layout differences:\n  {lines}",
                         section="layout")


class DecompressionError(FormatError):
    """A zstd payload that does not decompress (corrupt frame, trailing bytes after the frame)."""

    def __init__(self, section: str, offset: int | None, detail: str) -> None:
        self.detail = detail
        super().__init__(f"zstd payload refused: {detail}", section=section, offset=offset)
