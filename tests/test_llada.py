"""The LLaDA trunk against an independent, loop-based reading of the architecture, and its checkpoint format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from composer_dlm.models import LLaDAModel
from composer_dlm.models.llada import apply_rope, rope_cos_sin

# A config.json as LLaDA's release writes it: network fields plus Hugging Face and OLMo bookkeeping keys.
RELEASE_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "architectures": ["LLaDAModelLM"],
    "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig"},
    "block_type": "llama",
    "d_model": 32,
    "embedding_size": 72,
    "eos_token_id": 70,
    "include_bias": False,
    "init_device": "meta",
    "layer_norm_type": "rms",
    "mask_token_id": 71,
    "max_sequence_length": 64,
    "mlp_hidden_size": 48,
    "model_type": "llada",
    "n_heads": 4,
    "n_kv_heads": 2,
    "n_layers": 2,
    "rms_norm_eps": 1e-5,
    "rope": True,
    "rope_theta": 500000.0,
    "vocab_size": 72,
    "weight_tying": False,
}


def release_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under LLaDA's tensor names (norm weights random too, so their use is checked)."""
    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    kv = cfg["n_kv_heads"] * h // cfg["n_heads"]
    shapes = {"model.transformer.wte.weight": (v, h), "model.transformer.ln_f.weight": (h,)}
    if not cfg["weight_tying"]:
        shapes["model.transformer.ff_out.weight"] = (v, h)
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes |= {
            p + "attn_norm.weight": (h,),
            p + "ff_norm.weight": (h,),
            p + "q_proj.weight": (h, h),
            p + "k_proj.weight": (kv, h),
            p + "v_proj.weight": (kv, h),
            p + "attn_out.weight": (h, h),
            p + "ff_proj.weight": (f, h),
            p + "up_proj.weight": (f, h),
            p + "ff_out.weight": (h, f),
        }
    out = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        out[name] = 1.0 + 0.1 * t if len(shape) == 1 else 0.2 * t
    return out


