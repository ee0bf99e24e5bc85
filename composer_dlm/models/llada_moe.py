"""LLaDA-MoE: LLaDA's bidirectional trunk with a mixture of experts in place of the MLP (inclusionAI's
LLaDA-MoE-7B-A1B; the architecture of dLLM's ``modeling_lladamoe.py``), sharing attention, RMSNorm and RoPE
with :mod:`.llada`.

Each layer is pre-norm, h = input_layernorm(x), x = x + o_proj(attention(rope(q_norm(q)), rope(k_norm(k)), v))
(``q_norm``/``k_norm``: RMSNorm over each head's head_dim, when ``qk_layernorm``), then with
h = post_attention_layernorm(x)

    x = x + sum over the top-k experts e of p_e * down_e(silu(gate_e(h)) * up_e(h))  [+ shared_expert(h)]

where p = softmax(router(h)) in fp32 (plus ``expert_bias`` when the release enables it; the biased scores are
both the ranking and the weights), top-k not renormalised. Layers with ``moe_layer_freq[i] == 0`` have a dense
SwiGLU MLP instead. Then ``norm`` and ``lm_head`` (or the embedding, with ``tie_word_embeddings``).

Experts are held stacked, one (num_experts, out, in) tensor per projection, and run as grouped GEMMs over the
tokens sorted by expert (:mod:`kernels.grouped_mm`); the dispatch (sort, group ends, padding) stays on the device.

Training adds the router's losses as LLaDA-MoE trains with them (:attr:`LLaDAMoEModel.router_loss`): the
load-balancing loss E * sum_e f_e * P_e (f_e: the fraction of top-k slots given to expert e, P_e: its mean
router probability, both over the tokens of every MoE layer together, as dLLM's ``load_balancing_loss_func``
computes it) times ``router_aux_loss_coef`` (0.01), plus the router z-loss mean(logsumexp(router logits)^2) times
``router_z_loss_coef`` (0.001).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.models import hf_format
from composer_dlm.models.hf_format import CheckpointError
from composer_dlm.models.hf_remote.llada_layers import RMSNorm, apply_rope, attend, rope_cos_sin
from composer_dlm.models.llada import LLaDAModel, training_flops
from kernels.grouped_mm import GROUP_ALIGN, grouped_mm

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


@dataclasses.dataclass
class LLaDAMoEConfig:
    """The fields of LLaDA-MoE's ``config.json`` (its own key names) that define the network; also the schema of a
    run's ``model.config`` with ``model.architecture: llada_moe``. ``moe_layer_freq`` None: every layer is MoE.
    ``mask_token_id`` None: taken from the tokenizer. Other keys are kept in ``extra`` and written back."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_experts: int
    num_experts_per_tok: int
    expert_intermediate_size: int
    num_key_value_heads: int | None = None
    dense_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    moe_layer_freq: list[int] | None = None
    qk_layernorm: bool = True
    moe_router_enable_expert_bias: bool = False
    rope_theta: float = 50000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    initializer_range: float = 0.02
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        problems = []
        for name in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
            "num_experts", "num_experts_per_tok", "expert_intermediate_size",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if (
                self.hidden_size % self.num_attention_heads
                or (self.hidden_size // self.num_attention_heads) % 2
            ):
                problems.append(
                    f"hidden_size ({self.hidden_size}) / num_attention_heads ({self.num_attention_heads}) "
                    "must be an even integer (the head dimension, for RoPE)"
                )
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append("num_attention_heads must be a multiple of num_key_value_heads")
            if self.num_experts_per_tok > self.num_experts:
                problems.append(
                    f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds num_experts ({self.num_experts})"
                )
            if len(self.moe_layer_freq) != self.num_hidden_layers:
                problems.append(
                    f"moe_layer_freq has {len(self.moe_layer_freq)} entries for {self.num_hidden_layers} layers"
                )
            elif 0 in self.moe_layer_freq and not self.dense_intermediate_size:
                problems.append("dense layers (moe_layer_freq 0) need dense_intermediate_size")
        if problems:
            raise ValueError("invalid LLaDA-MoE config: " + "; ".join(problems))

    # --- the names the rest of the library reads (shared with LLaDAConfig) ---------------------------------
    @property
    def d_model(self) -> int:
        return self.hidden_size

    @property
    def n_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_size(self) -> int:
        return self.vocab_size

    @property
    def max_sequence_length(self) -> int:
        return self.max_position_embeddings

    @property
    def weight_tying(self) -> bool:
        return self.tie_word_embeddings

    def is_moe_layer(self, i: int) -> bool:
        assert self.moe_layer_freq is not None  # filled in by __post_init__
        return self.moe_layer_freq[i] != 0

    # --- config.json ----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> LLaDAMoEConfig:
        """Builds a config from a ``config.json`` mapping, refusing settings this implementation lacks."""
        hf_format.check_moe_supported(data, source)
        required = (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "num_experts",
            "num_experts_per_tok", "expert_intermediate_size",
        )  # fmt: skip
        config = hf_format.build_config(cls, data, required=required, source=source)
        if config.mask_token_id is not None and not 0 <= config.mask_token_id < config.vocab_size:
            raise CheckpointError(
                f"{source}: mask_token_id ({config.mask_token_id}) is outside the vocabulary ({config.vocab_size})"
            )
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LLaDAMoEConfig:
        return cls.from_dict(hf_format.read_config(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return hf_format.config_dict(self)

    # --- size and FLOPs -------------------------------------------------------------------------------------
    def num_params(self, *, include_embedding: bool = True, active: bool = False) -> int:
        """Parameter count from the shapes; ``active``: only those one token multiplies with (the top-k routed
        experts of each MoE layer, not all of them). ``include_embedding=False`` leaves out the input embedding
        (a lookup) but keeps the output projection."""
        assert self.num_key_value_heads is not None  # filled in by __post_init__
        h, hd = self.hidden_size, self.head_dim
        kv = self.num_key_value_heads * hd
        attention = 2 * h * h + 2 * h * kv + 2 * h + (2 * hd if self.qk_layernorm else 0)
        experts = self.num_experts_per_tok if active else self.num_experts
        moe = h * self.num_experts + 3 * h * self.expert_intermediate_size * experts
        moe += 3 * h * (self.shared_expert_intermediate_size or 0)
        dense = 3 * h * (self.dense_intermediate_size or 0)
        total = sum(
            attention + (moe if self.is_moe_layer(i) else dense) for i in range(self.num_hidden_layers)
        )
        total += h + self.vocab_size * h  # norm, output projection
        if include_embedding and not self.tie_word_embeddings:
            total += self.vocab_size * h
        return total

    def training_flops(self, batch_size: int, seq_len: int, projected_tokens: float | None = None) -> float:
        """FLOPs of one training step by :func:`.llada.training_flops` over the active parameters: the
        numerator of active-parameter MFU."""
        return training_flops(
            matmul_params=self.num_params(include_embedding=False, active=True),
            n_layers=self.num_hidden_layers,
            attention_width=self.hidden_size,
            output_rows=self.vocab_size,
            batch_size=batch_size,
            seq_len=seq_len,
            projected_tokens=projected_tokens,
        )


class SwiGLU(nn.Module):
    """down_proj(silu(gate_proj(x)) * up_proj(x)): the dense MLP and the shared expert."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on ``x`` run in: autocast's when it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class GroupedExperts(nn.Module):
    """``num_experts`` SwiGLU experts held stacked: gate_proj, up_proj (E, I, H) and down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x_MH: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
        """The experts over rows sorted by expert, group e ending at ``ends_E[e]``: three grouped GEMMs, in the
        autocast dtype when autocast is on (as ``nn.Linear`` would compute; the grouped product is not on
        autocast's lists, so the casts are made here)."""
        dtype = compute_dtype(x_MH)
        x_MH = x_MH.to(dtype)
        gate = grouped_mm(x_MH, self.gate_proj.to(dtype), ends_E)
        up = grouped_mm(x_MH, self.up_proj.to(dtype), ends_E)
        return grouped_mm(F.silu(gate) * up, self.down_proj.to(dtype), ends_E)


class SparseMoE(nn.Module):
    """Router (``gate``), top-k, and the routed experts; returns the routed output and the router's statistics."""

    expert_bias: torch.Tensor | None

    def __init__(self, cfg: LLaDAMoEConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size)
        if cfg.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        else:
            self.expert_bias = None

    def route(self, x_NH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits (N, E) fp32, top-k weights (N, k) in x's dtype, top-k expert ids (N, k))."""
        logits_NE = self.gate(x_NH).float()
        scores_NE = F.softmax(logits_NE, dim=1)
        if self.expert_bias is not None:
            scores_NE = scores_NE + self.expert_bias
        weights_NK, experts_NK = torch.topk(scores_NE, self.top_k, dim=-1)
        return logits_NE, weights_NK.to(x_NH.dtype), experts_NK

    def forward(self, h_BLH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed output (B, L, H), router statistics (2E + 1,) fp32: top-k slots per expert, summed router
        probabilities per expert, summed squared logsumexp of the router logits) for :func:`router_losses`."""
        shape = h_BLH.shape
        x_NH = h_BLH.reshape(-1, shape[-1])
        logits_NE, weights_NK, experts_NK = self.route(x_NH)
        out_NH = self.experts_forward(x_NH, weights_NK, experts_NK)
        return out_NH.view(shape), self.router_statistics(logits_NE)

    def router_statistics(self, logits_NE: torch.Tensor) -> torch.Tensor:
        """(2E + 1,) fp32: top-k slots per expert (of the unbiased softmax, as dLLM's balancing loss ranks them;
        no gradient), summed router probabilities per expert, summed logsumexp(logits)^2."""
        probs_NE = F.softmax(logits_NE, dim=-1)
        slots_NE = torch.zeros_like(probs_NE).scatter_(1, probs_NE.topk(self.top_k, dim=-1).indices, 1.0)
        z = torch.logsumexp(logits_NE, dim=-1).pow(2).sum()
        return torch.cat([slots_NE.sum(0).detach(), probs_NE.sum(0), z[None]])

    def experts_forward(
        self, x_NH: torch.Tensor, weights_NK: torch.Tensor, experts_NK: torch.Tensor
    ) -> torch.Tensor:
        """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]), with no host synchronisation.

        The N * k (token, slot) pairs are sorted by expert; each expert's group is padded to a multiple of
        ``GROUP_ALIGN`` rows inside a buffer of the static size N * k + E * GROUP_ALIGN (so no size is read on the
        host); the grouped GEMMs run over the buffer; each pair's row is read back, weighted, and the k slots of
        each token summed in a fixed order (deterministic, no atomics)."""
        n, k = experts_NK.shape
        flat_P = experts_NK.reshape(-1)
        order_P = torch.argsort(flat_P, stable=True)
        expert_of_sorted = flat_P[order_P]
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=x_NH.device)
        counts_E.scatter_add_(0, flat_P, torch.ones_like(flat_P))
        padded_E = (counts_E + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
        padded_ends_E = padded_E.cumsum(0)
        starts_E = counts_E.cumsum(0) - counts_E
        rank_in_group = torch.arange(n * k, device=x_NH.device) - starts_E[expert_of_sorted]
        dest_P = (padded_ends_E - padded_E)[expert_of_sorted] + rank_in_group  # buffer row of sorted pair p
        rows = n * k + self.num_experts * GROUP_ALIGN
        x_NH = x_NH.to(compute_dtype(x_NH))  # before the copies: bf16 rows under autocast
        buffer = x_NH.new_zeros(rows, x_NH.shape[1]).index_copy(0, dest_P, x_NH[order_P // k])
        y_sorted = self.experts(buffer, padded_ends_E)[dest_P]
        y_P = torch.empty_like(y_sorted).index_copy(0, order_P, y_sorted)  # back to (token, slot) order
        return (y_P.view(n, k, -1) * weights_NK[:, :, None]).sum(1)


def router_losses(stats_SX: torch.Tensor, num_experts: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, z-loss) from the stacked statistics of the S MoE layers of one forward over
    ``tokens`` tokens (see :meth:`SparseMoE.forward` and the module docstring)."""
    total = stats_SX.sum(0)
    rows = stats_SX.shape[0] * tokens
    slots_E, probs_E, z_sum = total[:num_experts], total[num_experts : 2 * num_experts], total[-1]
    balance = num_experts * ((slots_E / rows) * (probs_E / rows)).sum()
    return balance, z_sum / rows


class MoEAttention(nn.Module):
    """Bidirectional attention with q_proj/k_proj/v_proj/o_proj and per-head q/k RMSNorm (LLaDA-MoE's names)."""

    def __init__(self, cfg: LLaDAMoEConfig) -> None:
        super().__init__()
        assert cfg.num_key_value_heads is not None  # filled in by __post_init__
        h, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_layernorm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps) if cfg.qk_layernorm else None

    def forward(
        self, h_BLH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask_B11L: torch.Tensor | None
    ) -> torch.Tensor:
        b, length, _ = h_BLH.shape
        q = self.q_proj(h_BLH).view(b, length, self.n_heads, self.head_dim)
        k = self.k_proj(h_BLH).view(b, length, self.n_kv_heads, self.head_dim)
        v = self.v_proj(h_BLH).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        return self.o_proj(attend(q, k, v, key_mask_B11L))


class LLaDAMoEBlock(nn.Module):
    """One pre-norm layer: attention, then the mixture of experts (+ shared expert) or a dense MLP."""

    def __init__(self, cfg: LLaDAMoEConfig, index: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = MoEAttention(cfg)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp: SparseMoE | SwiGLU
        self.shared_expert: SwiGLU | None = None
        if cfg.is_moe_layer(index):
            self.mlp = SparseMoE(cfg)
            if cfg.shared_expert_intermediate_size:
                self.shared_expert = SwiGLU(h, cfg.shared_expert_intermediate_size)
        else:
            assert cfg.dense_intermediate_size is not None  # checked by LLaDAMoEConfig
            self.mlp = SwiGLU(h, cfg.dense_intermediate_size)

    def forward(
        self,
        x_BLH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask_B11L: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the layer's output, the router statistics of an MoE layer or None)."""
        x_BLH = x_BLH + self.self_attn(self.input_layernorm(x_BLH), cos, sin, key_mask_B11L)
        h = self.post_attention_layernorm(x_BLH)
        if isinstance(self.mlp, SwiGLU):
            return x_BLH + self.mlp(h), None
        routed, stats = self.mlp(h)
        if self.shared_expert is not None:
            routed = routed + self.shared_expert(h)
        return x_BLH + routed, stats


class _Trunk(nn.Module):
    def __init__(self, cfg: LLaDAMoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LLaDAMoEBlock(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDAMoEModel(nn.Module):
    """LLaDA-MoE mask predictor; the same calling convention as :class:`.llada.LLaDAModel`: ``model(input_ids,
    attention_mask)`` returns logits (B, L, vocab_size), ``model(input_ids, head=fn)`` returns ``fn(hidden,
    output_weight)``. A forward under autograd leaves the weighted router losses in :attr:`router_loss` (for the
    training objective to add); parameter names are the release's except the stacked experts
    (:func:`.hf_format.unstack_experts` maps them)."""

    fsdp_wrap_fn: Callable[[nn.Module], bool]
    activation_checkpointing_fn: Callable[[nn.Module], bool]
    router_loss: torch.Tensor | None

    def __init__(self, config: LLaDAMoEConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Trunk(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_loss = None

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: LLaDAMoEConfig | Mapping[str, Any],
        *,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> LLaDAMoEModel:
        """A freshly initialised fp32 model (the rule of :meth:`init_std`, drawn on the CPU from ``seed``)."""
        if not isinstance(config, LLaDAMoEConfig):
            config = LLaDAMoEConfig.from_dict(config)
        with torch.device("meta"):
            model = cls(config)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "meta":
            model.to_empty(device=device)
            model.reset_parameters(seed=seed)
        return model

    def init_std(self, name: str) -> float | None:
        """N(0, initializer_range) for every matrix, scaled by 1/sqrt(2 * layers) for those writing into the
        residual stream (o_proj, down_proj); None for RMSNorm weights (1)."""
        if name.endswith("norm.weight"):
            return None
        std = self.config.initializer_range
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            return std / math.sqrt(2 * self.config.num_hidden_layers)
        return std

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        generator = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
        for name, param in self.named_parameters():
            std = self.init_std(name)
            if std is None:
                param.fill_(1.0)
            else:
                param.copy_(torch.empty(param.shape).normal_(0.0, std, generator=generator))
        for buffer in self.buffers():
            buffer.zero_()

    # --- forward --------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    @property
    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states (B, L, hidden_size) after ``norm``; sets :attr:`router_loss` under autograd."""
        length = input_ids.shape[1]
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(length, self.config.head_dim, self.config.rope_theta, input_ids.device)
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)[:, None, None, :]
        stats = []
        for layer in self.model.layers:
            x, layer_stats = layer(x, cos, sin, key_mask)
            if layer_stats is not None:
                stats.append(layer_stats)
        self.router_loss = None
        if stats and torch.is_grad_enabled():
            balance, z = router_losses(torch.stack(stats), self.config.num_experts, input_ids.numel())
            self.router_loss = self.config.router_aux_loss_coef * balance + self.config.router_z_loss_coef * z
        return self.model.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], T] | None = None,
    ) -> torch.Tensor | T:
        hidden = self.hidden_states(input_ids, attention_mask)
        if head is not None:
            return head(hidden, self.output_weight)
        return F.linear(hidden, self.output_weight)

    # --- Hugging Face folders -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> LLaDAMoEModel:
        """Loads a LLaDA-MoE Hugging Face folder (the release's names; experts stacked as they are read).
        ``dtype`` defaults to the stored one; ``device="meta"`` reads config.json only."""
        folder = hf_format.check_folder(folder)
        config = LLaDAMoEConfig.from_json(folder / hf_format.CONFIG_NAME)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config)
        if device.type == "meta":
            hf_format.safetensors_files(folder)
            return model.to(dtype) if dtype is not None else model
        expected = dict(model.named_parameters()) | dict(model.named_buffers())
        filled: dict[str, int] = {}
        allocated = False
        for shard, name, tensor in hf_format.read_tensors(folder, device):
            if not allocated:
                model.to(dtype or tensor.dtype).to_empty(device=device)
                expected = dict(model.named_parameters()) | dict(model.named_buffers())
                allocated = True
            slot = hf_format.expert_slot(name)
            target_name, index = slot if slot is not None else (name, None)
            if target_name not in expected:
                raise CheckpointError(
                    f"{shard}: tensor {name!r} is not a parameter of a LLaDA-MoE model with this config"
                )
            target = expected[target_name] if index is None else expected[target_name][index]
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{shard}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(target.shape)}"
                )
            with torch.no_grad():
                target.copy_(tensor)
            filled[target_name] = filled.get(target_name, 0) + 1
        want = {
            n: (t.shape[0] if hf_format.expert_slot(_one_expert_name(n)) else 1) for n, t in expected.items()
        }
        missing = sorted(n for n, count in want.items() if filled.get(n, 0) != count)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(f"{folder}: {len(missing)} tensor(s) missing from the safetensors: {shown}")
        return model

    def save_pretrained(
        self,
        folder: str | os.PathLike[str],
        *,
        max_shard_size: int | str = "5GB",
        dtype: torch.dtype | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        source: str | os.PathLike[str] | None = None,
    ) -> None:
        """Writes a folder LLaDA-MoE's code loads (the release's names and keys; atomic, as for LLaDA)."""
        self.write_pretrained(
            self.state_dict(),
            folder,
            max_shard_size=max_shard_size,
            dtype=dtype,
            tokenizer=tokenizer,
            source=source,
        )

    def write_pretrained(
        self, state_dict: Mapping[str, torch.Tensor], folder: str | os.PathLike[str], **options: Any
    ) -> None:
        """:meth:`save_pretrained` of ``state_dict`` (this model's parameter names, e.g. gathered from FSDP)."""
        hf_format.write_folder(
            self.config.to_dict(),
            export_state(state_dict, self.config),
            folder,
            architecture=hf_format.MOE_RELEASE_ARCHITECTURE,
            own_remote_code=False,
            **options,
        )

    # FSDP's initialiser for meta-built ranks: NaN until rank 0's broadcast, as for LLaDA.
    param_init_fn = LLaDAModel.param_init_fn


def _one_expert_name(stacked: str) -> str:
    """The release name of expert 0 of a stacked parameter name (for :func:`.hf_format.expert_slot`)."""
    prefix, _, proj = stacked.rpartition(".")
    return f"{prefix}.0.{proj}.weight"


def export_state(state_dict: Mapping[str, torch.Tensor], config: LLaDAMoEConfig) -> dict[str, torch.Tensor]:
    """Our state dict (``model.`` prefixed names) under the release's tensor names: experts unstacked, and no
    ``lm_head.weight`` with tied embeddings."""
    out = hf_format.unstack_experts(state_dict)
    if config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out
