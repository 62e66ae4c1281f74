import os
import signal
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
    # A suite started in the background by a shell without job control (`nohup make test &`, some
    # CI runners) inherits SIGINT ignored, and so would every process it starts: the tests that
    # press Ctrl-C on `migrate recv`/`send` would find it ignored. Python's own handler here makes
    # the processes they start begin with the default again (exec resets a handled signal).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # The built-in guest's image is built at install and test time, never by hv at run time; a
    # direct `pytest` after editing tools/guests gets a fresh one (make decides whether it is stale).
    subprocess.run(builtin_guest.BUILD_COMMAND, check=True)


KVM_DEVICE = "/dev/kvm"
KVM_MISSING = (f"{KVM_DEVICE} is missing or not readable and writable here: this test runs a real VM on KVM "
               "and cannot run without it (load kvm_intel or kvm_amd, or enable nested virtualisation; "
               "tests marked pure, such as tests/formats, run without it)")
PURE_DIRS = (Path(__file__).parent / "formats",)


def kvm_missing() -> bool:
    return not os.access(KVM_DEVICE, os.R_OK | os.W_OK)


def is_pure(item: pytest.Item) -> bool:
    """Needs no KVM: under a pure directory (`formats` is bytes in, objects out) or marked pure."""
    path = Path(str(item.path))
    return item.get_closest_marker("pure") is not None or any(d in path.parents for d in PURE_DIRS)


def pytest_report_header(config) -> str | None:
    return f"WARNING: {KVM_DEVICE} is missing: every test but the pure ones fails" if kvm_missing() else None


def _fail_without_kvm() -> None:
    pytest.fail(KVM_MISSING, pytrace=False)


def pytest_collection_modifyitems(config, items):
    # /dev/kvm exists on every machine this project runs on, CI included: without it a KVM test
    # fails, with this one message, before any of its fixtures opens anything (no skip, no xfail,
    # no error from deep inside a fixture); the pure tests run as ever.
    if kvm_missing():
        for item in items:
            if not is_pure(item):
                item.setup = lambda: None  # its fixtures would open /dev/kvm
                item.runtest = _fail_without_kvm


def pytest_collection_finish(session):
    # The Debian kernel's two boots (a minute of emulated ring 0 each) start now, in the
    # background below the tests' priority, and the tests that read them run last
    # (tests/hv/debian_boots.py says why). Here, after -k/-m deselected what they do.
    readers = [item for item in session.items if "debian_boots" in getattr(item, "fixturenames", ())]
    if not readers or kvm_missing():
        return
    session.items[:] = [item for item in session.items if item not in readers] + readers
    from debian_boots import BACKGROUND_BOOTS, BackgroundBoots

    session.config.stash[BACKGROUND_BOOTS] = BackgroundBoots()


def pytest_sessionfinish(session):
    from debian_boots import BACKGROUND_BOOTS

    boots = session.config.stash.get(BACKGROUND_BOOTS, None)
    if boots is not None:
        boots.close()


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
