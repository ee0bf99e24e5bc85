"""Monte-Carlo likelihood: hand-worked cases with known logits, convergence to the exhaustively enumerated
ELBO, shrinking spread, ranking on a trained toy model, and the multiple-choice callback in a Composer run."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics

import pytest
import torch
import torch.nn.functional as F
import toy_task as tt
from composer import Trainer
from composer.loggers import InMemoryLogger
from torch import nn
from torch.utils.data import DataLoader

from composer_dlm.benchmarks import likelihood as bench
from composer_dlm.benchmarks.tables import render
from composer_dlm.callbacks.eval_likelihood import LikelihoodEval
from composer_dlm.data import DataError, load_tokenizer
from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.likelihood import (
    draw_masks,
    mask_counts,
    mc_log_likelihood,
    mc_log_likelihoods,
    score_choices,
)
from composer_dlm.models import LLaDAModel
from composer_dlm.models.composer_llada import ComposerLLaDA

MASK = 5  # vocabulary of the fake models: 0..4 words, 5 = mask
TRITON = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(), reason="Triton"
)


class PerColumn(nn.Module):
    """Logits that depend only on the column (a fixed table), except that a row whose prompt (column 0) is the
    mask token gets ``uncond`` instead: a known conditional and unconditional prediction."""

    def __init__(self, cond_LV: torch.Tensor, uncond_LV: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("cond", cond_LV)
        self.register_buffer("uncond", cond_LV if uncond_LV is None else uncond_LV)
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        prompt_masked = (input_ids[:, 0] == MASK)[:, None, None]
        return torch.where(prompt_masked, self.uncond, self.cond).expand(input_ids.shape[0], -1, -1).clone()


def test_mask_counts_hand_worked():
    assert mask_counts(8, 4, 3).tolist() == [3, 5, 7, 1]  # 3, 5, 7, 9 -> wrapped to 1
    assert mask_counts(5, 5, 4).tolist() == [4, 5, 1, 2, 3]
    assert mask_counts(2, 4, 1).tolist() == [1, 2, 2, 2]  # 1, 1.5, 2, 2.5: halves round to even
    assert mask_counts(3, 1, 2).tolist() == [2]


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 16])
def test_mask_counts_equal_llada_linspace_rule(rows):
    # LLaDA: round(linspace(o, o + (n - 1) * A / n, n)), wrapped to [1, A]; exact in binary for these n.
    for answer_length in range(1, 13):
        for offset in range(1, answer_length + 1):
            end = offset + (rows - 1) * answer_length / rows
            expected = torch.round(torch.linspace(offset, end, rows, dtype=torch.float64)).long()
            expected = (expected - 1) % answer_length + 1
            assert mask_counts(answer_length, rows, offset).tolist() == expected.tolist()


def test_single_token_answer_is_exact():
    # Prompt [0, 1], answer [3]; column 2 predicts p = (0.1, 0.2, 0.3, 0.4, 0, 0) -> log p(3) = log 0.4.
    probs = torch.tensor([[0.2] * 5 + [1e-9]] * 2 + [[0.1, 0.2, 0.3, 0.4, 1e-9, 1e-9]])
    model = PerColumn(probs.log())
    for num_samples in (1, 5):
        got = mc_log_likelihood(model, [0, 1], [3], mask_token_id=MASK, num_samples=num_samples, batch_size=2)
        assert got == pytest.approx(math.log(0.4), abs=1e-6)


def test_guidance_uses_the_extrapolated_logits():
    cond = torch.tensor([[0.0] * 6, [2.0, 1.5, 0, 0, -9, -9]])
    uncond = torch.tensor([[0.0] * 6, [2.0, 0.0, 0, 0, -9, -9]])
    model = PerColumn(cond, uncond)
    # s = 1: un + 2 (cond - un) = [2, 3, 0, 0, -9, -9]
    guided = torch.tensor([2.0, 3.0, 0, 0, -9, -9])
    expected = float(guided[1] - torch.logsumexp(guided, 0))
    got = mc_log_likelihood(model, [4], [1], mask_token_id=MASK, num_samples=1, batch_size=1, cfg_scale=1.0)
    assert got == pytest.approx(expected, abs=1e-5)
    plain = mc_log_likelihood(model, [4], [1], mask_token_id=MASK, num_samples=1, batch_size=1)
    assert plain == pytest.approx(float(cond[1, 1] - torch.logsumexp(cond[1], 0)), abs=1e-5)


def exhaustive_elbo(model: nn.Module, prompt: list[int], answer: list[int], mask_id: int) -> float:
    """-(1/A) sum_k mean over k-subsets S of (A/k) sum_{i in S} -log p(answer_i | answer with S masked)."""
    a = len(answer)
    total = 0.0
    for k in range(1, a + 1):
        subsets = list(itertools.combinations(range(a), k))
        for subset in subsets:
            x = torch.tensor([prompt + answer])
            cols = [len(prompt) + i for i in subset]
            x[0, cols] = mask_id
            logp = F.log_softmax(model(x)[0].double(), dim=-1)
            nll = -sum(float(logp[c, answer[i]]) for c, i in zip(cols, subset, strict=True))
            total += (a / k) * nll / len(subsets)
    return -total / a


def test_estimate_converges_to_the_elbo_and_its_spread_shrinks():
    model = LLaDAModel.from_config(
        dict(d_model=32, n_layers=2, n_heads=2, vocab_size=16, mlp_hidden_size=64, mask_token_id=15), seed=3
    ).eval()
    prompt, answer = [1, 2, 3], [7, 4, 9]
    exact = exhaustive_elbo(model, prompt, answer, 15)

    def estimates(num_samples: int) -> list[float]:
        # batch 9 = 3 * A: every batch masks 1, 2 and 3 tokens three times each (no half-way rounding).
        return [
            mc_log_likelihood(
                model,
                prompt,
                answer,
                mask_token_id=15,
                num_samples=num_samples,
                batch_size=9,
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
            for seed in range(20)
        ]

    small, large = estimates(9), estimates(9 * 16)
    spread_small, spread_large = statistics.stdev(small), statistics.stdev(large)
    assert spread_small > 0
    assert spread_large < 0.5 * spread_small  # 1/sqrt(16) = 0.25 in theory
    # Each estimate is unbiased: the mean of 20 lies within 4 standard errors of the exact value.
    assert abs(statistics.fmean(large) - exact) < 4 * spread_large / math.sqrt(20) + 1e-6


def test_the_same_generator_seed_gives_the_same_estimate():
    model = PerColumn(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))
    kw = dict(mask_token_id=MASK, num_samples=20, batch_size=8)  # a last batch of 4
    a = mc_log_likelihood(model, [0], [1, 2, 3, 4, 0], generator=torch.Generator().manual_seed(7), **kw)
    b = mc_log_likelihood(model, [0], [1, 2, 3, 4, 0], generator=torch.Generator().manual_seed(7), **kw)
    assert a == b
    # ... and the estimate does depend on the draws (another seed, other masks).
    c = mc_log_likelihood(model, [0], [1, 2, 3, 4, 0], generator=torch.Generator().manual_seed(8), **kw)
    assert c != a


def test_trained_toy_model_ranks_the_correct_answer_first():
    model = tt.trained_model()
    for start in range(0, tt.NUMBERS, 3):
        right = tt.answer(start)
        wrong = [right[::-1], [right[1], right[0], *right[2:]], tt.answer(start + 7)]
        scores = score_choices(
            model, [tt.token(start)], [right, *wrong], mask_token_id=tt.MASK, num_samples=32
        )
        assert scores[0] == max(scores), (start, scores)
        assert scores[0] > -1.0  # the task is learnt: the right answer is near certain


PACKED_REQUESTS = [
    ([1, 2, 3], [7, 4, 9]),
    ([5], [6, 8, 1, 2, 3]),
    ([2, 2, 4, 4, 6, 6], [9]),
    ([3, 1], [4, 1, 5]),
]
"""Prompts and answers of different lengths: packed under a small token budget they pad, need a key mask and
split one request's rows over forwards."""


