"""Multiple-choice accuracy by Monte-Carlo likelihood, logged as ``eval/mc_accuracy`` during training.

The data is a JSONL file, one question per line::

    {"prompt": "The capital of France is", "choices": [" Paris", " Rome", " Oslo"], "answer": 0}

Each choice is scored with :func:`composer_dlm.likelihood.score_choices` (LLaDA's estimate of log p(choice |
prompt), summed over the choice's tokens, not normalised by length) and the question counts as right when the
``answer``-th choice scores highest. Prompt and choices are tokenized separately without special tokens, so a
choice that continues the prompt after a space should start with that space.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from transformers import PreTrainedTokenizerBase

from composer_dlm.config import batch_interval
from composer_dlm.data import DataError, mask_token_id
from composer_dlm.data.sources import iter_jsonl_objects
from composer_dlm.likelihood import score_choices
from composer_dlm.parallel import inference

log = logging.getLogger(__name__)

METRIC = "eval/mc_accuracy"


@dataclasses.dataclass(frozen=True)
class MCQuestion:
    """One multiple-choice question, tokenized."""

    prompt_ids: list[int]
    choice_ids: list[list[int]]
    answer: int


def read_mc_jsonl(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, max_examples: int | None = None
) -> list[MCQuestion]:
    """Reads and tokenizes the first ``max_examples`` questions (all when None) of a JSONL file.

    Raises :class:`DataError` naming the file and line for a missing file, a line that is not a JSON object, a
    missing or mistyped field, an ``answer`` out of range, or a choice that tokenizes to nothing.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"likelihood eval data {path}: no such file (a JSONL of {{prompt, choices, answer}})")
    questions: list[MCQuestion] = []
    for where, row in iter_jsonl_objects(path):
        if max_examples is not None and len(questions) >= max_examples:
            break
        questions.append(_question(row, tokenizer, where))
    if not questions:
        raise DataError(f"likelihood eval data {path}: no questions in the file")
    return questions


def _question(row: dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str) -> MCQuestion:
    # iter_jsonl_objects has already rejected lines that are not JSON objects.
    missing = [key for key in ("prompt", "choices", "answer") if key not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    prompt, choices, answer = row["prompt"], row["choices"], row["answer"]
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: 'choices' must be a list of at least two strings")
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise DataError(
            f"{where}: 'answer' must be an index into choices (0..{len(choices) - 1}), got {answer!r}"
        )
    choice_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    empty = [i for i, ids in enumerate(choice_ids) if not ids]
    if empty:
        raise DataError(f"{where}: choice {empty[0]} ({choices[empty[0]]!r}) tokenizes to no tokens")
    return MCQuestion(tokenizer(prompt, add_special_tokens=False)["input_ids"], choice_ids, answer)


class LikelihoodEval(Callback):
    """Every ``interval`` batches and at the end of training, scores a multiple-choice JSONL (see the module
    docstring) and logs its accuracy as ``eval/mc_accuracy``.

    Args:
        data: path of the JSONL file; read and tokenized here, so a bad file fails before training starts.
        tokenizer: the model's tokenizer (its mask token is the one masked in).
        interval: in batches, e.g. ``'500ba'``.
        num_samples: Monte-Carlo rows per choice (LLaDA uses 128; 1 is exact for single-token choices).
        max_examples: score only the first this many questions (None: all).
        batch_size: Monte-Carlo rows per forward.
        seed: question ``i`` is scored with generator seed ``seed + i`` for every choice and at every
            evaluation, so numbers are comparable across checkpoints and runs.

    The model is put in eval mode under ``no_grad`` and the run's precision context, and its previous mode is
    restored afterwards. Under FSDP every rank runs every forward (each one is collective); rank 0 logs.
    """

    def __init__(
        self,
        data: str,
        *,
        tokenizer: PreTrainedTokenizerBase,
        interval: str,
        num_samples: int,
        max_examples: int | None,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        self.interval = batch_interval(interval, "callbacks.likelihood_eval.interval")
        if num_samples <= 0 or batch_size <= 0:
            raise ValueError(f"num_samples ({num_samples}) and batch_size ({batch_size}) must be positive")
        if max_examples is not None and max_examples <= 0:
            raise ValueError(f"max_examples must be positive or None, got {max_examples}")
        self.questions = read_mc_jsonl(data, tokenizer, max_examples)
        self.mask_token_id = mask_token_id(tokenizer)
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.last_batch: int | None = None

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval == 0:
            self.evaluate(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self.last_batch != int(state.timestamp.batch):
            self.evaluate(state, logger)

    def evaluate(self, state: State, logger: Logger) -> float:
        """Scores every question, logs and returns the accuracy."""
        correct = 0
        with inference(state) as model:
            for index, q in enumerate(self.questions):
                scores = score_choices(
                    model,
                    q.prompt_ids,
                    q.choice_ids,
                    mask_token_id=self.mask_token_id,
                    num_samples=self.num_samples,
                    batch_size=min(self.batch_size, self.num_samples),
                    seed=self.seed + index,
                )
                correct += int(max(range(len(scores)), key=scores.__getitem__) == q.answer)
        accuracy = correct / len(self.questions)
        self.last_batch = int(state.timestamp.batch)
        if dist.get_global_rank() == 0:
            logger.log_metrics({METRIC: accuracy})
            log.info(
                "%s = %.4f (%d questions) at batch %d", METRIC, accuracy, len(self.questions), self.last_batch
            )
        return accuracy
