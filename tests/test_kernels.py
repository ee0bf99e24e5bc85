"""Fused masked linear cross-entropy against independent references.

CPU: the Triton kernels run in the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU), in fp32
and fp16 at awkward sizes, against a float64 full-logits oracle. GPU (`-m gpu`): bf16 against a float32
reference at the issue's tolerances, the 8B shape's memory, and torch.compile / checkpointing on CUDA.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import (
    KernelConfig,
    masked_ce,
    masked_linear_cross_entropy,
    masked_linear_cross_entropy_reference,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")

# Tiny tiles, chunks and target-term segments so the interpreter covers partial vocabulary tiles, several
# row chunks, and runs of equal targets that cross segments.
TINY = KernelConfig(block_v=32, block_h=16, row_block_h=16, num_warps=1, max_chunk_rows=4, segment_rows=3)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    den = ref.norm().item()
    err = (x.double() - ref).norm().item()
    return err / den if den > 0 else err


def _oracle(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, rw: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 full logits + log_softmax, gradients by autograd."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    logits = h64 @ w64.T
    ce = -torch.log_softmax(logits, dim=-1).gather(1, t.long()[:, None]).squeeze(1)
    loss = (rw.double() * ce).sum()
    loss.backward()
    weighted = rw != 0
    return {
        "loss": loss.detach(),
        "dh": h64.grad,
        "dw": w64.grad,
        "ce": torch.where(weighted, ce.detach(), 0.0),
        "correct": (logits.argmax(-1) == t) & weighted,
        "logits": logits.detach(),
    }


def _inputs(
    n: int,
    dim: int,
    vocab: int,
    frac: float,
    dtype: torch.dtype,
    seed: int,
    device: str = "cpu",
    num_targets: int | None = None,
):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g).to(device, dtype)
    w = (torch.randn(vocab, dim, generator=g) / dim**0.5 * 2).to(device, dtype)
    t = torch.randint(0, num_targets or vocab, (n,), generator=g).to(device)
    # Weights like the diffusion loss: 1 / p_mask on masked rows, 0 elsewhere.
    rw = torch.where(torch.rand(n, generator=g) < frac, 1 / torch.rand(n, generator=g).clamp_min(0.05), 0.0)
    return h.requires_grad_(), w.requires_grad_(), t, rw.to(device)


def _run(fn, h, w, t, rw, **kw):
    loss, ce, correct = fn(h, w, t, rw, return_stats=True, **kw)
    loss.backward()
    return loss, ce, correct, h.grad, w.grad


def _check(out, ref, tol: float) -> None:
    loss, ce, correct, dh, dw = out
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert ce.dtype == torch.float32 and correct.dtype == torch.bool
    assert _rel(loss, ref["loss"]) <= tol
    assert dh is not None and dw is not None
    assert _rel(dh, ref["dh"]) <= tol and _rel(dw, ref["dw"]) <= tol
    assert _rel(ce, ref["ce"]) <= tol
    # Correctness must agree wherever the top two logits are not a near tie.
    top2 = ref["logits"].topk(min(2, ref["logits"].shape[1]), dim=-1).values
    clear = (top2[:, 0] - top2[:, -1]) > 1e-4 if top2.shape[1] > 1 else torch.ones_like(correct)
    assert torch.equal(correct[clear.cpu()].cpu(), ref["correct"][clear].cpu())


CASES = [  # n, dim, vocab, weighted fraction, number of distinct targets (None: whole vocabulary)
    pytest.param(0, 8, 37, 1.0, None, id="N=0"),
    pytest.param(1, 8, 37, 1.0, None, id="N=1"),
    pytest.param(9, 24, 101, 1.0, None, id="all-weighted"),
    pytest.param(9, 24, 101, 0.0, None, id="none-weighted"),
    pytest.param(17, 20, 259, 0.5, 6, id="half-repeated-targets"),
    pytest.param(6, 12, 23, 0.7, None, id="V<block"),
]


@pytest.mark.parametrize(("n", "dim", "vocab", "frac", "num_targets"), CASES)
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_fp32_matches_float64(
    impl: str, n: int, dim: int, vocab: int, frac: float, num_targets: int | None
) -> None:
    h, w, t, rw = _inputs(n, dim, vocab, frac, torch.float32, seed=n + vocab, num_targets=num_targets)
    ref = _oracle(h, w, t, rw)
    if impl == "triton":
        out = _run(masked_linear_cross_entropy, h, w, t, rw, config=TINY)
    else:
        out = _run(masked_linear_cross_entropy_reference, h, w, t, rw, chunk_rows=4)
    _check(out, ref, 1e-5)
    assert torch.all(out[3][rw == 0] == 0)


def _sft_targets(n: int, vocab: int, rw: torch.Tensor, share: float, seed: int) -> torch.Tensor:
    """Targets where `share` of the weighted rows point at one id (EOS padding in SFT), the rest uniform."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, vocab, (n,), generator=g)
    eos = vocab // 3
    weighted = (rw.cpu() != 0).nonzero().squeeze(1)
    on_eos = weighted[torch.randperm(weighted.numel(), generator=g)[: round(share * weighted.numel())]]
    t[on_eos] = eos
    return t.to(rw.device)


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [pytest.param(torch.float32, 1e-5, id="fp32"), pytest.param(torch.float16, 2e-3, id="fp16")],
)
def test_sft_shaped_targets_match_float64(dtype: torch.dtype, tol: float) -> None:
    """90% of the weighted rows on one target: that run spans many segments of the target-term pass."""
    h, w, _, rw = _inputs(150, 20, 67, 0.7, dtype, seed=21)
    t = _sft_targets(150, 67, rw, 0.9, seed=21)
    assert (t[rw != 0] == 67 // 3).float().mean().item() >= 0.89
    out = _run(masked_linear_cross_entropy, h, w, t, rw, config=dataclasses.replace(TINY, max_chunk_rows=16))
    _check(out, _oracle(h, w, t, rw), tol)


def _target_terms_case(num_rows: int, dim: int, vocab: int, kind: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        t = torch.randint(0, vocab, (num_rows,), generator=g)
    elif kind == "one":
        t = torch.full((num_rows,), vocab - 1)
    elif kind == "sft":
        t = torch.where(
            torch.rand(num_rows, generator=g) < 0.9, 2, torch.randint(0, vocab, (num_rows,), generator=g)
        )
    else:  # runs of equal length, each exactly one segment of 4 rows or several
        t = torch.arange(num_rows) // 8
    hidden = torch.randn(num_rows + 3, dim, generator=g)
    rows = torch.randperm(num_rows + 3, generator=g)[:num_rows]
    coef = -torch.rand(num_rows, generator=g)
    return t, hidden, rows, coef


@pytest.mark.parametrize("kind", ["uniform", "one", "sft", "aligned"])
@pytest.mark.parametrize("segment_rows", [2, 4, 5, 64])
def test_target_terms_pass_matches_index_add(kind: str, segment_rows: int) -> None:
    """The two-pass segmented sum against a float64 index_add, and bitwise equal run to run."""
    from kernels import masked_ce_triton

    t, hidden, rows, coef = _target_terms_case(61, 20, 13, kind, seed=segment_rows)
    sorted_t, order = torch.sort(t, stable=True)
    start = torch.randn(13, 20, generator=torch.Generator().manual_seed(5))
    want = start.double().index_add(0, t, coef.double()[:, None] * hidden.double()[rows])
    outs = []
    for _ in range(2):
        dw = start.clone()
        masked_ce_triton.add_target_terms(
            dw, hidden, sorted_t, rows[order], coef[order], segment_rows=segment_rows, block_h=16
        )
        outs.append(dw)
    assert _rel(outs[0], want) <= 1e-6
    assert torch.equal(outs[0], outs[1])


def test_forced_torch27_branch_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPOSER_DLM_FORCE_TORCH27=1 turns off matmul out_dtype even where the probe finds it, and benchmarks
    record the switch."""
    from composer_dlm.benchmarks import environment

    monkeypatch.setattr(masked_ce, "_probe_out_dtype", lambda device_type: True)
    monkeypatch.delenv(masked_ce.FORCE_TORCH27_ENV, raising=False)
    assert masked_ce._has_out_dtype("cuda") and not environment()["torch27_branch_forced"]
    monkeypatch.setenv(masked_ce.FORCE_TORCH27_ENV, "1")
    assert not masked_ce._has_out_dtype("cuda") and environment()["torch27_branch_forced"]
    monkeypatch.setenv(masked_ce.FORCE_TORCH27_ENV, "0")
    assert masked_ce._has_out_dtype("cuda")


def test_split_dh_product_matches_float64() -> None:
    h, w, t, rw = _inputs(13, 12, 259, 0.6, torch.float32, seed=4)
    out = _run(masked_linear_cross_entropy, h, w, t, rw, config=dataclasses.replace(TINY, dh_split=7))
    _check(out, _oracle(h, w, t, rw), 1e-5)


@pytest.mark.parametrize("fp32_weight_grad", [False, True])
def test_fp16_matches_float64(fp32_weight_grad: bool) -> None:
    h, w, t, rw = _inputs(11, 16, 77, 0.6, torch.float16, seed=3)
    cfg = dataclasses.replace(TINY, fp32_weight_grad=fp32_weight_grad)
    out = _run(masked_linear_cross_entropy, h, w, t, rw, config=cfg)
    assert out[3].dtype == torch.float16 and out[4].dtype == torch.float16
    _check(out, _oracle(h, w, t, rw), 2e-3)


@pytest.mark.parametrize("fp32_weight_grad", [False, True])
def test_no_weighted_rows_give_zero_gradients_in_input_dtypes(fp32_weight_grad: bool) -> None:
    cfg = dataclasses.replace(TINY, fp32_weight_grad=fp32_weight_grad)
    h, w, t, rw = _inputs(6, 8, 19, 0.0, torch.float16, seed=12)
    out = _run(masked_linear_cross_entropy, h, w, t, rw, config=cfg)
    assert out[3].dtype == torch.float16 and out[4].dtype == torch.float16
    h, w, t, _ = _inputs(6, 8, 19, 0.0, torch.float32, seed=12)
    h = h.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        master = _run(masked_linear_cross_entropy, h, w, t, rw, config=cfg)
    assert master[3].dtype == torch.bfloat16 and master[4].dtype == torch.float32
    for loss, ce, correct, dh, dw in (out, master):
        assert loss.item() == 0 and not ce.any() and not correct.any()
        assert dh.shape == (6, 8) and dw.shape == (19, 8) and not dh.any() and not dw.any()


def test_autocast_bf16_with_fp32_master_weight() -> None:
    h, w, t, rw = _inputs(10, 16, 53, 0.6, torch.float32, seed=5)
    h = h.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _run(masked_linear_cross_entropy, h, w, t, rw, config=TINY)
    assert out[3].dtype == torch.bfloat16 and out[4].dtype == torch.float32
    # The oracle sees the operands autocast computes with: bf16 values, float64 arithmetic.
    ref = _oracle(h, w.detach().bfloat16(), t, rw)
    assert _rel(out[0], ref["loss"]) <= 5e-3
    assert _rel(out[3], ref["dh"]) <= 1e-2 and _rel(out[4], ref["dw"]) <= 1e-2


def test_grad_output_scales_gradients() -> None:
    h, w, t, rw = _inputs(7, 8, 29, 0.8, torch.float32, seed=7)
    (2.5 * masked_linear_cross_entropy(h, w, t, rw, config=TINY)).backward()
    ref = _oracle(h, w, t, rw)
    assert _rel(h.grad, 2.5 * ref["dh"]) <= 1e-5 and _rel(w.grad, 2.5 * ref["dw"]) <= 1e-5


def test_no_grad_forward_and_single_backward() -> None:
    h, w, t, rw = _inputs(7, 8, 29, 0.8, torch.float32, seed=8)
    ref = _oracle(h, w, t, rw)
    with torch.no_grad():
        assert _rel(masked_linear_cross_entropy(h, w, t, rw, config=TINY), ref["loss"]) <= 1e-5
    loss = masked_linear_cross_entropy(h, w, t, rw, config=TINY)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


class _Head(torch.nn.Module):
    """A trunk layer whose output feeds the fused loss, as the model calls it."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(dim, dim)
        self.out = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, rw: torch.Tensor) -> torch.Tensor:
        return masked_linear_cross_entropy(F.gelu(self.trunk(x)), self.out.weight, t, rw, config=TINY)


def _grads(model: torch.nn.Module, loss: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_under_torch_compile_and_checkpoint() -> None:
    torch.manual_seed(0)
    model = _Head(12, 41)
    x = torch.randn(9, 12)
    t = torch.randint(0, 41, (9,))
    rw = torch.rand(9) * (torch.rand(9) < 0.6)
    eager = _grads(model, model(x, t, rw))
    compiled = torch.compile(model, backend="aot_eager")
    for got in (
        _grads(model, compiled(x, t, rw)),
        _grads(model, checkpoint(model, x, t, rw, use_reentrant=False)),
    ):
        for a, b in zip(got, eager, strict=True):
            assert _rel(a, b) <= 1e-6


def test_dispatch_without_interpreter_uses_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return masked_linear_cross_entropy_reference(*args, **kwargs)

    monkeypatch.setattr(masked_ce, "masked_linear_cross_entropy_reference", spy)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    h, w, t, rw = _inputs(5, 8, 19, 1.0, torch.float32, seed=9)
    loss = masked_linear_cross_entropy(h, w, t, rw)
    assert calls and _rel(loss, _oracle(h, w, t, rw)["loss"]) <= 1e-5


def test_bad_shapes_raise() -> None:
    h, w, t, rw = _inputs(5, 8, 19, 1.0, torch.float32, seed=10)
    with pytest.raises(ValueError):
        masked_linear_cross_entropy(h, w[:, :4], t, rw)
    with pytest.raises(ValueError):
        masked_linear_cross_entropy(h, w, t[:3], rw)
    with pytest.raises(ValueError):
        masked_linear_cross_entropy(h, w.double(), t, rw)


# ---------------------------------------------------------------------------------------------- GPU


def _fp32_reference(h, w, t, rw):
    """Gradients of the plain-PyTorch reference run in float32 on upcast copies of the inputs."""
    h32 = h.detach().float().requires_grad_()
    w32 = w.detach().float().requires_grad_()
    loss, ce, correct = masked_linear_cross_entropy_reference(h32, w32, t, rw, return_stats=True)
    loss.backward()
    return {"loss": loss.detach(), "dh": h32.grad, "dw": w32.grad, "ce": ce, "correct": correct}


def _gpu_check(
    n: int,
    dim: int,
    vocab: int,
    weight_dtype: torch.dtype,
    max_transient_gib: float | None = None,
    sft: bool = False,
):
    torch.backends.cuda.matmul.allow_tf32 = False
    h, w, t, rw = _inputs(n, dim, vocab, 0.5, torch.bfloat16, seed=11, device="cuda")
    if sft:
        t = _sft_targets(n, vocab, rw, 0.9, seed=11)
    w = w.detach().to(weight_dtype).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, ce, correct = masked_linear_cross_entropy(h, w, t, rw, return_stats=True)
    loss.backward()
    torch.cuda.synchronize()
    outputs = sum(x.numel() * x.element_size() for x in (h.grad, w.grad, loss, ce, correct))
    transient = (torch.cuda.max_memory_allocated() - base - outputs) / 2**30
    assert w.grad.dtype == weight_dtype and h.grad.dtype == torch.bfloat16
    ref = _fp32_reference(h, w.detach().bfloat16(), t, rw)
    errs = {k: _rel(v, ref[k]) for k, v in (("loss", loss), ("dh", h.grad), ("dw", w.grad), ("ce", ce))}
    print(f"n={n} H={dim} V={vocab} weight={weight_dtype} errors={errs} transient={transient:.3f} GiB")
    assert errs["loss"] <= 1e-4 and errs["ce"] <= 1e-3
    assert errs["dh"] <= 2e-3 and errs["dw"] <= 2e-3
    agree = (correct == ref["correct"]).float().mean().item()
    assert agree >= 0.999
    if max_transient_gib is not None:
        assert transient <= max_transient_gib
    return h.grad, w.grad


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_gpu_bf16_matches_fp32_reference(weight_dtype: torch.dtype) -> None:
    _gpu_check(6000, 1024, 50021, weight_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_gpu_torch27_branch_matches_fp32_reference(
    monkeypatch: pytest.MonkeyPatch, weight_dtype: torch.dtype
) -> None:
    """COMPOSER_DLM_FORCE_TORCH27=1 takes the pinned torch's branches (no matmul out_dtype) on a newer torch."""
    monkeypatch.setenv(masked_ce.FORCE_TORCH27_ENV, "1")
    assert not masked_ce._has_out_dtype("cuda")
    _gpu_check(6000, 1024, 50021, weight_dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("branch", ["native", "torch27"])
def test_gpu_sft_shaped_targets_accurate_and_deterministic(
    monkeypatch: pytest.MonkeyPatch, branch: str
) -> None:
    """90% of the weighted rows on one target: bf16 against the float32 reference, bitwise equal run to run."""
    monkeypatch.setenv(masked_ce.FORCE_TORCH27_ENV, "1" if branch == "torch27" else "0")
    first = _gpu_check(8192, 1024, 50021, torch.bfloat16, sft=True)
    second = _gpu_check(8192, 1024, 50021, torch.bfloat16, sft=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.gpu
def test_gpu_8b_shape_accuracy_and_memory() -> None:
    """Transient memory: the (2048, 126464) bf16 buffer (494 MiB) plus O(C·H) gathers and products."""
    _gpu_check(4 * 4096, 4096, 126464, torch.bfloat16, max_transient_gib=0.6)


@pytest.mark.gpu
def test_gpu_compile_and_checkpoint() -> None:
    torch.manual_seed(0)
    model = _Head(256, 5003).cuda()
    x = torch.randn(300, 256, device="cuda")
    t = torch.randint(0, 5003, (300,), device="cuda")
    rw = torch.rand(300, device="cuda") * (torch.rand(300, device="cuda") < 0.5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = _grads(model, model(x, t, rw))
        compiled = _grads(model, torch.compile(model)(x, t, rw))
        ckpt = _grads(model, checkpoint(model, x, t, rw, use_reentrant=False))
    for got in (compiled, ckpt):
        for a, b in zip(got, eager, strict=True):
            assert _rel(a, b) <= 1e-2


def test_separate_float32_sum_takes_fewer_larger_chunks() -> None:
    """8192 weighted rows, V 126464, bf16: the 512 MiB budget holds 2122 rows, so 4 chunks of 2048 (aligned to
    1024); where d(weight)'s float32 sum is a pass of its own per chunk, 2x the budget holds 4245 rows: 2 chunks
    of 4096, so 2 passes over the sum instead of 4. The previous 448 MiB budget held 1857 rows: 8 chunks of 1024."""
    cfg = KernelConfig()
    assert masked_ce._chunk_rows(8192, 126464, 2, cfg) == 2048
    assert masked_ce._chunk_rows(8192, 126464, 2, cfg, cfg.separate_sum_budget_factor) == 4096
    assert masked_ce._chunk_rows(8192, 126464, 2, KernelConfig(chunk_bytes=448 << 20)) == 1024