def tiny_llada(seed: int = 3) -> LLaDAModel:
    config = dict(d_model=32, n_layers=2, n_heads=2, vocab_size=16, mlp_hidden_size=64, mask_token_id=15)
    return LLaDAModel.from_config(config, seed=seed).eval()


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_packed_requests_score_as_each_alone(cfg_scale):
    # Different prompt and answer lengths (padding and a key mask), rows of one request split over forwards and
    # shared with others (a budget of 40 tokens): each request still gets its own estimate.
    model = tiny_llada()
    requests = PACKED_REQUESTS
    kw = dict(mask_token_id=15, num_samples=12, batch_size=5, cfg_scale=cfg_scale)
    alone = [
        mc_log_likelihood(model, p, a, generator=torch.Generator().manual_seed(i), **kw)
        for i, (p, a) in enumerate(requests)
    ]
    generators = [torch.Generator().manual_seed(i) for i in range(len(requests))]
    packed = mc_log_likelihoods(model, requests, generators=generators, batch_tokens=40, **kw)
    assert packed == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert len(set(packed)) == len(packed)


class RowCounter(nn.Module):
    """A LLaDA model's logits, counting the rows that reach the model (a plain module: the full-logits path)."""

    def __init__(self, model: LLaDAModel) -> None:
        super().__init__()
        self.model, self.rows = model, 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.rows += input_ids.shape[0]
        return self.model(input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("counted", [False, True])
def test_identical_rows_run_once_and_score_as_each_alone(counted):
    # MMLU-like: one context, four one-token choices (every row is context + [mask]: one forward row serves all
    # four), and two contexts so that only equal inputs are shared. Equal-length choices under common random
    # numbers share their fully masked rows only.
    llada = tiny_llada()
    model = RowCounter(llada) if counted else llada
    one_token = [([1, 2, 3], [c]) for c in (4, 6, 7, 9)] + [([1, 2, 4], [4])]
    two_token = [([3, 1], [c, 2]) for c in (4, 6)]
    requests = one_token + two_token
    num_samples = 4
    kw = dict(mask_token_id=15, batch_size=4)
    alone = [
        mc_log_likelihood(llada, p, a, num_samples=1 if len(a) == 1 else num_samples,
                          generator=torch.Generator().manual_seed(0), **kw)
        for p, a in requests
    ]  # fmt: skip
    generators = [torch.Generator().manual_seed(0) for _ in requests]
    first = mc_log_likelihoods(model, one_token, num_samples=1, generators=generators[:5], **kw)
    rows_one_token = model.rows if counted else None
    second = mc_log_likelihoods(model, two_token, num_samples=num_samples, generators=generators[5:], **kw)
    assert first + second == pytest.approx(alone, rel=1e-5, abs=1e-6)
    assert len(set(first[:4])) == 4  # each choice reads its own target from the shared row
    if counted:
        assert rows_one_token == 2  # the two distinct contexts
        masks, _ = draw_masks(
            2, num_samples=num_samples, batch_size=4, generator=torch.Generator().manual_seed(0)
        )
        inputs = {
            (tuple(p), tuple(torch.where(m, 15, torch.tensor(a)).tolist()))
            for p, a in two_token
            for m in masks
        }
        assert len(inputs) < 2 * num_samples  # the draw has fully masked rows (else the case tests nothing)
        assert model.rows - rows_one_token == len(inputs)


@TRITON
def test_fused_forward_gives_the_eager_estimates():
    # The fused inference forward (Triton elementwise kernels; in the CPU interpreter here, fp32) on packed rows
    # of different lengths, with guidance: the estimates of the eager forward.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_llada().to(device)
    requests = [([1, 2, 3], [7, 4, 9]), ([5], [6, 8, 1, 2, 3])]
    kw = dict(mask_token_id=15, num_samples=6, batch_size=3, cfg_scale=0.5, batch_tokens=64)
    runs = [
        mc_log_likelihoods(model, requests, generators=[torch.Generator().manual_seed(i) for i in range(2)],
                           fused=fused, **kw)
        for fused in (False, True)
    ]  # fmt: skip
    assert runs[1] == pytest.approx(runs[0], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=TRITON)])
