"""Sampler throughput: ``composer_dlm.generate`` (exact and fast modes) against LLaDA's own sampler.

    python scripts/benchmark.py sampler --reference-dir .peer/llada   # 8B-shaped model on CUDA
    python scripts/benchmark.py sampler --shape tiny --device cpu --batch-sizes 1,2 --steps 8,4 \\
        --prompt-length 8 --gen-length 16 --block-length 4  # a smoke test of the code path

``--reference-dir DIR``: the reference is LLaDA's own code, ``DIR/generate.py`` (ML-GSAI/LLaDA) driving
``DIR/modeling_llada.py`` + ``configuration_llada.py`` (a LLaDA modeling folder) holding the same weights (shared,
not copied; see :mod:`composer_dlm.benchmarks.peer`). Without it, a transcription of LLaDA's current sampler run on
our model stands in (labelled so; for smoke tests where their code is absent). Fast mode rows (``--fast-caches``: dual
and prefix KV cache, no threshold, the same steps) are approximate samplers: their "identical" column says whether
they happened to agree. ``--repeats N`` times every sampler N times: the table gives the median and the range.

Both samplers run the same randomly initialised bf16 model (built directly on the device) on the same prompts
in the same process, at temperature 0 with low-confidence remasking. Tokens/s counts generated tokens (batch *
gen_length) over the wall time of one whole ``generate`` call, after a short warm-up call of each sampler; our
sampler's CUDA-graph capture happens inside the timed call and is included. Outputs are compared token for
token. Every figure in the table is measured in the run that prints it; ``--out PATH`` writes PATH.md and the
raw figures with the environment as PATH.json. Needs only torch (no Composer), so it runs on a bare GPU box.
At batch 1 the reference is launch-bound, so its speed (and the ratio) depends on the host CPU.

Token identity on the GPU mixes two things: the sampler's logic and the model's rounding (our fused forward and
LLaDA's modeling file round differently in bf16, and a random model's confidences are near ties). The identity
check (``--identity-steps``, in the notes and under ``identity`` in the JSON) separates them: LLaDA's generate.py
driving our model's plain forward (:class:`PlainForward`) against our exact sampler on that same forward (the same
logits, so any difference is the sampler's), our plain forward against our default path (fused kernels, CUDA
graphs), and both against LLaDA's code on its own modeling file. ``--profile`` adds one profiled call per sampler
(one step per block, without CUDA graphs) as PATH_profile.txt, and its top ops to the JSON; the JSON's ``ours`` rows
carry the matrix work of an exact step and the rate it ran at (``tflop_per_s``).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.benchmarks import int_list, write_json
from composer_dlm.benchmarks.peer import load_package, peer_model
from composer_dlm.cli import ArgumentParser, fail
from composer_dlm.generate import FastMode, HeadRows, generate
from composer_dlm.models.architectures import AnyConfig, AnyModel, module_for
from composer_dlm.models.llada import LLaDAConfig, LLaDAModel

T = TypeVar("T")


class _Shape(TypedDict):
    d_model: int
    n_layers: int
    n_heads: int
    mlp_hidden_size: int
    vocab_size: int


SHAPES: dict[str, _Shape] = {
    "8b": dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=12288, vocab_size=126464),
    "tiny": dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=128),
}
MASK_ID = {"8b": 126336, "tiny": 127}

Sampler = Callable[[int], torch.Tensor]  # steps -> tokens
PEER_FILES = ("generate.py", "modeling_llada.py", "configuration_llada.py")


def _sampler(fn: functools.partial[torch.Tensor], **options: object) -> Sampler:
    """steps -> fn(steps=steps, **options)."""
    return lambda s: fn(steps=s, **options)


# --- the baseline -------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_generate(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
) -> torch.Tensor:
    """LLaDA's reference sampler (its generate.py) step for step, the work included: full logits at every
    position; the prediction as the argmax of the logits at temperature 0 (its ``add_gumbel_noise`` returns them
    unchanged there), else of the Gumbel transform in float64 over every position's vocabulary; the softmax
    in the logits' dtype over every position; a commit count table per row; a top-k per row whose ``k`` is read back from
    the device (a host synchronisation per row and step); the commit by boolean indexing."""
    batch, plen = prompt.shape
    device = prompt.device
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long, device=device)
    x[:, :plen] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for block in range(num_blocks):
        lo, hi = plen + block * block_length, plen + (block + 1) * block_length
        block_masks = (x[:, lo:hi] == mask_id).sum(dim=1, keepdim=True)
        counts = torch.zeros((batch, per_block), dtype=torch.long, device=device) + block_masks // per_block
        for row in range(batch):
            counts[row, : int(block_masks[row] % per_block)] += 1
        for i in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[prompt_index] = mask_id
                cond_logits, uncond_logits = model(torch.cat([x, uncond])).chunk(2)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
            else:
                logits = model(x)
            if temperature == 0:
                x0 = logits.argmax(dim=-1)
            else:
                logits64 = logits.to(torch.float64)
                noise = torch.rand_like(logits64)
                x0 = (logits64.exp() / (-torch.log(noise)) ** temperature).argmax(dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)  # in the logits' dtype, as LLaDA's current generate.py
                x0_p = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
            else:
                x0_p = torch.rand(x0.shape, device=device)
            x0_p[:, hi:] = -math.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -math.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(batch):
                _, chosen = torch.topk(confidence[row], k=int(counts[row, i]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
    return x


def load_llada(folder: str) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """LLaDA's ``generate``, ``modeling_llada`` and ``configuration_llada`` modules from ``folder``."""
    missing = [f for f in PEER_FILES if not (Path(folder) / f).is_file()]
    if missing:
        fail(f"--reference-dir {folder} lacks {', '.join(missing)}: it needs LLaDA's {', '.join(PEER_FILES)}")
    load_package("llada_peer", folder)
    generate_module, modeling, configuration = (
        importlib.import_module(f"llada_peer.{Path(f).stem}") for f in PEER_FILES
    )
    return generate_module, modeling, configuration


