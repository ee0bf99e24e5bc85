"""FP8 linear layers (composer_dlm/fp8.py): the quantisation on the CPU against hand-computed values, the module
swap keeping the state dict, the one-line refusal on a machine without FP8; on a GPU (``gpu`` marker) the
``_scaled_mm`` products against an fp32 emulation of the same quantisation, one block against bf16, and an
FSDP run with FP8 killed and resumed bit for bit (``deterministic: true``)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from test_train import run_main
from torch import nn

from composer_dlm import fp8
from composer_dlm.config import ConfigError, ModelConfig
from composer_dlm.fp8 import E4M3, E5M2, Fp8Linear, convert_to_fp8, quantize
from composer_dlm.models import LLaDAModel
from composer_dlm.models.llada import rope_cos_sin

GPU_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def tiny(**overrides) -> LLaDAModel:
    shape = dict(d_model=64, n_layers=2, n_heads=4, vocab_size=512, mlp_hidden_size=176, mask_token_id=511)
    return LLaDAModel.from_config(shape | overrides, seed=0)


def test_quantize_hand_computed_row():
    # amax 3: 3 / 448 = 2^-7.2, rounded up to the power of two 2^-7; every value is then exact in e4m3
    q, scale = quantize(torch.tensor([[1.0, -3.0, 0.5], [0.0, 0.0, 0.0]]), E4M3, rowwise=True)
    assert q.dtype == E4M3 and scale.shape == (2, 1)
    assert scale[0, 0].item() == 2.0**-7
    assert q[0].float().tolist() == [128.0, -384.0, 64.0]
    assert q[1].float().tolist() == [0.0, 0.0, 0.0]  # an all-zero row stays zero (no division by zero)


@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
@pytest.mark.parametrize("dtype", [E4M3, E5M2], ids=["e4m3", "e5m2"])
def test_quantize_scales_and_round_trip(rowwise, dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 32, generator=g) * torch.logspace(-3, 3, 8)[:, None]  # rows of very different size
    q, scale = quantize(t.t(), dtype, rowwise)  # a transposed view, as the backward passes them
    assert q.is_contiguous() and q.shape == (32, 8)
    fp8_max = torch.finfo(dtype).max
    amax = t.t().abs().amax(dim=-1, keepdim=True) if rowwise else t.abs().amax()
    assert torch.equal(torch.log2(scale), torch.log2(scale).round())  # powers of two
    assert (
        (amax / scale > fp8_max / 2) & (amax / scale <= fp8_max)
    ).all()  # the largest value uses the range
    mantissa_bits = 3 if dtype == E4M3 else 2
    err = (q.float() * scale - t.t()).abs()
    normal = (t.t() / scale).abs() >= torch.finfo(dtype).smallest_normal
    assert (err[normal] <= t.t().abs()[normal] * 2.0 ** -(mantissa_bits + 1)).all()


def test_conversion_keeps_parameters_names_and_dtypes():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    assert convert_to_fp8(model, "rowwise") == 2 * 7  # q, k, v, attn_out, ff_proj, up_proj, ff_out per block
    after = model.state_dict()
    assert list(after) == list(before)
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype and torch.equal(tensor, before[name]), name
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameters, nothing copied
    assert all(
        type(m) is Fp8Linear and m.rowwise for m in model.blocks[0].children() if isinstance(m, nn.Linear)
    )
    assert type(model.model.transformer.ff_out) is nn.Linear  # the output projection stays in the bf16 loss


def test_conversion_skips_misaligned_linears():
    model = tiny(mlp_hidden_size=168)  # 168 is not a multiple of 16: the MLP stays in bf16
    assert convert_to_fp8(model, "tensorwise") == 2 * 4
    assert type(model.blocks[1].ff_proj) is nn.Linear and type(model.blocks[1].q_proj) is Fp8Linear


@pytest.mark.skipif(GPU_FP8, reason="this machine can run FP8")
def test_fp8_refused_in_one_line_without_fp8_gpu(tmp_path, capsys):
    code, err = run_main(tmp_path, capsys, "model.fp8=rowwise")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("composer-dlm: error: model.fp8: rowwise needs") and "model.fp8: off" in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_fp8_with_lora_refused():
    with pytest.raises(ConfigError, match="model.fp8 with model.lora"):
        ModelConfig(pretrained="x", lora={"r": 4}, fp8="rowwise")  # type: ignore[arg-type]


def _scaled_mm_contract(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, fast_accum=False):
    """What ``fp8._mm`` promises, in fp32 on any device: (a * a_scale) @ (b * b_scale).T rounded to
    ``out_dtype`` (``fast_accum`` only changes the GPU's accumulation order)."""
    assert a.is_contiguous() and b.is_contiguous() and a.dtype in (E4M3, E5M2) and b.dtype == E4M3
    b_scale = b_scale.reshape(-1, 1) if b_scale.dim() else b_scale
    return ((a.float() * a_scale) @ (b.float() * b_scale).t()).to(out_dtype)


@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_fp8_linear_wiring_on_cpu(monkeypatch, rowwise):
    """The autograd wiring (which operand is quantised along which dimension, transposes, dtypes) with
    ``_scaled_mm`` replaced by its contract: out, d(x), d(w) equal the emulated FP8 products (bf16 rounding),
    and are within FP8's error (e4m3: 3 mantissa bits, ~3% per operand) of plain fp32 ``F.linear``."""
    monkeypatch.setattr(fp8, "_mm", _scaled_mm_contract)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 64, generator=g).requires_grad_()  # fp32 in: the layer takes it in bf16
    lin = Fp8Linear(64, 48, bias=False, device="meta")
    lin.weight, lin.rowwise = nn.Parameter(torch.randn(48, 64, generator=g) * 0.02), rowwise
    out = lin(x)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    assert (
        out.dtype == torch.bfloat16
        and x.grad.dtype == torch.float32
        and lin.weight.grad.dtype == torch.float32
    )
    x2, g2 = x.detach().reshape(-1, 64).bfloat16(), grad.reshape(-1, 48).bfloat16()
    ref = _emulated(x2, lin.weight.detach(), g2, rowwise)
    got = (out.reshape(-1, 48), x.grad.reshape(-1, 64), lin.weight.grad)
    for have, want in zip(got, ref, strict=True):
        assert _rel(have, want) < 1e-2
    exact = torch.autograd.functional.vjp(
        lambda a, w: a @ w.t(), (x2.float(), lin.weight.detach()), g2.float()
    )
    for have, want in zip(got, (exact[0], *exact[1]), strict=True):
        assert 1e-3 < _rel(have, want) < 0.1  # FP8's error, not zero (the products were quantised)


