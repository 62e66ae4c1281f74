"""The type check hv/persist.py promises: every class whose state outlives a process, held by the
type checker (`make test` runs mypy before the tests) to the `Persist` protocol of its own state
type. A model that forgot `save` or `restore`, or whose signatures drifted from its state, fails
here, statically, instead of in someone's restore; tests/hv/test_persist.py runs the same list.
"""

from __future__ import annotations

from hv.devices.debug_exit import DebugExit, DebugExitState
from hv.devices.i8042 import I8042, I8042State
from hv.devices.serial import Serial16550, SerialState
from hv.devices.virtio import VirtioBlk, VirtioConsole, VirtioRng
from hv.devices.virtio.net import VirtioNet
from hv.kvm.state import VcpuState, VmState
from hv.kvm.vcpu import Vcpu
from hv.kvm.vm import Vm
from hv.persist import Device, Persist

VCPU: type[Persist[VcpuState]] = Vcpu
VM: type[Persist[VmState]] = Vm
SERIAL: type[Persist[SerialState]] = Serial16550
I8042_MODEL: type[Persist[I8042State]] = I8042
DEBUG_EXIT: type[Persist[DebugExitState]] = DebugExit
# each device model the builder can place, as the machine takes it (a bus device that persists)
DEVICE_MODELS: tuple[type[Device], ...] = (Serial16550, I8042, DebugExit, VirtioBlk, VirtioConsole, VirtioRng,
                                           VirtioNet)
