"""LLaDA's mask predictor for ``AutoModel`` / ``AutoModelForMaskedLM`` (remote code shipped in composer-dlm
exports; needs only torch and transformers).

``model(input_ids).logits`` is (B, L, embedding_size): every position predicted from the whole sequence, with no
causal mask and no time input. Parameter names are those of LLaDA's released safetensors
(``model.transformer.blocks.0.q_proj.weight`` ...), so this class loads LLaDA's release folders as well as
composer-dlm's exports. The network, computed in this order so results match composer-dlm's own model:

    x = wte(input_ids)
    per block:  x = x + attn_out(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))   h = attn_norm(x)
                x = x + ff_out(silu(ff_proj(h)) * up_proj(h))                               h = ff_norm(x)
    logits = ln_f(x) @ W^T   (W = ff_out, or wte when weight_tying)

RMSNorm: (x * rsqrt(mean(x^2) + eps)) in fp32, cast back, times the weight. RoPE (rotate-half: dimension i is
paired with i + head_dim / 2, angle p * theta^(-2i / head_dim)) is applied to q and k in fp32. Attention is
softmax(q k^T / sqrt(head_dim)) v over all keys, grouped-query when n_kv_heads < n_heads; ``attention_mask``
(B, L), 1 for real tokens, hides padded keys.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_llada import LLaDAConfig, unsupported_settings
from .llada_layers import RMSNorm, apply_rope, attend, rope_cos_sin


class LLaDABlock(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, heads, kv_heads = config.d_model, config.n_heads, config.n_kv_heads
        self.n_heads, self.n_kv_heads, self.head_dim = heads, kv_heads, d // heads
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + self.attn_out(attend(q, k, v, key_mask))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDATransformer(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.embedding_size, config.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers))
        self.ln_f = RMSNorm(config.d_model, config.rms_norm_eps)
        if not config.weight_tying:
            self.ff_out = nn.Linear(config.d_model, config.embedding_size, bias=False)


class LLaDATrunk(nn.Module):
    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAModelLM(PreTrainedModel):
    """The mask predictor: ``forward(input_ids, attention_mask=None)`` -> ``MaskedLMOutput(logits=...)``."""

    config_class = LLaDAConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__(config)
        problems = unsupported_settings(config.to_dict())
        if problems:
            raise ValueError(f"config.json: {'; '.join(problems)} by this modeling file")
        if config.d_model % config.n_heads or config.n_heads % config.n_kv_heads:
            raise ValueError("d_model must be a multiple of n_heads, and n_heads a multiple of n_kv_heads")
        self.model = LLaDATrunk(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """N(0, init_std) for linear and embedding weights, 1 for norms (used only for weights a folder lacks)."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.data.fill_(1.0)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.wte = value

    def output_weight(self) -> torch.Tensor:
        t = self.model.transformer
        return t.wte.weight if self.config.weight_tying else t.ff_out.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MaskedLMOutput | tuple[torch.Tensor]:
        t = self.model.transformer
        x = t.wte(input_ids)
        cos, sin = rope_cos_sin(
            input_ids.shape[1], self.config.d_model // self.config.n_heads, self.config.rope_theta, x.device
        )
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)[:, None, None, :]
        for block in t.blocks:
            x = block(x, cos, sin, key_mask)
        logits = F.linear(t.ln_f(x), self.output_weight())
        if return_dict is False:
            return (logits,)
        return MaskedLMOutput(logits=cast(torch.FloatTensor, logits))
