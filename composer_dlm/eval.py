"""Standard benchmarks through lm-evaluation-harness: the model class ``composer_dlm`` and its CLI.

    python -m composer_dlm.eval --model composer_dlm --tasks arc_easy \\
        --model_args pretrained=runs/quickstart/hf/final,mc_num=128,batch_size=32
    composer -n 8 -m composer_dlm.eval --model composer_dlm --tasks ... --model_args ...   # data-parallel

Every other argument is lm-eval's own (``--include_path`` for local task YAMLs, ``--apply_chat_template``,
``--limit``, ``--output_path``, ...); ``pip install -e ".[eval]"`` installs the pinned lm-eval.

``--model_args`` (comma-separated ``key=value``):

- ``pretrained``: a Hugging Face folder, a Composer checkpoint ``.pt`` of our trainer (its shape from
  ``config=PATH/config.json`` or the run's own export), or a hub id already in the local Hugging Face cache.
- ``tokenizer``: a tokenizer folder or ``embedded``; default: the ``pretrained`` folder (our exports hold one).
- ``mc_num`` (128), ``batch_size`` (32): Monte-Carlo rows per scored continuation, stratified in batches of
  ``batch_size`` rows, as LLaDA evaluates (lm-eval's own ``--batch_size`` is not used: rows of many requests
  are packed into forwards of up to ``batch_tokens`` (32768) tokens instead). A one-token continuation is
  scored with one row, which is exact.
- ``cfg_scale`` (0): unsupervised classifier-free guidance, for scoring and generation.
- ``gen_length`` (lm-eval's ``max_gen_toks``, else 256), ``steps`` (= gen_length), ``block_length``
  (= gen_length), ``remasking`` (low_confidence): the sampler (:func:`composer_dlm.generate.generate`, greedy).
- ``cache`` (none; ``prefix`` or ``dual``), ``threshold``, ``factor``: ``generate_until``'s fast mode
  (:class:`composer_dlm.generate.FastMode`); none of them: exact mode.
- ``greedy_check`` (False): also report whether the continuation is what greedy decoding of ``len(continuation)``
  tokens (one committed per step) produces, LLaDA's ``is_greedy``; otherwise ``is_greedy`` is False.
- ``seed`` (1234), ``dtype`` (bf16 on CUDA, fp32 on CPU), ``device`` (cuda:LOCAL_RANK when CUDA is there).

Request semantics:

- ``loglikelihood``: :func:`composer_dlm.likelihood.mc_log_likelihoods`. The masks of a request are drawn from
  a generator seeded by ``seed`` and the context's text, so a score depends neither on the order of requests nor
  on the number of processes, and all choices of a question see the same masks (common random numbers).
- ``loglikelihood_rolling``: the text is cut into windows of the model's ``max_sequence_length`` (lm-eval's
  rolling windows: each token scored once, with as much context as fits); the result is the sum of each window's
  estimate -- the masked-diffusion ELBO, a lower bound on the log-likelihood.
- ``generate_until``: the sampler on the (left-truncated) context, the answer cut at the first EOS and at the
  first stop string. Contexts of equal length are decoded together, ``gen_batch_size`` (8) at a time.

Under ``composer -n N`` or ``torchrun`` each process takes its share of the requests (lm-eval splits them) and
rank 0 gathers the metrics and prints the table.
"""

from __future__ import annotations

import os
import sys
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn
from transformers import PreTrainedTokenizerBase

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ModuleNotFoundError as err:  # the optional extra
    raise ModuleNotFoundError(f"composer_dlm.eval needs lm-eval ({err}): pip install -e '.[eval]'") from err

from composer_dlm.cli import report_once, warnings_as_lines
from composer_dlm.data.embedded import resolve_tokenizer
from composer_dlm.generate import CacheMode, FastMode, Remasking, generate
from composer_dlm.generate_cli import find_run_config, load_model
from composer_dlm.likelihood import mc_log_likelihoods
from composer_dlm.models.hf_format import resolve_folder
from composer_dlm.models.llada import LLaDAConfig


class EvalArgumentError(ValueError):
    """A bad ``--model_args`` value."""


