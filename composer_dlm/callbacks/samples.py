"""Prints text sampled from the model at fixed prompts every N batches, so users can watch it learn."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from transformers import PreTrainedTokenizerBase

from composer_dlm.config import batch_interval
from composer_dlm.data.tokenizer import user_turn
from composer_dlm.generate import FastMode, generate
from composer_dlm.parallel import inference

log = logging.getLogger(__name__)


class SampleText(Callback):
    """Every ``interval`` batches (and at the end) decodes ``gen_length`` tokens after each prompt with LLaDA's
    sampler at temperature 0, prints them on rank 0 and appends them to ``{run_folder}/samples.txt``.

    With ``chat_template`` each prompt is first rendered by the tokenizer's chat template as one user turn
    followed by the assistant's generation prompt, the form SFT shards give the model (so an SFT model
    answers, rather than ending the text it was given at once).

    All ranks run the sampler (under FSDP each forward is collective); rank 0 reports.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: list[str],
        *,
        interval: str,
        gen_length: int,
        steps: int,
        block_length: int | None = None,
        fast: FastMode | None = None,
        mask_token_id: int,
        out_file: str | Path | None = None,
        chat_template: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompts = prompts
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("callbacks.samples.chat_template is true but the tokenizer has no chat template")
        texts = [user_turn(tokenizer, p) for p in prompts] if chat_template else prompts
        # Tokenized once here rather than at every sample.
        self.prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        self.interval = batch_interval(interval, "callbacks.samples.interval")
        self.gen_length, self.steps = gen_length, steps
        self.block_length = block_length or gen_length
        self.fast = fast
        self.mask_token_id = mask_token_id
        self.out_file = Path(out_file) if out_file else None

    def batch_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval == 0:
            self.sample(state, logger)

    def fit_end(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) % self.interval != 0:  # not sampled at this batch already
            self.sample(state, logger)

    def sample(self, state: State, logger: Logger) -> list[str]:
        device = next(state.model.parameters()).device
        texts = []
        with inference(state) as model:
            for ids in self.prompt_ids:
                prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
                out = generate(
                    model,
                    prompt_ids,
                    steps=self.steps,
                    gen_length=self.gen_length,
                    block_length=self.block_length,
                    mask_token_id=self.mask_token_id,
                    fast=self.fast,
                )
                texts.append(self.tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True))
        if dist.get_global_rank() == 0:
            step = int(state.timestamp.batch)
            lines = [
                f"[sample @ batch {step}] {p!r} -> {t!r}" for p, t in zip(self.prompts, texts, strict=True)
            ]
            for line in lines:
                print(line, flush=True)
            if self.out_file is not None:
                self.out_file.parent.mkdir(parents=True, exist_ok=True)
                with self.out_file.open("a") as f:
                    f.write("\n".join(lines) + "\n")
            logger.log_traces({f"samples/{i}": t for i, t in enumerate(texts)})
        return texts
