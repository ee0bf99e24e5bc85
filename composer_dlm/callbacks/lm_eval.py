"""lm-evaluation-harness tasks on the model being trained, every N batches, logged as ``lm_eval/{task}/{metric}``.

The model in memory is scored through :class:`composer_dlm.eval.DiffusionLM` (the model class of ``python -m
composer_dlm.eval``, with the same Monte-Carlo likelihood and sampler settings), so a metric logged here is what
the CLI reports for an export of the same weights. Needs the ``eval`` extra (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from transformers import PreTrainedTokenizerBase

from composer_dlm.config import LMEvalConfig, batch_interval
from composer_dlm.eval import DiffusionLM
from composer_dlm.parallel import inference

log = logging.getLogger(__name__)


class LMEval(Callback):
    """Every ``cfg.interval`` batches (and at the end of training) runs ``cfg.tasks`` with lm-eval.

    Every rank evaluates every request (under FSDP each forward is collective, so all ranks must run the same
    forwards); rank 0 logs the metrics. lm-eval's global seeding is switched off so that the evaluation leaves
    the training's random state alone; the Monte-Carlo masks come from ``cfg.seed`` and each request's text.
    """

    def __init__(self, cfg: LMEvalConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.interval = batch_interval(cfg.interval, "callbacks.lm_eval.interval")
        self._task_manager: TaskManager | None = None

    @property
    def task_manager(self) -> TaskManager:
        """Built at the first evaluation: indexing lm-eval's own tasks takes a while."""
        if self._task_manager is None:
            self._task_manager = TaskManager(
                include_path=self.cfg.include_path, include_defaults=self.cfg.include_defaults
            )
        return self._task_manager

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval == 0:
            self.evaluate(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval != 0:  # not evaluated at this batch already
            self.evaluate(state, logger)

    def evaluate(self, state: State, logger: Logger) -> dict[str, float]:
        """Runs the tasks; returns (on every rank) and logs (from rank 0) the metrics."""
        c = self.cfg
        with inference(state) as model:
            lm = DiffusionLM(
                model=model,
                tokenizer=self.tokenizer,
                mc_num=c.mc_num,
                batch_size=c.batch_size,
                cfg_scale=c.cfg_scale,
                gen_length=c.gen_length,
                steps=c.steps,
                block_length=c.block_length,
                seed=c.seed,
                distributed=False,
            )
            results = simple_evaluate(
                model=lm,
                tasks=list(c.tasks),
                task_manager=self.task_manager,
                limit=c.limit,
                num_fewshot=c.num_fewshot,
                random_seed=None,
                numpy_random_seed=None,
                torch_random_seed=None,
                verbosity="WARNING",
            )
        assert results is not None  # one process's view: this rank holds the results
        metrics = flatten_metrics(results["results"])
        if dist.get_global_rank() == 0:
            logger.log_metrics(metrics)
            log.info("lm_eval at batch %d: %s", int(state.timestamp.batch), metrics)
        return metrics


def flatten_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """lm-eval's ``{task: {"acc,none": 0.5, "acc_stderr,none": ..., "alias": ...}}`` as ``{"lm_eval/task/acc":
    0.5}``: numeric metrics only, without standard errors; a filter other than ``none`` is appended (``_flex``).

    >>> flatten_metrics({"arc": {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": "arc", "sample_len": 4}})
    {'lm_eval/arc/acc': 0.5}
    """
    out: dict[str, float] = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            if not filter_name or "_stderr" in metric or isinstance(value, bool):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                name = metric if filter_name == "none" else f"{metric}_{filter_name}"
                out[f"lm_eval/{task}/{name}"] = float(value)
    return out
