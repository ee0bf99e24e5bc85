"""Benchmark of the fused masked cross-entropy: `python scripts/benchmark.py kernel [--out PATH] ...`.

One GPU, one run, every method on the same inputs: B*L rows of bf16 hidden, a bf16 (V, H) weight, half
the rows weighted (1 / p_mask-like weights), targets uniform over the vocabulary or SFT-shaped (90% of the
weighted rows on one id, as EOS padding gives). Ours runs on each torch branch asked for: `native` (what
this torch offers) and `torch27` (COMPOSER_DLM_FORCE_TORCH27=1: no matmul out_dtype, as the pinned torch
2.7 takes). For each shape, targets, method and branch: median ms of forward + backward, the GEMMs'
TFLOP/s (6·M·V·H over that time),
transient memory (peak allocated minus inputs and outputs: loss and the two gradients), and relative
errors of the loss and both gradients against the float32 reference (kernels.masked_ce_reference on
upcast copies, TF32 off). Liger-Kernel and Cut Cross-Entropy have no per-row weights: they get the
weighted rows with unit weights, and their errors are taken against the unit-weight reference.
Each method's back-to-back repetitions are also sampled for the SM clock and the power cap
(composer_dlm/benchmarks/clocks.py); ``--idle-reps`` times extra steps after idle GPU, and ``--gemm-floor`` the
lone logits product, whose rate estimates what the same GEMMs alone cost (README, "The power cap").
Writes the table as markdown and the raw figures, with the environment, as JSON (PATH with .md and .json
suffixes) when --out is given.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composer_dlm.benchmarks import environment, repeats, write_json
from composer_dlm.benchmarks.clocks import ClockSampler
from composer_dlm.benchmarks.tables import central, fmt
from composer_dlm.cli import ArgumentParser, fail
from kernels import (
    KernelConfig,
    masked_ce,
    masked_linear_cross_entropy,
    masked_linear_cross_entropy_reference,
)

BRANCHES = ("native", "torch27")
TARGETS = ("uniform", "sft")
SFT_SHARE = 0.9  # share of the weighted rows on one target in SFT-shaped inputs

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _full_logits(h, w, t, rw):
    logits = h @ w.T
    return (F.cross_entropy(logits.float(), t, reduction="none") * rw).sum()


def _masked_eager(h, w, t, rw):
    rows = rw.nonzero().squeeze(1)
    logits = h.index_select(0, rows) @ w.T
    return (F.cross_entropy(logits.float(), t[rows], reduction="none") * rw[rows]).sum()


def _chunk_loss(h, w, t, rw):
    return (rw * F.cross_entropy(F.linear(h, w).float(), t, reduction="none")).sum()


def _compiled_chunked(chunk: int) -> LossFn:
    step = torch.compile(_chunk_loss, dynamic=False)

    def fn(h, w, t, rw):
        rows = rw.nonzero().squeeze(1)
        total = h.new_zeros((), dtype=torch.float32)
        for s in range(0, rows.numel(), chunk):
            r = rows[s : s + chunk]
            total = total + step(h.index_select(0, r), w, t[r], rw[r])
        return total

    return fn


def _liger() -> LossFn:
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    def fn(h, w, t, rw):
        rows = rw.nonzero().squeeze(1)
        out = LigerFusedLinearCrossEntropyFunction.apply(
            h.index_select(0, rows), w, t[rows], None, None, -100, 0.0, 0.0, "sum"
        )
        return out[0] if isinstance(out, tuple) else out

    return fn


def _cce() -> LossFn:
    from cut_cross_entropy import linear_cross_entropy

    def fn(h, w, t, rw):
        rows = rw.nonzero().squeeze(1)
        return linear_cross_entropy(h.index_select(0, rows), w, t[rows], reduction="sum")

    return fn


def _ours(cfg: KernelConfig) -> LossFn:
    return lambda h, w, t, rw: masked_linear_cross_entropy(h, w, t, rw, config=cfg)


def _ours_master(cfg: KernelConfig) -> LossFn:
    """fp32 master weight under autocast, as in the unsharded model."""

    def fn(h, w, t, rw):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return masked_linear_cross_entropy(h, w, t, rw, config=cfg)

    return fn


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def _nbytes(*xs: torch.Tensor | None) -> int:
    return sum(x.numel() * x.element_size() for x in xs if x is not None)


def _clear_grads(h: torch.Tensor, w: torch.Tensor) -> None:
    h.grad = None
    w.grad = None


def _step(fn: LossFn, h, w, t, rw) -> torch.Tensor:
    """One forward + backward from cleared gradients; returns the loss."""
    _clear_grads(h, w)
    loss = fn(h, w, t, rw)
    loss.backward()
    return loss


def _cuda_ms(f: Callable[[], object]) -> float:
    """Milliseconds of the GPU work `f` enqueues, between two CUDA events (synchronises)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    f()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _timed_step(fn: LossFn, h, w, t, rw) -> float:
    """Milliseconds of one forward + backward, gradients cleared outside the timed region."""
    _clear_grads(h, w)
    return _cuda_ms(lambda: fn(h, w, t, rw).backward())


