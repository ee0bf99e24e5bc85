"""The LLaDA transformer: a bidirectional Llama-style trunk, its configuration and its initialisation.

Architecture (LLaDA's release): token embedding ``wte``; ``n_layers`` pre-norm blocks, each

    x = x + attn_out(attention(rope(q_proj(h)), rope(k_proj(h)), v_proj(h)))   with h = attn_norm(x)
    x = x + ff_out(silu(ff_proj(h)) * up_proj(h))                               with h = ff_norm(x)

then ``ln_f`` and the output projection ``ff_out`` (or ``wte`` when ``weight_tying``). Attention has no
causal mask, no biases and no time input; grouped-query attention is supported (``n_kv_heads < n_heads``).
RMSNorm is computed in fp32 (x * rsqrt(mean(x^2) + eps)), cast back, then scaled by its weight. RoPE
uses the rotate-half convention (dimension i pairs with i + head_dim/2, inverse frequency
theta^(-2i/head_dim)) and is applied to q and k in fp32.

Under ``torch.no_grad()`` on CUDA, ``model(..., fused=True)`` computes the same forward with the elementwise work
in fused Triton kernels (:mod:`kernels.inference`), bitwise equal to the eager ops; the sampler uses it.

Parameter names equal the tensor names in LLaDA's safetensors files (``model.transformer.blocks.0.q_proj.weight``
...), so loading and saving need no renaming map; the folder format itself lives in :mod:`.hf_format`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.models import hf_format
from composer_dlm.models.hf_format import CheckpointError
from composer_dlm.models.hf_remote.llada_layers import RMSNorm, apply_rope, attend, rope_cos_sin
from kernels import inference as fused_ops

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


@dataclasses.dataclass
class LLaDAConfig:
    """The fields of LLaDA's ``config.json`` that define the network; also the schema of a run's ``model.config``
    (where ``mask_token_id`` and ``eos_token_id`` are taken from the tokenizer).

    Keys of the file that are not fields (``architectures``, ``auto_map``, ``init_device`` ...) are kept in
    ``extra`` and written back unchanged by an export, so a released folder round-trips.
    """

    d_model: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    mlp_hidden_size: int | None = None
    embedding_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    mask_token_id: int | None = None  # from config.json, or for a run from the tokenizer
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    max_sequence_length: int = 4096
    weight_tying: bool = False
    include_bias: bool = False
    init_std: float = 0.02
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = 4 * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        problems = []
        for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "mlp_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not problems:
            if self.d_model % self.n_heads:
                problems.append(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
            elif (self.d_model // self.n_heads) % 2:
                problems.append(
                    f"head_dim = d_model / n_heads = {self.d_model // self.n_heads} must be even for RoPE"
                )
            if self.n_heads % self.n_kv_heads:
                problems.append(
                    f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
                )
            if self.embedding_size < self.vocab_size:
                problems.append(
                    f"embedding_size ({self.embedding_size}) must be >= vocab_size ({self.vocab_size})"
                )
        if self.include_bias:
            problems.append("include_bias=true is not supported: LLaDA's blocks have no biases")
        if problems:
            raise ValueError("invalid LLaDA config: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> LLaDAConfig:
        """Builds a config from a ``config.json`` mapping, refusing settings this implementation lacks; keys that
        are not fields are kept in ``extra``."""
        model_type = data.get("model_type")
        if model_type not in (None, "llada"):
            raise CheckpointError(
                f"{source}: not a LLaDA config (model_type {model_type!r}); composer-dlm builds LLaDA and LLaDA-MoE "
                "networks only: give a LLaDA folder (model_type 'llada', e.g. GSAI-ML/LLaDA-8B-Base or one of our "
                "exports) or a LLaDA-MoE one (model_type 'lladamoe')"
            )
        hf_format.check_supported(data, source)
        required = ("d_model", "n_layers", "n_heads", "vocab_size")
        config = hf_format.build_config(cls, data, required=required, source=source)
        assert config.embedding_size is not None  # filled in by __post_init__
        if config.mask_token_id is not None and not 0 <= config.mask_token_id < config.embedding_size:
            # Checked here rather than in __post_init__: a run's model.config leaves the id to the tokenizer.
            raise CheckpointError(
                f"{source}: mask_token_id ({config.mask_token_id}) is outside the embedding "
                f"(size {config.embedding_size})"
            )
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> LLaDAConfig:
        return cls.from_dict(hf_format.read_config(path), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The fields and the ``extra`` keys as one mapping (what :meth:`from_dict` reads back)."""
        return hf_format.config_dict(self)

    def num_params(self, *, include_embedding: bool = True) -> int:
        """Parameter count from the shapes alone; ``include_embedding=False`` leaves out the input embedding
        (but keeps the output projection, tied or not, since it does matrix work on every token)."""
        n_kv_heads, mlp_hidden_size, embedding_size = (
            self.n_kv_heads,
            self.mlp_hidden_size,
            self.embedding_size,
        )
        # All three are filled in by __post_init__.
        assert n_kv_heads is not None and mlp_hidden_size is not None and embedding_size is not None
        h, kv = self.d_model, n_kv_heads * self.head_dim
        per_block = 2 * h + h * h + 2 * h * kv + h * h + 3 * h * mlp_hidden_size
        total = self.n_layers * per_block + h + embedding_size * h  # blocks, ln_f, output projection
        if include_embedding and not self.weight_tying:
            total += embedding_size * h  # the input embedding, a lookup with no matrix work
        return total

    def training_flops(self, batch_size: int, seq_len: int, projected_tokens: float | None = None) -> float:
        """FLOPs of one training step by :func:`training_flops` (the numerator of MFU)."""
        assert self.embedding_size is not None  # filled in by __post_init__
        return training_flops(
            matmul_params=self.num_params(include_embedding=False),
            n_layers=self.n_layers,
            attention_width=self.d_model,
            output_rows=self.embedding_size,
            batch_size=batch_size,
            seq_len=seq_len,
            projected_tokens=projected_tokens,
        )


