"""Commands run as a user runs them, several at once: most of a short command's time is its
interpreter starting, so independent ones are started together."""

from __future__ import annotations

import subprocess


def run_together(*argvs: list[str], timeout: float = 60) -> list[subprocess.CompletedProcess]:
    """Each command line run to its end (output captured as text, no stdin), all started at once."""
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              text=True) for argv in argvs]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]
    finally:
        for p in procs:
            p.kill()
            p.wait()
