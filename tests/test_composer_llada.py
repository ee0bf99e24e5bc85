"""The ComposerModel: loss equals the objective's definition, training reduces it, eval is reproducible."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from composer_dlm.diffusion import DiffusionConfig, diffusion_loss
from composer_dlm.models import LLaDAModel
from composer_dlm.models.composer_llada import ComposerLLaDA

VOCAB, MASK = 64, 63
_BASE = LLaDAModel.from_config(
    dict(d_model=32, n_layers=2, n_heads=4, vocab_size=VOCAB, mlp_hidden_size=64, mask_token_id=MASK), seed=0
)


def make(mode: str = "pretrain", loss_impl: str = "plain", **diffusion) -> ComposerLLaDA:
    cfg = DiffusionConfig(mode=mode, **({"random_length_prob": 0.0} | diffusion))  # type: ignore[arg-type]
    return ComposerLLaDA(copy.deepcopy(_BASE), cfg, loss_impl=loss_impl, seed=5)  # type: ignore[arg-type]


def batch(seed: int = 0, sft: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"input_ids": torch.randint(0, MASK, (4, 16), generator=g)}
    if sft:
        out["prompt_lengths"] = torch.tensor([3, 7, 0, 15])
    return out


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_forward_loss_is_the_objective_on_the_models_logits(mode):
    model = make(mode)
    b = batch(sft=mode == "sft")
    model.set_noise_step(11)
    out = model(b)
    # Recompute independently: same generator seed, full logits, the definition of the loss.
    model.set_noise_step(11)
    pl = b.get("prompt_lengths")
    noisy, masked, p_mask = model.train_noise(b["input_ids"], pl)
    expected = diffusion_loss(model.model(noisy), b["input_ids"], masked, p_mask, pl)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.num_masked.item() == masked.sum().item()
    tokens = 4 * 16 if mode == "pretrain" else sum(16 - p for p in (3, 7, 0, 15))
    assert out.elbo_tokens.item() == tokens
    if mode == "pretrain":
        assert out.elbo_sum.item() / tokens == pytest.approx(out.loss.item(), rel=1e-5)


def test_fused_and_plain_paths_agree():
    plain, fused = make(loss_impl="plain"), make(loss_impl="fused")
    b = batch(3)
    for m in (plain, fused):
        m.set_noise_step(2)
    a, f = plain(b), fused(b)
    assert f.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
    assert f.ce_sum.item() == pytest.approx(a.ce_sum.item(), rel=1e-5)
    assert f.correct_sum.item() == a.correct_sum.item()
    a.loss.backward()
    f.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_loss_chunk_budget_reaches_the_kernel_from_the_yaml(monkeypatch):
    """model.loss_chunk_mib, through the builder as train.py builds the model, is the kernel's chunk budget;
    unset, the kernel's own default."""
    from composer_dlm import builders
    from composer_dlm.config import load_config
    from composer_dlm.models import composer_llada
    from kernels import masked_linear_cross_entropy

    seen = []

    def spy(*args, config=None, **kwargs):
        seen.append(config.chunk_bytes)
        return masked_linear_cross_entropy(*args, config=config, **kwargs)

    monkeypatch.setattr(composer_llada, "masked_linear_cross_entropy", spy)
    for overrides, expected in (([], 512 << 20), (["model.loss_chunk_mib=2048"], 2048 << 20)):
        cfg = load_config(Path(__file__).resolve().parents[1] / "yamls" / "quickstart.yaml", overrides)
        tokenizer = builders.build_tokenizer(cfg)
        model = builders.build_model(cfg, tokenizer)
        model.set_noise_step(0)
        model(batch(0))  # ids below 63: inside the embedded tokenizer's vocabulary
        assert seen.pop() == expected


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_one_step_reduces_loss_and_reaches_every_parameter(mode):
    model = make(mode)
    b = batch(1, sft=mode == "sft")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.set_noise_step(0)
    before = model(b).loss
    before.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing
    opt.step()
    model.set_noise_step(0)  # same noise: the change is the parameters'
    with torch.no_grad():
        after = model(b).loss
    assert after.item() < before.item()


