"""The fused inference kernels (kernels/inference.py) against the eager ops they replace.

GPU (``-m gpu``): bit for bit in bf16, one kernel at a time and through a whole model's forward; that equality is
what keeps the sampler's output token for token the eager model's. CPU (Triton's interpreter, fp32): the same
indexing and operation order, bitwise where the interpreter's arithmetic is IEEE (sums, products), within an ulp
where it has no libdevice (rsqrt, exp).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from composer_dlm.models import LLaDAModel
from composer_dlm.models.llada import FusedInference, RMSNorm, apply_rope, rope_cos_sin
from kernels import inference as fused

interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need Triton's interpreter"
)
CONFIG = dict(
    d_model=128, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=300, mlp_hidden_size=192, mask_token_id=299
)


def _rand(
    *shape: int, scale: float = 1.0, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device, dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _check_kernels(device: str, dtype: torch.dtype, exact_transcendentals: bool) -> None:
    """Each kernel against its eager ops; ``exact_transcendentals`` also demands bitwise RMSNorm and SiLU."""
    a, b = (
        _rand(3, 37, 96, dtype=dtype, device=device),
        _rand(3, 37, 96, scale=0.3, dtype=dtype, device=device, seed=1),
    )
    total, sq = fused.add_square(a, b)
    assert torch.equal(total, a + b)
    assert torch.equal(sq, (a + b).float().pow(2))
    same, sq_a = fused.add_square(a)
    assert same is a and torch.equal(sq_a, a.float().pow(2))

    norm = RMSNorm(96, 1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(_rand(96, seed=2))
    got = fused.rms_apply(a, sq_a.mean(-1, keepdim=True), norm.weight, norm.eps)
    want = norm(a)
    assert torch.equal(got, want) if exact_transcendentals else _rel(got, want) < 1e-6

    # q and k as views into one stacked projection output: strided rows, contiguous heads.
    length = 37
    for heads, head_dim in ((4, 16), (3, 24)):  # also a head count and half width that are not powers of two
        qkv = _rand(3, length, 3 * heads * head_dim, dtype=dtype, device=device, seed=3)
        q = qkv[..., : heads * head_dim].view(3, length, heads, head_dim)
        cos, sin = rope_cos_sin(length, head_dim, 500000.0, torch.device(device))
        assert torch.equal(fused.rope(q, cos, sin), apply_rope(q.transpose(1, 2), cos, sin).transpose(1, 2))

    g = _rand(5, 300, scale=30.0, dtype=dtype, device=device, seed=4)  # saturated SiLU on both sides too
    u = _rand(5, 300, dtype=dtype, device=device, seed=5)
    got, want = fused.silu_mul(g, u), F.silu(g) * u
    assert torch.equal(got, want) if exact_transcendentals else _rel(got, want) < 1e-6


def _model(device: str, dtype: torch.dtype) -> LLaDAModel:
    return LLaDAModel.from_config(CONFIG, seed=0).to(device, dtype).eval()


def _inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 299, (3, 41), generator=torch.Generator().manual_seed(6)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    return ids, mask


@interpreter
def test_kernels_match_eager_ops_in_the_interpreter() -> None:
    _check_kernels("cpu", torch.float32, exact_transcendentals=False)


@interpreter
def test_fused_forward_matches_eager_in_the_interpreter() -> None:
    model = _model("cpu", torch.float32)
    ids, mask = _inputs("cpu")
    stacked = FusedInference(qkv_weights=[block.qkv_weight() for block in model.blocks])
    with torch.no_grad():
        want = model(ids, attention_mask=mask)
        for option in (True, stacked):
            got = model(ids, attention_mask=mask, fused=option)
            assert _rel(got, want) < 1e-5


def test_fused_forward_refuses_autograd() -> None:
    model = _model("cpu", torch.float32)
    with pytest.raises(ValueError, match="no_grad"):
        model(torch.zeros(1, 4, dtype=torch.long), fused=True)


@pytest.mark.gpu
def test_gpu_kernels_bitwise_equal_to_eager_ops() -> None:
    _check_kernels("cuda", torch.bfloat16, exact_transcendentals=True)
    _check_kernels("cuda", torch.float32, exact_transcendentals=True)


@pytest.mark.gpu
def test_gpu_fused_forward_bitwise_equal_to_eager() -> None:
    model = _model("cuda", torch.bfloat16)
    ids, mask = _inputs("cuda")
    with torch.no_grad():
        for attention_mask in (None, mask):
            want = model(ids, attention_mask=attention_mask)
            options = model.fused_inference(ids)
            for option in (True, options):
                assert torch.equal(model(ids, attention_mask=attention_mask, fused=option), want)
