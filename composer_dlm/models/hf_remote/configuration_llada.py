"""LLaDA's configuration for ``AutoConfig`` (remote code shipped in composer-dlm exports; needs only transformers).

The keys are those of LLaDA's released ``config.json``. Unlike LLaDA's own class, every default here is the
released network's (Llama-style blocks, SiLU MLP, RMSNorm, RoPE, untied output, no biases, no dropout), and
settings that ``modeling_llada.py`` does not compute are refused when the model is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig

# config.json keys whose other values describe networks this implementation does not compute, with the values
# it does compute. A key that is absent or null means the released network's value.
SUPPORTED: dict[str, tuple[Any, ...]] = {
    "alibi": (False,),
    "block_type": ("llama",),
    "layer_norm_type": ("rms",),
    "activation_type": ("silu", "swiglu"),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "scale_logits": (False,),
    "clip_qkv": (None,),
    "rope": (True,),
    "include_bias": (False,),
    "include_qkv_bias": (False,),
    "multi_query_attention": (False, None),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (False, None),
    "block_group_size": (1,),
}


def unsupported_settings(data: Mapping[str, Any]) -> list[str]:
    """One line per key of ``data`` (a config.json mapping) set to a value outside :data:`SUPPORTED`."""
    return [
        f"{key}={data[key]!r} is not supported (supported: {', '.join(repr(a) for a in allowed if a is not None)})"
        for key, allowed in SUPPORTED.items()
        if data.get(key) is not None and data[key] not in allowed
    ]


class LLaDAConfig(PretrainedConfig):
    """Sizes and special ids of a LLaDA mask predictor; extra keys of the file are kept as attributes."""

    model_type = "llada"
    # The names transformers' generic code looks for.
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_layers: int = 32,
        n_heads: int = 32,
        n_kv_heads: int | None = None,
        mlp_hidden_size: int | None = None,
        vocab_size: int = 126464,
        embedding_size: int | None = None,
        rope_theta: float = 500000.0,
        rms_norm_eps: float = 1e-5,
        max_sequence_length: int = 4096,
        mask_token_id: int = 126336,
        eos_token_id: int = 126081,
        pad_token_id: int | None = None,
        weight_tying: bool = False,
        init_std: float = 0.02,
        block_type: str = "llama",
        activation_type: str = "silu",
        layer_norm_type: str = "rms",
        rope: bool = True,
        alibi: bool = False,
        include_bias: bool = False,
        include_qkv_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.mlp_hidden_size = 4 * d_model if mlp_hidden_size is None else mlp_hidden_size
        self.vocab_size = vocab_size
        self.embedding_size = vocab_size if embedding_size is None else embedding_size
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_sequence_length = max_sequence_length
        self.mask_token_id = mask_token_id
        self.weight_tying = weight_tying
        self.init_std = init_std
        self.block_type = block_type
        self.activation_type = activation_type
        self.layer_norm_type = layer_norm_type
        self.rope = rope
        self.alibi = alibi
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        kwargs.pop("tie_word_embeddings", None)  # weight_tying is the file's key for it
        super().__init__(
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id if pad_token_id is None else pad_token_id,
            tie_word_embeddings=weight_tying,
            **kwargs,
        )