def reference_logits(
    cfg: dict, w: dict[str, torch.Tensor], ids: torch.Tensor, key_mask: torch.Tensor | None = None
):
    """A second implementation in float64: explicit per-head loops, complex-number RoPE, explicit softmax."""
    w = {k: t.double() for k, t in w.items()}
    h, nh, nkv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    hd, eps = h // nh, cfg["rms_norm_eps"]
    b, length = ids.shape

    def rms(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight

    def rope(x):  # x: (L, hd); pair i with i + hd/2 as the complex number x_i + j x_{i+hd/2}
        half = hd // 2
        pos = torch.arange(length, dtype=torch.float64)[:, None]
        freq = cfg["rope_theta"] ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
        z = torch.complex(x[:, :half], x[:, half:]) * torch.exp(1j * pos * freq)
        return torch.cat([z.real, z.imag], dim=-1)

    x = w["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        a = rms(x, w[p + "attn_norm.weight"])
        q, k, v = a @ w[p + "q_proj.weight"].T, a @ w[p + "k_proj.weight"].T, a @ w[p + "v_proj.weight"].T
        heads = []
        for bi in range(b):
            per_head = []
            for hi in range(nh):
                kvi = hi // (nh // nkv)
                qh = rope(q[bi, :, hi * hd : (hi + 1) * hd])
                kh = rope(k[bi, :, kvi * hd : (kvi + 1) * hd])
                vh = v[bi, :, kvi * hd : (kvi + 1) * hd]
                scores = qh @ kh.T / math.sqrt(hd)
                if key_mask is not None:
                    scores = scores.masked_fill(~key_mask[bi][None, :], float("-inf"))
                probs = torch.exp(scores - scores.max(-1, keepdim=True).values)
                per_head.append(probs / probs.sum(-1, keepdim=True) @ vh)
            heads.append(torch.cat(per_head, dim=-1))
        x = x + torch.stack(heads) @ w[p + "attn_out.weight"].T
        m = rms(x, w[p + "ff_norm.weight"])
        gate = m @ w[p + "ff_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * (m @ w[p + "up_proj.weight"].T)) @ w[p + "ff_out.weight"].T
    x = rms(x, w["model.transformer.ln_f.weight"])
    head = w["model.transformer.wte.weight" if cfg["weight_tying"] else "model.transformer.ff_out.weight"]
    return x @ head.T


def write_release_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def tiny(**overrides) -> LLaDAModel:
    cfg = dict(d_model=32, n_layers=2, n_heads=4, vocab_size=50, mlp_hidden_size=48, mask_token_id=49)
    return LLaDAModel.from_config(cfg | overrides, seed=0)


@pytest.mark.parametrize("weight_tying", [False, True])
def test_release_folder_logits_match_reference(tmp_path, weight_tying):
    cfg = RELEASE_CONFIG | {"weight_tying": weight_tying}
    tensors = release_tensors(cfg)
    folder = write_release_folder(tmp_path / "release", cfg, tensors)
    model = LLaDAModel.from_pretrained(folder)
    ids = torch.randint(0, cfg["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    ours = model(ids).double()
    ref = reference_logits(cfg, tensors, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_padding_mask_matches_reference_and_hides_padded_keys(tmp_path):
    cfg = RELEASE_CONFIG
    tensors = release_tensors(cfg, seed=3)
    model = LLaDAModel.from_pretrained(write_release_folder(tmp_path / "r", cfg, tensors))
    ids = torch.randint(0, 70, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False  # left padding on row 0
    ours = model(ids, attention_mask=mask).double()
    assert (ours - reference_logits(cfg, tensors, ids, mask)).abs().max() <= 1e-4
    changed = ids.clone()
    changed[0, :3] = (changed[0, :3] + 1) % 70  # padded tokens must not influence real positions
    again = model(changed, attention_mask=mask).double()
    assert torch.allclose(ours[0, 3:], again[0, 3:], atol=1e-6)
    assert not torch.allclose(model(ids).double()[0, 3:], ours[0, 3:], atol=1e-4)


def test_attention_is_bidirectional():
    model = tiny()
    ids = torch.randint(0, 49, (1, 8), generator=torch.Generator().manual_seed(0))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 49
    assert not torch.allclose(model(ids)[0, 0], model(changed)[0, 0])


def test_rope_equals_complex_rotation():
    head_dim, length = 8, 5
    x = torch.randn(1, 1, length, head_dim, dtype=torch.float64)
    cos, sin = rope_cos_sin(length, head_dim, 10000.0, torch.device("cpu"))
    ours = apply_rope(x, cos.double(), sin.double())[0, 0]
    half = head_dim // 2
    for p in range(length):
        for i in range(half):
            angle = p * 10000.0 ** (-2 * i / head_dim)
            z = complex(x[0, 0, p, i], x[0, 0, p, i + half]) * complex(math.cos(angle), math.sin(angle))
            assert ours[p, i].item() == pytest.approx(z.real, abs=1e-6)
            assert ours[p, i + half].item() == pytest.approx(z.imag, abs=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_tables_round_as_lladas_modeling_file(theta, device):
    """The tables are LLaDA's to the bit: inverse frequencies as 1 / theta^(2i/d) in fp32 (LLaDA's
    RotaryEmbedding), not theta^(-2i/d), which rounds differently in fp32 and so moves bf16 queries and keys by
    an ulp now and then: enough, on a GPU, for exact-mode tokens to part from LLaDA's own code. On a GPU too
    they are the CPU's sin and cos (LLaDA builds its tables on the CPU), not the GPU's, which round otherwise."""
    head_dim, length = 128, 300
    inv_freq = [
        1.0 / torch.tensor(theta, dtype=torch.float32) ** torch.tensor(i / head_dim)
        for i in range(0, head_dim, 2)
    ]
    angles = torch.arange(length, dtype=torch.float32)[:, None] * torch.stack(inv_freq)[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = rope_cos_sin(length, head_dim, theta, torch.device(device))
    assert cos.device.type == device
    assert torch.equal(cos.cpu(), angles.cos()) and torch.equal(sin.cpu(), angles.sin())


def test_rope_tables_cached_in_inference_mode_serve_training():
    """Tables first built under torch.inference_mode (sampling, evaluation) are cached and then used by a training
    forward, whose autograd saves them: they must be ordinary tensors."""
    with torch.inference_mode():
        cos, _ = rope_cos_sin(13, 8, 12345.0, torch.device("cpu"))
    assert not cos.is_inference()
    x = torch.randn(1, 1, 13, 8, requires_grad=True)
    cos, sin = rope_cos_sin(13, 8, 12345.0, torch.device("cpu"))
    apply_rope(x, cos, sin).square().sum().backward()
    assert x.grad is not None


def test_grouped_query_attention_equals_repeated_heads():
    gqa = tiny(n_kv_heads=2)
    mha = tiny(n_kv_heads=4)
    with torch.no_grad():
        for b_gqa, b_mha in zip(gqa.blocks, mha.blocks, strict=True):
            for name in ("attn_norm", "ff_norm", "q_proj", "attn_out", "ff_proj", "up_proj", "ff_out"):
                getattr(b_mha, name).weight.copy_(getattr(b_gqa, name).weight)
            hd = 8
            for name in ("k_proj", "v_proj"):
                w = getattr(b_gqa, name).weight.view(2, hd, 32)
                getattr(b_mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
        for name in ("wte", "ln_f", "ff_out"):
            getattr(mha.model.transformer, name).weight.copy_(getattr(gqa.model.transformer, name).weight)
    ids = torch.randint(0, 49, (2, 7))
    assert torch.allclose(gqa(ids), mha(ids), atol=1e-5)


def test_head_receives_hidden_states_and_output_weight():
    model = tiny()
    ids = torch.randint(0, 49, (2, 6))
    hidden, weight = model(ids, head=lambda h, w: (h, w))
    assert weight is model.output_weight
    assert torch.allclose(hidden @ weight.T, model(ids), atol=1e-6)
    assert torch.equal(hidden, model.hidden_states(ids))


def test_num_params_matches_module():
    for tying in (False, True):
        model = tiny(weight_tying=tying, n_kv_heads=2)
        assert model.config.num_params() == sum(p.numel() for p in model.parameters())