def reference_sampler(
    peer: tuple[types.ModuleType, types.ModuleType, types.ModuleType] | None,
    model: LLaDAModel,
    prompts: torch.Tensor,
    mask_id: int,
    gen_length: int,
    block_length: int,
) -> Sampler:
    """steps -> the reference's tokens: LLaDA's generate.py on its modeling class holding ``model``'s weights, or
    the transcription on ``model`` when ``peer`` is None."""
    if peer is None:
        fn = functools.partial(reference_generate, model, prompts, mask_id=mask_id)
    else:
        generate_module, modeling, configuration = peer
        fn = functools.partial(
            generate_module.generate, peer_model(modeling, configuration, model), prompts, mask_id=mask_id
        )
    return _sampler(fn, gen_length=gen_length, block_length=block_length)


# --- setup ----------------------------------------------------------------------------------------------------------
def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int) -> LLaDAModel:
    """A random model of the benchmark ``shape`` (see :func:`random_model`)."""
    config = LLaDAConfig(**SHAPES[shape], mask_token_id=MASK_ID[shape], eos_token_id=MASK_ID[shape] - 1)
    model = random_model(config, device, dtype, seed)
    assert isinstance(model, LLaDAModel)
    return model


def random_model(config: AnyConfig, device: torch.device, dtype: torch.dtype, seed: int) -> AnyModel:
    """Random weights by the model's own initialisation rule (:meth:`LLaDAModel.init_std`, norm weights 1), drawn
    in ``dtype`` directly on ``device`` from one generator seeded with ``seed``, without a host copy: an 8B
    model is 16 GB in bf16. In eval mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = module_for(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = model.init_std(name)
            if std is None:
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """``fn()`` and its wall time in seconds, the device synchronised before and after."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def head_rows_exact(
    model: LLaDAModel, prompts: torch.Tensor, gen_length: int, block_length: int, mask_id: int
) -> bool:
    """Whether projecting only one block's rows gives bitwise the rows of the full projection (cuBLAS may pick
    another kernel for the smaller matrix); if not, our default output may differ from the reference's."""
    batch, plen = prompts.shape
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long, device=prompts.device)
    x[:, :plen] = prompts
    cols = torch.arange(plen, plen + block_length, device=prompts.device)
    with torch.no_grad():
        full = model(x)
        part = model(x, head=lambda h, w: F.linear(h.index_select(1, cols), w))
    return torch.equal(full.index_select(1, cols), part)


