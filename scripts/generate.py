"""Sample from a LLaDA checkpoint (Hugging Face folder or Composer .pt); see --help.

    python scripts/generate.py runs/quickstart/hf/final --prompt "The list type" --gen-length 32 --show

The work is done by composer_dlm.generate_cli.
"""

from __future__ import annotations

import sys

from composer_dlm.generate_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