def _measure(
    fn: LossFn, h, w, t, rw, ref, reps: int, warmup: int, idle_reps: int = 0, idle_s: float = 1.5
) -> dict[str, Any]:
    """Back-to-back repetitions after a warm-up (the SM clock sampled meanwhile), then ``idle_reps`` more, each
    after ``idle_s`` seconds of idle GPU (below its power cap when it starts), then one step for the memory
    and the errors."""
    with ClockSampler() as clocks:
        for _ in range(warmup):
            _step(fn, h, w, t, rw)
        times = [_timed_step(fn, h, w, t, rw) for _ in range(reps)]
    after_idle = []
    for _ in range(idle_reps):
        time.sleep(idle_s)
        after_idle.append(_timed_step(fn, h, w, t, rw))
    _clear_grads(h, w)
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = _step(fn, h, w, t, rw)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base - _nbytes(loss, h.grad, w.grad)
    out = {
        "ms": repeats(times),  # every timed repetition, their median and range
        "transient_gib": transient / 2**30,
        "err_loss": _rel(loss.detach(), ref["loss"]),
        "err_dh": _rel(h.grad, ref["dh"]),
        "err_dw": _rel(w.grad, ref["dw"]),
    }
    if after_idle:
        out["ms_after_idle"] = repeats(after_idle)
    clock = clocks.summary()
    if clock is not None:
        out["clocks"] = clock
    _clear_grads(h, w)
    return out


def _gemm_floor(h, w, rows: int, gemm_flops: float, idle_s: float) -> dict[str, Any]:
    """The rate of a lone logits product (``rows`` rows of h @ w.T, cuBLAS) on the benchmark's operands, once
    after ``idle_s`` seconds idle and over 150 products back to back (the clock sampled), and the time the
    step's three products (``gemm_flops``) would take at each rate: what a method made of these cuBLAS GEMMs
    costs with nothing else in its step (an estimate: the other two products have other shapes and data)."""
    hc = h.detach()[:rows].contiguous()
    wt = w.detach().t()
    buf = torch.empty(rows, w.shape[0], dtype=w.dtype, device=w.device)
    flops = 2.0 * rows * w.shape[0] * w.shape[1]
    torch.mm(hc, wt, out=buf)
    torch.cuda.synchronize()
    time.sleep(idle_s)
    once = _cuda_ms(lambda: torch.mm(hc, wt, out=buf))
    with ClockSampler() as clocks:
        groups = [_cuda_ms(lambda: [torch.mm(hc, wt, out=buf) for _ in range(10)]) / 10 for _ in range(15)]
    sustained = repeats([flops / ms / 1e9 for ms in groups])  # TFLOP/s of each group of 10 products
    return {
        "rows": rows,
        "tflops_after_idle": flops / once / 1e9,
        "tflops_back_to_back": sustained,
        "floor_ms_after_idle": gemm_flops / (flops / once),
        "floor_ms_back_to_back": gemm_flops / (sustained["median"] * 1e9),
        "clocks": clocks.summary(),
    }