def test_hidden_states_at_positions_equal_the_full_forward_there(fused):
    # Grouped-query attention, rows right-padded to different lengths (random tokens in the padding, hidden by the
    # key mask), positions out of order, repeated and not 0..R-1 (so RoPE at the wrong positions would show).
    device = "cuda" if fused and torch.cuda.is_available() else "cpu"
    config = dict(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=16, mlp_hidden_size=64)
    model = LLaDAModel.from_config(config | dict(mask_token_id=15), seed=5).eval().to(device)
    ids = torch.randint(0, 15, (4, 11), generator=torch.Generator().manual_seed(0)).to(device)
    lengths = torch.tensor([11, 7, 4, 9], device=device)
    mask = torch.arange(11, device=device) < lengths[:, None]
    positions = torch.tensor([[10, 0, 5], [6, 2, 6], [3, 1, 3], [4, 8, 7]], device=device)
    rows = torch.arange(4, device=device)[:, None]
    with torch.no_grad():
        full = model.hidden_states(ids, mask, fused=fused)
        at = model.hidden_states(ids, mask, fused=fused, positions=positions)
        expected = full[rows, positions]
        assert at.shape == (4, 3, 32)
        torch.testing.assert_close(at, expected, atol=1e-5, rtol=0)
        # The comparison is sensitive to the key mask and to the positions' order: a forward that let the padding
        # be attended, or the hidden states of other positions, differ by far more than the tolerance.
        unmasked = model.hidden_states(ids, fused=fused)[rows, positions]
        assert (unmasked - expected)[1:3].abs().max() > 1e-2
        assert (full[:, :3] - expected).abs().max() > 1e-2
        # Logits through forward(positions=...) are the full logits there.
        logits = model(ids, mask, fused=fused, positions=positions)
        torch.testing.assert_close(logits, model(ids, mask)[rows, positions], atol=1e-5, rtol=0)


