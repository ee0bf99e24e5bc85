"""The forward process and LLaDA's loss normalisation against hand-written readings of the recipe."""

from __future__ import annotations

import math

import pytest
import torch

from composer_dlm.diffusion import (
    DiffusionConfig,
    diffusion_loss,
    elbo_denominator,
    forward_process,
    loss_weights,
    random_truncation_length,
)

MASK = 31


def recipe_loss(logits, targets, masked, p_mask, prompt_lengths=None) -> float:
    """LLaDA's loss, element by element, in float64."""
    b, length, _ = logits.shape
    total = 0.0
    for i in range(b):
        answer_len = length - int(prompt_lengths[i]) if prompt_lengths is not None else None
        for j in range(length):
            if not masked[i, j]:
                continue
            row = logits[i, j].double()
            ce = (torch.logsumexp(row, 0) - row[targets[i, j]]).item()
            term = ce / p_mask[i, j].item()
            total += term / answer_len if answer_len is not None else term
    return total / b if prompt_lengths is not None else total / (b * length)


def random_case(seed: int, b: int = 3, length: int = 7, vocab: int = 32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, MASK, (b, length), generator=g)
    logits = torch.randn(b, length, vocab, generator=g) * 3
    return ids, logits, g


@pytest.mark.parametrize("seed", range(4))
def test_pretrain_loss_matches_recipe(seed):
    ids, logits, g = random_case(seed)
    _, masked, p_mask = forward_process(ids, mask_token_id=MASK, generator=g)
    ours = diffusion_loss(logits, ids, masked, p_mask).item()
    assert ours == pytest.approx(recipe_loss(logits, ids, masked, p_mask), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("seed", range(4))
def test_sft_loss_matches_recipe_with_ragged_prompts_and_eos_padding(seed):
    ids, logits, g = random_case(seed, b=4, length=9)
    prompt_lengths = torch.tensor([1, 3, 8, 5])
    ids[2, 8:] = (
        30  # row 2: a one-token answer; row 1 ends in EOS padding (id 30) that is scored like any token
    )
    ids[1, 6:] = 30
    _, masked, p_mask = forward_process(ids, mask_token_id=MASK, prompt_lengths=prompt_lengths, generator=g)
    ours = diffusion_loss(logits, ids, masked, p_mask, prompt_lengths).item()
    assert ours == pytest.approx(recipe_loss(logits, ids, masked, p_mask, prompt_lengths), rel=1e-6, abs=1e-7)


def test_hand_computed_example():
    # One row of 4 tokens, p = 0.5, positions 1 and 3 masked, uniform logits over 4 classes: CE = ln 4 each.
    logits = torch.zeros(1, 4, 4)
    ids = torch.tensor([[0, 1, 2, 3]])
    masked = torch.tensor([[False, True, False, True]])
    p_mask = torch.full((1, 4), 0.5)
    assert diffusion_loss(logits, ids, masked, p_mask).item() == pytest.approx(2 * math.log(4) / 0.5 / 4)
    # SFT with a prompt of 2: answer length 2, B = 1.
    sft = diffusion_loss(logits, ids, masked, p_mask, torch.tensor([2])).item()
    assert sft == pytest.approx(2 * math.log(4) / 0.5 / 2)
    assert elbo_denominator(masked, torch.tensor([2])).item() == 2
    assert elbo_denominator(masked).item() == 4


def test_loss_weights_express_the_same_loss():
    ids, logits, g = random_case(5)
    prompt_lengths = torch.tensor([2, 0, 4])
    _, masked, p_mask = forward_process(ids, mask_token_id=MASK, prompt_lengths=prompt_lengths, generator=g)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), ids.reshape(-1), reduction="none")
    for pl in (None, prompt_lengths):
        w = loss_weights(masked, p_mask, pl)
        assert torch.all(w[~masked] == 0) and torch.all(w[masked] > 0)
        assert (w.reshape(-1) * ce).sum().item() == pytest.approx(
            diffusion_loss(logits, ids, masked, p_mask, pl).item(), rel=1e-6
        )


def test_masking_statistics_over_many_draws():
    g = torch.Generator().manual_seed(0)
    eps = 0.05
    ids = torch.randint(0, MASK, (4000, 256), generator=g)
    noisy, masked, p_mask = forward_process(ids, mask_token_id=MASK, eps=eps, generator=g)
    p_row = p_mask[:, 0]
    assert torch.all(p_mask == p_row[:, None])
    assert p_row.min() >= eps and p_row.max() <= 1.0
    # t ~ U(0, 1): p is uniform on [eps, 1]
    assert p_row.mean().item() == pytest.approx((1 + eps) / 2, abs=0.02)
    # each row's masked fraction follows its p: binomial(256, p) deviations stay within 5 standard deviations
    frac = masked.float().mean(1)
    sd = torch.sqrt(p_row * (1 - p_row) / 256)
    assert torch.all((frac - p_row).abs() <= 5 * sd + 1e-6)
    assert torch.equal(noisy == MASK, masked)  # mask id exactly where masked, nowhere else
    assert torch.equal(noisy[~masked], ids[~masked])  # unmasked tokens untouched; targets never contain MASK


def test_prompt_is_never_masked():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MASK, (2000, 32), generator=g)
    prompt_lengths = torch.randint(0, 32, (2000,), generator=g)
    noisy, masked, _ = forward_process(ids, mask_token_id=MASK, prompt_lengths=prompt_lengths, generator=g)
    in_prompt = torch.arange(32)[None, :] < prompt_lengths[:, None]
    assert not masked[in_prompt].any()
    assert torch.equal(noisy[in_prompt], ids[in_prompt])
    assert masked[~in_prompt].float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_generator_makes_noise_reproducible():
    ids = torch.randint(0, MASK, (3, 50))
    a = forward_process(ids, mask_token_id=MASK, generator=torch.Generator().manual_seed(7))
    b = forward_process(ids, mask_token_id=MASK, generator=torch.Generator().manual_seed(7))
    c = forward_process(ids, mask_token_id=MASK, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[1], c[1])


def test_random_truncation_is_deterministic_and_has_the_right_rate():
    lengths = [random_truncation_length(64, 0.25, seed=3, step=s) for s in range(4000)]
    assert lengths == [random_truncation_length(64, 0.25, seed=3, step=s) for s in range(4000)]
    truncated = [n for n in lengths if n != 64]
    # truncation draws U{1..64}, which includes 64 itself with probability 1/64
    assert len(truncated) / 4000 == pytest.approx(0.25 * 63 / 64, abs=0.03)
    assert min(truncated) >= 1 and max(truncated) <= 63 and len(set(truncated)) > 40
    assert all(random_truncation_length(64, 0.0, seed=3, step=s) == 64 for s in range(100))
    other_seed = [random_truncation_length(64, 0.25, seed=4, step=s) for s in range(4000)]
    assert other_seed != lengths


def test_config_errors():
    with pytest.raises(ValueError, match="diffusion.mode"):
        DiffusionConfig(mode="ar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        DiffusionConfig(eps=1.5)