def _reference(h, w, t, rw) -> dict[str, torch.Tensor]:
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    loss = masked_linear_cross_entropy_reference(h32, w32, t, rw, chunk_rows=2048)
    assert isinstance(loss, torch.Tensor)  # the loss alone, without return_stats
    loss.backward()
    out = {"loss": loss.detach(), "dh": h32.grad, "dw": w32.grad}
    del h32, w32
    return out


def _profile(h, w, t, rw, cfg: KernelConfig) -> dict[str, float]:
    """Milliseconds of each stage of our kernel, summed over the chunks (one timed repetition each)."""
    rows = rw.nonzero().squeeze(1)
    num_w, vocab = rows.numel(), w.shape[0]
    chunk = masked_ce._chunk_rows(num_w, vocab, w.element_size(), cfg)
    buf = torch.empty(chunk, vocab, dtype=w.dtype, device=w.device)
    hc = h.detach()[rows[:chunk]]
    tc, wc = t[rows[:chunk]], rw[rows[:chunk]].float()
    aux = [torch.empty(chunk, device=w.device) for _ in range(3)]
    aux[1] = aux[1].to(torch.int8)
    dw = torch.zeros_like(w)

    def time_ms(f: Callable[[], object]) -> float:
        f()
        return _cuda_ms(lambda: [f() for _ in range(3)]) / 3

    from kernels import masked_ce_triton

    def rows_kernel(block_v: int, warps: int) -> Callable[[], object]:
        return lambda: masked_ce_triton.softmax_grad_rows(
            buf, tc, wc, aux[0], aux[1], aux[2], write_grad=True, block_v=block_v, num_warps=warps
        )

    k = num_w / chunk
    out = {
        "chunk_rows": float(chunk),
        "logits_gemm": k * time_ms(lambda: torch.mm(hc, w.detach().t(), out=buf)),
    }
    for bv, nw in ((4096, 8), (2048, 8), (8192, 16), (4096, 16)):
        out[f"rows_kernel_v{bv}_w{nw}"] = k * time_ms(rows_kernel(bv, nw))
    # The repeated row kernels left softmax(softmax(...)) in the buffer, near-constant values, which a GEMM
    # multiplies faster (and at lower power) than real ones: the products below get one pass over real logits.
    torch.mm(hc, w.detach().t(), out=buf)
    rows_kernel(4096, 16)()
    out["dh_gemm"] = k * time_ms(lambda: masked_ce._mm_wide(buf, w.detach()))
    out["dw_gemm_acc"] = k * time_ms(lambda: masked_ce._accumulate(dw, buf.t(), hc, first=False))
    # An fp32 master weight: its bf16 copy once per call, d(weight) summed in float32 (out_dtype, or on the
    # torch-2.7 branch a pass of its own per chunk, over the separate-sum path's larger chunks)
    w32 = w.detach().float()
    out["master_weight_cast"] = time_ms(lambda: w32.to(w.dtype))
    dw32 = torch.zeros_like(w32)
    separate = not masked_ce._has_out_dtype(w.device.type)
    rows32 = masked_ce._chunk_rows(
        num_w, vocab, w.element_size(), cfg, cfg.separate_sum_budget_factor if separate else 1
    )
    k32 = num_w / rows32
    buf32, hc32 = buf, hc
    if rows32 != chunk:
        buf32 = torch.empty(rows32, vocab, dtype=w.dtype, device=w.device)
        hc32 = h.detach()[rows[:rows32]]
    out["master_chunks"] = k32
    out["master_dw_gemm_acc"] = k32 * time_ms(
        lambda: masked_ce._accumulate(dw32, buf32.t(), hc32, first=False)
    )
    sorted_t, order = torch.sort(t[rows], stable=True)
    g_sorted = -torch.rand(num_w, device=w.device)
    out["target_terms"] = time_ms(
        lambda: masked_ce_triton.add_target_terms(
            dw,
            h.detach(),
            sorted_t,
            rows[order],
            g_sorted,
            segment_rows=cfg.segment_rows,
            block_h=cfg.block_h,
        )
    )
    return out