class PlainForward(nn.Module):
    """Our model's plain forward (eager, unfused, every position projected) behind the interface that LLaDA's
    generate.py calls: ``model(x, attention_mask=...).logits`` and ``model.device``."""

    def __init__(self, model: LLaDAModel) -> None:
        super().__init__()
        self.inner = model

    @property
    def device(self) -> torch.device:
        return next(self.inner.parameters()).device

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.inner(input_ids, attention_mask=attention_mask))


def identity_check(
    peer: tuple[types.ModuleType, types.ModuleType, types.ModuleType] | None,
    model: LLaDAModel,
    prompts: torch.Tensor,
    mask_id: int,
    steps: int,
    gen_length: int,
    block_length: int,
    reference_out: torch.Tensor,
    head_rows: HeadRows,
) -> dict[str, int]:
    """Tokens that differ between pairs of samplers at ``steps``, separating the sampler's logic from the model's
    numerics: LLaDA's generate.py (the transcription without ``peer``) driving our model's plain forward against
    our exact sampler on that same plain forward (same logits: any difference is the sampler's); our plain run
    against our default one (fused kernels, CUDA graphs); and each against ``reference_out``, LLaDA's code on its
    own modeling file (there the forwards differ, and so may their roundings)."""
    shape: dict[str, Any] = dict(steps=steps, gen_length=gen_length, block_length=block_length)
    if peer is None:
        llada_on_ours = reference_generate(model, prompts, mask_id=mask_id, **shape)
    else:
        llada_on_ours = peer[0].generate(PlainForward(model), prompts, mask_id=mask_id, **shape)
    ours = functools.partial(
        generate, model, prompts, mask_token_id=mask_id, steps=steps, gen_length=gen_length,
        block_length=block_length,
    )  # fmt: skip
    ours_plain = ours(fused=False, cuda_graph=False, head_rows=head_rows)
    ours_default = ours()

    def differ(a: torch.Tensor, b: torch.Tensor) -> int:
        return int((a != b).sum())

    return {
        "llada_sampler_on_our_plain_forward_vs_ours_plain": differ(llada_on_ours, ours_plain),
        "ours_plain_vs_ours_default": differ(ours_plain, ours_default),
        "llada_sampler_on_our_plain_forward_vs_llada_code": differ(llada_on_ours, reference_out),
        "ours_default_vs_llada_code": differ(ours_default, reference_out),
    }


def exact_step_flop(config: LLaDAConfig, batch: int, length: int, rows: int) -> float:
    """Matrix FLOPs of one exact-mode step as our sampler runs it: the trunk's products over every position, the
    attention scores and their weighted sum, and the output projection of ``rows`` candidate rows per sequence."""
    vocab = config.embedding_size
    assert vocab is not None  # filled in by LLaDAConfig.__post_init__
    trunk = config.num_params(include_embedding=False) - vocab * config.d_model
    attention = 4 * config.n_layers * length * length * config.d_model
    return batch * (2 * trunk * length + attention + 2 * vocab * config.d_model * rows)


