"""Sampling from a checkpoint on the command line (``scripts/generate.py`` calls :func:`main`).

    python scripts/generate.py runs/quickstart/hf/final --prompt "The list type" --gen-length 32 --show
    python scripts/generate.py runs/quickstart/checkpoints/latest-rank0.pt --prompt "..." --chat

A checkpoint is a Hugging Face folder (config.json + safetensors; preferred: nothing in it runs code), a LoRA
run's adapter folder (merged into the base folder its adapter_config.json names), a Composer checkpoint
file (``.pt``) written by our trainer, or a run folder (``runs/quickstart``: its latest export, ``hf/final`` or
the newest ``hf/ba<N>``, else its latest checkpoint), so a run can be sampled while it trains. A ``.pt`` holds
the weights but not the model's shape, which comes from ``--config``, else from the run's config.yaml, else
from the run's HF export found next to it.

Inside a run folder (``RUN/hf/final``, ``RUN/checkpoints/*.pt``) the run's ``config.yaml`` gives the defaults:
its tokenizer, and the chat template for a run trained with ``diffusion.mode: sft`` (``--no-chat`` turns that
off). Exit codes: 0 answers printed; 2 a user mistake (one ``composer-dlm: error:`` line); 3 every answer came
out empty (the model produced only EOS or special tokens; a ``composer-dlm: note:`` line says what to try).
"""

from __future__ import annotations

import argparse
import pickle
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer_dlm.cli import ArgumentParser, report, warnings_as_lines

if TYPE_CHECKING:  # imported where used: `--help` and a bad flag answer without loading torch
    import torch
    from transformers import PreTrainedTokenizerBase

    from composer_dlm.models.architectures import AnyConfig, AnyModel

MASK_GLYPH = "░"
EXIT_EMPTY = 3


