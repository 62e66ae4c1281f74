"""kvmigrate's snapshot / migration stream format: pure, sans-IO, hostile-input safe.

Bytes in, typed objects out; no files, sockets or KVM here, and no import of `hv` or `migrate`.
See SPEC.md for the byte layout and the versioning rules.

Writing a snapshot::

    reg = SchemaRegistry(); reg.register(VcpuState, "vcpu", version=1); ...
    w = StreamWriter(reg, producer="kvmigrate 0.1")
    out = [w.header(), w.config(cfg), w.layout(layout)]
    out += [w.vcpu(s) for s in vcpus] + [w.vm_state(vm)] + [w.device(e, s) for e, s in devs]
    enc = PageEncoder(level=1)
    for addr, mem in ram:                      # one (address, memoryview) per RAM range
        out += [w.pages(sec) for sec in enc.encode(addr, mem)]
    out.append(w.end(memory_digest(ram)))

Reading it back::

    r = StreamReader(reg, expected_layout=my_layout)
    for chunk in chunks:
        for rec in r.feed(chunk):
            match rec:
                case PagesRecord(runs=runs): ...   # write run.data (None = zero) at run.address
                case EndRecord(): ...
    r.finish()
    verify_digest(r.end, my_ram)
"""

from .errors import (
    BadMagic,
    ChecksumError,
    DecompressionError,
    DigestMismatch,
    FlagsError,
    FormatError,
    LayoutMismatch,
    PageRangeError,
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
from .layout import (
    PAGE_SIZE,
    DeviceChanged,
    DeviceEntry,
    DeviceLayout,
    DeviceOrderDifference,
    Difference,
    ExtraDevice,
    IoRange,
    MemoryDifference,
    MemoryLayout,
    MissingDevice,
    PciBar,
    PciEntry,
    RamRange,
    VcpuCountDifference,
    check,
    diff,
)
from .digest import (
    DIGEST_BLOCK,
    DISK_DIGEST_BLOCK,
    DISK_DIGEST_SIZE,
    POSTCOPY_DIGEST_BLOCK,
    KnownZero,
    ZeroRanges,
    block_count,
    block_hash,
    combine_block_hashes,
    combine_disk_digest,
    disk_block_digests,
    memory_block_hashes,
    memory_digest,
    zero_block_hash,
    zero_block_hashes,
    zero_disk_block_digest,
)
from .pages import (
    PageDecoder,
    PageDecoding,
    PageEncoder,
    PageEncoding,
    PageLimits,
    PageRun,
    PageSection,
    PageTotals,
    page_runs,
)
from .index import (
    INDEX_RUN_DTYPE,
    INDEX_TAIL,
    IndexLocation,
    MemoryIndex,
    check_tail,
    decode_memory_index,
    encode_memory_index,
    index_location,
    previous_record,
)
from .workingset import WorkingSet, check_working_set, decode_working_set, encode_working_set, page_addresses
from .budget import Budget, BudgetExceeded, scan as scan_budget
from .schema import MsgpackLimits, SchemaRegistry, unpack as unpack_msgpack
from .stream import (
    FLAG_SKIPPABLE,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    MAGIC,
    SUPPORTED_MAJORS,
    ConfigRecord,
    DeviceRecord,
    DeviceSection,
    EndRecord,
    Header,
    LayoutRecord,
    MemoryIndexRecord,
    PagesRecord,
    WorkingSetRecord,
    Record,
    SectionKind,
    SkippedRecord,
    StreamLimits,
    StreamReader,
    StreamTotals,
    StreamWriter,
    VcpuRecord,
    VmStateRecord,
    register_format_types,
    verify_digest,
)

__all__ = [name for name in dir() if not name.startswith("_")]
