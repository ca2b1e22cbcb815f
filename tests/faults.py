"""Machine faults that tests make for real in a child process."""

from __future__ import annotations

import ctypes
import os

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def obey_file_modes() -> None:
    """preexec_fn: the child obeys file modes even when run as root (the tests run as root in CI).

    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH are dropped from the bounding set before exec, so the new
    program never gets them; a non-root child needs nothing.
    """
    if os.geteuid() != 0:
        return
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    for capability in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
