"""Guest memory and memory slots against real KVM."""

from __future__ import annotations

import pytest

from hv.errors import GuestAddressError, SlotError, SlotOverlapError
from hv.kvm.kvm import Kvm
from hv.kvm.vm import MMIO_HOLE_END, MMIO_HOLE_START, Vm, VmConfig

MiB = 1 << 20


def test_layout_splits_around_the_mmio_hole() -> None:
    assert VmConfig(mem_size=512 * MiB).memory_layout() == [(0, 512 * MiB)]
    big = VmConfig(mem_size=4096 * MiB).memory_layout()
    assert big == [(0, MMIO_HOLE_START), (MMIO_HOLE_END, 4096 * MiB - MMIO_HOLE_START)]


def test_read_write_and_zero_copy_view(vm: Vm) -> None:
    mem = vm.memory
    mem.write(0x1234, b"hello")
    assert mem.read(0x1234, 5) == b"hello"
    view = mem.view(0x1000, 0x1000)
    view[0x234:0x239] = b"HELLO"  # through the view, no copy
    assert mem.read(0x1234, 5) == b"HELLO"
    assert mem.host_address(0x1000) == vm.memory.regions[0].host_address + 0x1000


def test_out_of_range_access_is_typed(vm: Vm) -> None:
    size = vm.memory.total_size
    with pytest.raises(GuestAddressError) as err:
        vm.memory.read(size - 2, 4)
    assert err.value.address == size - 2 and err.value.length == 4
    with pytest.raises(GuestAddressError):
        vm.memory.write(size + 0x1000, b"x")
    with pytest.raises(GuestAddressError):
        vm.memory.view(-1, 1)


def test_overlapping_slot_is_refused_and_nothing_changes(vm: Vm) -> None:
    before = vm.memory.regions
    with pytest.raises(SlotOverlapError) as err:
        vm.add_memory_region(16 * MiB, 32 * MiB)
    assert err.value.slot == before[0].slot
    assert vm.memory.regions == before


def test_add_remove_and_reuse_slot(vm: Vm) -> None:
    extra = vm.add_memory_region(1 << 32, 2 * MiB)
    vm.memory.write((1 << 32) + 8, b"abc")
    assert vm.memory.read((1 << 32) + 8, 3) == b"abc"
    vm.remove_memory_region(extra)
    with pytest.raises(GuestAddressError):
        vm.memory.read(1 << 32, 1)
    with pytest.raises(SlotError):
        vm.remove_memory_region(extra)
    again = vm.add_memory_region(1 << 32, 4 * MiB)
    assert again.slot == extra.slot  # freed slot numbers are reused
    assert vm.memory.read(1 << 32, 3) == b"\0\0\0"  # fresh memory


def test_dump_all_covers_every_region(kvm: Kvm) -> None:
    with kvm.create_vm(VmConfig(mem_size=3 * 1024 * MiB + 64 * MiB)) as big:
        dumped = [(base, len(view)) for base, view in big.memory.dump_all()]
        assert dumped == [(0, 3 * 1024 * MiB), (1 << 32, 64 * MiB)]
        # MAP_NORESERVE + untouched: a large guest costs nothing until touched
        big.memory.write((1 << 32) + 5, b"z")
        assert big.memory.read((1 << 32) + 5, 1) == b"z"


def test_vmm_writes_are_marked_dirty(vm: Vm) -> None:
    region = vm.memory.regions[0]
    region.take_vmm_dirty()
    vm.memory.write(0x5FFF, b"ab")  # straddles pages 5 and 6
    vm.memory.fill(0x10000, 0x3000, 0xFF)  # pages 16..18
    assert region.take_vmm_dirty().pages().tolist() == [5, 6, 16, 17, 18]
    assert region.take_vmm_dirty() is None  # taking it cleared it: nothing written since


def test_readonly_slot_turns_guest_writes_into_mmio_exits(kvm: Kvm, write_image) -> None:
    from tinyguest import Recorder, multiboot_elf, store_then_report, wait_for

    from hv.vmm.builder import multiboot_machine

    rom_base = 0x0800_0000  # above the 32 MiB of RAM
    image = write_image(multiboot_elf(store_then_report([rom_base + 0x10])))
    machine = multiboot_machine(kvm, image, "", VmConfig(mem_size=32 * MiB))
    rom = machine.vm.add_memory_region(rom_base, 64 * 1024, readonly=True)
    rom.view[0x10:0x14] = b"\x11\x22\x33\x44"  # the host may write it; the guest may not
    mmio, done = Recorder(), Recorder()
    machine.mmio_bus.insert(rom_base, 64 * 1024, mmio, "rom")
    machine.io_bus.insert(0x501, 1, done, "done")
    machine.start()
    try:
        wait_for(lambda: done.writes)
        assert mmio.writes == [(0x10, 4, 0xA5A5A5A5)]
        assert bytes(rom.view[0x10:0x14]) == b"\x11\x22\x33\x44"
    finally:
        machine.stop()
        machine.vm.close()


