"""A LLaDA-format dense variant unlike LLaDA-8B (grouped-query attention with 8 KV heads, tied embeddings,
vocabulary 155,136, mask id 5, context 8192) at tiny widths: its mask id reaches the noise, the loss and the
sampler from its config alone; it trains, exports (config keys, no separate output matrix) and loads back."""

from __future__ import annotations

import json

import torch

from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.generate import generate
from composer_dlm.models.architectures import from_pretrained
from composer_dlm.models.composer_llada import ComposerLLaDA
from composer_dlm.models.llada import LLaDAModel

VARIANT = {
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 16,
    "n_kv_heads": 8,
    "mlp_hidden_size": 96,
    "vocab_size": 155136,
    "weight_tying": True,
    "mask_token_id": 5,
    "eos_token_id": 2,
    "max_sequence_length": 8192,
    "rope_theta": 10000.0,
}


def test_dense_variant_trains_exports_and_samples_with_its_own_mask_id(tmp_path):
    torch.manual_seed(0)
    model = LLaDAModel.from_config(VARIANT, seed=0)
    composer_model = ComposerLLaDA(model, DiffusionConfig(random_length_prob=0.0), loss_impl="plain")
    assert composer_model.mask_token_id == 5
    ids = torch.randint(6, 155136, (2, 24))
    noisy, masked, _ = composer_model.train_noise(ids, None)
    assert masked.any() and torch.equal(noisy[masked], torch.full_like(noisy[masked], 5))
    assert torch.equal(noisy[~masked], ids[~masked])

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(4):
        composer_model.set_noise_step(step)
        loss = composer_model(dict(input_ids=ids)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    model.save_pretrained(tmp_path / "variant", dtype=torch.float32)
    config = json.loads((tmp_path / "variant" / "config.json").read_text())
    assert {k: config[k] for k in VARIANT} == VARIANT
    from safetensors import safe_open

    with safe_open(str(tmp_path / "variant" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "model.transformer.ff_out.weight" not in names and "model.transformer.wte.weight" in names
    loaded = from_pretrained(tmp_path / "variant").eval()
    assert isinstance(loaded, LLaDAModel) and loaded.config.n_kv_heads == 8
    with torch.no_grad():
        assert torch.equal(loaded(ids), model.eval()(ids))
    # The sampler starts the answer from the config's mask id: record what the model is given.
    inputs: list[torch.Tensor] = []
    loaded.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    with torch.no_grad():
        out = generate(loaded, ids[:1, :6], steps=4, gen_length=8, block_length=8, mask_token_id=5)
    assert len(inputs) == 4 and torch.equal(inputs[0], torch.cat([ids[:1, :6], torch.full((1, 8), 5)], 1))
    assert out.shape == (1, 14) and torch.equal(out[:, :6], ids[:1, :6])