def load_model(
    path: str | Path,
    *,
    config: str | Path | AnyConfig | None = None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> AnyModel:
    """A :class:`LLaDAModel` (or LLaDA-MoE model) in eval mode from a Hugging Face folder or a Composer ``.pt``
    checkpoint.

    ``config`` (a LLaDA config.json or config) is used for a ``.pt`` only; see :func:`load_composer_checkpoint`.
    Raises :class:`CheckpointError` for a missing path or a file that is neither.
    """
    from composer_dlm.models.architectures import from_pretrained
    from composer_dlm.models.hf_format import CONFIG_NAME
    from composer_dlm.models.llada import CheckpointError
    from composer_dlm.models.lora import is_adapter_folder, load_merged

    path = Path(path)
    if path.is_dir() and is_adapter_folder(path):  # a LoRA run's export: merged into its base on load
        return load_merged(path, dtype=dtype, device=device).eval()
    if path.is_dir():  # LLaDA or LLaDA-MoE, as its config.json says
        return from_pretrained(path, dtype=dtype, device=device).eval()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix == ".pt":
        return load_composer_checkpoint(path, config=config, dtype=dtype, device=device)
    hint = (
        "; pass the folder that holds it" if path.name == CONFIG_NAME or path.suffix == ".safetensors" else ""
    )
    raise CheckpointError(
        f"{path}: expected a Hugging Face folder (config.json + safetensors) or a Composer checkpoint (.pt){hint}"
    )


def load_composer_checkpoint(
    path: str | Path,
    *,
    config: str | Path | AnyConfig | None = None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> AnyModel:
    """Loads the LLaDA (or LLaDA-MoE) weights of a Composer checkpoint written by our trainer.

    The file is a pickle: it is read with ``torch.load(weights_only=False)``, which runs whatever code the file
    names, so only load checkpoints you trust (a warning says so); the HF export of the same run is the safe
    choice. The model's shape comes from ``config`` (a config.json or a config of either architecture, e.g. from the run's
    config.yaml: :func:`run_network`) or :func:`find_run_config`.
    """
    import torch

    from composer_dlm.models.architectures import config_from_json, from_config
    from composer_dlm.models.composer_llada import llada_weights
    from composer_dlm.models.llada import CheckpointError

    path = Path(path)
    if config is not None and not isinstance(config, (str, Path)):
        llada_config, config_source = config, "the run's config.yaml"
    else:
        config_path = Path(config) if config is not None else find_run_config(path)
        if config_path is None:
            raise CheckpointError(
                f"{path}: a Composer checkpoint holds the weights but not the model's shape, and no config.json "
                "or run config.yaml was found beside it or in its run folder; pass --config PATH/TO/config.json"
            )
        llada_config, config_source = config_from_json(config_path), str(config_path)
    warnings.warn(
        f"{path} is a pickle: loading it (torch.load with weights_only=False) runs code stored in it. Only load "
        "checkpoints you trust; the run's Hugging Face export (safetensors) is the safe alternative.",
        UserWarning,
        stacklevel=2,
    )
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as err:
        raise CheckpointError(f"{path}: unpickling needs the module {err.name!r}; install composer") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
    state = raw.get("state") if isinstance(raw, Mapping) else None
    weights = state.get("model") if isinstance(state, Mapping) else None
    if not isinstance(weights, Mapping):
        raise CheckpointError(f"{path}: not a Composer checkpoint (no state['state']['model'])")
    # Built on the meta device and given the checkpoint's tensors: no random initialisation to overwrite.
    model = from_config(llada_config, device="meta")
    result = model.load_state_dict(llada_weights(weights), strict=False, assign=True)
    problems = [f"missing {', '.join(result.missing_keys[:3])}"] if result.missing_keys else []
    problems += [f"unexpected {', '.join(result.unexpected_keys[:3])}"] if result.unexpected_keys else []
    if problems:
        raise CheckpointError(f"{path} does not fit {config_source}: " + "; ".join(problems))
    return model.to(device=device, dtype=dtype).eval()


def find_run_config(checkpoint: Path) -> Path | None:
    """The config.json for a checkpoint of our trainer's run layout (``RUN/checkpoints/*.pt`` beside
    ``RUN/hf/{final,baN}/config.json``): one beside the file, else ``hf/final``, else the newest export."""
    from composer_dlm.callbacks.hf_export import latest_export
    from composer_dlm.models.hf_format import CONFIG_NAME

    beside = checkpoint.parent / CONFIG_NAME
    if beside.is_file():
        return beside
    export = latest_export(checkpoint.resolve().parent.parent / "hf")
    return export / CONFIG_NAME if export is not None and (export / CONFIG_NAME).is_file() else None


def resolve_run_folder(path: str | Path) -> Path:
    """What to sample when ``path`` is a run folder (it holds the run's config.yaml and no config.json): its
    latest Hugging Face export (``final``, else the newest ``ba<N>``), else its latest Composer checkpoint.
    Any other path is returned as it is. A run folder with neither is a :class:`CheckpointError`."""
    from composer_dlm.config import RUN_CONFIG_NAME
    from composer_dlm.models.hf_format import CONFIG_NAME
    from composer_dlm.models.llada import CheckpointError

    path = Path(path)
    if not (path / RUN_CONFIG_NAME).is_file() or (path / CONFIG_NAME).is_file():
        return path
    from composer_dlm.callbacks.hf_export import latest_export

    export = (run_config(path / RUN_CONFIG_NAME).get("callbacks") or {}).get("hf_export") or {}
    exports = path / str(export.get("folder") or "hf")
    latest = path / "checkpoints" / "latest-rank0.pt"
    found = latest_export(exports) or (latest.resolve() if latest.is_file() else None)
    if found is None:
        raise CheckpointError(
            f"{path} is a run folder with no Hugging Face export ({exports}/final or ba<N>) and no checkpoint "
            f"({latest}) yet; sample it after its first export (callbacks.hf_export.interval) or checkpoint "
            "(checkpoint.save_interval)"
        )
    what = "export" if found.is_dir() else "checkpoint"
    print(f"composer-dlm: note: sampling {found}, the run's latest {what}", file=sys.stderr)
    return found


def run_network(run: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> AnyConfig | None:
    """The network a run trained, from its config.yaml's ``model`` section (as the trainer builds it:
    builders.network_config), or None when the run folder has no config.yaml."""
    section = run.get("model")
    if not isinstance(section, dict):
        return None
    from composer_dlm.builders import network_config
    from composer_dlm.config import ModelConfig, build
    from composer_dlm.models.llada import CheckpointError

    model = build(ModelConfig, section, "model")
    if model.lora is not None:
        raise CheckpointError(
            "a LoRA run's checkpoints hold only its adapters, not the base model; sample its export "
            "(RUN/hf/final, or the run folder itself)"
        )
    return network_config(model, tokenizer)


def render(tokenizer, ids: list[int], mask_token_id: int) -> str:
    """Partly decoded text: runs of committed tokens decoded, each mask shown as ``MASK_GLYPH``."""
    parts: list[str] = []
    run: list[int] = []
    for token in [*ids, None]:
        if token is not None and token != mask_token_id:
            run.append(token)
            continue
        if run:
            parts.append(tokenizer.decode(run))
            run = []
        if token is not None:
            parts.append(MASK_GLYPH)
    return "".join(parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    # prog: argparse's default, the name the user ran (composer-dlm-generate, or generate.py for the script).
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "checkpoint",
        help="Hugging Face folder (preferred), LoRA adapter folder, Composer checkpoint .pt, or a run folder "
        "(its latest export, else its latest checkpoint)",
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    p.add_argument(
        "--tokenizer",
        help="'embedded' or a tokenizer folder (default: the checkpoint folder's own tokenizer files, else the "
        "run's tokenizer.name from its config.yaml, else embedded)",
    )
    p.add_argument(
        "--config",
        help="config.json giving the model's shape, for a .pt (default: the run's config.yaml, else its HF export)",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        help="wrap each prompt as a user turn with the tokenizer's chat template (default: on for a checkpoint "
        "of an SFT run, as its config.yaml says; --no-chat: off)",
    )
    p.add_argument("--gen-length", type=int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--steps", type=int, help="denoising steps (default: gen-length)")
    p.add_argument("--block-length", type=int, help="semi-autoregressive block size (default: gen-length)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: Gumbel sampling")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="unsupervised classifier-free guidance scale")
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence")
    p.add_argument(
        "--min-new-tokens", type=int, default=0, help="forbid EOS in the first this many answer tokens"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed for sampling (temperature > 0, random remasking)"
    )
    p.add_argument(
        "--cache",
        choices=("prefix", "dual"),
        help="fast mode: block-level KV cache (default: none, exact mode)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="fast mode: commit every token at least this confident (parallel decoding)",
    )
    p.add_argument(
        "--factor", type=float, help="fast mode: factor-based parallel decoding (excludes --threshold)"
    )
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--show", action="store_true", help="print the answer after every step as masks fill in")
    return p.parse_args(argv)


def run_config(checkpoint: str | Path) -> dict[str, Any]:
    """The ``config.yaml`` of the run a checkpoint belongs to (``RUN/hf/<export>``, ``RUN/checkpoints/x.pt``, or
    the file itself), or ``{}`` when it is not inside a run folder of our trainer. Read as plain YAML."""
    import yaml

    from composer_dlm.config import RUN_CONFIG_NAME

    path = Path(checkpoint).resolve()
    found = path if path.name == RUN_CONFIG_NAME else path.parent.parent / RUN_CONFIG_NAME
    if not found.is_file():
        return {}
    try:
        data = yaml.safe_load(found.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def default_tokenizer(checkpoint: str | Path, run: dict[str, Any]) -> str:
    """The checkpoint folder itself when it holds tokenizer files, else the run's tokenizer, else embedded."""
    folder = Path(checkpoint)
    if folder.is_dir() and (folder / "tokenizer_config.json").is_file():
        return str(folder)
    name = (run.get("tokenizer") or {}).get("name")
    return name if isinstance(name, str) else "embedded"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch  # after --help and flag errors, which answer without loading torch

    from composer_dlm.data import load_tokenizer, mask_token_id
    from composer_dlm.data.tokenizer import user_turn
    from composer_dlm.generate import FastMode, generate, left_pad

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    try:
        checkpoint = resolve_run_folder(args.checkpoint)
        run = run_config(checkpoint)
        sft_run = (run.get("diffusion") or {}).get("mode") == "sft"
        tokenizer_name = args.tokenizer or default_tokenizer(checkpoint, run)
        tokenizer = load_tokenizer(tokenizer_name)
        config = args.config
        if config is None and checkpoint.suffix == ".pt":
            config = run_network(run, tokenizer)
        with warnings_as_lines():  # the unpickling warning
            model = load_model(checkpoint, config=config, dtype=dtype, device=device)
        mask_id = mask_token_id(tokenizer)
        if model.config.mask_token_id is not None and mask_id != model.config.mask_token_id:
            raise ValueError(
                f"the tokenizer's mask id is {mask_id} but the model's config says {model.config.mask_token_id}; "
                "pass the model's own tokenizer with --tokenizer"
            )
        chat = args.chat if args.chat is not None else sft_run and bool(tokenizer.chat_template)
        if chat and args.chat is None:
            print(
                "composer-dlm: note: an SFT run: prompts go through the chat template (--no-chat: raw)",
                file=sys.stderr,
            )
        texts = args.prompt
        if chat:
            if not tokenizer.chat_template:
                raise ValueError(f"--chat: tokenizer {tokenizer_name!r} has no chat template")
            texts = [user_turn(tokenizer, t) for t in texts]
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        longest = max(len(r) for r in rows)
        limit = model.config.max_sequence_length
        if longest + args.gen_length > limit:
            raise ValueError(
                f"the prompt ({longest} tokens) plus --gen-length {args.gen_length} is {longest + args.gen_length} "
                f"tokens, more than the model's max_sequence_length ({limit}); shorten the prompt or lower "
                "--gen-length"
            )
        eos_id = (
            model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
        )
        assert eos_id is not None, "neither the model's config nor the tokenizer names an EOS token"
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
        prompt_ids, attention_mask = left_pad(rows, pad_id=pad)
        steps = args.steps or args.gen_length
        plen = prompt_ids.shape[1]

        def show(step: int, x: torch.Tensor) -> None:
            for row, ids in enumerate(x[:, plen:].tolist()):
                label = f"[{row}] " if len(rows) > 1 else ""
                text = render(tokenizer, ids, mask_id).replace("\n", "\\n")
                print(f"step {step + 1}/{steps}: {label}{text}", flush=True)

        sampling = args.temperature > 0 or args.remasking == "random"
        out = generate(
            model,
            prompt_ids,
            steps=steps,
            gen_length=args.gen_length,
            block_length=args.block_length or args.gen_length,
            temperature=args.temperature,
            cfg_scale=args.cfg_scale,
            remasking=args.remasking,
            mask_token_id=mask_id,
            attention_mask=attention_mask if len({len(r) for r in rows}) > 1 else None,
            eos_token_id=eos_id,
            min_new_tokens=args.min_new_tokens,
            generator=torch.Generator(device=device).manual_seed(args.seed) if sampling else None,
            on_step=show if args.show else None,
            fast=FastMode(cache=args.cache, threshold=args.threshold, factor=args.factor)
            if args.cache or args.threshold is not None or args.factor is not None
            else None,
        )
    except ValueError as err:  # CheckpointError, DataError and bad sampler arguments
        return report(str(err))
    answers = [tokenizer.decode(ids, skip_special_tokens=True) for ids in out[:, plen:].tolist()]
    for row, answer in enumerate(answers):
        print(answer if len(rows) == 1 else f"[{row}] {answer}", flush=True)
    if all(not a.strip() for a in answers):
        only_eos = bool((out[:, plen:] == eos_id).all())
        what = "only EOS tokens" if only_eos else "only special tokens or whitespace"
        hint = (
            "try --min-new-tokens N to forbid EOS at the start"
            if chat
            else "if it was fine-tuned for chat (SFT), pass --chat"
        )
        print(
            f"composer-dlm: note: every answer is empty: the model produced {what}. It may be undertrained "
            f"(train longer or check the run's eval ELBO); {hint}.",
            file=sys.stderr,
        )
        return EXIT_EMPTY
    return 0
