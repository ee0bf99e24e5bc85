"""The sampler: LLaDA's semantics checked against hand-worked steps on models with known logits, and token for
token against a plain loop-based transcription of LLaDA's reference sampler on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composer_dlm.generate import BlockPlan, _graph_safe, commit_schedule, generate, left_pad
from composer_dlm.models import LLaDAModel

VOCAB, MASK, EOS = 128, 127, 126
TINY = LLaDAModel.from_config(
    dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        vocab_size=VOCAB,
        mlp_hidden_size=128,
        mask_token_id=MASK,
        eos_token_id=EOS,
    ),
    seed=0,
).eval()


# --- an independent reference: LLaDA's algorithm written as plainly as possible --------------------------------
def reference_generate(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
    cfg_scale: float = 0.0,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature 0, low-confidence remasking: full logits everywhere, the softmax in the logits' dtype, a top-k per
    row over the whole sequence (LLaDA's current generate.py)."""
    batch, plen = prompt.shape
    x = torch.full((batch, plen + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :plen] = prompt
    mask = None
    if attention_mask is not None:
        ones = torch.ones(batch, gen_length, dtype=attention_mask.dtype, device=prompt.device)
        mask = torch.cat([attention_mask, ones], dim=1)
    is_prompt = x != mask_id
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    for block in range(num_blocks):
        lo, hi = plen + block * block_length, plen + (block + 1) * block_length
        todo = []
        for row in range(batch):
            n = int((x[row, lo:hi] == mask_id).sum())
            todo.append([n // per_block + (1 if s < n % per_block else 0) for s in range(per_block)])
        for s in range(per_block):
            masked = x == mask_id
            if cfg_scale > 0:
                uncond = x.clone()
                uncond[is_prompt] = mask_id
                both = torch.cat([x, uncond])
                both_mask = torch.cat([mask, mask]) if mask is not None else None
                out = model(both) if both_mask is None else model(both, attention_mask=both_mask)
                cond_logits, uncond_logits = out.chunk(2)
                logits = uncond_logits + (cfg_scale + 1) * (cond_logits - uncond_logits)
            else:
                logits = model(x) if mask is None else model(x, attention_mask=mask)
            x0 = logits.argmax(-1)
            p = F.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]
            p[:, hi:] = -math.inf
            x0 = torch.where(masked, x0, x)
            confidence = torch.where(masked, p, -math.inf)
            for row in range(batch):
                chosen = torch.topk(confidence[row], k=todo[row][s]).indices
                x[row, chosen] = x0[row, chosen]
    return x


# --- fake models with known logits ----------------------------------------------------------------------------
class FixedLogits(nn.Module):
    """Returns the same logits (L, V) for every row, whatever the input; counts its forward calls."""

    def __init__(self, logits_LV: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits_LV)
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device to read
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        return self.table.expand(input_ids.shape[0], -1, -1).clone()


def log_probs(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).log()


# Vocabulary of the hand-worked examples: 0..3 words, 4 = EOS, 5 = MASK. Prompt [0, 1]; answer columns 2..5.
M, E = 5, 4
PROMPT = torch.tensor([[0, 1]])
#             argmax token, its probability:  col2 -> 1 (0.9), col3 -> 0 (0.5), col4 -> 2 (0.7), col5 -> 3 (0.6)
HAND = log_probs(
    [
        [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],  # prompt columns: never candidates
        [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
        [0.02, 0.9, 0.02, 0.02, 0.02, 0.02],
        [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
        [0.06, 0.06, 0.7, 0.06, 0.06, 0.06],
        [0.08, 0.08, 0.08, 0.6, 0.08, 0.08],
    ]
)


def run_recording(
    model: nn.Module, prompt: torch.Tensor = PROMPT, **kw
) -> tuple[torch.Tensor, list[list[int]]]:
    seen: list[list[int]] = []
    out = generate(model, prompt, mask_token_id=M, on_step=lambda i, x: seen.append(x[0].tolist()), **kw)
    return out, seen


def test_commit_schedule_spreads_evenly_front_loaded():
    assert commit_schedule(32, 8) == [4] * 8
    assert commit_schedule(10, 4) == [3, 3, 2, 2]
    assert commit_schedule(3, 5) == [1, 1, 1, 0, 0]
    assert BlockPlan(2, 12, 4, 6).commits_per_step == [2, 2]
    assert BlockPlan(2, 12, 4, 6).block_bounds(1) == (6, 10)


def test_single_block_commits_most_confident_first():
    out, seen = run_recording(FixedLogits(HAND), steps=4, gen_length=4, block_length=4)
    assert seen == [
        [0, 1, 1, M, M, M],  # 0.9 at col 2
        [0, 1, 1, M, 2, M],  # then 0.7 at col 4
        [0, 1, 1, M, 2, 3],  # then 0.6 at col 5
        [0, 1, 1, 0, 2, 3],  # last 0.5 at col 3
    ]
    assert out.tolist() == [[0, 1, 1, 0, 2, 3]]


def test_two_tokens_per_step():
    _, seen = run_recording(FixedLogits(HAND), steps=2, gen_length=4, block_length=4)
    assert seen == [[0, 1, 1, M, 2, M], [0, 1, 1, 0, 2, 3]]


def test_semi_autoregressive_blocks_hide_later_positions():
    # Block 1 is cols 2-3: col 4's 0.7 beats col 3's 0.5 but is beyond the block, so col 3 goes second.
    _, seen = run_recording(FixedLogits(HAND), steps=4, gen_length=4, block_length=2)
    assert seen == [
        [0, 1, 1, M, M, M],
        [0, 1, 1, 0, M, M],
        [0, 1, 1, 0, 2, M],
        [0, 1, 1, 0, 2, 3],
    ]


def test_exact_ties_go_to_the_leftmost_position():
    # Columns 3 and 5 hold the same logits (token 3 with 0.6), so their confidences are equal bit for bit.
    tied = HAND.clone()
    tied[3] = tied[5]
    _, seen = run_recording(FixedLogits(tied), steps=4, gen_length=4, block_length=4)
    assert [row[2:] for row in seen] == [[1, M, M, M], [1, M, 2, M], [1, 3, 2, M], [1, 3, 2, 3]]


def test_steps_that_commit_nothing_are_skipped():
    model = FixedLogits(HAND)
    out, seen = run_recording(
        model, steps=8, gen_length=4, block_length=4
    )  # schedule [1, 1, 1, 1, 0, 0, 0, 0]
    assert out.tolist() == [[0, 1, 1, 0, 2, 3]]
    assert len(seen) == 8 and seen[3:] == [[0, 1, 1, 0, 2, 3]] * 5
    assert model.calls == 4


class Guided(nn.Module):
    """One answer column. Conditional logits [2, 1.5, 0, ...], unconditional (prompt masked) [2, 0, 0, ...]."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        cond = torch.tensor([2.0, 1.5, 0, 0, -9, -9])
        uncond = torch.tensor([2.0, 0.0, 0, 0, -9, -9])
        prompt_masked = (input_ids[:, 0] == M)[:, None, None]
        rows = torch.where(prompt_masked, uncond, cond)  # (B, 1, V)
        return rows.expand(-1, input_ids.shape[1], -1).clone()


def test_guidance_extrapolates_away_from_the_unconditional_prediction():
    kw = dict(steps=1, gen_length=1, block_length=1)
    plain, _ = run_recording(Guided(), **kw)
    assert plain.tolist() == [[0, 1, 0]]  # argmax of the conditional logits
    # s = 1: un + 2 (cond - un) = [2, 3, 0, 0, ...] -> token 1
    guided, _ = run_recording(Guided(), cfg_scale=1.0, **kw)
    assert guided.tolist() == [[0, 1, 1]]


def test_min_new_tokens_forbids_eos_early():
    eos_first = log_probs([[0.1, 0.1, 0.1, 0.1, 0.5, 0.1]] * 2 + [[0.3, 0.05, 0.05, 0.05, 0.5, 0.05]] * 4)
    kw = dict(steps=4, gen_length=4, block_length=4, eos_token_id=E)
    free, _ = run_recording(FixedLogits(eos_first), **kw)
    assert free.tolist() == [[0, 1, E, E, E, E]]
    early, _ = run_recording(FixedLogits(eos_first), min_new_tokens=2, **kw)
    assert early.tolist() == [[0, 1, 0, 0, E, E]]
    never, _ = run_recording(FixedLogits(eos_first), min_new_tokens=4, **kw)
    assert never.tolist() == [[0, 1, 0, 0, 0, 0]]


class PredictsMaskFirst(nn.Module):
    """Col 2 predicts the mask token (p 0.4) until col 3 is decoded, then token 1 (p 0.9); others as HAND."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        out = HAND.expand(input_ids.shape[0], -1, -1).clone()
        predicts_mask = log_probs([[0.12, 0.12, 0.12, 0.12, 0.12, 0.4]])[0]
        waiting = input_ids[:, 3] == M
        out[waiting, 2] = predicts_mask
        return out


def test_committed_mask_prediction_stays_a_candidate_in_later_blocks():
    # Block 1 (cols 2-3, k=2): col 2 "commits" the mask token (no change), col 3 gets 0. Block 2 (cols 4-5, k=2):
    # col 2 is still masked and now predicts 1 with 0.9, beating col 5 (0.6): cols 2 and 4 are committed.
    model = PredictsMaskFirst()
    kw = dict(steps=2, gen_length=4, block_length=2)
    out, seen = run_recording(model, **kw)
    assert seen == [[0, 1, M, 0, M, M], [0, 1, 1, 0, 2, M]]
    assert torch.equal(out, reference_generate(model, PROMPT, mask_id=M, **kw))


# --- the tiny transformer against the reference ---------------------------------------------------------------
def random_prompts(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, EOS, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "steps, gen_length, block_length, cfg_scale",
    [
        (12, 12, 12, 0.0),  # one block, one token per step
        (7, 10, 10, 0.0),  # uneven split: [2, 2, 2, 1, 1, 1, 1]
        (16, 16, 4, 0.0),  # semi-autoregressive
        (6, 12, 4, 0.0),  # semi-autoregressive, two tokens per step
        (8, 8, 4, 1.5),  # guidance
    ],
)
def test_matches_reference_sampler(steps, gen_length, block_length, cfg_scale):
    prompts = random_prompts(3, 6, seed=steps + gen_length)
    kw = dict(steps=steps, gen_length=gen_length, block_length=block_length, cfg_scale=cfg_scale)
    ours = generate(TINY, prompts, mask_token_id=MASK, **kw)
    ref = reference_generate(TINY, prompts, mask_id=MASK, **kw)
    assert torch.equal(ours, ref)
    assert torch.equal(ours[:, :6], prompts)
    everything = generate(TINY, prompts, mask_token_id=MASK, head_rows="all", **kw)
    assert torch.equal(everything, ref)


def test_deterministic_at_temperature_zero():
    prompts = random_prompts(2, 5, seed=3)
    kw = dict(steps=8, gen_length=8, block_length=4, mask_token_id=MASK)
    assert torch.equal(generate(TINY, prompts, **kw), generate(TINY, prompts, **kw))


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_left_padded_batch(cfg_scale):
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [1, 2, 3, 4, 5, 6, 7]]
    ids, attn = left_pad(rows, pad_id=0)
    assert ids.tolist()[0] == [0, 0, 0, 0, 5, 6, 7]
    assert attn.tolist()[0] == [0, 0, 0, 0, 1, 1, 1]
    kw = dict(steps=8, gen_length=8, block_length=4, cfg_scale=cfg_scale)
    ours = generate(TINY, ids, attention_mask=attn, mask_token_id=MASK, **kw)
    assert torch.equal(ours, reference_generate(TINY, ids, attention_mask=attn, mask_id=MASK, **kw))
    # Padding is invisible: each row equals generating from its prompt alone (RoPE attention is relative).
    # The model's RoPE runs in fp32 at shifted absolute positions, so run in float64 to keep argmax ties away.
    model = LLaDAModel.from_config(TINY.config, seed=0).double().eval()
    batched = generate(model, ids, attention_mask=attn, mask_token_id=MASK, **kw)
    for row, prompt in enumerate(rows):
        alone = generate(model, torch.tensor([prompt]), mask_token_id=MASK, **kw)
        assert batched[row, -8:].tolist() == alone[0, -8:].tolist()


def test_cuda_graphs_only_chosen_for_plain_llada_models():
    assert _graph_safe(TINY)
    assert not _graph_safe(FixedLogits(HAND))  # any other module may synchronise with the host in forward


def test_one_dimensional_prompt():
    prompt = random_prompts(1, 4, seed=1)
    kw = dict(steps=4, gen_length=4, block_length=4, mask_token_id=MASK)
    assert torch.equal(generate(TINY, prompt[0], **kw), generate(TINY, prompt, **kw)[0])


# --- sampling ---------------------------------------------------------------------------------------------------
def test_gumbel_sampling_follows_the_tempered_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0, -30, -30, -30])
    model = FixedLogits(torch.stack([logits] * 2))
    n = 6000
    prompts = torch.zeros((n, 1), dtype=torch.long)
    for temperature in (1.0, 0.5):
        g = torch.Generator().manual_seed(0)
        out = generate(model, prompts, steps=1, gen_length=1, block_length=1, mask_token_id=M,
                       temperature=temperature, generator=g)  # fmt: skip
        freq = torch.bincount(out[:, 1], minlength=6).double() / n
        expected = torch.softmax(logits.double() / temperature, dim=0)
        sigma = (expected * (1 - expected) / n).sqrt()
        assert ((freq - expected).abs() <= 5 * sigma + 1e-12).all(), (temperature, freq, expected)
    again = generate(model, prompts[:50], steps=1, gen_length=1, block_length=1, mask_token_id=M,
                     temperature=1.0, generator=torch.Generator().manual_seed(1))  # fmt: skip
    same = generate(model, prompts[:50], steps=1, gen_length=1, block_length=1, mask_token_id=M,
                    temperature=1.0, generator=torch.Generator().manual_seed(1))  # fmt: skip
    assert torch.equal(again, same)


def test_sampling_with_low_confidence_remasking_commits_most_confident_first():
    # At a temperature this low the Gumbel noise cannot overturn HAND's margins: the samples are the argmax
    # tokens, committed in the order of their float64 softmax confidence, as at temperature 0.
    greedy, greedy_seen = run_recording(FixedLogits(HAND), steps=4, gen_length=4, block_length=4)
    g = torch.Generator().manual_seed(0)
    sampled, seen = run_recording(
        FixedLogits(HAND), steps=4, gen_length=4, block_length=4, temperature=1e-3, generator=g
    )
    assert torch.equal(sampled, greedy) and seen == greedy_seen


def test_random_remasking_picks_positions_uniformly():
    n = 3000
    first: list[int] = []

    def record(step: int, x: torch.Tensor) -> None:
        if step == 0:
            first.extend(((x[:, 2:] != M).float().argmax(dim=1)).tolist())

    generate(FixedLogits(HAND), PROMPT.expand(n, -1), steps=4, gen_length=4, block_length=4, mask_token_id=M,
             remasking="random", generator=torch.Generator().manual_seed(0), on_step=record)  # fmt: skip
    freq = torch.bincount(torch.tensor(first), minlength=4).double() / n
    assert ((freq - 0.25).abs() < 5 * math.sqrt(0.25 * 0.75 / n)).all(), freq


# --- argument errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gen_length=10, block_length=4, steps=4), "divisible by block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "divisible by the number of blocks"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(remasking="lowest"), "remasking must be one of"),
        (dict(temperature=-1.0), "temperature"),
        (dict(cfg_scale=-0.5), "cfg_scale"),
        (dict(min_new_tokens=2), "needs eos_token_id"),
        (dict(min_new_tokens=9, eos_token_id=EOS), "min_new_tokens must lie"),
        (dict(cuda_graph=True), "cuda_graph=True needs"),
    ],
)
def test_bad_arguments(kwargs, message):
    kw = dict(steps=4, gen_length=8, block_length=8, mask_token_id=MASK) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(TINY, random_prompts(1, 3, seed=0), **kw)


