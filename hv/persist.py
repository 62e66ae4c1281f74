"""The one persist protocol (save() -> State, restore(State)) and the lifecycle protocol.

Every object whose state outlives a process implements `Persist[S]`: `Vcpu` (`VcpuState`), `Vm`
(`VmState`) and every device model (its own frozen `*State`). There is no default: a model that
forgot `save` fails the type check (`hv/vmm/persisted.py`, mypy in `make test`) and a test, it is
never silently empty. `restore` checks the whole state first and raises `StateRestoreError` (what,
which field, expected, found) before it applies any of it; constructor arguments (ports,
callbacks, a disk's path) are configuration and are never part of the state.

A device also declares `KIND`, the identity its state has on the wire ("serial-16550", ...): a
constant with a version rule, not its Python class name, so renaming a class changes no format.

Devices with threads of their own (virtio workers) also implement `Lifecycle`; `Machine` pauses
them after its vCPUs stop and resumes them before, so a paused machine has nothing touching guest
memory. Sans-IO devices have no lifecycle.

The `check_*` helpers are the validation vocabulary restores share, so each reads as a list of
facts about its state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

from hv.errors import StateRestoreError

S = TypeVar("S")
T = TypeVar("T")
U32, U64 = (1 << 32) - 1, (1 << 64) - 1  # the widths saved registers and counters have


class Persist(Protocol[S]):
    """Saves its state as plain data and restores it, validated first."""

    def save(self) -> S: ...

    def restore(self, state: S) -> None:
        """Apply `state`, or raise `StateRestoreError` (having applied nothing)."""
        ...


@runtime_checkable
class Lifecycle(Protocol):
    """A device that runs on its own (a worker thread): the machine drives it with its vCPUs."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def stop(self) -> None: ...


class Device(Persist[Any], Protocol):
    """A bus device model (sans-IO reads and writes at offsets in its range) that persists; its
    state type is its own (Any here: each model's `restore` checks it is given its type)."""

    KIND: ClassVar[str]  # its identity on the wire; see the module docstring

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


# --- validation helpers -------------------------------------------------------------------------


def check_type(owner: str, state: object, cls: type[T]) -> T:
    """`state` itself is a `cls` (never a lookalike: a dataclass of another model)."""
    if type(state) is not cls:
        raise StateRestoreError(owner, "type", cls.__name__, type(state).__name__)
    return state


def check_int(owner: str, field: str, value: object, low: int, high: int) -> None:
    """An int (not a bool) in [low, high]."""
    if type(value) is not int or not low <= value <= high:
        raise StateRestoreError(owner, field, f"an int in [{low:#x}, {high:#x}]", value)


def check_ints(owner: str, state: object, bounds: Mapping[str, tuple[int, int]]) -> None:
    """Each named field of `state` is an int within its (low, high)."""
    for name, (low, high) in bounds.items():
        check_int(owner, name, getattr(state, name), low, high)


def check_bits(owner: str, state: object, masks: Mapping[str, int]) -> None:
    """Each named field of `state` is an int with no bit outside its mask (a register)."""
    for name, mask in masks.items():
        value = getattr(state, name)
        if type(value) is not int or value < 0 or value & ~mask:
            raise StateRestoreError(owner, name, f"an int within the bits {mask:#x}", value)


def check_bool(owner: str, field: str, value: object) -> None:
    if type(value) is not bool:
        raise StateRestoreError(owner, field, "a bool", value)


def check_bytes(owner: str, field: str, value: object, max_len: int) -> None:
    if type(value) is not bytes or len(value) > max_len:
        raise StateRestoreError(owner, field, f"bytes, at most {max_len}",
                                f"{len(value)} bytes" if type(value) is bytes else value)


def check_equal(owner: str, field: str, expected: object, found: object) -> None:
    """A saved fact that must match this object's own (a disk's size, a queue count)."""
    if found != expected:
        raise StateRestoreError(owner, field, expected, found)