def training_flops(
    *,
    matmul_params: int,
    n_layers: int,
    attention_width: int,
    output_rows: int,
    batch_size: int,
    seq_len: int,
    projected_tokens: float | None = None,
) -> float:
    """FLOPs of one training step (forward + backward) by the standard formula, the numerator of MFU:
    3 * (2 * params * tokens + 4 * n_layers * attention_width * L^2 * B).

    ``matmul_params`` are the parameters each token multiplies with: without the input embedding (a lookup), with
    the output projection (``output_rows`` x d_model); for a mixture of experts, only the active ones (top-k
    routed experts, shared expert, router). The attention term counts the full L x L score and value products
    (attention here is bidirectional) over ``attention_width`` = heads * head_dim. With ``projected_tokens``, the
    output projection counts only that many rows (the fused loss projects the masked rows only): the FLOPs
    actually executed, 6 * output_rows * d_model per row fewer, d_model = attention_width.
    """
    tokens = batch_size * seq_len
    forward = 2.0 * matmul_params * tokens
    forward += 4 * n_layers * attention_width * seq_len * tokens
    if projected_tokens is not None:
        forward -= 2 * output_rows * attention_width * (tokens - projected_tokens)
    return float(3 * forward)


@contextlib.contextmanager
def eager_blocks() -> Iterator[None]:
    """Runs ``torch.compile``-d blocks eagerly inside the block.

    No-grad passes (evaluation, sampling) would otherwise recompile the blocks for the other grad mode, which
    fails under FSDP1 with compiled blocks on recent torch (seen on torch 2.11: "attempting to assign a
    gradient with dtype 'float' to a tensor with grad_dtype 'BFloat16'"). They are a small part of a run.
    """
    with torch.compiler.set_stance("force_eager"):
        yield


