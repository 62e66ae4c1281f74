"""A machine's state as stream sections and back: the one writing and the one reading path that
snapshot files and the live-migration wire share.

`state_sections` writes a `MachineState`'s VCPU, VM_STATE and DEVICE sections (a snapshot puts the
header, CONFIG and LAYOUT before them; a migration source sends them in STATE). `Collected` takes
the records a `StreamReader` yields, from a file or from protocol messages, applies PAGES to a
`MemorySink` and keeps the rest, until `state()` gives back the `MachineState`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from formats import (ConfigRecord, DeviceEntry, DeviceLayout, DeviceRecord, EndRecord, Header,
                     LayoutRecord, MemoryIndex, MemoryIndexRecord, PagesRecord, Record, SectionKind, StreamWriter,
                     VcpuRecord, VmStateRecord, WorkingSet, WorkingSetRecord)
from hv.kvm import state as hv_state
from hv.kvm.state import CpuidEntry
from migrate.errors import MissingSections, StateShapeError
from migrate.pages import MemorySink
from migrate.state import MachineConfig, MachineState, check_shape

# The types a reader of a kvmigrate stream decodes these sections into.
EXPECT = {SectionKind.CONFIG: MachineConfig, SectionKind.VCPU: hv_state.VcpuState,
          SectionKind.VM_STATE: hv_state.VmState}


def state_sections(writer: StreamWriter, state: MachineState) -> list[bytes]:
    """The VCPU, VM_STATE and DEVICE sections of `state`, in the order a reader expects them."""
    parts = [writer.vcpu(v) for v in state.vcpus]
    parts.append(writer.vm_state(state.vm))
    parts += [writer.device(entry, s) for entry, s in state.devices]
    return parts


@dataclass
class Collected:
    """What a stream's records said so far; its PAGES go into `sink` (None: checked, dropped)."""

    sink: MemorySink | None = None
    header: Header | None = None
    config: MachineConfig | None = None
    layout: DeviceLayout | None = None
    vcpus: list[hv_state.VcpuState] = field(default_factory=list)
    vm: hv_state.VmState | None = None
    devices: list[tuple[DeviceEntry, object]] = field(default_factory=list)
    end: EndRecord | None = None
    index: MemoryIndex | None = None  # a snapshot file's (format 2.1)
    working_set: WorkingSet | None = None  # ... and the pages a restore recorded
    pages: int = 0
    sections: dict[str, int] = field(default_factory=dict)  # section kind -> how many

    def take(self, records: Iterable[Record]) -> int:
        """Keep each record (PAGES applied to the sink); returns how many pages they carried."""
        pages = 0
        for record in records:
            kind = type(record).__name__.removesuffix("Record").lower()
            self.sections[kind] = self.sections.get(kind, 0) + 1
            match record:
                case Header():
                    self.header = record
                case ConfigRecord(config=c):
                    if self.config is not None:
                        raise StateShapeError(["a second CONFIG section"])
                    self.config = c
                case LayoutRecord(layout=layout):
                    self.layout = layout
                case VcpuRecord(state=s):
                    self.vcpus.append(s)
                case VmStateRecord(state=s):
                    if self.vm is not None:
                        raise StateShapeError(["a second VM_STATE section"])
                    self.vm = s
                case DeviceRecord(entry=entry, state=s):
                    self.devices.append((entry, s))
                case PagesRecord(runs=runs, totals=totals):
                    if self.sink is not None:
                        self.sink.apply(runs)
                    pages += totals.pages
                case EndRecord():
                    self.end = record
                case MemoryIndexRecord(index=index):
                    self.index = index
                case WorkingSetRecord(working_set=ws):
                    self.working_set = ws
        self.pages += pages
        return pages

    def need(self, *sections: str) -> None:
        """`MissingSections` unless each of `sections` (CONFIG, LAYOUT, VCPU, VM_STATE) came."""
        seen = {"CONFIG": self.config, "LAYOUT": self.layout, "VCPU": self.vcpus, "VM_STATE": self.vm}
        if missing := [name for name in sections if not seen[name]]:
            raise MissingSections(missing)

    def described(self) -> tuple[MachineConfig, DeviceLayout]:
        """The CONFIG and LAYOUT a stream opened with; `MissingSections` if one never came."""
        if self.config is None or self.layout is None:
            raise MissingSections([name for name, value in (("CONFIG", self.config), ("LAYOUT", self.layout))
                                   if value is None])
        return self.config, self.layout

    def ended(self) -> tuple[Header, DeviceLayout, EndRecord]:
        """The header, layout and END of a stream read to its end (`StreamReader.finish`);
        `MissingSections` if one of them never came."""
        if self.header is None or self.layout is None or self.end is None:
            raise MissingSections([name for name, value in (("HEADER", self.header), ("LAYOUT", self.layout),
                                                            ("END", self.end)) if value is None])
        return self.header, self.layout, self.end

    def state(self, host_cpuid: Sequence[CpuidEntry] | None = None) -> MachineState:
        """The machine state the records held, its shape checked against its layout (`check_shape`:
        every device present and of its type, no unknown one, one state per vCPU); `MissingSections`
        if a section it needs never came. `host_cpuid`: this host's features, for the vCPUs'
        architectural check (`migrate.state.host_features`)."""
        self.need("CONFIG", "LAYOUT", "VCPU", "VM_STATE")
        assert self.config is not None and self.layout is not None and self.vm is not None  # need() said so
        return check_shape(MachineState(self.config, self.layout, tuple(self.vcpus), self.vm,
                                        tuple(self.devices)), host_cpuid)
