"""The grouped GEMM (kernels.grouped_mm, kernels.grouped_mm_triton): output and both gradients against the
per-expert reference and against a gather formulation written here, over awkward group layouts.

CPU tests run the Triton kernels in the interpreter in float32 (tests/conftest.py sets TRITON_INTERPRET=1), with
tiles smaller than the shapes so that every loop, partial tile and spare program runs. GPU tests check bf16 at
LLaDA-MoE-7B-A1B's expert shape, that nothing waits for the host, and torch.compile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch

from composer_dlm.benchmarks.moe import routed_groups
from kernels.grouped_mm import GROUP_ALIGN, grouped_mm, grouped_mm_reference

triton_kernels = pytest.importorskip("kernels.grouped_mm_triton")


def gathered_product(x_MK: torch.Tensor, w_ENK: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """y[r] = x[r] @ w[expert of r].T with each row's expert found by searchsorted; zero past the last group."""
    rows = torch.arange(x_MK.shape[0], device=x_MK.device)
    expert_M = torch.searchsorted(ends_E, rows, right=True)
    inside = expert_M < w_ENK.shape[0]
    w_MNK = w_ENK[expert_M.clamp(max=w_ENK.shape[0] - 1)]
    return torch.einsum("mk,mnk->mn", x_MK, w_MNK) * inside[:, None]


