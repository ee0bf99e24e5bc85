"""What every composer-dlm command line shares: user mistakes end as one line on stderr, exit code 2.

    composer-dlm: error: <what is wrong and how to fix it>

Imports nothing heavy, so a script can answer --help (or a bad flag) without loading torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import NoReturn

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

# Under a launcher, how long a rank other than 0 waits before reporting a user error (see report_once).
OTHER_RANKS_WAIT_S = 20.0


def report(message: str) -> int:
    """Print `composer-dlm: error: MESSAGE` (one line) on stderr; returns 2, for a `main` that returns codes."""
    print(f"composer-dlm: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USER_ERROR


def report_interrupt(what: str, code: int = EXIT_INTERRUPTED) -> int:
    """Print `composer-dlm: WHAT` (one line, no traceback) on stderr; returns `code` (130: Ctrl-C)."""
    print(f"composer-dlm: {what}", file=sys.stderr, flush=True)
    return code


def report_once(message: str) -> int:
    """:func:`report` for a command that may run as one of several processes (Composer's launcher, torchrun).

    A mistake in the config is seen by every rank; printed by each, it would appear once per process, and the
    launcher would exit with the code of a rank it killed (241 = SIGTERM) rather than 2. Rank 0 reports at once;
    the others wait :data:`OTHER_RANKS_WAIT_S` first, so that when rank 0 hit the same error the launcher sees
    its exit code 2 and stops them before they print. An error only another rank hits is still reported, late.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        time.sleep(OTHER_RANKS_WAIT_S)
    return report(message)


def fail(message: str) -> NoReturn:
    """Print `composer-dlm: error: MESSAGE` (one line) on stderr and exit with code 2."""
    sys.exit(report(message))


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Inside, each Python warning (e.g. torch's on unpickling a checkpoint) is one `composer-dlm: warning:` line on
    stderr instead of a file:line report with the source line."""
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *_, **__: print(
            f"composer-dlm: warning: {message}", file=sys.stderr
        )
        yield


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `composer-dlm: error:` line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see {self.prog} --help)")
