"""Without /dev/kvm: the pure tests run and pass, every KVM test fails with one message naming it.

Honest, not pretended: pytest runs in a mount namespace of its own whose /dev is a fresh tmpfs
holding null, zero, random, urandom and shm but no kvm, so the code under test really cannot open
it (root is needed for the namespace; CI and this project's hosts run the suite as root)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent
WITHOUT_KVM = """set -e
mount -t tmpfs tmpfs /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9
ln -s /proc/self/fd /dev/fd; mkdir /dev/shm; mount -t tmpfs tmpfs /dev/shm
test ! -e /dev/kvm
exec "$@"
"""


def test_without_dev_kvm_the_pure_tests_pass_and_the_kvm_tests_fail_saying_so() -> None:
    pure, kvm = "tests/formats/test_fmt_digest.py", "tests/hv/test_kvm_fd.py"
    run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", WITHOUT_KVM, "sh",
                          sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", pure, kvm],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "1000"})  # summary lines whole
    out = run.stdout
    assert run.returncode == 1, out + run.stderr  # failures, not an error of the run itself
    failed = [line for line in out.splitlines() if line.startswith("FAILED ")]
    assert failed and all(line.startswith(f"FAILED {kvm}::") for line in failed), out
    assert all("/dev/kvm is missing" in line for line in failed), failed  # one message, naming it
    assert f"{len(failed)} failed, " in out.splitlines()[-1] and " passed" in out.splitlines()[-1], out
    assert "xfail" not in out and "skipped" not in out
