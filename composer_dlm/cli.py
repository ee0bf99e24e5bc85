"""What every composer-dlm command line shares: user mistakes end as one line on stderr, exit code 2.

    composer-dlm: error: <what is wrong and how to fix it>

Imports nothing heavy, so a script can answer --help (or a bad flag) without loading torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


def report(message: str) -> int:
    """Print `composer-dlm: error: MESSAGE` (one line) on stderr; returns 2, for a `main` that returns codes."""
    print(f"composer-dlm: error: {' '.join(str(message).split())}", file=sys.stderr)
    return EXIT_USER_ERROR


def fail(message: str) -> NoReturn:
    """Print `composer-dlm: error: MESSAGE` (one line) on stderr and exit with code 2."""
    sys.exit(report(message))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one `composer-dlm: error:` line instead of usage + error."""

    def error(self, message: str) -> NoReturn:
        fail(f"{self.prog}: {message} (see {self.prog} --help)")