class LLaDABlock(nn.Module):
    """One pre-norm transformer block with bidirectional attention and a SwiGLU MLP."""

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        n_kv_heads, mlp_hidden_size = cfg.n_kv_heads, cfg.mlp_hidden_size
        # Both are filled in by LLaDAConfig.__post_init__.
        assert n_kv_heads is not None and mlp_hidden_size is not None
        h, kv_dim = cfg.d_model, n_kv_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, n_kv_heads, cfg.head_dim
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.ff_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, kv_dim, bias=False)
        self.v_proj = nn.Linear(h, kv_dim, bias=False)
        self.attn_out = nn.Linear(h, h, bias=False)
        self.ff_proj = nn.Linear(h, mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(h, mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(mlp_hidden_size, h, bias=False)

    def attention(
        self,
        h_BLH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask_B11L: torch.Tensor | None,
        positions_BR: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention output (B, L, d_model), or (B, R, d_model) for the queries at ``positions_BR`` only."""
        b, length, _ = h_BLH.shape
        h_BRH = select_positions(h_BLH, positions_BR)
        q_cos, q_sin = _query_rope_tables(cos, sin, positions_BR)
        q = self.q_proj(h_BRH).view(b, h_BRH.shape[1], self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h_BLH).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h_BLH).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, q_cos, q_sin), apply_rope(k, cos, sin)
        return self.attn_out(attend(q, k, v, key_mask_B11L))

    def forward(
        self,
        x_BLH: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_mask_B11L: torch.Tensor | None = None,
        positions_BR: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The block's output (B, L, d_model); with ``positions_BR`` (B, R) long, only at those positions of each
        row, (B, R, d_model): keys and values still come from all L positions (an inference shortcut for the last
        block, whose other outputs nobody reads)."""
        x_BRH = select_positions(x_BLH, positions_BR)
        x_BRH = x_BRH + self.attention(self.attn_norm(x_BLH), cos, sin, key_mask_B11L, positions_BR)
        h = self.ff_norm(x_BRH)
        return x_BRH + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def forward_cached(
        self,
        x_BSH: torch.Tensor,
        cos_SD: torch.Tensor,
        sin_SD: torch.Tensor,
        key_mask_B11L: torch.Tensor | None,
        keys_BKLD: torch.Tensor,
        values_BKLD: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        """:meth:`forward` of the S positions ``[start, start + S)`` of a longer sequence whose other keys and values
        come from a cache: this slice's keys (after RoPE) and values are written into ``keys_BKLD`` /
        ``values_BKLD`` (B, kv_heads, L, head_dim) in place, then its queries attend over all L of them.
        ``cos_SD`` / ``sin_SD`` are the RoPE tables of those S positions. With ``start=0`` and S = L this is the
        full forward that fills the cache."""
        b, length, _ = x_BSH.shape
        h = self.attn_norm(x_BSH)
        q = self.q_proj(h).view(b, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        keys_BKLD[:, :, start : start + length] = apply_rope(k, cos_SD, sin_SD)
        values_BKLD[:, :, start : start + length] = v
        q = apply_rope(q, cos_SD, sin_SD)
        x_BSH = x_BSH + self.attn_out(attend(q, keys_BKLD, values_BKLD, key_mask_B11L))
        h = self.ff_norm(x_BSH)
        return x_BSH + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))

    def qkv_weight(self) -> torch.Tensor:
        """The q, k and v projection weights stacked (one product instead of three); a new tensor."""
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def forward_fused(
        self, x_BLH: torch.Tensor, sq_BLH: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
        key_mask_B11L: torch.Tensor | None = None, qkv_weight: torch.Tensor | None = None,
        positions_BR: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """:meth:`forward` (no grad, CUDA) with its elementwise work fused, bit for bit equal to it.

        Takes and returns the residual stream with its fp32 squares (``x.float() ** 2``, the next RMSNorm's input);
        with ``positions_BR`` it returns them at those positions only, as :meth:`forward` does. ``qkv_weight``
        (:meth:`qkv_weight`) computes q, k and v in one product (not with ``positions_BR``, where q has fewer rows).
        """
        b, length, _ = x_BLH.shape
        q_lin, k_lin, v_lin = self._fused_qkv(x_BLH, sq_BLH, qkv_weight, positions_BR)
        q = _fused_rope(q_lin, self.n_heads, cos, sin, positions_BR)
        k = _fused_rope(k_lin, self.n_kv_heads, cos, sin)
        v = v_lin.view(b, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        attn = self.attn_out(attend(q, k, v, key_mask_B11L))
        return self._fused_residual_mlp(select_positions(x_BLH, positions_BR), attn)

    def forward_cached_fused(
        self, x_BSH: torch.Tensor, sq_BSH: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor,
        key_mask_B11L: torch.Tensor | None, keys_BKLD: torch.Tensor, values_BKLD: torch.Tensor, start: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """:meth:`forward_cached` with the elementwise work of :meth:`forward_fused` (same kernels, bit for bit
        equal to it), taking and returning the residual stream with its fp32 squares."""
        b, length, _ = x_BSH.shape
        q_lin, k_lin, v_lin = self._fused_qkv(x_BSH, sq_BSH)
        keys_BKLD[:, :, start : start + length] = _fused_rope(k_lin, self.n_kv_heads, cos_SD, sin_SD)
        values_BKLD[:, :, start : start + length] = v_lin.view(
            b, length, self.n_kv_heads, self.head_dim
        ).transpose(1, 2)
        q = _fused_rope(q_lin, self.n_heads, cos_SD, sin_SD)
        attn = self.attn_out(attend(q, keys_BKLD, values_BKLD, key_mask_B11L))
        return self._fused_residual_mlp(x_BSH, attn)

    def _fused_qkv(
        self,
        x_BLH: torch.Tensor,
        sq_BLH: torch.Tensor,
        qkv_weight: torch.Tensor | None = None,
        positions_BR: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q (at ``positions_BR`` when given), k and v projections of the normed residual stream, unsplit into
        heads: one product with ``qkv_weight`` where allowed, else three."""
        h = _fused_norm(self.attn_norm, x_BLH, sq_BLH)
        if qkv_weight is not None and positions_BR is None:
            kv_dim = self.n_kv_heads * self.head_dim
            q_lin, k_lin, v_lin = F.linear(h, qkv_weight).split(
                [self.n_heads * self.head_dim, kv_dim, kv_dim], -1
            )
            return q_lin, k_lin, v_lin
        return self.q_proj(select_positions(h, positions_BR)), self.k_proj(h), self.v_proj(h)

    def _fused_residual_mlp(
        self, x_BRH: torch.Tensor, attn_BRH: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's second half, fused: the attention's residual add, then the MLP and its residual add;
        returns the output and its fp32 squares."""
        x_BRH, sq_BRH = fused_ops.add_square(x_BRH, attn_BRH)
        h = _fused_norm(self.ff_norm, x_BRH, sq_BRH)
        return fused_ops.add_square(x_BRH, self.ff_out(fused_ops.silu_mul(self.ff_proj(h), self.up_proj(h))))


def select_positions(x_BLH: torch.Tensor, positions_BR: torch.Tensor | None) -> torch.Tensor:
    """``x_BLH`` at ``positions_BR`` (B, R) long of each row, (B, R, H); ``x_BLH`` itself when None."""
    if positions_BR is None:
        return x_BLH
    return x_BLH.gather(1, positions_BR[:, :, None].expand(-1, -1, x_BLH.shape[-1]))


def _query_rope_tables(
    cos_LD: torch.Tensor, sin_LD: torch.Tensor, positions_BR: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE tables of the queries at ``positions_BR``: (B, 1, R, head_dim), broadcasting over the heads of a
    (B, heads, R, head_dim) q; the (L, head_dim) tables themselves when None (every position is a query)."""
    if positions_BR is None:
        return cos_LD, sin_LD
    return cos_LD[positions_BR][:, None], sin_LD[positions_BR][:, None]


def _fused_rope(
    lin_BRX: torch.Tensor,
    n_heads: int,
    cos_LD: torch.Tensor,
    sin_LD: torch.Tensor,
    positions_BR: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fused_ops.rope` of a (B, R, n_heads * head_dim) projection, returned as (B, n_heads, R, head_dim).

    Row r of a batch is at position r, or at ``positions_BR[b, r]`` when given: the rows are then flattened into
    one sequence of B * R rows whose tables are gathered, so the kernel's row i reads table row i."""
    b, rows, width = lin_BRX.shape
    head_dim = width // n_heads
    if positions_BR is None:
        out = fused_ops.rope(lin_BRX.view(b, rows, n_heads, head_dim), cos_LD, sin_LD)
    else:
        flat = lin_BRX.reshape(1, b * rows, n_heads, head_dim)
        flat_positions = positions_BR.reshape(-1)
        out = fused_ops.rope(flat, cos_LD[flat_positions], sin_LD[flat_positions])
    return out.view(b, rows, n_heads, head_dim).transpose(1, 2)


def _check_fused(x: torch.Tensor) -> None:
    """The fused kernels run without autograd, on CUDA (or in Triton's CPU interpreter, for tests)."""
    if torch.is_grad_enabled() or (x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ValueError("fused=True is an inference path: it needs torch.no_grad() and a CUDA model")


def _fused_norm(norm: RMSNorm, x: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` given ``sq = x.float() ** 2``; the row mean is PyTorch's own reduction, as in :class:`RMSNorm`."""
    return fused_ops.rms_apply(x, sq.mean(-1, keepdim=True), norm.weight, norm.eps)


class _Transformer(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        embedding_size = cfg.embedding_size
        assert embedding_size is not None  # filled in by LLaDAConfig.__post_init__
        self.wte = nn.Embedding(embedding_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        if not cfg.weight_tying:
            self.ff_out = nn.Linear(cfg.d_model, embedding_size, bias=False)


class _Model(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.transformer = _Transformer(cfg)


@dataclasses.dataclass
class FusedInference:
    """Options of the fused no-grad forward (``model(..., fused=FusedInference(...))``), made by
    :meth:`LLaDAModel.fused_inference`. ``qkv_weights``: per block, the stacked q/k/v weight."""

    qkv_weights: list[torch.Tensor] | None = None


@dataclasses.dataclass
class KVCache:
    """Keys (after RoPE) and values of every position of a sequence, per block, each (B, kv_heads, L, head_dim),
    for :meth:`LLaDAModel.forward_cached`; ``key_mask`` (B, 1, 1, L) bool marks the real (non-padding) keys, or is
    None when every key is real."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_mask: torch.Tensor | None

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


class LLaDAModel(nn.Module):
    """LLaDA mask predictor. ``model(input_ids)`` returns logits (B, L, embedding_size).

    ``model(input_ids, head=fn)`` instead returns ``fn(hidden_BLH, output_weight_VH)``: the loss is then computed
    inside ``forward``, where FSDP has the output projection gathered, and without materialising logits.
    """

    # Composer's FSDP / activation-checkpointing hooks; parallel.parallelize sets them, plain models leave them unset.
    fsdp_wrap_fn: Callable[[nn.Module], bool]
    activation_checkpointing_fn: Callable[[nn.Module], bool]

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Model(config)

    # --- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: LLaDAConfig | Mapping[str, Any] | str | os.PathLike[str],
        *,
        seed: int | None = None,
        device: str | torch.device | None = None,
    ) -> LLaDAModel:
        """A freshly initialised model for pretraining from scratch, in fp32 on ``device`` (default CPU).

        Initialisation: every linear and embedding weight ~ N(0, init_std); the two projections that write
        into the residual stream (``attn_out`` and the blocks' ``ff_out``) use init_std / sqrt(2 * n_layers) so
        the residual's variance does not grow with depth; RMSNorm weights are 1. The values depend on ``seed``
        only (drawn on the CPU, parameter by parameter), not on the device. ``device="meta"``: shapes only, for
        the ranks that receive their weights from rank 0 (see :meth:`param_init_fn`).
        """
        if isinstance(config, (str, os.PathLike)):
            config = LLaDAConfig.from_json(config)
        elif not isinstance(config, LLaDAConfig):
            config = LLaDAConfig.from_dict(config)
        with torch.device("meta"):  # no memory and no default init that reset_parameters would overwrite
            model = cls(config)
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "meta":
            model.to_empty(device=device)
            model.reset_parameters(seed=seed)
        return model

    def init_std(self, name: str) -> float | None:
        """The initial standard deviation of parameter ``name`` (see :meth:`from_config`); None for the RMSNorm
        weights, which start at 1."""
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            return None
        std = self.config.init_std
        if ".blocks." in name and name.endswith(("attn_out.weight", "ff_out.weight")):
            return std / math.sqrt(2 * self.config.n_layers)
        return std

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(0 if seed is None else seed)
        for name, param in self.named_parameters():
            std = self.init_std(name)
            if std is None:
                param.fill_(1.0)
                continue
            sample = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=generator)
            param.copy_(sample)

    # --- forward --------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    @property
    def output_weight(self) -> torch.Tensor:
        """The (embedding_size, d_model) matrix of the output projection."""
        t = self.model.transformer
        return t.wte.weight if self.config.weight_tying else t.ff_out.weight

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        fused: bool | FusedInference = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, L, d_model), after ``ln_f``, before the output projection.

        ``attention_mask`` (B, L), true/1 for real tokens: padded keys are excluded from every query's attention.
        ``fused=True`` (no grad, CUDA) runs the blocks' elementwise work in fused kernels (:mod:`kernels.inference`),
        with bitwise the same result; a :class:`FusedInference` from :meth:`fused_inference` also stacks q/k/v.
        ``positions`` (B, R) long, indices into each row's L positions (repeats allowed): the hidden states at those
        positions only, (B, R, d_model), equal to the full ones there up to rounding. The last block then computes
        its queries, MLP and residual at those R positions only (keys and values still at all L); the others run
        in full, since every position's output feeds the next block's keys and values.
        """
        t = self.model.transformer
        batch, length = input_ids.shape
        if positions is not None and (
            positions.dim() != 2 or positions.shape[0] != batch or positions.dtype != torch.long
        ):
            raise ValueError(
                f"positions must be a (batch={batch}, R) long tensor, got {positions.dtype} {tuple(positions.shape)}"
            )
        last = len(t.blocks) - 1  # the block computed at ``positions`` only
        x = t.wte(input_ids)
        cos, sin = rope_cos_sin(length, self.config.head_dim, self.config.rope_theta, input_ids.device)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.to(torch.bool)[:, None, None, :]
        if fused:
            _check_fused(x)
            qkv = fused.qkv_weights if isinstance(fused, FusedInference) else None
            x, sq = fused_ops.add_square(x)
            for i, block in enumerate(t.blocks):
                qkv_weight = qkv[i] if qkv is not None else None
                x, sq = block.forward_fused(
                    x, sq, cos, sin, key_mask, qkv_weight, positions if i == last else None
                )
            return _fused_norm(t.ln_f, x, sq)
        for i, block in enumerate(t.blocks):
            x = block(x, cos, sin, key_mask, positions if i == last else None)
        return t.ln_f(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        head: Callable[[torch.Tensor, torch.Tensor], T] | None = None,
        *,
        fused: bool | FusedInference = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor | T:
        """Logits (B, L, embedding_size), or ``head(hidden, output_weight)``; ``fused`` and ``positions`` as in
        :meth:`hidden_states` (with ``positions``, the logits or the head's hidden states are (B, R, ...))."""
        hidden = self.hidden_states(input_ids, attention_mask, fused=fused, positions=positions)
        if head is not None:
            return head(hidden, self.output_weight)
        return F.linear(hidden, self.output_weight)

    def new_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> KVCache:
        """An empty (uninitialised) :class:`KVCache` for sequences shaped like ``input_ids`` (B, L); the first
        :meth:`forward_cached` call should cover all L positions (``start=0``) to fill it."""
        batch, length = input_ids.shape
        weight = self.model.transformer.wte.weight
        shape = (batch, self.config.n_kv_heads or self.config.n_heads, length, self.config.head_dim)
        blocks = range(len(self.blocks))
        key_mask = None if attention_mask is None else attention_mask.to(torch.bool)[:, None, None, :]
        return KVCache(
            keys=[weight.new_empty(shape) for _ in blocks],
            values=[weight.new_empty(shape) for _ in blocks],
            key_mask=key_mask,
        )

    def forward_cached(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        start: int,
        head: Callable[[torch.Tensor, torch.Tensor], T] | None = None,
        *,
        fused: bool = False,
    ) -> torch.Tensor | T:
        """Logits (B, S, embedding_size) (or ``head(hidden, output_weight)``) of the S positions ``[start,
        start + S)`` of a cached sequence, ``input_ids`` (B, S) being their tokens now: each block recomputes these
        positions' keys and values into ``cache`` and reads the others from it (no grad; the inference path of
        block-level KV caching). ``start=0`` with all L positions is the full forward and fills the cache.

        The other positions' keys and values are those of the forward that last wrote them: exact when their
        tokens have not changed since and, in a bidirectional model, approximate otherwise, since their states
        depended on the tokens then. ``fused=True`` runs the elementwise work in the fused kernels of
        :meth:`hidden_states` (bit for bit the same result).
        """
        if torch.is_grad_enabled():
            raise ValueError("forward_cached is an inference path: call it under torch.no_grad()")
        t = self.model.transformer
        length = input_ids.shape[1]
        if start < 0 or start + length > cache.length:
            raise ValueError(f"positions [{start}, {start + length}) fall outside the cache's {cache.length}")
        cos, sin = rope_cos_sin(cache.length, self.config.head_dim, self.config.rope_theta, input_ids.device)
        cos, sin = cos[start : start + length], sin[start : start + length]
        x = t.wte(input_ids)
        layers = zip(cast(list[LLaDABlock], list(t.blocks)), cache.keys, cache.values, strict=True)
        if fused:
            _check_fused(x)
            x, sq = fused_ops.add_square(x)
            for block, keys, values in layers:
                x, sq = block.forward_cached_fused(x, sq, cos, sin, cache.key_mask, keys, values, start)
            hidden = _fused_norm(t.ln_f, x, sq)
        else:
            for block, keys, values in layers:
                x = block.forward_cached(x, cos, sin, cache.key_mask, keys, values, start)
            hidden = t.ln_f(x)
        if head is not None:
            return head(hidden, self.output_weight)
        return F.linear(hidden, self.output_weight)

    @torch.no_grad()
    def fused_inference(self, example_ids: torch.Tensor, *, headroom_bytes: int = 2 << 30) -> FusedInference:
        """Options for the fused forward on inputs shaped like ``example_ids`` (B, L).

        Stacks each block's q/k/v weights, which costs their memory a second time (3.2 GB for LLaDA-8B), only if
        that much plus ``headroom_bytes`` is free and one product with the stacked weight equals the three
        separate products bit for bit at this shape on this device: cuBLAS picks its kernel by shape, and a
        split-K kernel would round differently. Checked on the first block.
        """
        blocks = cast(list[LLaDABlock], list(self.blocks))
        first = blocks[0]
        need = sum(b.q_proj.weight.nbytes + b.k_proj.weight.nbytes + b.v_proj.weight.nbytes for b in blocks)
        device = first.q_proj.weight.device
        if device.type != "cuda" or torch.cuda.mem_get_info(device)[0] < need + headroom_bytes:
            return FusedInference()
        h = first.attn_norm(self.model.transformer.wte(example_ids.to(device)))
        stacked = first.qkv_weight()
        separate = torch.cat([first.q_proj(h), first.k_proj(h), first.v_proj(h)], dim=-1)
        if not torch.equal(F.linear(h, stacked), separate):
            return FusedInference()
        return FusedInference(qkv_weights=[stacked] + [b.qkv_weight() for b in blocks[1:]])

    # --- Hugging Face folders (the format itself: :mod:`.hf_format`) ----------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> LLaDAModel:
        """Loads a LLaDA Hugging Face folder (config.json + safetensors, one file or sharded with an index).

        The model is built on the meta device and each tensor is moved into it as it is read, so peak host memory
        is about one tensor beyond the model itself. ``dtype`` defaults to the stored dtype. ``device="meta"``
        reads config.json only and leaves the parameters on the meta device (shapes, no storage): the ranks that
        receive their weights from another rank (FSDP's ``sync_module_states``) start that way.
        """
        folder = hf_format.check_folder(folder)
        config = LLaDAConfig.from_json(folder / hf_format.CONFIG_NAME)
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.device("meta"):
            model = cls(config)
        if device.type == "meta":
            hf_format.safetensors_files(folder)  # the same errors as a full load for a folder without weights
            return model.to(dtype) if dtype is not None else model
        expected = dict(model.named_parameters())
        loaded: set[str] = set()
        for shard, name, tensor in hf_format.read_tensors(folder, device):
            if name not in expected:
                raise CheckpointError(
                    f"{shard}: tensor {name!r} is not a parameter of a LLaDA model with this config"
                )
            param = expected[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(
                    f"{shard}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"config.json implies {tuple(param.shape)}"
                )
            _assign_parameter(model, name, tensor if dtype is None else tensor.to(dtype))
            loaded.add(name)
        missing = sorted(set(expected) - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise CheckpointError(
                f"{folder}: {len(missing)} parameter(s) missing from the safetensors: {shown}"
            )
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
        """Writes a drop-in LLaDA folder (:func:`.hf_format.write_folder`): config.json stating every architecture
        key, safetensors under LLaDA's tensor names, generation_config.json, ``tokenizer``'s files, and the
        modeling files of ``source`` (the folder this model was loaded from) with their ``auto_map``.

        Atomic: a crash leaves either the previous folder or the new one, never a half-written one.
        """
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
        hf_format.write_folder(self.config.to_dict(), state_dict, folder, **options)

    @torch.no_grad()
    def param_init_fn(self, module: nn.Module) -> None:
        """FSDP's initialiser for the parameters of ``module`` that a rank built on the meta device (Composer calls
        it after moving them to the GPU uninitialised). Their values come from rank 0 by ``sync_module_states``;
        until then they hold NaN, so a rank that missed the broadcast fails loudly instead of training garbage."""
        for param in module.parameters(recurse=False):
            param.fill_(float("nan"))


def _assign_parameter(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, param_name = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[param_name] = nn.Parameter(tensor, requires_grad=True)
