"""The fast-accuracy benchmark: its prompts are the corpus's own sentences cut before the answer, its grading reads
whole words, and its agreement figures are consistent with its accuracies, on a tiny random model."""

from __future__ import annotations

import json

import pytest

from composer_dlm.benchmarks.fast_accuracy import MODES, fact_prompts, is_right, leading_words, main
from composer_dlm.data import synthetic
from composer_dlm.models import LLaDAModel


def test_prompts_are_every_fact_and_sum_the_corpus_states():
    items = fact_prompts()
    # 20 capitals, 12 colours, 10 animal sounds, 10 jobs; 11 x 11 sums and 66 differences (0..10), each in words
    # and in digits.
    assert len(items) == 20 + 12 + 10 + 10 + 2 * 121 + 2 * 66 == len({p for p, _ in items})
    corpus = "\n".join(synthetic.documents())
    assert [f"{p} {a}." for p, a in items if f"{p} {a}." not in corpus] == []
    assert ("The capital of India is", "New Delhi") in items and ("Nine minus four is", "five") in items
    assert ("The dog", "barks") in items and ("10 + 9 =", "19") in items


@pytest.mark.parametrize(
    "text, answer, right",
    [
        (" Paris. The", "Paris", True),
        ("Paris", "Paris", True),
        (" New Delhi.", "New Delhi", True),
        (" New York", "New Delhi", False),
        (" 10.", "1", False),
        (" 1.", "1", True),
        (" sixteen", "six", False),
        (" is Paris", "Paris", False),
    ],
)
def test_grading_reads_whole_words(text, answer, right):
    assert is_right(text, answer) is right


def test_leading_words_are_as_many_as_the_answer_has():
    assert leading_words(" New Delhi. The capital", "New Delhi") == ["New", "Delhi"]
    assert leading_words(" 10. 3 + 4", "1") == ["10"]
    assert leading_words(" .", "Paris") == []


def test_agreement_figures_are_consistent(tmp_path):
    config = dict(
        d_model=32, n_layers=2, n_heads=2, mlp_hidden_size=64, vocab_size=1024, mask_token_id=2, eos_token_id=0,
        init_std=0.2,
    )  # fmt: skip
    LLaDAModel.from_config(config, seed=0).save_pretrained(tmp_path / "model")
    argv = [str(tmp_path / "model"), "--batch-size", "64", "--trained-with", "from_config(seed=0)"]
    main([*argv, "--out", str(tmp_path / "raw")])
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert raw["command"].endswith("--trained-with 'from_config(seed=0)' --out " + str(tmp_path / "raw"))
    assert raw["options"]["trained_with"] == "from_config(seed=0)"
    rows = raw["results"]
    assert [r["mode"] for r in rows] == list(MODES)
    exact = rows[0]
    assert (exact["same_tokens"], exact["same_answer"], exact["gained"], exact["lost"]) == (426, 426, 0, 0)
    for r in rows:
        assert r["prompts"] == 426 and r["token_agreement"] == r["same_tokens"] / 426
        assert r["same_tokens"] <= r["same_answer"] and r["answer_agreement"] == r["same_answer"] / 426
        assert r["correct"] - exact["correct"] == r["gained"] - r["lost"]
        assert r["gained"] + r["lost"] <= 426 - r["same_tokens"]
    # The caches read stale keys and values: some rows differ from exact mode on a random model.
    assert next(r for r in rows if r["mode"] == "prefix cache")["same_tokens"] < 426
