"""Benchmarks: `python scripts/benchmark.py {kernel,loader,train,sampler} [options]`.

Each subcommand lives next to the code it measures; this script only dispatches.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "kernel": "kernels.benchmark",
    "loader": "composer_dlm.data.benchmark",
    "train": "composer_dlm.benchmarks.train",
    "sampler": "composer_dlm.benchmarks.sampler",
}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in SUBCOMMANDS:
        names = ", ".join(SUBCOMMANDS)
        usage = (
            f"usage: python scripts/benchmark.py {{{names}}} [options]  (--help after a name for its options)"
        )
        if argv[:1] in (["-h"], ["--help"]):
            print(usage)
            return
        sys.exit(usage)
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    module.main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