def test_positions_must_be_a_batch_of_long_indices():
    model = tiny_llada()
    ids = torch.zeros((2, 5), dtype=torch.long)
    for bad in (torch.zeros(2, dtype=torch.long), torch.zeros((3, 1), dtype=torch.long), torch.zeros((2, 1))):
        with pytest.raises(ValueError, match="positions must be"):
            model.hidden_states(ids, positions=bad)


def full_forward_estimate(
    model: nn.Module, prompt: list[int], answer: list[int], *, mask_id: int, num_samples: int, batch_size: int,
    cfg_scale: float, seed: int,
) -> float:  # fmt: skip
    """The estimator written out plainly: the same masks (the same seed), one request at a time, every row's full
    logits (no key mask, no packing), guidance on the full logits, the loss in float64."""
    masked_NA, k_N = draw_masks(
        len(answer),
        num_samples=num_samples,
        batch_size=batch_size,
        generator=torch.Generator().manual_seed(seed),
    )
    p, a = len(prompt), len(answer)
    x = torch.tensor(prompt + answer).repeat(num_samples, 1)
    x[:, p:] = torch.where(masked_NA, mask_id, x[:, p:])
    with torch.no_grad():
        logits = model(x).double()
        if cfg_scale > 0:
            uncond = x.clone()
            uncond[:, :p] = mask_id
            un = model(uncond).double()
            logits = un + (cfg_scale + 1) * (logits - un)
    logp_NAV = F.log_softmax(logits[:, p:], dim=-1)
    target_NA = torch.tensor(answer).expand(num_samples, -1)
    nll_NA = -logp_NAV.gather(-1, target_NA[..., None])[..., 0]
    loss_N = (nll_NA * masked_NA).sum(1) * a / k_N.double()
    return -float(loss_N.mean())


