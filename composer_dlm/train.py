"""Train a LLaDA model: ``composer composer_dlm/train.py yamls/<run>.yaml [dotted.key=value ...]``.

Also runs on one process as ``python -m composer_dlm.train ...``. Reads the YAML (see config.py), builds the
tokenizer, model, loaders, optimizer, schedule and callbacks (builders.py), and calls Composer's ``Trainer.fit``.
"""

from __future__ import annotations

import os
import sys

from composer_dlm.builders import build_trainer, training_complete
from composer_dlm.callbacks.nan_guard import NonFiniteLossError
from composer_dlm.config import ConfigError, load_config
from composer_dlm.data import DataError
from composer_dlm.models import CheckpointError

USER_ERRORS = (ConfigError, DataError, CheckpointError, NonFiniteLossError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        cfg = load_config(argv[0], argv[1:])
        trainer = build_trainer(cfg)
        if training_complete(trainer):  # Composer's fit would raise on a run that has nothing left to do
            print(
                f"composer-dlm: {cfg.run_folder} has already trained to max_duration={cfg.max_duration} (resumed "
                "from its latest checkpoint); nothing to do. Raise max_duration to train further, or set another "
                "run_name for a new run.",
                flush=True,
            )
        else:
            trainer.fit()
        trainer.close()
    except USER_ERRORS as err:
        print(f"composer-dlm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