def test_tensorwise_quantisation_commutes_with_transpose():
    """With one scale per tensor, the forward's e4m3 copy transposed is, bit for bit, the quantisation of the
    transposed tensor (what the backward would compute afresh), and casting the transposed weight with the
    forward's scale gives the weight's quantisation transposed; rowwise scales differ between the two layouts."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(48, 32, generator=g) * torch.logspace(-2, 2, 32)).bfloat16()
    q, scale = quantize(x, E4M3, rowwise=False)
    q_t, scale_t = quantize(x.t(), E4M3, rowwise=False)
    assert torch.equal(scale, scale_t)
    assert torch.equal(q.t().contiguous().view(torch.uint8), q_t.view(torch.uint8))
    assert torch.equal(fp8.cast(x.t(), scale, E4M3).view(torch.uint8), q_t.view(torch.uint8))
    _, row_scale = quantize(x, E4M3, rowwise=True)
    _, col_scale = quantize(x.t(), E4M3, rowwise=True)
    assert row_scale.shape == (48, 1) and col_scale.shape == (32, 1)


def test_tensorwise_backward_from_saved_fp8_equals_recomputed(monkeypatch):
    """The tensorwise layer's backward (the forward's fp8 input saved, the weight cast with its forward scale, the
    gradient quantised once) gives exactly the products of operands quantised afresh for each product, as the
    recipe defines them; d(weight) is written in the fp32 master's dtype directly (no bf16 rounding)."""
    monkeypatch.setattr(fp8, "_mm", _scaled_mm_contract)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    lin = Fp8Linear(32, 48, bias=False, device="meta")
    lin.weight, lin.rowwise = nn.Parameter(torch.randn(48, 32, generator=g) * 0.05), False
    out = lin(x)
    grad = torch.randn(out.shape, generator=g).bfloat16()
    out.backward(grad)
    w = lin.weight.detach()

    def product(a, a_dtype, b):  # a @ b.T with each operand quantised on its own (tensorwise)
        qa, sa = quantize(a, a_dtype, rowwise=False)
        qb, sb = quantize(b, E4M3, rowwise=False)
        return (qa.float() * sa) @ (qb.float() * sb).t()

    assert torch.equal(out, product(x.detach(), E4M3, w).bfloat16())
    assert torch.equal(x.grad, product(grad, E5M2, w.t()).bfloat16())
    assert lin.weight.grad.dtype == torch.float32
    assert torch.equal(lin.weight.grad, product(grad.t(), E5M2, x.detach().t()))


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_fp8_block_compiles_to_one_graph_each_way(recipe):
    """torch.compile traces an FP8 block without a graph break (``fullgraph``), the autograd Function inlined:
    one forward graph with the 7 output products and one backward graph with the 14 gradient products, all
    ``_scaled_mm`` (so Inductor sees every amax, scale and cast beside its product). Traced on meta tensors
    (``_scaled_mm`` has a meta kernel; its CUDA kernel is the GPU tests' business)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    model = tiny(n_layers=1)
    convert_to_fp8(model, recipe)
    block = model.blocks[0].to("meta")
    x = torch.randn(2, 32, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(32, model.config.head_dim, 10000.0, torch.device("meta"))
    products: list[int] = []

    def count(gm, _inputs):
        products.append(sum(n.target is torch.ops.aten._scaled_mm.default for n in gm.graph.nodes))
        return make_boxed_func(gm.forward)

    def backend(gm, inputs):
        return aot_module_simplified(gm, inputs, fw_compiler=count, bw_compiler=count)

    torch._dynamo.reset()
    out = torch.compile(block, backend=backend, fullgraph=True)(x, cos, sin)
    out.float().sum().backward()
    torch._dynamo.reset()
    assert products == [7, 14]
    assert x.grad is not None and block.ff_out.weight.grad is not None


# --- GPU ----------------------------------------------------------------------------------------------------------


def _emulated(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor, rowwise: bool) -> list[torch.Tensor]:
    """out, d(x), d(w) from the same quantised operands, dequantised and multiplied in fp32 (the reference)."""

    def dq(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q, s = quantize(t, dtype, rowwise)
        return q.float() * s

    gd = E4M3 if rowwise else E5M2
    return [
        dq(x, E4M3) @ dq(w, E4M3).t(),
        dq(g, gd) @ dq(w.t(), E4M3).t(),
        dq(g.t(), gd) @ dq(x.t(), E4M3).t(),
    ]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FP8, reason="needs a GPU with FP8 tensor cores")
@pytest.mark.parametrize("rowwise", [True, False], ids=["rowwise", "tensorwise"])
def test_fp8_products_match_fp32_emulation(rowwise):
    """The three ``_scaled_mm`` products equal fp32 products of the dequantised operands up to the bf16 output's
    rounding (relative norm error < 1e-2; bf16 keeps 8 bits)."""
    torch.manual_seed(0)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(384, 512, device="cuda") * 0.02)  # an fp32 master weight
    lin = Fp8Linear(512, 384, bias=False, device="meta")
    lin.weight, lin.rowwise = w, rowwise
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = lin(x)
    g = torch.randn_like(out)
    out.backward(g)
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ref = _emulated(x.detach(), w.detach(), g, rowwise)
    for got, want in zip((out, x.grad, w.grad), ref, strict=True):
        assert _rel(got, want) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FP8, reason="needs a GPU with FP8 tensor cores")
@pytest.mark.parametrize(("recipe", "tol"), [("rowwise", 0.1), ("tensorwise", 0.15)])
def test_fp8_block_close_to_bf16(recipe, tol):
    """One block (d 512, MLP 1536, 2 x 256 tokens) in FP8 vs the same block in bf16 autocast: the block's
    contribution (output minus input) and every parameter's gradient within ``tol`` (relative norm), and not
    equal (FP8 ran). An fp32 emulation of the same quantisation on the CPU gives 5.5-7% (rowwise: e4m3, ~3%
    per operand) and 4-9.5% (tensorwise: one scale per tensor, gradients in e5m2 with 2 mantissa bits)."""
    torch.manual_seed(0)
    model = tiny(d_model=512, n_heads=8, mlp_hidden_size=1536).cuda()
    fp8_model = copy.deepcopy(model)
    convert_to_fp8(fp8_model, recipe)
    x = torch.randn(2, 256, 512, device="cuda")
    cos, sin = rope_cos_sin(256, model.config.head_dim, model.config.rope_theta, torch.device("cuda"))
    deltas, grads = [], []
    for block in (model.blocks[0], fp8_model.blocks[0]):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = block(x, cos, sin)
        out.float().square().mean().backward()
        deltas.append(out.float() - x)
        grads.append({n: p.grad for n, p in block.named_parameters()})
    assert 1e-3 < _rel(deltas[1], deltas[0]) < tol
    for name, want in grads[0].items():
        assert _rel(grads[1][name], want) < tol, name


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FP8, reason="needs a GPU with FP8 tensor cores")
def test_one_gpu_fsdp_fp8_deterministic_kill_and_resume(tmp_path):
    from test_gpu_multigpu import _kill_and_resume

    _kill_and_resume(tmp_path, 1, True, **{"model.fp8": "rowwise"})


@pytest.mark.slow
def test_fp8_benchmark_curve_and_report_on_cpu(tmp_path, capsys, monkeypatch):
    """The benchmark's loss-curve path and its report on a tiny CPU run (bf16 only: FP8 needs the GPU)."""
    from composer_dlm.benchmarks import fp8 as bench

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the fused loss's plain twin: the kernel has its own tests

    bench.main(["--out-dir", str(tmp_path), "--shapes", "", "--recipes", "", "--curve-shape", "tiny"]
               + ["--curve-steps", "6", "--curve-batch", "4"])  # fmt: skip
    raw = json.loads((tmp_path / "fp8_h200.json").read_text())
    losses = raw["curve"]["losses"]["off"]
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert raw["curve"]["final"]["off"] == {
        "final_loss": losses[-1],
        "relative_to_bf16": 0.0,
    }  # last 10%: 1 step
    assert "| off | " in capsys.readouterr().out
    png = tmp_path / "fp8_loss_h200.png"
    png.unlink(missing_ok=True)
    bench.main(["--out-dir", str(tmp_path), "--replot", str(tmp_path / "fp8_h200.json")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn again from the raw JSON alone


def test_fp8_benchmark_throughput_rows_saved_run_by_run(tmp_path, monkeypatch, capsys):
    """The throughput loop with the trainer run replaced by fixed figures (the runs themselves need the GPU):
    bf16 first, each recipe's speedup over it, the JSON rewritten after every run (a command cut short keeps
    the runs before), an out-of-memory run recorded as such, and each run's micro-batch as asked."""
    from composer_dlm.benchmarks import fp8 as bench

    out = tmp_path / "out"
    tokens = {"off": 40_000.0, "tensorwise": 50_000.0}
    seen = []

    def fake_run(args, data_root, out_root):
        if seen:  # the runs before this one are already on disk
            saved = json.loads((out / "fp8_h200.json").read_text())["throughput"]
            assert [r["fp8"] for r in saved] == [recipe for recipe, _ in seen]
        seen.append((args.fp8, args.micro_batch))
        if args.fp8 == "rowwise":
            raise torch.OutOfMemoryError("CUDA out of memory")
        return {"path": "ours", "micro_batch": args.micro_batch, "tokens_per_s_per_gpu": tokens[args.fp8],
                "mfu": 0.5, "executed_utilisation": 0.4, "peak_gib": 1.0}  # fmt: skip

    monkeypatch.setattr(bench, "run_ours", fake_run)
    monkeypatch.setattr(bench, "bench_data", lambda args: tmp_path)
    monkeypatch.setattr(bench, "release_trainers", lambda: None)
    bench.main(["--out-dir", str(out), "--shapes", "1.65b", "--recipes", "tensorwise,rowwise"]
               + ["--micro-batch", "6", "--curve-steps", "0"])  # fmt: skip
    rows = json.loads((out / "fp8_h200.json").read_text())["throughput"]
    assert seen == [("off", 6), ("tensorwise", 6), ("rowwise", 6)]
    assert [(r["fp8"], r.get("speedup"), r.get("oom")) for r in rows] == [
        ("off", 1.0, None),
        ("tensorwise", 1.25, None),
        ("rowwise", None, True),
    ]
    assert "1.65b, fp8=tensorwise: 1.250x the tokens/s of bf16" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FP8, reason="needs a GPU with FP8 tensor cores")
def test_fp8_with_fsdp_compiled_blocks_and_activation_checkpointing(tmp_path):
    """FULL_SHARD (one GPU), compiled blocks, activation checkpointing and FP8 train (losses finite, falling);
    the checkpoint holds the same tensor names and dtypes (fp32 masters) as a bf16 run's."""
    from faults import rank0_metrics, run_ranks
    from test_gpu_multigpu import ENV, LOSS, QUICKSTART, TRAIN, overrides

    fsdp = {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full", "activation_checkpointing": "true"}
    extra = {"model.compile_blocks": "true", "max_duration": "8ba", "checkpoint.save_interval": "4ba"}
    states = {}
    for recipe in ("off", "rowwise"):
        args = overrides(tmp_path / recipe, "run", fsdp, **extra, **{"model.fp8": recipe})
        run_ranks(1, [TRAIN, QUICKSTART, *args], ENV)
        (ckpt,) = (tmp_path / recipe / "run" / "checkpoints").glob("ep*-ba8-rank0.pt")
        states[recipe] = torch.load(ckpt, map_location="cpu", weights_only=False)["state"]["model"]
    losses = rank0_metrics(tmp_path / "rowwise" / "run", LOSS)
    assert all(math.isfinite(v) for v in losses.values()) and losses[7] < losses[0]
    assert {k: v.dtype for k, v in states["rowwise"].items()} == {
        k: v.dtype for k, v in states["off"].items()
    }
    assert all(v.dtype == torch.float32 for v in states["rowwise"].values())


def test_llada_moe_conversion_covers_attention_and_shared_expert_not_router_or_experts(monkeypatch):
    """LLaDA-MoE: the attention projections, the dense layer's MLP and the shared expert compute in FP8; the router
    (ranking the experts) and the stacked routed experts (grouped GEMMs) do not. The forward, with ``_scaled_mm``
    replaced by its contract, stays within FP8's error of the unconverted model."""
    from composer_dlm.models.llada_moe import LLaDAMoEModel

    shape = dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, num_experts=16,
        num_experts_per_tok=2, expert_intermediate_size=32, shared_expert_intermediate_size=32,
        dense_intermediate_size=64, moe_layer_freq=[0, 1], mask_token_id=127,
    )  # fmt: skip
    model = LLaDAMoEModel.from_config(shape, seed=0).eval()
    reference = copy.deepcopy(model)
    names = list(model.state_dict())
    assert (
        convert_to_fp8(model, "rowwise") == 2 * 4 + 3 + 3
    )  # q, k, v, o; layer 0's MLP; layer 1's shared expert
    assert list(model.state_dict()) == names
    attention, moe, shared = model.blocks[1].self_attn, model.blocks[1].mlp, model.blocks[1].shared_expert
    assert type(attention.o_proj) is Fp8Linear and type(shared.down_proj) is Fp8Linear
    assert type(moe.gate) is nn.Linear  # the router, 64 x 16: aligned, but kept
    monkeypatch.setattr(fp8, "_mm", _scaled_mm_contract)
    ids = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids), reference(ids)
    assert 1e-4 < _rel(got, want) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not GPU_FP8, reason="needs a GPU with FP8 tensor cores")
def test_llada_moe_fp8_forward_and_backward_close_to_bf16():
    """LLaDA-MoE with FP8 attention / shared-expert / dense-MLP products under bf16 autocast, against the same model
    in bf16: the output within FP8's error, every parameter's gradient finite."""
    from composer_dlm.models.llada_moe import LLaDAMoEModel

    shape = dict(
        hidden_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=512, num_experts=8,
        num_experts_per_tok=2, expert_intermediate_size=128, shared_expert_intermediate_size=128,
        dense_intermediate_size=256, moe_layer_freq=[0, 1], mask_token_id=511,
    )  # fmt: skip
    reference = LLaDAMoEModel.from_config(shape, seed=0).cuda()
    model = copy.deepcopy(reference)
    assert convert_to_fp8(model, "rowwise") == 2 * 4 + 3 + 3
    ids = torch.randint(0, 511, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, want = model(ids).float(), reference(ids).float()
    assert _rel(got, want) < 0.1
    got.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
