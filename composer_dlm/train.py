"""Train a LLaDA model: ``composer composer_dlm/train.py yamls/<run>.yaml [dotted.key=value ...]``.

Also runs on one process as ``python -m composer_dlm.train ...``. Reads the YAML (see config.py), builds the
tokenizer, model, loaders, optimizer, schedule and callbacks (builders.py), and calls Composer's ``Trainer.fit``.
Any key below can be set in the YAML or overridden on the command line (``optimizer.lr=1e-4``).
"""

from __future__ import annotations

import os
import sys

from composer_dlm.builders import build_trainer, training_complete
from composer_dlm.callbacks.nan_guard import NonFiniteLossError
from composer_dlm.checkpoints import ResumeMismatchError
from composer_dlm.cli import report, report_interrupt, report_once
from composer_dlm.config import ConfigError, describe, load_config
from composer_dlm.data import DataError
from composer_dlm.lifecycle import die_with_launcher, interrupt_code, interrupt_message
from composer_dlm.models import CheckpointError
from composer_dlm.run_lock import RunLockedError

USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    NonFiniteLossError,
    RunLockedError,
    ResumeMismatchError,
)
USAGE = "usage: composer composer_dlm/train.py RUN.yaml [dotted.key=value ...]  (--help lists every key)"


def main(argv: list[str] | None = None) -> int:
    die_with_launcher()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{__doc__.strip()}\n\n{USAGE}\n\nConfig keys (type = default):\n\n{describe()}")
        return 0
    if not argv or argv[0].startswith("-"):
        what = f"unknown option {argv[0]}" if argv else "no config file given"
        return report(f"{what}; {USAGE}")
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
        return report_once(str(err))
    except (KeyboardInterrupt, SystemExit) as err:
        code = interrupt_code(err)
        if code is None:
            raise
        return report_interrupt(
            f"{interrupt_message(code)}; run the same command again to resume from the last checkpoint", code
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
