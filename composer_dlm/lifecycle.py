"""How a training process ends besides finishing: with its launcher, and on an interrupt as one line.

Under a launcher (Composer's ``composer -n N`` / ``python -m composer.cli.launcher``, or torchrun: the launcher sets
``LOCAL_RANK``) each rank is the launcher's child. A launcher killed with SIGKILL cannot stop its ranks, which then
trained on as orphans to the end (and a re-run found nothing left to do). :func:`die_with_launcher` asks Linux to
SIGKILL the rank when its parent exits (``prctl(PR_SET_PDEATHSIG)``), set in the rank itself so it holds whatever
killed the launcher; a parent already gone by then (the launcher died during the rank's imports) ends the rank at
once. SIGKILL, not SIGTERM: a rank blocked in a collective would never run a Python handler. What a kill mid-save
leaves, the next start repairs (checkpoints.py); the run folder's flock is released by the kernel.

Interrupts: Composer turns SIGINT and SIGTERM into ``SystemExit(128 + signal)`` (composer.core.engine); before
Composer is imported SIGINT is a ``KeyboardInterrupt``. :func:`interrupt_code` recognises both, so the entry point
can print one line and exit 130 (or 143) instead of a traceback.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
_INTERRUPTS = {128 + signal.SIGINT: "interrupted (Ctrl-C)", 128 + signal.SIGTERM: "terminated (SIGTERM)"}


def under_launcher() -> bool:
    return "LOCAL_RANK" in os.environ


def die_with_launcher() -> bool:
    """Under a launcher on Linux, makes this process die (SIGKILL) when its parent exits; True if set."""
    if not under_launcher() or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent == 1 or os.getppid() != parent:  # the launcher exited before the call could cover it
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def interrupt_code(err: BaseException) -> int | None:
    """The exit code for an interrupt (130 for SIGINT / Ctrl-C, 143 for SIGTERM); None for anything else."""
    if isinstance(err, KeyboardInterrupt):
        return 128 + signal.SIGINT
    if isinstance(err, SystemExit) and err.code in _INTERRUPTS:
        return int(err.code)
    return None


def interrupt_message(code: int) -> str:
    return _INTERRUPTS[code]