@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=TRITON)])
def test_packed_estimates_equal_a_plain_full_forward_computation(cfg_scale, fused):
    # Requests of different prompt and answer lengths packed together (padding, a key mask, answer spans of the
    # widest answer clamped at the row's end), rows split over forwards: the last block runs over the answer spans
    # only, and each estimate is the plainly computed one with the same masks.
    device = "cuda" if fused and torch.cuda.is_available() else "cpu"
    model = tiny_llada().to(device)
    requests = PACKED_REQUESTS
    kw = dict(num_samples=12, batch_size=5, cfg_scale=cfg_scale)
    widths = []
    last_mlp = model.blocks[-1].ff_proj.register_forward_hook(
        lambda m, args, out: widths.append(args[0].shape[1])
    )
    generators = [torch.Generator().manual_seed(i) for i in range(len(requests))]
    packed = mc_log_likelihoods(
        model, requests, mask_token_id=15, generators=generators, batch_tokens=40, fused=fused, **kw
    )
    last_mlp.remove()
    assert widths and max(widths) <= 5  # the last block's MLP saw the answer spans, never a whole row
    expected = [
        full_forward_estimate(model.cpu(), p, a, mask_id=15, seed=i, **kw)
        for i, (p, a) in enumerate(requests)
    ]
    assert packed == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_llada_loop_transcription_is_the_same_estimator():
    # The benchmark's baseline (LLaDA's loop: full logits, per-row randperm) estimates the same ELBO: the mean of
    # many of its estimates lies within 4 standard errors of the exhaustively enumerated value.
    model = tiny_llada()
    prompt, answer = [1, 2, 3], [7, 4, 9]
    exact = exhaustive_elbo(model, prompt, answer, 15)
    torch.manual_seed(0)
    estimates = [
        bench.reference_log_likelihood(
            model, torch.tensor(prompt), torch.tensor(answer), mc_num=9, mask_id=15, batch_size=9
        )
        for _ in range(40)
    ]
    spread = statistics.stdev(estimates)
    assert spread > 0
    assert abs(statistics.fmean(estimates) - exact) < 4 * spread / math.sqrt(len(estimates))


def test_benchmark_smoke_on_cpu(capsys, tmp_path):
    shapes = ["8/3/4/2", "6/1/1/3", "6/1/1/4:2"]
    rows = bench.main(
        [
            "--shape",
            "tiny",
            "--device",
            "cpu",
            "--shapes",
            *shapes,
            "--repeats",
            "3",
            "--out",
            str(tmp_path / "l"),
        ]
    )
    assert [(r["prompt"], r["answer"], r["mc_num"], r["answers_per_context"]) for r in rows] == [
        (8, 3, 4, 1),
        (6, 1, 1, 1),
        (6, 1, 1, 2),
    ]
    # Every repeat is kept, with its median and range; the raw file holds the same, and its table divides medians.
    for r in rows:
        for timing in (r["reference_ms"], r["ours_ms"]):
            times = timing["repeats"]
            assert len(times) == 3 and min(times) > 0
            assert (timing["min"], timing["median"], timing["max"]) == tuple(sorted(times))
    assert json.loads((tmp_path / "l.json").read_text())["rows"] == rows
    table = render([str(tmp_path / "l.json")]).split("\n")
    speed_ups = [float(line.rsplit("|", 2)[1].strip().rstrip("x")) for line in table[2:]]
    expected = [r["reference_ms"]["median"] / r["ours_ms"]["median"] for r in rows]
    assert speed_ups == pytest.approx(expected, abs=0.006)
    out = capsys.readouterr().out
    # One-token answers are exact: both give the same value per request, up to float rounding.
    differences = re.findall(r"max difference ([^ ]+) \|", out)
    assert len(differences) == 2 and max(float(d) for d in differences) < 1e-5
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "6/1/1/3:2"])  # 2 answers per context do not divide 3 requests


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(answer_ids=[]), "answer_ids is empty"),
        (dict(prompt_ids=[0, MASK]), "contains the mask token"),
        (dict(num_samples=0), "must be positive"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(prompt_ids=[[0, 1]]), "1-D sequence"),
    ],
)
def test_bad_arguments(kwargs, message):
    kw = dict(prompt_ids=[0], answer_ids=[1, 2], mask_token_id=MASK) | kwargs
    with pytest.raises(ValueError, match=message):
        mc_log_likelihood(PerColumn(torch.zeros(3, 6)), **kw)


