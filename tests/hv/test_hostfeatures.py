"""A failure caused by the host names the host feature (tests/hv/hostfeatures.py)."""

from __future__ import annotations

from hostfeatures import host_feature_missing

from hv.errors import GuestFatalExit, KvmUnavailableError, MissingCapabilityError, VcpuStateError
from hv.kvm.exits import InternalError


def _cmpxchg16b_failure() -> InternalError:
    insn = bytes([4, 0xF0, 0x48, 0x0F, 0xC7]) + bytes(11)  # insn_size 4, then the bytes
    return InternalError(InternalError.EMULATION, (1, int.from_bytes(insn[:8], "little"),
                                                   int.from_bytes(insn[8:], "little")))


def test_a_missing_capability_is_named_through_the_chain() -> None:
    try:
        try:
            raise MissingCapabilityError("KVM_CAP_XSAVE2", "AMX state")
        except MissingCapabilityError as e:
            raise RuntimeError("restore failed") from e
    except RuntimeError as outer:
        assert host_feature_missing(outer) == "this host's KVM lacks KVM_CAP_XSAVE2 (needed for AMX state)"


def test_an_emulation_failure_names_the_instruction() -> None:
    sentence = host_feature_missing(GuestFatalExit(0, _cmpxchg16b_failure()))
    assert sentence is not None and "f0 48 0f c7" in sentence and "vCPU 0" in sentence
    assert host_feature_missing(KvmUnavailableError("/dev/kvm", 2)) == "this host has no usable /dev/kvm"


def test_code_faults_name_no_host_feature() -> None:
    assert host_feature_missing(VcpuStateError(0, "xsave", "wrong size")) is None
    assert host_feature_missing(GuestFatalExit(0, InternalError(3, ()))) is None
    assert host_feature_missing(AssertionError("x")) is None