def test_bad_prompts():
    kw = dict(steps=4, gen_length=4, block_length=4, mask_token_id=MASK)
    with pytest.raises(ValueError, match="contain the mask token"):
        generate(TINY, torch.tensor([[1, MASK, 2]]), **kw)
    with pytest.raises(ValueError, match="pad on the left"):
        generate(TINY, torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1, 0]]), **kw)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(TINY, torch.tensor([[1, 2, 0]]), attention_mask=torch.tensor([[1, 1]]), **kw)
    with pytest.raises(ValueError, match="integer tensor"):
        generate(TINY, torch.tensor([[1.0, 2.0]]), **kw)
    # (A LLaDAModel may run fused on the CPU in Triton's interpreter, as these tests do.)
    with pytest.raises(ValueError, match="fused=True needs a plain LLaDAModel on CUDA"):
        generate(FixedLogits(log_probs([[0.0, 0.0]])), torch.tensor([[1, 2]]), fused=True, **kw)


# --- GPU: bf16, graph replay, candidate-row projection, all against the reference ----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_cuda_bf16_graph_steps_equal_eager_and_reference(cfg_scale):
    model = LLaDAModel.from_config(TINY.config, seed=0).to("cuda", torch.bfloat16).eval()
    prompts = random_prompts(4, 9, seed=2).cuda()
    kw = dict(steps=24, gen_length=24, block_length=8, cfg_scale=cfg_scale)
    graph = generate(model, prompts, mask_token_id=MASK, cuda_graph=True, **kw)
    eager = generate(model, prompts, mask_token_id=MASK, cuda_graph=False, **kw)
    assert torch.equal(graph, eager)  # the same kernels, launched from a graph
    unfused = generate(model, prompts, mask_token_id=MASK, cuda_graph=False, fused=False, **kw)
    # Fused elementwise kernels and stacked q/k/v: bitwise the eager forward.
    assert torch.equal(unfused, eager)
    ref = reference_generate(model, prompts, mask_id=MASK, **kw)
    everything = generate(model, prompts, mask_token_id=MASK, cuda_graph=False, head_rows="all", **kw)
    assert torch.equal(everything, ref)  # same matmul shapes as the reference
    # Projecting only the candidate rows changes the head matmul's M; cuBLAS gives the same bits per row here.
    assert torch.equal(eager, ref)
    assert (graph[:, 9:] != MASK).all()