def _flag(value: bool | str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise EvalArgumentError(f"expected true or false, got {value!r}")


@register_model("composer_dlm")
class DiffusionLM(TemplateLM):
    """lm-eval's view of a LLaDA-style masked diffusion model (see the module docstring for the arguments).

    Give ``pretrained`` (a path or hub id) from the command line, or ``model`` (a module in eval mode mapping
    input ids to logits, e.g. the trainer's model) and ``tokenizer`` from code, as the training callback does.
    ``distributed=False`` keeps one process's view even inside a multi-process run (each process then evaluates
    every request); by default the requests are split when ``torch.distributed`` has more than one process.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: nn.Module | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        config: str | None = None,
        mc_num: int = 128,
        batch_size: int = 32,
        batch_tokens: int = 32768,
        cfg_scale: float = 0.0,
        gen_length: int | None = None,
        steps: int | None = None,
        block_length: int | None = None,
        remasking: Remasking = "low_confidence",
        cache: str | None = None,
        threshold: float | None = None,
        factor: float | None = None,
        gen_batch_size: int = 8,
        greedy_check: bool | str = False,
        seed: int = 1234,
        dtype: str | None = None,
        device: str | None = None,
        max_length: int | None = None,
        distributed: bool | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            raise EvalArgumentError(f"unknown model_args {', '.join(sorted(unused))} for model composer_dlm")
        positive = {
            "mc_num": mc_num,
            "batch_size": batch_size,
            "batch_tokens": batch_tokens,
            "gen_batch_size": gen_batch_size,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise EvalArgumentError(f"{name} must be a positive integer, got {value!r}")
        if remasking not in ("low_confidence", "random"):
            raise EvalArgumentError(f"remasking must be low_confidence or random, got {remasking!r}")
        try:
            fast = None
            if cache not in (None, "", "none") or threshold is not None or factor is not None:
                fast = FastMode(
                    cache=None if cache in (None, "", "none") else cast(CacheMode, cache),
                    threshold=None if threshold is None else float(threshold),
                    factor=None if factor is None else float(factor),
                )
        except ValueError as err:
            raise EvalArgumentError(str(err)) from None
        self.fast = fast
        self._setup_distributed(distributed)
        self._device = torch.device(device) if device else _default_device()
        if model is None:
            if pretrained is None:
                raise EvalArgumentError("model_args needs pretrained=<HF folder | Composer .pt | hub id>")
            model, tokenizer = _load(pretrained, config, tokenizer, dtype, self._device)
        elif tokenizer is None or isinstance(tokenizer, str):
            raise EvalArgumentError("a model given in code needs its tokenizer object")
        else:
            self._device = next(model.parameters()).device
        assert not isinstance(tokenizer, str) and tokenizer is not None
        self.model, self.tokenizer = model, tokenizer
        # A LLaDAModel, or its FSDP wrapper (which forwards attribute lookups); None for other modules.
        llada_config: LLaDAConfig | None = getattr(model, "config", None)
        mask_id = tokenizer.mask_token_id
        if not isinstance(mask_id, int):
            raise EvalArgumentError(f"tokenizer {tokenizer.name_or_path} has no mask token")
        self.mask_token_id = mask_id
        config_mask = None if llada_config is None else llada_config.mask_token_id
        if config_mask is not None and config_mask != self.mask_token_id:
            raise EvalArgumentError(
                f"the tokenizer's mask id is {self.mask_token_id} but the model's config says "
                f"{config_mask}; pass the model's own tokenizer with tokenizer=FOLDER"
            )
        self._max_length = int(max_length or (llada_config.max_sequence_length if llada_config else 4096))
        self.mc_num, self.mc_batch, self.batch_tokens = mc_num, batch_size, batch_tokens
        self.cfg_scale, self.seed = float(cfg_scale), int(seed)
        self.gen_length, self.steps, self.block_length = gen_length, steps, block_length
        self.remasking: Remasking = remasking
        self.gen_batch_size = int(gen_batch_size)
        self.greedy_check = _flag(greedy_check)

    # --- lm-eval plumbing ---------------------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> DiffusionLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> DiffusionLM:
        """Only ``--model_args`` configure the model. lm-eval's ``--batch_size`` (requests per batch for causal
        models, 1 by default) is not ours (``batch_size`` counts Monte-Carlo rows), and its ``--device`` defaults
        to cuda:0 for every process; ``device`` in ``--model_args`` (default: cuda:LOCAL_RANK) replaces it."""
        return cls(**arg_dict)

    def _setup_distributed(self, distributed: bool | None) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if distributed is False or (distributed is None and world == 1 and not dist.is_initialized()):
            return
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend)
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not self.tokenizer.chat_template:
            raise EvalArgumentError(
                f"--apply_chat_template: tokenizer {self.tokenizer_name} has no chat template"
            )
        text = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert isinstance(text, str)
        return text

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``, without special tokens unless asked (a chat template writes its own)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def _generator(self, key: str) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(key.encode()))

    # --- requests ------------------------------------------------------------------------------------------------
    def _scores(self, pairs: Sequence[tuple[list[int], list[int]]], keys: Sequence[str]) -> list[float]:
        """The Monte-Carlo estimate of each (context ids, continuation ids); ``keys[i]`` seeds request ``i``."""
        out = [0.0] * len(pairs)
        # One-token continuations need one row: every row masks that token alone, so every row is the same.
        groups: dict[int, list[int]] = defaultdict(list)
        for i, (_, cont) in enumerate(pairs):
            groups[1 if len(cont) == 1 else self.mc_num].append(i)
        for rows, members in groups.items():
            scores = mc_log_likelihoods(
                self.model,
                [self._fit(*pairs[i]) for i in members],
                mask_token_id=self.mask_token_id,
                num_samples=rows,
                batch_size=min(self.mc_batch, rows),
                cfg_scale=self.cfg_scale,
                generators=[self._generator(keys[i]) for i in members],
                batch_tokens=self.batch_tokens,
            )
            for i, score in zip(members, scores, strict=True):
                out[i] = score
        return out

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """Drops the oldest context tokens so that context + continuation fit the model's length."""
        if len(continuation) > self.max_length:
            raise EvalArgumentError(
                f"a continuation of {len(continuation)} tokens is longer than the model's {self.max_length}"
            )
        keep = self.max_length - len(continuation)
        return context[-keep:] if keep else [], continuation

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], **kwargs: Any
    ) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        scores = self._scores(pairs, [text[0] for text, _, _ in requests])
        results = []
        for (text, ctx, cont), score in zip(requests, scores, strict=True):
            greedy = self.greedy_check and self._is_greedy(ctx, cont)
            results.append((score, greedy))
            self.cache_hook.add_partial("loglikelihood", text, (score, greedy))
        return results

    def _is_greedy(self, context: list[int], continuation: list[int]) -> bool:
        """Whether greedy decoding of ``len(continuation)`` tokens, one committed per step, gives it."""
        context, continuation = self._fit(context, continuation)
        n = len(continuation)
        out = generate(
            self.model,
            torch.tensor(context, dtype=torch.long, device=self._device),
            steps=n,
            gen_length=n,
            block_length=n,
            mask_token_id=self.mask_token_id,
            cfg_scale=self.cfg_scale,
        )
        return out[len(context) :].tolist() == continuation

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[list[int], list[int]]] = []
        keys, owners = [], []
        for r, request in enumerate(requests):
            (text,) = request.args
            rolling = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for w, window in enumerate(map(make_disjoint_window, rolling)):
                windows.append((list(window[0]), list(window[1])))
                keys.append(f"{w}\0{text}")
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, score in zip(owners, self._scores(windows, keys), strict=True):
            totals[r] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy samples; contexts of equal token length decoded together, ``gen_batch_size`` at a time."""
        eos_text = self.tokenizer.decode([self.eot_token_id])
        jobs = []
        for i, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_length = int(self.gen_length or gen_kwargs.get("max_gen_toks", 256))
            steps, block = self.steps or gen_length, self.block_length or gen_length
            ids = self.tok_encode(context)[-max(self.max_length - gen_length, 1) :]
            stops = handle_stop_sequences(gen_kwargs.get("until"), eos=eos_text)
            jobs.append((i, ids, (gen_length, steps, block), stops))
        batches: dict[tuple[int, tuple[int, int, int]], list[Any]] = defaultdict(list)
        for job in jobs:
            batches[(len(job[1]), job[2])].append(job)
        out = [""] * len(requests)
        for (_, (gen_length, steps, block)), members in batches.items():
            for s in range(0, len(members), self.gen_batch_size):
                part = members[s : s + self.gen_batch_size]
                prompt = torch.tensor([ids for _, ids, _, _ in part], dtype=torch.long, device=self._device)
                tokens = generate(
                    self.model,
                    prompt,
                    steps=steps,
                    gen_length=gen_length,
                    block_length=block,
                    mask_token_id=self.mask_token_id,
                    cfg_scale=self.cfg_scale,
                    remasking=self.remasking,
                    fast=self.fast,
                    generator=torch.Generator(self._device).manual_seed(self.seed),
                )[:, prompt.shape[1] :].tolist()
                for (i, _, _, stops), answer in zip(part, tokens, strict=True):
                    out[i] = self._answer_text(answer, stops)
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _answer_text(self, tokens: list[int], stops: list[str]) -> str:
        """Generated tokens as text, cut at the first EOS token and then at the first stop string."""
        if self.eot_token_id in tokens:
            tokens = tokens[: tokens.index(self.eot_token_id)]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        for stop in stops:
            if stop:
                text = text.split(stop, 1)[0]
        return text


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _load(
    pretrained: str,
    config: str | None,
    tokenizer: str | PreTrainedTokenizerBase | None,
    dtype: str | None,
    device: torch.device,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The model (eval mode) and tokenizer that ``pretrained`` and ``tokenizer`` name."""
    dtypes = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    name = dtype or ("bf16" if device.type == "cuda" else "fp32")
    if name not in dtypes:
        raise EvalArgumentError(f"dtype must be bf16 or fp32, got {dtype!r}")
    path = resolve_folder(pretrained, "pretrained")
    with warnings_as_lines():  # the unpickling warning of a .pt
        model = load_model(path, config=config, dtype=dtypes[name], device=device)
    if tokenizer is None:
        # A .pt's tokenizer is the one beside the config.json that gave its shape (the run's HF export).
        shape = Path(config) if config else find_run_config(path)
        folder = path if path.is_dir() else (shape.parent if shape is not None else path.parent)
        if not (folder / "tokenizer_config.json").is_file():
            raise EvalArgumentError(f"{pretrained}: no tokenizer found in {folder}; pass tokenizer=FOLDER")
        tokenizer = str(folder)
    if isinstance(tokenizer, str):
        tokenizer = resolve_tokenizer(tokenizer)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    """``lm-eval`` with the ``composer_dlm`` model registered; a bad argument is one line on stderr, exit 2."""
    from lm_eval.__main__ import cli_evaluate

    args = sys.argv[1:] if argv is None else argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except (ValueError, FileNotFoundError) as err:  # EvalArgumentError, CheckpointError, DataError, lm-eval's
        return report_once(str(err))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