# --- the callback -------------------------------------------------------------------------------------------------
def write_questions(path, answers_right: bool = True) -> None:
    with path.open("w") as f:
        for start in range(0, tt.NUMBERS, 4):
            right = tt.words(tt.answer(start))
            wrong = tt.words(tt.answer(start)[::-1])
            choices, answer = ([wrong, right], 1) if start % 8 else ([right, wrong], 0)
            if not answers_right:
                answer = 1 - answer
            f.write(json.dumps({"prompt": f"t{start}", "choices": choices, "answer": answer}) + "\n")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(str(tt.tokenizer_folder(tmp_path_factory.mktemp("tok"))))


@pytest.mark.parametrize("answers_right", [True, False])
def test_callback_logs_mc_accuracy_at_interval_and_fit_end(tmp_path, tokenizer, answers_right):
    data = tmp_path / "mc.jsonl"
    write_questions(data, answers_right)
    model = ComposerLLaDA(tt.trained_model(), DiffusionConfig(random_length_prob=0.0), loss_impl="plain")
    model.train()
    callback = LikelihoodEval(
        str(data), tokenizer=tokenizer, interval="2ba", num_samples=8, max_examples=None
    )
    assert len(callback.questions) == 5
    logger = InMemoryLogger()
    batches = [{"input_ids": torch.tensor([[tt.token(s), *tt.answer(s)] for s in range(4)])}] * 3
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(batches, batch_size=None),
        max_duration="3ba",
        device_train_microbatch_size=4,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.0),  # the weights stay those of the trained model
        callbacks=[callback],
        loggers=[logger],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    logged = logger.data["eval/mc_accuracy"]
    assert [int(ts.batch) for ts, _ in logged] == [2, 3]  # the interval, then fit end
    expected = 1.0 if answers_right else 0.0
    assert [value for _, value in logged] == [expected, expected]
    assert model.training  # train mode restored


def test_callback_max_examples_and_bad_files(tmp_path, tokenizer):
    data = tmp_path / "mc.jsonl"
    write_questions(data)
    kw = dict(tokenizer=tokenizer, interval="10ba", num_samples=4)
    assert len(LikelihoodEval(str(data), max_examples=2, **kw).questions) == 2
    with pytest.raises(DataError, match="no such file"):
        LikelihoodEval(str(tmp_path / "absent.jsonl"), max_examples=None, **kw)
    bad_lines = [
        ("{not json", "mc.jsonl:2: not valid JSON"),
        (
            '{"prompt": "t1", "choices": ["t2"], "answer": 0}',
            "mc.jsonl:2: 'choices' must be a list of at least two",
        ),
        ('{"prompt": "t1", "choices": ["t2", "t3"], "answer": 2}', "mc.jsonl:2: 'answer' must be an index"),
        ('{"prompt": "t1", "choices": ["t2", "t3"]}', "mc.jsonl:2: missing field"),
        (
            '{"prompt": "t1", "choices": ["t2", ""], "answer": 0}',
            "mc.jsonl:2: choice 1 .* tokenizes to no tokens",
        ),
        ("[1, 2]", "mc.jsonl:2: expected a JSON object"),
    ]
    good = data.read_text().splitlines()[0]
    for line, message in bad_lines:
        data.write_text(good + "\n" + line + "\n")
        with pytest.raises(DataError, match=message):
            LikelihoodEval(str(data), max_examples=None, **kw)
    with pytest.raises(ValueError, match="in batches"):
        LikelihoodEval(str(data), max_examples=None, **(kw | {"interval": "1ep"}))
