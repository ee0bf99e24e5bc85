"""Benchmark of the fused masked cross-entropy: `python scripts/benchmark.py kernel [--out PATH] ...`.

One GPU, one run, every method on the same inputs: B*L rows of bf16 hidden, a bf16 (V, H) weight, half
the rows weighted (1 / p_mask-like weights). For each shape and method: median ms of forward + backward,
transient memory (peak allocated minus inputs and outputs: loss and the two gradients), and relative
errors of the loss and both gradients against the float32 reference (kernels.masked_ce_reference on
upcast copies, TF32 off). Liger-Kernel and Cut Cross-Entropy have no per-row weights: they get the
weighted rows with unit weights, and their errors are taken against the unit-weight reference.
Writes the table as markdown and JSON (PATH with .md and .json suffixes) when --out is given.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kernels import (
    KernelConfig,
    masked_ce,
    masked_linear_cross_entropy,
    masked_linear_cross_entropy_reference,
)

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


def _step(fn: LossFn, h, w, t, rw) -> torch.Tensor:
    """One forward + backward from cleared gradients; returns the loss."""
    h.grad = None
    w.grad = None
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


def _measure(fn: LossFn, h, w, t, rw, ref, reps: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        _step(fn, h, w, t, rw)
    times = []
    for _ in range(reps):
        h.grad = None  # cleared outside the timed region
        w.grad = None
        times.append(_cuda_ms(lambda: fn(h, w, t, rw).backward()))
    h.grad = None
    w.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = _step(fn, h, w, t, rw)
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - base - _nbytes(loss, h.grad, w.grad)
    out = {
        "ms": statistics.median(times),
        "transient_gib": transient / 2**30,
        "err_loss": _rel(loss.detach(), ref["loss"]),
        "err_dh": _rel(h.grad, ref["dh"]),
        "err_dw": _rel(w.grad, ref["dw"]),
    }
    h.grad = None
    w.grad = None
    return out


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

    def rows_kernel(block_v: int, warps: int) -> Callable[[], object]:
        return lambda: masked_ce._softmax_grad_rows_kernel[(chunk,)](
            buf,
            buf.stride(0),
            tc,
            wc,
            aux[0],
            aux[1],
            aux[2],
            vocab,
            WRITE_GRAD=True,
            BLOCK_V=block_v,
            num_warps=warps,
        )

    k = num_w / chunk
    out = {
        "chunk_rows": float(chunk),
        "logits_gemm": k * time_ms(lambda: torch.mm(hc, w.detach().t(), out=buf)),
    }
    for bv, nw in ((4096, 8), (2048, 8), (8192, 16), (4096, 16)):
        out[f"rows_kernel_v{bv}_w{nw}"] = k * time_ms(rows_kernel(bv, nw))
    out["dh_gemm"] = k * time_ms(lambda: masked_ce._mm_f32(buf, w.detach()))
    out["dw_gemm_acc"] = k * time_ms(lambda: masked_ce._accumulate(dw, buf.t(), hc, first=False))
    return out


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


def _trace(fn: LossFn, h, w, t, rw) -> None:
    """One profiled step: the CUDA kernels by total time, so the stages and the gaps can be read off."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        _step(fn, h, w, t, rw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _step(fn, h, w, t, rw)
        torch.cuda.synchronize()
    h.grad = None
    w.grad = None
    events = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            print(events.table(sort_by=key, row_limit=14, max_name_column_width=60), flush=True)
            break
        except (AttributeError, KeyError, RuntimeError):
            continue
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if kernels:
        start = min(e.time_range.start for e in kernels)
        end = max(e.time_range.end for e in kernels)
        busy = sum(e.time_range.elapsed_us() for e in kernels)
        print(
            f"trace: {len(kernels)} kernels, span {(end - start) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms",
            flush=True,
        )


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


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="benchmark.py kernel", description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=126464)
    p.add_argument("--hidden", type=str, default="4096,2048", help="comma-separated hidden sizes (8B, 1B)")
    p.add_argument("--frac", type=float, default=0.5, help="fraction of rows weighted")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile-chunk", type=int, default=1024)
    p.add_argument(
        "--variants",
        type=str,
        default="default",
        help="comma-separated KernelConfig variants of ours, each 'default' or key=value[+key=value]",
    )
    p.add_argument(
        "--trace", action="store_true", help="print the CUDA kernels of one step of ours (profiler)"
    )
    p.add_argument("--methods", type=str, default="all", help="comma-separated subset of method keys")
    p.add_argument("--profile", action="store_true", help="also time the stages of our kernel")
    p.add_argument("--peaked", action="store_true", help="also check accuracy on peaked logits, Zipf targets")
    p.add_argument("--out", type=str, default=None, help="write PATH.md and PATH.json")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the kernel benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    n = args.batch * args.seq
    results: list[dict[str, object]] = []
    profiles: dict[str, dict[str, float]] = {}
    peaked: dict[str, dict[str, list[float]]] = {}
    for dim in (int(x) for x in args.hidden.split(",")):
        g = torch.Generator(device="cuda").manual_seed(dim)
        h = torch.randn(n, dim, device="cuda", generator=g).bfloat16().requires_grad_()
        w = (torch.randn(args.vocab, dim, device="cuda", generator=g) / dim**0.5).bfloat16().requires_grad_()
        t = torch.randint(0, args.vocab, (n,), device="cuda", generator=g)
        order = torch.randperm(n, device="cuda", generator=g)
        rw = torch.zeros(n, device="cuda")
        num_w = int(n * args.frac)
        rw[order[:num_w]] = 1.0 / (torch.rand(num_w, device="cuda", generator=g) * 0.999 + 1e-3) / n
        unit = (rw != 0).float()
        refs = {"weighted": _reference(h, w, t, rw), "unit": _reference(h, w, t, unit)}

        methods: list[tuple[str, str, Callable[[], LossFn], str]] = []
        for spec in args.variants.split(","):
            cfg = _config(spec)
            chunk = masked_ce._chunk_rows(num_w, args.vocab, 2, cfg)
            label = "" if spec == "default" else f", {spec}"
            methods.append(
                (f"ours_{spec}", f"ours (C={chunk}{label})", functools.partial(_ours, cfg), "weighted")
            )
        methods += [
            (
                "ours_fp32acc",
                "ours, float32 dW accumulator",
                lambda: _ours(KernelConfig(fp32_weight_grad=True)),
                "weighted",
            ),
            (
                "ours_master",
                "ours, fp32 master weight under autocast",
                lambda: _ours_master(KernelConfig()),
                "weighted",
            ),
            ("full", "full logits + F.cross_entropy", lambda: _full_logits, "weighted"),
            ("eager", "masked rows only, eager", lambda: _masked_eager, "weighted"),
            (
                "compile",
                f"torch.compile, chunked over masked rows ({args.compile_chunk})",
                lambda: _compiled_chunked(args.compile_chunk),
                "weighted",
            ),
            ("liger", "Liger-Kernel fused linear CE (masked rows)", _liger, "unit"),
            ("cce", "Cut Cross-Entropy (masked rows)", _cce, "unit"),
        ]
        wanted = None if args.methods == "all" else set(args.methods.split(","))
        for key, name, make, weighting in methods:
            if wanted is not None and key not in wanted and key.split("_")[0] not in wanted:
                continue
            row: dict[str, object] = {"hidden": dim, "method": name, "weighting": weighting}
            try:
                fn = make()
                w_in = w
                if key == "ours_master":
                    w_in = w.detach().float().requires_grad_()
                row.update(
                    _measure(
                        fn,
                        h,
                        w_in,
                        t,
                        rw if weighting == "weighted" else unit,
                        refs[weighting],
                        args.reps,
                        args.warmup,
                    )
                )
                del w_in
            except ImportError as e:
                row["note"] = f"skipped: {e}"
            except Exception as e:  # report and go on: one failing method must not lose the others
                row["note"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            results.append(row)
            print(_format_row(row), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
        if args.peaked:
            peaked[str(dim)] = _peaked_accuracy(dim, args.vocab, n, args.frac)
            print(f"peaked H={dim}: {peaked[str(dim)]}", flush=True)
        if args.trace:
            _trace(_ours(KernelConfig()), h, w, t, rw)
        if args.profile:
            profiles[str(dim)] = _profile(h, w, t, rw, KernelConfig())
            print(
                f"profile H={dim}: " + ", ".join(f"{k}={v:.2f}" for k, v in profiles[str(dim)].items()),
                flush=True,
            )
        del h, w, t, rw, unit, refs
        gc.collect()
        torch.cuda.empty_cache()

    header = (
        f"B*L={n}, V={args.vocab}, {args.frac:.0%} rows weighted, bf16, {torch.cuda.get_device_name()}, "
        f"torch {torch.__version__}"
    )
    table = _markdown(results)
    print("\n" + header + "\n" + table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
        out.with_suffix(".json").write_text(
            json.dumps(
                {"header": header, "results": results, "profiles": profiles, "peaked": peaked}, indent=1
            )
        )


def _format_row(row: dict[str, object]) -> str:
    if "ms" not in row:
        return f"H={row['hidden']} {row['method']}: {row.get('note')}"
    return (
        f"H={row['hidden']} {row['method']}: {row['ms']:.2f} ms, {row['transient_gib']:.3f} GiB, "
        f"err loss {row['err_loss']:.1e} dh {row['err_dh']:.1e} dw {row['err_dw']:.1e}"
    )


def _markdown(results: list[dict[str, object]]) -> str:
    lines = [
        "| H | method | ms | transient GiB | rel err loss | rel err dh | rel err dW | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "ms" in r:
            lines.append(
                f"| {r['hidden']} | {r['method']} | {r['ms']:.2f} | {r['transient_gib']:.3f} | "
                f"{r['err_loss']:.1e} | {r['err_dh']:.1e} | {r['err_dw']:.1e} | |"
            )
        else:
            lines.append(f"| {r['hidden']} | {r['method']} | | | | | | {r.get('note', '')} |")
    return "\n".join(lines)