def test_populated_pages_follow_touched_memory_not_size(kvm: Kvm) -> None:
    with kvm.create_vm(VmConfig(mem_size=4096 * MiB)) as big:
        low, high = big.memory.regions
        assert low.populated_pages().count() == 0  # a fresh 3 GiB region: nothing to read
        assert not low.pages_array()[:4096].any()  # reading maps the zero page ...
        assert low.populated_pages().count() == 0  # ... which still counts as untouched
        big.memory.write(0x1234, b"x")
        big.memory.fill(0x10_0000, 3 * 4096, 7)
        big.memory.write(high.guest_base + 5 * 4096, b"y")
        # RAM is backed by huge pages where the host has them: a write populates its whole
        # 2 MiB block. So: every written page is reported, and nothing outside written blocks.
        for region, written in ((low, {1, 256, 257, 258}), (high, {5})):
            populated = set(region.populated_pages().pages().tolist())
            assert written <= populated
            block = lambda page, r=region: (r.host_address + page * 4096) // (2 << 20)  # noqa: E731
            assert {block(p) for p in populated} == {block(p) for p in written}


def test_file_backed_private_ram_loads_lazily_and_never_writes_the_file(kvm: Kvm, tmp_path) -> None:
    import mmap

    image = tmp_path / "ram.img"
    with open(image, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(0x2000)
        f.write(b"from the file")

    def backing(base: int, size: int) -> mmap.mmap:
        with open(image, "rb") as f:
            return mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)

    with kvm.create_vm(VmConfig(mem_size=16 * MiB), backing=backing) as vm:
        assert vm.memory.read(0x2000, 13) == b"from the file"
        vm.memory.write(0x2000, b"FROM")
        assert vm.memory.read(0x2000, 13) == b"FROM the file"
        assert not vm.memory.regions[0].anonymous
        assert vm.memory.regions[0].populated_pages().count() == 4096  # file pages all count
    assert image.read_bytes()[0x2000:0x200D] == b"from the file"  # copy-on-write: file untouched


def test_a_region_takes_another_mappings_pages_in_place(vm: Vm, tmp_path) -> None:
    """`take_pages`: a restore's staging memory (anonymous, or a file mapped privately) becomes a
    VM's RAM without a copy and without a new memory slot: the region keeps its host address, the
    pages are the staging's, and the staging is left mapped and empty."""
    import mmap

    from hv.kvm.memory import MemoryRegion, RamBacking, pages_movable

    assert pages_movable() is None  # this project's hosts: Linux 6.x
    region = vm.memory.regions[0]
    address = region.host_address
    staging = MemoryRegion(0, region.size, slot=-1, backing=RamBacking.host_filled(0, region.size))
    staging.view[0x3000:0x3005] = b"moved"
    region.take_pages(staging)
    assert region.host_address == address and vm.memory.read(0x3000, 5) == b"moved" and region.anonymous
    assert bytes(staging.view[0x3000:0x3005]) == bytes(5)  # left mapped, empty
    staging.close()

    image = tmp_path / "ram.img"
    with open(image, "wb") as f:
        f.truncate(region.size)
        f.seek(0x2000)
        f.write(b"from the file")
    with open(image, "rb") as f:
        mapped = mmap.mmap(f.fileno(), region.size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    from_file = MemoryRegion(0, region.size, slot=-1, backing=mapped)
    region.take_pages(from_file)
    assert vm.memory.read(0x2000, 13) == b"from the file" and vm.memory.read(0x3000, 5) == bytes(5)
    assert not region.anonymous  # a file's pages: they all count as touched
    vm.memory.write(0x2000, b"FROM")
    assert image.read_bytes()[0x2000:0x2004] == b"from"  # private: the file is never written
    from_file.close()

    with pytest.raises(GuestAddressError):
        smaller = MemoryRegion(0, region.size // 2, slot=-1, backing=RamBacking.host_filled(0, region.size // 2))
        region.take_pages(smaller)