def test_training_noise_follows_the_step():
    model = make()
    b = batch()
    losses = {}
    for step in (0, 1, 0):
        model.set_noise_step(step)
        losses.setdefault(step, []).append(model(b).loss.item())
    assert losses[0][0] == losses[0][1]
    assert losses[0][0] != losses[1][0]
    model.set_noise_step(4)
    first, second = model(b).loss.item(), model(b).loss.item()  # two microbatches of one step differ
    assert first != second


@pytest.mark.parametrize("mode", ["pretrain", "sft"])
def test_training_noise_does_not_depend_on_the_microbatch_split(mode):
    """Row r of batch s gets the noise of generator seed (seed, rank, s, r) whichever micro-batch holds it, so
    Composer's weighted sum of micro-batch losses (weights microbatch / batch) is the whole batch's loss."""
    model = make(mode, random_length_prob=0.5)
    b = batch(2, sft=mode == "sft")
    model.set_noise_step(7)
    whole_noise = model.train_noise(b["input_ids"], b.get("prompt_lengths"))
    model.set_noise_step(7)
    whole = model(b).loss.item()
    for split in ([1, 3], [2, 2], [1, 1, 1, 1]):
        model.set_noise_step(7)
        parts, noise, start = 0.0, [], 0
        for size in split:
            mb = {k: v[start : start + size] for k, v in b.items()}
            parts += model(mb).loss.item() * size / 4
            start += size
        model.set_noise_step(7)
        for size in split:  # the noise itself, row by row, independently of the loss
            rows = slice(sum(noise_rows.shape[0] for noise_rows in noise), None)
            mb_ids = b["input_ids"][rows][:size]
            mb_pl = None if mode == "pretrain" else b["prompt_lengths"][rows][:size]
            noise.append(model.train_noise(mb_ids, mb_pl)[1])
        assert torch.equal(torch.cat(noise), whole_noise[1]), split
        assert parts == pytest.approx(whole, rel=1e-6), split


def test_eval_is_reproducible_and_independent_of_training_state():
    model = make()
    model.eval()
    vals = []
    for step in (0, 9):
        model.set_noise_step(step)
        metrics = model.get_metrics(is_train=False)
        for m in metrics.values():
            m.reset()
        with torch.no_grad():
            for s in range(3):
                b = batch(s)
                out = model.eval_forward(b)
                for m in metrics.values():
                    model.update_metric(b, out, m)
        vals.append({k: m.compute().item() for k, m in metrics.items()})
    assert vals[0] == vals[1]
    assert 0.0 <= vals[0]["MaskedAccuracy"] <= 1.0
    assert vals[0]["ELBO"] == pytest.approx(vals[0]["DiffusionLoss"], rel=1e-5)


def test_random_length_truncation_applies_to_pretraining():
    model = make(random_length_prob=1.0)
    b = batch()
    lengths = set()
    for step in range(20):
        model.set_noise_step(step)
        lengths.add(int(model(b).elbo_tokens.item()) // 4)
    assert len(lengths) > 5 and max(lengths) <= 16


def test_sft_needs_prompt_lengths():
    with pytest.raises(ValueError, match="prompt_lengths"):
        make("sft")(batch())


def test_flops_per_batch_by_hand():
    model = make()
    # blocks: 2 * (norms 2*32 + q,k,v,o 4*32*32 + mlp 3*32*64) + ln_f 32 + output projection 64*32
    params = 2 * (64 + 4096 + 6144) + 32 + 2048
    b, length = 4, 16
    expected = 3 * (2 * params * b * length + 4 * 2 * 32 * length * length * b)
    assert model.flops_per_batch(batch()) == expected


def test_eval_does_not_recompile_compiled_blocks():
    """Evaluation and sampling run compiled blocks eagerly: recompiling them for no-grad mode crashed under
    FSDP1 on torch 2.11 (see models.llada.eager_blocks). A counting backend sees every compilation."""
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    model = make()
    for block in model.model.blocks:
        block.compile(backend=counting_backend)
    b = batch()
    model.set_noise_step(0)
    model(b).loss.backward()
    after_train = len(compiled)
    assert after_train >= 1
    model.eval()
    with torch.no_grad():
        model.eval_forward(b)
    assert len(compiled) == after_train
    with torch.no_grad():  # without the guard, the no-grad pass does compile again
        model.model(b["input_ids"])
    assert len(compiled) > after_train
