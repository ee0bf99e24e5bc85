"""Write a grid of run configs: python scripts/make_yamls.py grid.yaml [--out yamls/generated].

The same command as the installed `composer-dlm-make-yamls`. See composer_dlm/grid.py for the description's
format (the original trainer's prep.py, as YAML).
"""

from __future__ import annotations

import sys

from composer_dlm.commands import make_yamls

if __name__ == "__main__":
    sys.exit(make_yamls(sys.argv[1:], prog="make_yamls.py"))
