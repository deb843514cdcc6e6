"""File modes that a test's subprocess really obeys, also when the tests run as root (as in CI
containers). Root passes every permission check through two capabilities, CAP_DAC_OVERRIDE and
CAP_DAC_READ_SEARCH; `obey_file_modes` drops both from the bounding set of the child before it runs
its program, so that the program keeps uid 0 (it may still read the venv and write what root owns
with write permission) but a file of mode 000 is `Permission denied` to it, as to any user. Another
user needs nothing dropped: its modes already apply."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import pytest

PR_CAPBSET_DROP = 24  # <linux/prctl.h>
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # <linux/capability.h>


def drop_file_capabilities() -> None:
    """In the child, before exec: the program it runs gets neither capability."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


def obey_file_modes() -> Callable[[], None] | None:
    """The `preexec_fn` for `subprocess` that makes file modes apply to the child (None: they already do);
    skips the test, saying why, where root may not drop capabilities."""
    if os.geteuid() != 0:
        return None
    pid = os.fork()
    if pid == 0:  # try it in a throwaway child: dropping is for good
        try:
            drop_file_capabilities()
        except OSError:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        pytest.skip("running as root without CAP_SETPCAP: root ignores file modes, so no file can be unreadable")
    return drop_file_capabilities