def profile(
    fn: Callable[[], object], device: torch.device, rows: int = 25
) -> tuple[str, list[dict[str, object]]]:
    """``fn()`` under torch.profiler: its table of the ``rows`` ops with the most self device time (CPU time on the
    CPU), and those rows as records."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        fn()
        _sync(device)
    averages = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    top = sorted(averages, key=lambda e: getattr(e, key), reverse=True)[:rows]
    records: list[dict[str, object]] = [
        {"name": e.key, "calls": e.count, "self_device_ms": e.self_device_time_total / 1e3,
         "self_cpu_ms": e.self_cpu_time_total / 1e3}
        for e in top
    ]  # fmt: skip
    return averages.table(sort_by=key, row_limit=rows), records


# --- main ---------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="benchmark.py sampler", description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 16])
    p.add_argument("--steps", type=int_list, default=[64, 256])
    p.add_argument("--prompt-length", type=int, default=128)
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--extras-max-steps", type=int, default=64,
                   help="time the extra variants (no CUDA graph at batch 1; all rows projected when candidate rows "
                        "are not bitwise exact) only up to this many steps")  # fmt: skip
    p.add_argument(
        "--budget-s", type=float, default=float("inf"), help="skip extra variants after this many seconds"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--reference-dir", help="folder with LLaDA's generate.py and modeling files (the reference)"
    )
    p.add_argument(
        "--fast-caches",
        type=lambda t: [c for c in t.split(",") if c],
        default=["dual", "prefix"],
        help="fast mode's KV caches to time too, comma-separated (default: dual,prefix; '' for none)",
    )
    p.add_argument(
        "--repeats", type=int, default=1, help="timed calls per sampler (median and range reported)"
    )
    p.add_argument(
        "--identity-steps",
        type=int,
        help="steps of the token-identity check that separates sampler logic from model numerics (default: the "
        "first of --steps; 0: skip)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile one call per sampler (one step per block, no CUDA graph) into PATH_profile.txt",
    )
    p.add_argument("--out", help="write PATH.md and PATH.json (default: $OUT/sampler when $OUT is set)")
    return p.parse_args(argv)


class Setup(NamedTuple):
    device: torch.device
    dtype_name: str
    mask_id: int
    model: LLaDAModel
    device_name: str


def setup(args: argparse.Namespace) -> Setup:
    """The device, dtype and random model of ``--device --dtype --shape --seed`` (the sampler and likelihood
    benchmarks); prints what was built and how long it took."""
    began = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but CUDA is not available; pass --device cpu (with --shape tiny)")
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    model = build_model(args.shape, device, dtype, args.seed)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {args.shape} {dtype_name}, model built in "
          f"{time.perf_counter() - began:.1f}s", flush=True)  # fmt: skip
    return Setup(device, dtype_name, MASK_ID[args.shape], model, name)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    began = time.perf_counter()
    device, dtype_name, mask_id, model, name = setup(args)

    env_out = os.environ.get("OUT")
    out_base = Path(args.out) if args.out else (Path(env_out) / "sampler" if env_out else None)
    out_path = out_base.with_suffix(".md") if out_base is not None else None
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    lines = [
        f"Sampler throughput, {args.shape}-shaped random {dtype_name} model on {name} (torch {torch.__version__}); "
        f"prompt {args.prompt_length}, gen {args.gen_length}, block {args.block_length}, temperature 0.",
        "",
        "| batch | steps | sampler | seconds (median) | range | tok/s | vs reference | identical to reference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes: list[str] = []

    def emit(line: str, note: bool = False) -> None:
        (notes if note else lines).append(line)
        print(line, flush=True)
        if out_path is not None:
            out_path.write_text("\n".join(lines + [""] + notes) + "\n")

    peer = load_llada(args.reference_dir) if args.reference_dir else None
    reference_label = "LLaDA generate.py" if peer is not None else "reference (transcription)"
    vocab_ids = min(SHAPES[args.shape]["vocab_size"], mask_id) - 2
    common = dict(gen_length=args.gen_length, block_length=args.block_length)
    length = args.prompt_length + args.gen_length
    identity: list[dict[str, object]] = []
    profiles: list[dict[str, object]] = []
    profile_text: list[str] = []
    for batch in args.batch_sizes:
        prompts = torch.randint(
            0, vocab_ids, (batch, args.prompt_length), generator=torch.Generator().manual_seed(batch)
        )
        prompts = prompts.to(device)
        exact = head_rows_exact(model, prompts, args.gen_length, args.block_length, mask_id)
        emit(
            f"batch {batch}: candidate-row projection bitwise equal to the full projection's rows: {exact}",
            True,
        )
        ours = functools.partial(generate, model, prompts, mask_token_id=mask_id, **common)
        samplers: dict[str, Sampler] = {
            reference_label: reference_sampler(
                peer, model, prompts, mask_id, args.gen_length, args.block_length
            ),
            "ours": _sampler(ours),
        }
        # --profile: no CUDA graph, so that the profile shows every kernel
        profiled = {reference_label: samplers[reference_label], "ours": _sampler(ours, cuda_graph=False)}
        for cache in args.fast_caches:
            samplers[f"ours, {cache} cache"] = _sampler(ours, fast=FastMode(cache=cache))
            profiled[f"ours, {cache} cache"] = _sampler(ours, fast=FastMode(cache=cache), cuda_graph=False)
        extras: dict[str, Sampler] = {}
        if device.type == "cuda" and batch == 1:
            extras["ours, no CUDA graph"] = _sampler(ours, cuda_graph=False)
            extras["ours, unfused"] = _sampler(ours, fused=False)
        if not exact:
            extras["ours, all rows projected"] = _sampler(ours, head_rows="all")
        warm_steps = args.gen_length // args.block_length  # one step per block
        for fn in [*samplers.values(), *extras.values()]:  # kernels, cuBLAS handles, allocator
            fn(warm_steps)
        reference_outs: dict[int, torch.Tensor] = {}
        for steps in args.steps:
            runs = dict(samplers)
            if steps <= args.extras_max_steps:
                runs |= extras
            ref_out, ref_s = None, float("nan")
            for label, fn in runs.items():
                if label in extras and time.perf_counter() - began > args.budget_s:
                    emit(
                        f"batch {batch}, steps {steps}, {label}: skipped (over the {args.budget_s:.0f}s budget)",
                        True,
                    )
                    continue
                try:
                    outs = [timed(functools.partial(fn, steps), device) for _ in range(args.repeats)]
                except Exception as err:  # keep the table: report the failure in its row
                    emit(f"| {batch} | {steps} | {label} | failed: {type(err).__name__}: {err} | | | | |")
                    continue
                times = sorted(t for _, t in outs)
                out, seconds = outs[0][0], statistics.median(times)
                diff = 0
                if ref_out is None:
                    ref_out, ref_s = out, seconds
                    reference_outs[steps] = out
                    same, speedup = "-", "1.00x"
                else:
                    diff = int((out != ref_out).sum())
                    same = "yes" if diff == 0 else f"NO ({diff} tokens differ)"
                    speedup = f"{ref_s / seconds:.2f}x"
                tok_s = batch * args.gen_length / seconds
                spread = f"{times[0]:.2f}-{times[-1]:.2f}"
                emit(
                    f"| {batch} | {steps} | {label} | {seconds:.2f} | {spread} | {tok_s:.1f} | {speedup} | {same} |"
                )
                row: dict[str, object] = {
                    "batch": batch, "steps": steps, "sampler": label, "seconds": seconds, "seconds_all": times,
                    "tokens_per_s": tok_s, "identical_to_reference": same in ("-", "yes"),
                    "tokens_differing_from_reference": diff, "step_seconds": seconds / steps,
                }  # fmt: skip
                if label == "ours":  # the matrix work of an exact step, and the rate it ran at
                    flop = exact_step_flop(model.config, batch, length, args.block_length)
                    row |= {"exact_step_tflop": flop / 1e12, "tflop_per_s": flop / 1e12 / (seconds / steps)}
                rows.append(row)
        if args.identity_steps != 0:
            steps = args.steps[0] if args.identity_steps is None else args.identity_steps
            ref = reference_outs.get(steps)
            if ref is None:
                ref = samplers[reference_label](steps)
            counts = identity_check(
                peer, model, prompts, mask_id, steps, args.gen_length, args.block_length, ref,
                "candidates" if exact else "all",
            )  # fmt: skip
            identity.append({"batch": batch, "steps": steps, "tokens": batch * args.gen_length, **counts})
            for what, n in counts.items():
                emit(f"batch {batch}, steps {steps}: {what.replace('_', ' ')}: {n} tokens differ", True)
        if args.profile:
            for label, fn in profiled.items():
                table, records = profile(functools.partial(fn, warm_steps), device)
                profiles.append({"batch": batch, "steps": warm_steps, "sampler": label, "top": records})
                profile_text.append(
                    f"## batch {batch}, {label}, {warm_steps} steps (one per block)\n\n{table}\n"
                )

    notes.append(f"total {time.perf_counter() - began:.0f}s")
    table = "\n".join(lines + [""] + notes)
    if out_base is not None and out_path is not None:
        out_path.write_text(table + "\n")
        options = {k: v for k, v in vars(args).items() if k != "out"}
        raw = {
            "benchmark": "sampler",
            "options": options,
            "results": rows,
            "identity": identity,
            "notes": notes,
        }
        if args.profile:
            raw["profiles"] = profiles
            out_base.with_name(out_base.name + "_profile.txt").write_text("\n".join(profile_text))
        write_json(out_base.with_suffix(".json"), raw)
    print("\n" + table, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
