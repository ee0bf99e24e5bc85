"""Benchmarks: `python scripts/benchmark.py {kernel,loader,train,sampler,likelihood,startup,table,fp8,moe} [options]`.

The same command as the installed `composer-dlm-benchmark`. Every benchmark is a module of
composer_dlm/benchmarks/ (composer_dlm.commands.BENCHMARKS); this script only dispatches.
"""

from __future__ import annotations

import sys

from composer_dlm.commands import benchmark

if __name__ == "__main__":
    sys.exit(benchmark(sys.argv[1:], prog="scripts/benchmark.py"))
