"""File modes that a test's command really obeys, also when the tests run as root (as in CI
containers). Root passes every permission check through two capabilities, CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH; `obeying_file_modes` runs the command through a small Python launcher that drops
both from its bounding set and then execs the command, so that the command keeps uid 0 (it still reads
the venv and writes what root owns with write permission) but a file of mode 000 is `Permission
denied` to it, as to any user. Another user needs nothing dropped: its modes already apply. (A fresh
launcher process, not a `preexec_fn`: forking the test process, which runs threads, is not safe.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

DROP_THEN_EXEC = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
    if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP (linux/prctl.h)
        sys.exit(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
os.execv(sys.argv[1], sys.argv[1:])
"""


def obeying_file_modes(argv: list[str]) -> list[str]:
    """`argv` (an absolute program path first) as a command for which file modes apply; skips the test,
    saying why, where root may not drop the capabilities."""
    if os.geteuid() != 0:
        return argv
    launcher = [sys.executable, "-c", DROP_THEN_EXEC]
    probe = subprocess.run([*launcher, sys.executable, "-c", "pass"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"running as root, which ignores file modes, and {probe.stderr.strip()}")
    return [*launcher, *argv]
