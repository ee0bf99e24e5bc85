"""The sampler benchmark's reference follows LLaDA's sampler (temperature-0 shortcut included), and every
column of its table is measured in the run that prints it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from composer_dlm.benchmarks import sampler as bench
from composer_dlm.generate import generate


def test_reference_at_temperature_zero_draws_no_noise_and_matches_ours() -> None:
    """LLaDA's add_gumbel_noise returns the logits unchanged at temperature 0: no random numbers are drawn
    (the old transcription drew a float64 rand over every B x L x V logit), and the tokens equal ours."""
    model = bench.build_model("tiny", torch.device("cpu"), torch.float32, seed=3)
    prompts = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(steps=8, gen_length=16, block_length=8)
    state = torch.random.get_rng_state()
    ref = bench.reference_generate(model, prompts, mask_id=bench.MASK_ID["tiny"], **kw)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(ref, generate(model, prompts, mask_token_id=bench.MASK_ID["tiny"], **kw))
    torch.manual_seed(0)
    bench.reference_generate(model, prompts, mask_id=bench.MASK_ID["tiny"], temperature=0.5, **kw)
    assert not torch.equal(torch.random.get_rng_state(), state)  # sampling at temperature > 0 draws noise


def test_benchmark_writes_measured_columns_only(tmp_path: Path) -> None:
    argv = "--shape tiny --device cpu --batch-sizes 1 --steps 4 --prompt-length 4 --gen-length 8 --block-length 4"
    bench.main([*argv.split(), "--out", str(tmp_path / "sampler")])
    table = (tmp_path / "sampler.md").read_text()
    assert "LLaDA's code" not in table
    raw = json.loads((tmp_path / "sampler.json").read_text())
    assert raw["environment"]["torch"] == torch.__version__
    samplers = ["reference (transcription)", "ours", "ours, dual cache", "ours, prefix cache"]
    assert [r["sampler"] for r in raw["results"]] == samplers
    assert [r["identical_to_reference"] for r in raw["results"][:2]] == [
        True,
        True,
    ]  # the cached ones approximate
    assert all(r["tokens_per_s"] > 0 for r in raw["results"])
    # The identity check: LLaDA's sampler (here the transcription) on our plain forward = our exact sampler on it.
    (identity,) = raw["identity"]
    assert identity["steps"] == 4 and identity["llada_sampler_on_our_plain_forward_vs_ours_plain"] == 0
    assert identity["ours_plain_vs_ours_default"] == 0
