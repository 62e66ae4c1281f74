"""PCI test tools: hand-assembled tiny guests that count the interrupts they take, configuration
accesses as a guest's exits make them, and a virtio-pci driver played by the test."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tinyguest import LOAD_ADDRESS, Recorder, wait_for

from hv.devices.pci.config import COMMAND, COMMAND_MASTER, COMMAND_MEMORY
from hv.devices.pci.root import PciAddress
from hv.devices.pci import virtio_pci as vp
from hv.devices.virtio import mmio as regs
from hv.vmm.machine import Machine
from hv.vmm.pci import ECAM_BASE

REPORT, READY = 0x502, 0x503
MSI_ADDRESS = 0xFEE0_0000  # LAPIC 0, physical destination, fixed delivery
FLAG = 0x8_0000  # where a guest waits for the host's go (interrupt_counter's `notify`)


def cf8(address: PciAddress, register: int) -> int:
    return 0x8000_0000 | address.bus << 16 | address.device << 11 | address.function << 8 | register & 0xFC


def ecam(address: PciAddress, register: int) -> int:
    return ECAM_BASE | address.bus << 20 | address.device << 15 | address.function << 12 | register


# --- tiny guests (32-bit ring 0, hand-assembled: keep them short, ring 0 is emulated) -------------


def _mov_mem(address: int, value: int) -> bytes:
    return b"\xc7\x05" + struct.pack("<II", address, value)  # mov dword [address], value


def interrupt_counter(vectors: list[int], isr_reads: dict[int, int] | None = None,
                      ioapic: tuple[int, int] | None = None, notify: int | None = None) -> bytes:
    """A guest whose handler for each of `vectors` writes v to port 0x502 (or, for those in
    `isr_reads`, the byte it read at `isr_reads[v]`, as an INTx handler reads and so clears its
    device's ISR), EOIs, and waits with
    interrupts on again: every interrupt taken is one report, nested ones included. `ioapic`:
    (pin, vector) is routed level-triggered to LAPIC 0 first. Port 0x503 says ready. `notify`: after that, the guest waits for a non-zero dword at FLAG,
    then writes 16 bits of 0 at `notify` (a virtio-pci queue 0 notification)."""
    base = LOAD_ADDRESS + 12
    main = b"\xb0\xff\xe6\x21\xe6\xa1"  # mask both PICs (LINT0 takes ExtINT from the PIC)
    main += _mov_mem(0xFEE0_00F0, 0x1FF)  # LAPIC SVR: software enable
    if ioapic:
        pin, vector = ioapic
        main += (_mov_mem(0xFEC0_0000, 0x10 + 2 * pin) + _mov_mem(0xFEC0_0010, vector | 0x8000)
                 + _mov_mem(0xFEC0_0000, 0x11 + 2 * pin) + _mov_mem(0xFEC0_0010, 0))
    code_size, handler_size = 128, 32
    handlers_at = base + code_size
    idtr_at = handlers_at + handler_size * len(vectors)
    idt_at = idtr_at + 8
    main = (b"\xbc" + struct.pack("<I", 0x9_0000) + main  # mov esp, 0x90000
            + b"\x0f\x01\x1d" + struct.pack("<I", idtr_at)  # lidt [idtr]
            + b"\xba" + struct.pack("<I", READY) + b"\xb0\x01\xee"  # out 0x503, 1
            + (b"\x83\x3d" + struct.pack("<I", FLAG) + b"\x00\x74\xf7"  # wait: cmp dword [FLAG], 0; je wait
               + b"\x66\xc7\x05" + struct.pack("<IH", notify, 0) if notify is not None else b"")  # mov word [notify], 0
            + b"\xfb\xf4\xeb\xfd")  # sti; spin: hlt; jmp spin
    assert len(main) <= code_size
    idt = bytearray(256 * 8)
    handlers = b""
    for i, v in enumerate(vectors):
        at = handlers_at + i * handler_size
        h = b"\xba" + struct.pack("<I", REPORT)  # mov edx, 0x502
        if isr_reads and v in isr_reads:
            h += b"\xa0" + struct.pack("<I", isr_reads[v])  # mov al, [isr]: reports what it read
        else:
            h += b"\xb0" + bytes([v])  # mov al, v
        h += (b"\xee"  # out dx, al
              + _mov_mem(0xFEE0_00B0, 0)  # EOI
              + b"\xfb\xf4\xeb\xfd")  # sti; spin: hlt; jmp spin (iret cannot be emulated here)
        assert len(h) <= handler_size
        handlers += h.ljust(handler_size, b"\x90")
        idt[v * 8 : v * 8 + 8] = struct.pack("<HHBBH", at & 0xFFFF, 0x10, 0, 0x8E, at >> 16)
    return main.ljust(code_size, b"\x90") + handlers + struct.pack("<HI", len(idt) - 1, idt_at) + b"\0\0" + bytes(idt)


def config_reader(address: PciAddress) -> bytes:
    """Reads the function's first dword through 0xCF8/0xCFC, then through ECAM, writing each
    to port 0x504."""
    return (b"\x66\xba\xf8\x0c" + b"\xb8" + struct.pack("<I", cf8(address, 0)) + b"\xef"  # out 0xCF8
            + b"\x66\xba\xfc\x0c\xed"  # in eax, 0xCFC
            + b"\x66\xba\x04\x05\xef"  # out 0x504, eax
            + b"\xa1" + struct.pack("<I", ecam(address, 0)) + b"\xef"  # mov eax, [ecam]; out 0x504
            + b"\xf3\x90\xeb\xfc")


def config_access(machine: Machine, address: PciAddress, register: int, size: int, value: int | None = None,
                  through_ecam: bool = False) -> int:
    """A configuration access as a guest's exit makes it: through the port bus or the MMIO bus."""
    if through_ecam:
        if value is not None:
            machine.mmio_bus.write(ecam(address, register), size, value)
        return machine.mmio_bus.read(ecam(address, register), size)
    machine.io_bus.write(0xCF8, 4, cf8(address, register))
    port = 0xCFC + (register & 3)
    if value is not None:
        machine.io_bus.write(port, size, value)
    return machine.io_bus.read(port, size)


@dataclass
class PciDriver:
    """A virtio-pci driver played by the test, through the machine's buses (as a guest's exits)."""

    machine: Machine
    address: PciAddress
    bar0: int = 0
    bar1: int = 0
    queues: list = field(default_factory=list)

    def config(self, register: int, size: int, value: int | None = None) -> int:
        return config_access(self.machine, self.address, register, size, value)

    def r(self, offset: int, size: int) -> int:
        return self.machine.mmio_bus.read(self.bar0 + offset, size)

    def w(self, offset: int, size: int, value: int) -> None:
        self.machine.mmio_bus.write(self.bar0 + offset, size, value)

    def find_capabilities(self) -> dict[int, tuple[int, int, int]]:
        """virtio cfg_type -> (bar, offset, length), walking the capability list."""
        found, at = {}, self.config(0x34, 1)
        while at:
            if self.config(at, 1) == vp.CAP_ID_VENDOR:
                found[self.config(at + 3, 1)] = (self.config(at + 4, 1), self.config(at + 8, 4), self.config(at + 12, 4))
            at = self.config(at + 1, 1)
        return found

    def start(self, vectors: list[int]) -> None:
        """Decoding on, MSI-X table entries for `vectors` (entry i -> LAPIC vector vectors[i]),
        MSI-X enabled."""
        self.config(COMMAND, 2, COMMAND_MEMORY | COMMAND_MASTER)
        self.bar0 = self.config(0x10, 4) & ~0xF
        self.bar1 = self.config(0x14, 4) & ~0xF
        for i, v in enumerate(vectors):
            for offset, value in ((0, MSI_ADDRESS), (4, 0), (8, v), (12, 0)):
                self.machine.mmio_bus.write(self.bar1 + 16 * i + offset, 4, value)
        cap = next(at for at in range(0x40, 0x100, 4) if self.config(at, 1) == 0x11)
        self.config(cap + 2, 2, 0x8000)

    def init(self, nqueues: int, vectors: list[int], config_vector: int = 0xFFFF, num: int = 16,
             rings: int = 0x20_0000) -> None:
        """Reset, negotiate every offered feature, set up `nqueues` queues (queue i on MSI-X
        entry vectors[i]) and go DRIVER_OK; queues are `DriverQueue`s of test_virtio."""
        from test_virtio import DriverQueue

        mem = self.machine.vm.memory
        self.w(vp.DEVICE_STATUS, 1, 0)
        self.w(vp.DEVICE_STATUS, 1, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER)
        for sel in (0, 1):
            self.w(vp.DEVICE_FEATURE_SELECT, 4, sel)
            offered = self.r(vp.DEVICE_FEATURE, 4)
            self.w(vp.DRIVER_FEATURE_SELECT, 4, sel)
            self.w(vp.DRIVER_FEATURE, 4, offered)
        self.w(vp.DEVICE_STATUS, 1, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER | regs.STATUS_FEATURES_OK)
        assert self.r(vp.DEVICE_STATUS, 1) & regs.STATUS_FEATURES_OK
        assert self.r(vp.NUM_QUEUES, 2) == nqueues
        self.w(vp.CONFIG_MSIX_VECTOR, 2, config_vector)
        for i in range(nqueues):
            area = rings + i * 0x10000
            q = DriverQueue(mem, i, num, area, area + 0x4000, area + 0x8000)
            mem.write(area, bytes(0xC000))
            self.w(vp.QUEUE_SELECT, 2, i)
            assert self.r(vp.QUEUE_SIZE, 2) >= num and self.r(vp.QUEUE_ENABLE, 2) == 0
            self.w(vp.QUEUE_SIZE, 2, num)
            self.w(vp.QUEUE_MSIX_VECTOR, 2, vectors[i])
            assert self.r(vp.QUEUE_MSIX_VECTOR, 2) == vectors[i]
            for field_at, addr in ((vp.QUEUE_DESC, q.desc), (vp.QUEUE_DRIVER, q.avail), (vp.QUEUE_DEVICE, q.used)):
                self.w(field_at, 4, addr & 0xFFFF_FFFF)  # as Linux: two 32-bit halves
                self.w(field_at + 4, 4, addr >> 32)
            self.w(vp.QUEUE_ENABLE, 2, 1)
            self.queues.append(q)
        self.w(vp.DEVICE_STATUS, 1, regs.STATUS_ACKNOWLEDGE | regs.STATUS_DRIVER | regs.STATUS_FEATURES_OK
               | regs.STATUS_DRIVER_OK)

    def notify_address(self, queue: int) -> int:
        return self.bar0 + vp.NOTIFY + vp.NOTIFY_MULTIPLIER * queue


def start_counting(machine: Machine) -> Recorder:
    """Start the machine's `interrupt_counter` guest and wait until its IDT and LAPIC are set
    (it says so on READY): the recorder of its reports, one per interrupt it takes."""
    reports, ready = Recorder(), Recorder()
    machine.io_bus.insert(REPORT, 1, reports, "report")
    machine.io_bus.insert(READY, 1, ready, "ready")
    machine.start()
    wait_for(lambda: ready.writes)
    return reports
