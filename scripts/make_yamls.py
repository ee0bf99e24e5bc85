"""Write a grid of run configs: python scripts/make_yamls.py grid.yaml [--out yamls/generated].

See composer_dlm/grid.py for the description's format (the original trainer's prep.py, as YAML).
"""

from __future__ import annotations

import argparse
import sys

from composer_dlm.config import ConfigError
from composer_dlm.grid import make_grid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("description", help="YAML with base, models, datasets, modes")
    parser.add_argument("--out", default=None, help="output folder (default: the description's 'out')")
    args = parser.parse_args()
    try:
        for path in make_grid(args.description, out=args.out):
            print(path)
    except ConfigError as err:
        print(f"make_yamls: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