@contextlib.contextmanager
def _branch(name: str) -> Iterator[None]:
    """Runs the body on torch branch `name`: 'torch27' sets COMPOSER_DLM_FORCE_TORCH27=1, 'native' clears it."""
    old = os.environ.get(masked_ce.FORCE_TORCH27_ENV)
    os.environ[masked_ce.FORCE_TORCH27_ENV] = "1" if name == "torch27" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[masked_ce.FORCE_TORCH27_ENV]
        else:
            os.environ[masked_ce.FORCE_TORCH27_ENV] = old


def make_targets(kind: str, rw: torch.Tensor, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Targets (N,): 'uniform' over the vocabulary, or 'sft': SFT_SHARE of the weighted rows on one id (EOS
    padding), the other rows uniform."""
    n = rw.numel()
    t = torch.randint(0, vocab, (n,), device=rw.device, generator=generator)
    if kind == "sft":
        weighted = rw.nonzero().squeeze(1)
        pick = torch.randperm(weighted.numel(), device=rw.device, generator=generator)
        t[weighted[pick[: round(SFT_SHARE * weighted.numel())]]] = vocab // 2
    elif kind != "uniform":
        raise ValueError(f"targets must be 'uniform' or 'sft', not {kind!r}")
    return t


def _config(spec: str) -> KernelConfig:
    """'default' or 'key=value+key=value' over KernelConfig's integer/boolean fields."""
    if spec == "default":
        return KernelConfig()
    fields: dict[
        str, Any
    ] = {}  # keyword arguments named at run time, int or bool by field: no static type fits
    for item in spec.split("+"):
        key, value = item.split("=")
        fields[key] = value.lower() == "true" if value.lower() in ("true", "false") else int(value)
    return KernelConfig(**fields)


def _trace(fn: LossFn, h, w, t, rw) -> dict[str, object]:
    """One profiled step: the CUDA kernels by total time, so the stages and the gaps can be read off; returns the
    kernels' count, span and busy time and the 14 longest kernels (the JSON's ``traces``)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        _step(fn, h, w, t, rw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(fn, h, w, t, rw)
        torch.cuda.synchronize()
    _clear_grads(h, w)
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(events.table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)
            break
        except (AttributeError, KeyError, RuntimeError):
            continue
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not kernels:
        return {"kernels": 0}
    start = min(e.time_range.start for e in kernels)
    end = max(e.time_range.end for e in kernels)
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    print(
        f"trace: {len(kernels)} kernels, span {(end - start) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms",
        flush=True,
    )
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    longest = sorted(by_name.items(), key=lambda item: -item[1])[:14]
    return {
        "kernels": len(kernels),
        "span_ms": (end - start) / 1e3,
        "busy_ms": busy / 1e3,
        "longest_ms": dict(longest),
    }


def _peaked_accuracy(dim: int, vocab: int, n: int, frac: float) -> dict[str, list[float]]:
    """Relative errors (loss, dh, dW) on trained-model-like data: Zipf targets (frequent tokens recur in
    every chunk) and hidden states pointing at their target's row, so the softmax is peaked (p_t ~ 0.5)
    and the non-target probabilities are no longer negligible next to the target terms."""
    g = torch.Generator(device="cuda").manual_seed(dim + 1)
    log_zipf = -1.1 * torch.arange(1, vocab + 1, device="cuda", dtype=torch.float32).log()
    t = torch.multinomial(log_zipf.exp(), n, replacement=True, generator=g)
    u = torch.randn(dim, device="cuda", generator=g)
    u /= u.norm()
    w0 = torch.randn(vocab, dim, device="cuda", generator=g) / dim**0.5
    # Logits = unigram prior (log_zipf along u) + a strong pull towards the target's own row.
    w = (w0 + (log_zipf - log_zipf.mean())[:, None] * u).bfloat16().requires_grad_()
    h = (13.0 * w0[t] + u + torch.randn(n, dim, device="cuda", generator=g) * 0.5).bfloat16().requires_grad_()
    rw = torch.where(torch.rand(n, device="cuda", generator=g) < frac, 1.0, 0.0) / n
    ref = _reference(h, w, t, rw)
    out = {}
    for name, fn in (
        ("ours", _ours(KernelConfig())),
        ("ours_fp32acc", _ours(KernelConfig(fp32_weight_grad=True))),
        ("full_logits", _full_logits),
    ):
        loss = _step(fn, h, w, t, rw)
        out[name] = [_rel(loss.detach(), ref["loss"]), _rel(h.grad, ref["dh"]), _rel(w.grad, ref["dw"])]
    out["mean_ce"] = [ref["loss"].item() / rw.sum().item()]
    return out


def _methods(args: argparse.Namespace, num_w: int) -> list[tuple[str, str, Callable[[], LossFn], str, str]]:
    """(key, label, factory, weighting, branch) of every method asked for; ours once per branch and variant, with
    a bf16 weight (as FSDP gathers it) and with an fp32 master weight under autocast (the unsharded model)."""
    methods: list[tuple[str, str, Callable[[], LossFn], str, str]] = []
    for branch in args.branches.split(","):
        for spec in args.variants.split(","):
            cfg = _config(spec)
            chunk = masked_ce._chunk_rows(num_w, args.vocab, 2, cfg)
            label = "" if spec == "default" else f", {spec}"
            methods.append(
                (
                    f"ours_{spec}",
                    f"ours (C={chunk}{label})",
                    functools.partial(_ours, cfg),
                    "weighted",
                    branch,
                )
            )
            methods.append(
                (
                    f"ours_master_{spec}",
                    f"ours, fp32 master weight under autocast{label}",
                    functools.partial(_ours_master, cfg),
                    "weighted",
                    branch,
                )
            )
        methods.append(
            (
                "ours_fp32acc",
                "ours, float32 dW accumulator",
                lambda: _ours(KernelConfig(fp32_weight_grad=True)),
                "weighted",
                branch,
            )
        )
    methods += [
        ("full", "full logits + F.cross_entropy", lambda: _full_logits, "weighted", "-"),
        ("eager", "masked rows only, eager", lambda: _masked_eager, "weighted", "-"),
        (
            "compile",
            f"torch.compile, chunked over masked rows ({args.compile_chunk})",
            lambda: _compiled_chunked(args.compile_chunk),
            "weighted",
            "-",
        ),
        ("liger", "Liger-Kernel fused linear CE (masked rows)", _liger, "unit", "-"),
        ("cce", "Cut Cross-Entropy (masked rows)", _cce, "unit", "-"),
    ]
    wanted = None if args.methods == "all" else set(args.methods.split(","))
    return [m for m in methods if wanted is None or m[0] in wanted or m[0].split("_")[0] in wanted]


def _library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("liger-kernel", "cut-cross-entropy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main(argv: list[str]) -> None:
    p = ArgumentParser(prog="benchmark.py kernel", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--hidden", type=str, default="4096,2048", help="comma-separated hidden sizes (8B, 1B)")
    p.add_argument("--frac", type=float, default=0.5, help="fraction of rows weighted")
    p.add_argument(
        "--targets", type=str, default="uniform,sft", help="comma-separated: uniform, sft (90%% on one id)"
    )
    p.add_argument(
        "--branches", type=str, default="native,torch27", help="torch branches of ours: native, torch27"
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--idle-reps",
        type=int,
        default=0,
        help="also time each method this many more times, each after --idle-s seconds of idle GPU (the JSON's "
        "ms_after_idle: below the power cap, where back-to-back repetitions run at it)",
    )
    p.add_argument("--idle-s", type=float, default=1.5)
    p.add_argument(
        "--gemm-floor",
        action="store_true",
        help="also time a lone logits product after idle and back to back: the time the three products alone "
        "take at those rates (the JSON's floors)",
    )
    p.add_argument("--compile-chunk", type=int, default=1024)
    p.add_argument(
        "--variants",
        type=str,
        default="default",
        help="comma-separated KernelConfig variants of ours, each 'default' or key=value[+key=value]",
    )
    p.add_argument(
        "--trace",
        action="store_true",
        help="profile one step of ours on each branch, bf16 and fp32 master weight: its CUDA kernels (printed, "
        "and in the JSON's traces)",
    )
    p.add_argument("--methods", type=str, default="all", help="comma-separated subset of method keys")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also time the stages of our kernel on each branch (with an fp32 master weight's too)",
    )
    p.add_argument("--peaked", action="store_true", help="also check accuracy on peaked logits, Zipf targets")
    p.add_argument("--out", type=str, default=None, help="write PATH.md and PATH.json")
    args = p.parse_args(argv)
    for flag, given, allowed in (
        ("--targets", args.targets, TARGETS),
        ("--branches", args.branches, BRANCHES),
    ):
        if not set(given.split(",")) <= set(allowed):
            fail(f"{flag} takes a comma-separated subset of {', '.join(allowed)}, not {given!r}")
    if not torch.cuda.is_available():
        fail(
            "the kernel benchmark needs a CUDA GPU (it times cuBLAS and Triton kernels); run it on a GPU machine"
        )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    n = args.batch * args.seq
    results: list[dict[str, object]] = []
    profiles: dict[str, dict[str, float]] = {}
    traces: dict[str, dict[str, object]] = {}
    floors: dict[str, dict[str, Any]] = {}
    peaked: dict[str, dict[str, list[float]]] = {}
    for dim in (int(x) for x in args.hidden.split(",")):
        g = torch.Generator(device="cuda").manual_seed(dim)
        h = torch.randn(n, dim, device="cuda", generator=g).bfloat16().requires_grad_()
        w = (torch.randn(args.vocab, dim, device="cuda", generator=g) / dim**0.5).bfloat16().requires_grad_()
        order = torch.randperm(n, device="cuda", generator=g)
        rw = torch.zeros(n, device="cuda")
        num_w = int(n * args.frac)
        rw[order[:num_w]] = 1.0 / (torch.rand(num_w, device="cuda", generator=g) * 0.999 + 1e-3) / n
        unit = (rw != 0).float()
        gemm_flops = 6.0 * num_w * args.vocab * dim
        if args.gemm_floor:
            rows = masked_ce._chunk_rows(num_w, args.vocab, 2, KernelConfig())  # our default chunk
            floors[f"H={dim}"] = _gemm_floor(h, w, rows, gemm_flops, args.idle_s)
            print(f"floor H={dim}: {floors[f'H={dim}']}", flush=True)
        for kind in args.targets.split(","):
            t = make_targets(kind, rw, args.vocab, g)
            refs = {"weighted": _reference(h, w, t, rw), "unit": _reference(h, w, t, unit)}
            for key, name, make, weighting, branch in _methods(args, num_w):
                row: dict[str, object] = {
                    "hidden": dim,
                    "targets": kind,
                    "method": name,
                    "branch": branch,
                    "weighting": weighting,
                }
                try:
                    with _branch(branch if branch != "-" else "native"):
                        fn = make()
                        master = key.startswith("ours_master")
                        w_in = w.detach().float().requires_grad_() if master else w
                        inputs = (h, w_in, t, rw if weighting == "weighted" else unit)
                        row.update(
                            _measure(
                                fn,
                                *inputs,
                                refs[weighting],
                                args.reps,
                                args.warmup,
                                args.idle_reps,
                                args.idle_s,
                            )
                        )
                        row["gemm_tflops"] = gemm_flops / (central(row["ms"]) * 1e-3) / 1e12  # type: ignore[arg-type]
                        del w_in, inputs
                except ImportError as e:
                    row["note"] = f"skipped: {e}"
                except Exception as e:  # report and go on: one failing method must not lose the others
                    row["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
                results.append(row)
                print(_format_row(row), flush=True)
                gc.collect()
                torch.cuda.empty_cache()
            if args.profile:
                for branch in args.branches.split(","):
                    with _branch(branch):
                        stages = _profile(h, w, t, rw, KernelConfig())
                    profiles[f"H={dim} {kind} {branch}"] = stages
                    print(
                        f"profile H={dim} {kind} {branch}: "
                        + ", ".join(f"{k}={v:.3f}" for k, v in stages.items()),
                        flush=True,
                    )
            if args.trace:
                w32 = w.detach().float().requires_grad_()
                for branch in args.branches.split(","):
                    with _branch(branch):
                        traces[f"H={dim} {kind} {branch}"] = _trace(_ours(KernelConfig()), h, w, t, rw)
                        traces[f"H={dim} {kind} {branch} master"] = _trace(
                            _ours_master(KernelConfig()), h, w32, t, rw
                        )
                del w32
            del t, refs
        if args.peaked:
            peaked[str(dim)] = _peaked_accuracy(dim, args.vocab, n, args.frac)
            print(f"peaked H={dim}: {peaked[str(dim)]}", flush=True)
        del h, w, rw, unit
        gc.collect()
        torch.cuda.empty_cache()

    env = environment()
    header = (
        f"B*L={n}, V={args.vocab}, {args.frac:.0%} rows weighted, bf16, {env['device']}, "
        f"torch {env['torch']}, Triton {env['triton']}"
    )
    table = _markdown(results)
    print("\n" + header + "\n" + table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
        payload = {
            "benchmark": "kernel",
            "command": "python scripts/benchmark.py kernel " + " ".join(argv),
            "libraries": _library_versions(),
            "header": header,
            "results": results,
            "profiles": profiles,
            "traces": traces,
            "floors": floors,
            "peaked": peaked,
        }
        write_json(out.with_suffix(".json"), payload)


def _format_row(row: dict[str, object]) -> str:
    what = f"H={row['hidden']} {row['targets']} {row['method']} [{row['branch']}]"
    if "ms" not in row:
        return f"{what}: {row.get('note')}"
    ms = fmt(row["ms"], ".2f")  # type: ignore[arg-type]  # a repeats record (a float in older files)
    return (
        f"{what}: {ms} ms, {row['gemm_tflops']:.0f} TFLOP/s, {row['transient_gib']:.3f} GiB, "
        f"err loss {row['err_loss']:.1e} dh {row['err_dh']:.1e} dw {row['err_dw']:.1e}"
    )


def _markdown(results: list[dict[str, object]]) -> str:
    lines = [
        "| H | targets | method | torch branch | ms | GEMM TFLOP/s | transient GiB | rel err loss | rel err dh "
        "| rel err dW | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        what = f"| {r['hidden']} | {r['targets']} | {r['method']} | {r['branch']} |"
        if "ms" in r:
            ms = fmt(r["ms"], ".2f")  # type: ignore[arg-type]
            lines.append(
                f"{what} {ms} | {r['gemm_tflops']:.0f} | {r['transient_gib']:.3f} | "
                f"{r['err_loss']:.1e} | {r['err_dh']:.1e} | {r['err_dw']:.1e} | |"
            )
        else:
            lines.append(f"{what} | | | | | | {r.get('note', '')} |")
    return "\n".join(lines)