def padded_ends(sizes: list[int], align: int) -> torch.Tensor:
    """Group ends for groups of these sizes, each padded up to a multiple of ``align`` rows."""
    return torch.tensor([-(-s // align) * align for s in sizes]).cumsum(0)


# (group sizes, alignment, rows): uneven sizes, empty groups (first, middle, last, all), one-row groups padded
# to GROUP_ALIGN, groups larger than a tile, unaligned sizes, padding rows past the last group, E not a power of 2.
LAYOUTS = [
    ([20, 0, 45, 33], GROUP_ALIGN, 180),
    ([1, 1, 0, 1], GROUP_ALIGN, 64),
    ([0, 70, 3, 0], GROUP_ALIGN, 112),
    ([0, 0, 0, 0], GROUP_ALIGN, 40),
    ([7, 33, 1, 50], 1, 100),
    ([64, 0, 0, 37], 1, 101),
    ([3, 0, 17, 16, 40], GROUP_ALIGN, 150),  # E = 5: the kernel's expert vector has masked lanes
]


def make_inputs(
    sizes: list[int], align: int, rows: int, k: int = 32, n: int = 48, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ends = padded_ends(sizes, align)
    assert int(ends[-1]) <= rows
    x = torch.randn(rows, k, generator=gen)
    for e, size in enumerate(sizes):  # padding rows inside a group are zeros, as the MoE layer writes them
        start = 0 if e == 0 else int(ends[e - 1])
        x[start + size : int(ends[e])] = 0
    w = torch.randn(len(sizes), n, k, generator=gen) / k**0.5
    return x, w, ends


@pytest.mark.parametrize(("sizes", "align", "rows"), LAYOUTS)
def test_forward_and_gradients_match_both_references(sizes: list[int], align: int, rows: int) -> None:
    x, w, ends = make_inputs(sizes, align, rows)
    probe = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(1))

    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = triton_kernels.grouped_mm(x1, w1, ends)
    dx, dw = torch.autograd.grad((y * probe).sum(), [x1, w1])

    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    y_gather = gathered_product(x2, w2, ends)
    dx_gather, dw_gather = torch.autograd.grad((y_gather * probe).sum(), [x2, w2])

    torch.testing.assert_close(y, y_gather)
    torch.testing.assert_close(dx, dx_gather)
    torch.testing.assert_close(dw, dw_gather)
    torch.testing.assert_close(y, grouped_mm_reference(x, w, ends))
    assert not y[int(ends[-1]) :].any() and not dx[int(ends[-1]) :].any()  # the rows past the last group
    for e, size in enumerate(sizes):
        if size == 0:
            assert not dw[e].any()  # an empty group: zero gradient, exactly


def test_rows_past_the_last_group_are_not_read_and_come_out_zero() -> None:
    """NaN in the padding rows past the last group (inputs and d(y)) reaches no result, and those rows of y
    and d(x) are written as zeros. Deterministic mode fills new empty tensors with NaN, so an output row the
    kernel left unwritten would show."""
    x, w, ends = make_inputs([20, 0, 45, 33], GROUP_ALIGN, 180)
    used = int(ends[-1])
    x[used:] = float("nan")
    probe = torch.randn(180, 48)
    probe[used:] = float("nan")
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.empty(4).isnan().all()  # the fill this test relies on
        y = triton_kernels.grouped_mm_forward(x, w, ends)
        dw = triton_kernels.grouped_mm_weight_grad(probe, x, ends)
        dx = triton_kernels.grouped_mm_forward(probe, w.transpose(1, 2), ends)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    assert not y[used:].any() and not dx[used:].any()
    torch.testing.assert_close(y[:used], gathered_product(x[:used], w, ends))
    torch.testing.assert_close(dx[:used], gathered_product(probe[:used], w.transpose(1, 2), ends))
    starts = [0, *ends[:-1].tolist()]
    expected_dw = torch.stack([probe[s:e].T @ x[s:e] for s, e in zip(starts, ends.tolist(), strict=True)])
    torch.testing.assert_close(dw, expected_dw)


def test_strided_operands() -> None:
    """Non-contiguous x and w (a column slice, a transposed weight) and d(y) (``sum()``'s expanded gradient,
    stride 0) are read through their strides."""
    x, w, ends = make_inputs([20, 0, 45, 33], GROUP_ALIGN, 180, k=40, n=48)
    x_view = torch.cat([x, torch.randn(180, 8)], dim=1)[:, :40].requires_grad_()
    w_view = w.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    y = triton_kernels.grouped_mm(x_view, w_view, ends)
    torch.testing.assert_close(y, gathered_product(x, w, ends))
    dx, dw = torch.autograd.grad(y.sum(), [x_view, w_view])
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    dx_gather, dw_gather = torch.autograd.grad(gathered_product(x2, w2, ends).sum(), [x2, w2])
    torch.testing.assert_close(dx, dx_gather)
    torch.testing.assert_close(dw, dw_gather)


def test_compiles_into_one_graph_with_its_backward() -> None:
    """Under torch.compile with fullgraph=True (no graph break allowed) output and gradients are eager's."""
    x, w, ends = make_inputs([20, 0, 45, 33], GROUP_ALIGN, 180)

    def block(x_MK: torch.Tensor, w_ENK: torch.Tensor) -> torch.Tensor:
        return triton_kernels.grouped_mm(torch.relu(x_MK), w_ENK, ends).square().sum()

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (block, compiled):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(xr, wr)
        results.append((loss, *torch.autograd.grad(loss, [xr, wr])))
    for eager, comp in zip(*results, strict=True):
        torch.testing.assert_close(comp, eager)


def test_dispatch_checks_shapes_and_takes_the_reference_on_cpu() -> None:
    x, w, ends = make_inputs([20, 0, 45, 33], GROUP_ALIGN, 180)
    torch.testing.assert_close(grouped_mm(x, w, ends), gathered_product(x, w, ends))
    with pytest.raises(ValueError, match="w is torch.float64"):
        grouped_mm(x, w.double(), ends)
    with pytest.raises(ValueError, match=r"ends \(E,\)"):
        grouped_mm(x, w, ends[:3])


# ---------------------------------------------------------------------------------------------------- GPU


def routed_inputs(
    tokens: int, top_k: int, num_experts: int, k: int, n: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (rows, K) for tokens * top_k randomly routed pairs laid out as the MoE layer lays them out (groups
    padded to GROUP_ALIGN inside a static buffer), w (E, N, K), ends (E,), on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ends, rows = routed_groups(tokens, top_k, num_experts, gen)
    x = torch.randn(rows, k, device="cuda", generator=gen, dtype=dtype)
    w = (torch.randn(num_experts, n, k, device="cuda", generator=gen) / k**0.5).to(dtype)
    return x, w, ends


def exact_products(
    x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, d(x), d(w) in float64 from the (rounded) operands, per expert."""
    y, dx = torch.zeros_like(dy, dtype=torch.float64), torch.zeros_like(x, dtype=torch.float64)
    dw = torch.zeros_like(w, dtype=torch.float64)
    start = 0
    for e, end in enumerate(ends.tolist()):
        xs, ds, we = x[start:end].double(), dy[start:end].double(), w[e].double()
        y[start:end], dx[start:end], dw[e] = xs @ we.T, ds @ we, ds.T @ xs
        start = end
    return y, dx, dw


def assert_within_one_rounding(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    """|got - exact| <= eps(dtype) * |exact| + atol: one rounding of the float32-accumulated product to the
    output dtype (half a unit in the last place is at most eps / 2 * |exact|; eps gives room for float32
    accumulation in another order), atol = 1e-3 of the mean magnitude for entries near zero."""
    eps = torch.finfo(dtype).eps
    atol = 1e-3 * float(exact.abs().mean())
    torch.testing.assert_close(got.double(), exact, rtol=eps, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", ["gate_up", "down"])
def test_bf16_at_the_release_expert_shape(shape: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """8192 tokens x top-8 over 64 experts, hidden 2048 and expert width 1024 (LLaDA-MoE-7B-A1B): the Triton
    path's output and gradients are within one bf16 rounding of the float64 products, as the loop's are."""
    monkeypatch.setenv("COMPOSER_DLM_FORCE_TORCH27", "1")
    k, n = (2048, 1024) if shape == "gate_up" else (1024, 2048)
    x, w, ends = routed_inputs(8192, 8, 64, k, n, torch.bfloat16)
    dy = torch.randn(x.shape[0], n, device="cuda", dtype=torch.bfloat16)
    used = int(ends[-1])
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_mm(xr, wr, ends)
    y.backward(dy)
    y_exact, dx_exact, dw_exact = exact_products(x[:used], w, ends, dy[:used])
    for got, exact in ((y[:used], y_exact), (xr.grad[:used], dx_exact), (wr.grad, dw_exact)):
        assert got.dtype == torch.bfloat16
        assert_within_one_rounding(got, exact, torch.bfloat16)
    # Against the loop over experts (cuBLAS, bf16 output): two roundings apart at most, with room for cuBLAS's
    # reduced-precision bf16 reductions (torch allows them by default).
    torch.testing.assert_close(y, grouped_mm_reference(x, w, ends), rtol=2**-6, atol=1e-2)
    assert not y[used:].any()


@pytest.mark.gpu
def test_float32_on_the_gpu_is_ieee() -> None:
    x, w, ends = routed_inputs(512, 4, 8, 256, 192, torch.float32)
    dy = torch.randn(x.shape[0], 192, device="cuda")
    used = int(ends[-1])
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    triton_kernels.grouped_mm(xr, wr, ends).backward(dy)
    y_exact, dx_exact, dw_exact = exact_products(x[:used], w, ends, dy[:used])
    y = triton_kernels.grouped_mm(x, w, ends)
    for got, exact in ((y[:used], y_exact), (xr.grad[:used], dx_exact), (wr.grad, dw_exact)):
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-4)  # TF32 would miss by ~1e-3


def run_without_host_sync(step: Callable[[], object]) -> None:
    """``step`` once to compile and warm up, then again under CUDA's sync debug mode "error", where any call that
    waits for the device (``.item()``, ``.tolist()``, a device-to-host copy) raises."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_triton_path_never_waits_for_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forced torch-2.7 path runs the grouped GEMM forward and backward without a host sync; the loop
    reference fails the same check (so the check can fail)."""
    monkeypatch.setenv("COMPOSER_DLM_FORCE_TORCH27", "1")
    x, w, ends = routed_inputs(1024, 8, 16, 256, 128, torch.bfloat16)

    def step(fn: Callable[..., torch.Tensor] = grouped_mm) -> None:
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xr, wr, ends).float().sum().backward()

    run_without_host_sync(step)
    with pytest.raises(RuntimeError, match="synchroniz"):
        run_without_host_sync(functools.partial(step, grouped_mm_reference))


@pytest.mark.gpu
def test_moe_layer_never_waits_for_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole MoE layer on the forced torch-2.7 path (routing, dispatch to the padded groups, grouped
    experts, combine), forward and backward under bf16 autocast, without a host sync."""
    from composer_dlm.models.llada_moe import LLaDAMoEConfig, SparseMoE

    monkeypatch.setenv("COMPOSER_DLM_FORCE_TORCH27", "1")
    config = LLaDAMoEConfig(
        hidden_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=64,
        num_experts=16,
        num_experts_per_tok=4,
        expert_intermediate_size=128,
    )
    moe = SparseMoE(config).cuda()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    h = torch.randn(2, 64, 256, device="cuda", requires_grad=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, stats = moe(h)
        (out.float().square().sum() + stats.sum()).backward()

    run_without_host_sync(step)
    assert h.grad is not None and moe.experts.down_proj.grad is not None


@pytest.mark.gpu
def test_agrees_with_torch_grouped_mm_where_torch_has_it() -> None:
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch < 2.8 has no torch._grouped_mm")
    x, w, ends = routed_inputs(2048, 8, 64, 512, 256, torch.bfloat16)
    used = int(ends[-1])
    ours = triton_kernels.grouped_mm(x, w, ends)
    theirs = torch._grouped_mm(x, w.transpose(1, 2), offs=ends.to(torch.int32))  # type: ignore[attr-defined]
    y_exact = exact_products(x[:used], w, ends, torch.zeros(used, 256, device="cuda"))[0]
    assert_within_one_rounding(ours[:used], y_exact, torch.bfloat16)
    assert_within_one_rounding(theirs[:used], y_exact, torch.bfloat16)


@pytest.mark.gpu
def test_inductor_compiles_the_experts_without_a_graph_break() -> None:
    x, w, ends = routed_inputs(1024, 8, 16, 256, 128, torch.bfloat16)
    w_down = (torch.randn(16, 256, 128, device="cuda") / 128**0.5).bfloat16()

    def experts(x_MK: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(triton_kernels.grouped_mm(x_MK, w1, ends))
        return triton_kernels.grouped_mm(h, w2, ends)

    compiled = torch.compile(experts, fullgraph=True)
    results = []
    for fn in (experts, compiled):
        xr, w1, w2 = (t.clone().requires_grad_() for t in (x, w, w_down))
        out = fn(xr, w1, w2)
        out.float().square().sum().backward()
        results.append((out, xr.grad, w1.grad, w2.grad))
    for eager, comp in zip(*results, strict=True):
        # the compiled silu may skip a bf16 rounding of eager's: a few roundings apart
        torch.testing.assert_close(comp, eager, rtol=2**-6, atol=2e-2)
