"""The README's troubleshooting table is what the code does: every row is reproduced here or names the test that
reproduces it, and each quoted message (``...`` abridges) matches what the command prints.

Rows reproduced here run the command the way a user does (``train.main`` on the tiny quickstart config, or
``scripts/generate.py``'s ``main``) and check: exit code 2, exactly one ``composer-dlm: error:`` line on stderr,
the README's text, and that no run folder is left behind. Paths in messages are compared with the README's
placeholders (``/data/...``, ``/models/...``): the test's temporary folder stands for ``/``.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from test_train import ROOT, tiny_overrides
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from composer_dlm import builders, generate_cli, train
from composer_dlm.data import load_tokenizer
from composer_dlm.models import LLaDAModel

README = ROOT / "README.md"


@functools.cache
def row_texts() -> dict[str, str]:
    """Case -> the markdown of its row's error cell, as written."""
    section = README.read_text().split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| case "):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows[cells[0]] = cells[1]
    return rows


@functools.cache
def table() -> dict[str, list[str]]:
    """Case -> the messages quoted in its row (markdown's ``\\|`` unescaped)."""
    return {
        case: [m.replace("\\|", "|") for m in re.findall(r"`([^`]+)`", text)]
        for case, text in row_texts().items()
    }


def pattern(abridged: str) -> str:
    """The README's abridged message as a regex: ``...`` stands for any text."""
    return ".*".join(re.escape(part) for part in abridged.split("..."))


# --- reproductions: each returns the stderr of the command (and may set up files under `root`) -----------------


def train_cli(root: Path, capsys, *overrides: str) -> str:
    code = train.main([str(ROOT / "yamls" / "quickstart.yaml"), *tiny_overrides(root), *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (root / "tiny").exists(), "a refused run left its run folder behind"
    return err


def generate_cmd(root: Path, capsys, *argv: str) -> tuple[int, str]:
    code = generate_cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def tiny_hf_folder(folder: Path, **config) -> Path:
    tok = load_tokenizer("embedded")
    fields = dict(d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, vocab_size=len(tok)) | config
    fields["mask_token_id"] = tok.convert_tokens_to_ids("<|mdm_mask|>")
    fields["eos_token_id"] = tok.eos_token_id
    LLaDAModel.from_config(fields, seed=0).save_pretrained(folder)
    return folder


def no_mask_tokenizer(root: Path) -> Path:
    folder = root / "models" / "tok"
    tok = load_tokenizer("embedded")
    data = json.loads(tok.backend_tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mdm_mask|>"]
    data["model"]["vocab"].pop("<|mdm_mask|>", None)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(data))).save_pretrained(folder)
    return folder


def case_unknown_key(root, capsys, monkeypatch):
    return train_cli(root, capsys, "train_loader.shufle=true")


def case_wrong_type(root, capsys, monkeypatch):
    return train_cli(root, capsys, "optimizer.lr=fast")


def case_bad_duration(root, capsys, monkeypatch):
    return train_cli(root, capsys, "max_duration=10 steps")


def case_missing_shards(root, capsys, monkeypatch):
    return train_cli(
        root, capsys, f"train_loader.local={root / 'data' / 'nowhere'}", "train_loader.split=null"
    )


def case_empty_shards(root, capsys, monkeypatch):
    (root / "data" / "empty").mkdir(parents=True)
    return train_cli(root, capsys, f"train_loader.local={root / 'data' / 'empty'}", "train_loader.split=null")


def case_no_mask_token(root, capsys, monkeypatch):
    return train_cli(root, capsys, f"tokenizer.name={no_mask_tokenizer(root)}")


def case_tokenizer_too_large(root, capsys, monkeypatch):
    size = len(load_tokenizer("embedded")) - 1
    return train_cli(root, capsys, f"model.config.vocab_size={size}", f"model.config.embedding_size={size}")


def case_batch_not_divisible(root, capsys, monkeypatch):
    monkeypatch.setattr(builders.dist, "get_world_size", lambda: 4)
    return train_cli(root, capsys, "global_train_batch_size=10")


def case_microbatch(root, capsys, monkeypatch):
    return train_cli(root, capsys, "global_train_batch_size=8", "device_train_microbatch_size=3")


def case_seq_len_above_model(root, capsys, monkeypatch):
    return train_cli(root, capsys, "model.config.max_sequence_length=64", "max_seq_len=128")


def case_pretrained_without_config(root, capsys, monkeypatch):
    (root / "models" / "x").mkdir(parents=True)
    return train_cli(root, capsys, "model.config=null", f"model.pretrained={root / 'models' / 'x'}")


def case_outside_checkpoint(root, capsys, monkeypatch):
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "ep0-ba2-rank0.pt").write_bytes(b"")
    return train_cli(root, capsys, f"checkpoint.load_path={root / 'elsewhere' / 'ep0-ba2-rank0.pt'}")


def case_remote_checkpoint(root, capsys, monkeypatch):
    return train_cli(
        root,
        capsys,
        "checkpoint.load_path=s3://bucket/other-run/ep0-ba2-rank0.pt",
        "checkpoint.trusted_load_paths=[s3://bucket/my-run]",
    )


def case_no_config_file(root, capsys, monkeypatch):
    assert train.main([]) == 2
    return capsys.readouterr().err


def case_long_prompt(root, capsys, monkeypatch):
    folder = tiny_hf_folder(root / "models" / "x", max_sequence_length=16)
    code, err = generate_cmd(root, capsys, folder, "--prompt", "a b c d e f g h", "--gen-length", "12")
    assert code == 2
    return err


def case_empty_answers(root, capsys, monkeypatch):
    folder = tiny_hf_folder(root / "models" / "x")
    # A model that predicts EOS everywhere: with the final norm's weight zero every logit is 0, and the greedy
    # choice among equal logits is the first id, which is EOS in the embedded tokenizer.
    model = LLaDAModel.from_pretrained(folder)
    assert model.config.eos_token_id == 0
    model.state_dict()["model.transformer.ln_f.weight"].zero_()
    model.save_pretrained(folder)
    code, err = generate_cmd(root, capsys, folder, "--prompt", "The", "--gen-length", "4")
    assert code == generate_cli.EXIT_EMPTY
    return err


# Rows whose reproduction lives in another test (a run, a conversion, a model folder): named here with an anchor, a
# distinctive piece of the row's message (of its text, for a row that quotes none) that the named test's source
# (decorators included, where parametrized tests keep their messages) also holds; checked to exist, and the row's
# messages checked against the source that prints them.
ELSEWHERE: dict[str, tuple[str, str]] = {
    "loader pointed at a split folder": (
        "tests/test_data_loader.py::test_loader_errors_name_the_path_and_the_fix",
        "is itself a split folder",
    ),
    "no validation split": (
        "tests/test_data_loader.py::test_loader_errors_name_the_path_and_the_fix",
        "convert again with --val-fraction",
    ),
    "corrupt, truncated or missing shard or index": (
        "tests/test_data_verify.py::test_damaged_split_is_named_at_loader_build",
        "convert the data again with composer-dlm-convert",
    ),
    "tokenizer changed, loaders left on the embedded corpus": (
        "tests/test_data_embedded.py::test_embedded_loader_refuses_another_tokenizer",
        "the built-in corpus in the embedded tokenizer's ids",
    ),
    "shards of another sequence length": (
        "tests/test_data_loader.py::test_loader_errors_name_the_path_and_the_fix",
        "tokens, the run's max_seq_len is",
    ),
    "shards of another tokenizer": (
        "tests/test_data_loader.py::test_loader_errors_name_the_path_and_the_fix",
        "shards were tokenised with",
    ),
    "SFT sample with an empty answer (conversion)": (
        "tests/test_data_convert.py::test_sft_empty_answer_is_an_error_or_dropped",
        "--drop-empty-answers",
    ),
    "SFT prompt longer than the sequence": (
        "tests/test_data_convert.py::test_overlong_sft_advice_says_raise_seq_len",
        "raise --seq-len above 8, or pass --overlong truncate",
    ),
    "model.pretrained on a YAML that sets model.config (the quickstart)": (
        "tests/test_messages.py::test_pretrained_on_the_quickstart_names_model_config_null",
        "model.config and model.pretrained are both set",
    ),
    "model.pretrained of another architecture": (
        "tests/test_messages.py::test_gpt2_config_is_not_a_llada_config",
        "not a LLaDA config (model_type 'gpt2')",
    ),
    "config.json with missing or unsupported fields": (
        "tests/test_hf_format.py::test_bad_config_errors",
        "alibi=True is not supported",
    ),
    "truncated safetensors file": (
        "tests/test_hf_format.py::test_truncated_safetensors_is_a_clear_error",
        "truncated",
    ),
    "pickle weights (`pytorch_model.bin`)": ("tests/test_hf_format.py::test_folder_errors", "pickle"),
    "run folder in use by another run": (
        "tests/test_reliability.py::test_a_second_run_in_the_same_folder_is_refused_until_the_first_dies",
        "is in use by another run (pid",
    ),
    "resuming after changing the model": (
        "tests/test_reliability.py::test_resume_mismatch_is_one_line_at_start_up",
        "Undo the change to the model",
    ),
    "resuming on less data": (
        "tests/test_reliability.py::test_resume_mismatch_is_one_line_at_start_up",
        "samples into its epoch but the training data now has",
    ),
    "resuming with another tokenizer": (
        "tests/test_reliability.py::test_resume_with_another_tokenizer_is_refused",
        "was trained with the tokenizer 'embedded'",
    ),
    "non-finite loss or gradients": (
        "tests/test_reliability.py::test_consecutive_nans_stop_the_run_and_keep_the_last_good_checkpoint",
        "consecutive non-finite losses/gradients, the last at batch",
    ),
    "disk full while saving": (
        "tests/test_reliability.py::test_disk_full_during_checkpoint_save_keeps_the_previous_checkpoint",
        "space left on device",
    ),
    "killed mid-checkpoint (pre-emption, SIGKILL)": (
        "tests/test_fault_injection.py::test_killed_and_resumed_run_equals_uninterrupted_run",
        "incomplete checkpoint(s) moved aside: ep0-ba4-rank0.pt.incomplete",
    ),
    "a killed run's Streaming shared memory": (
        "tests/test_data_loader.py::test_stale_shared_memory_of_a_killed_run_is_cleaned_and_live_runs_kept",
        "blocks",
    ),
}

REPRODUCED: dict[str, Callable] = {
    "mistyped YAML key or override": case_unknown_key,
    "wrong type": case_wrong_type,
    "bad duration": case_bad_duration,
    "missing shard folder": case_missing_shards,
    "empty shard folder": case_empty_shards,
    "tokenizer without a mask token": case_no_mask_token,
    "tokenizer larger than the model's embedding": case_tokenizer_too_large,
    "global batch not divisible by the processes": case_batch_not_divisible,
    "micro-batch not dividing the batch": case_microbatch,
    "max_seq_len above the model's": case_seq_len_above_model,
    "pretrained folder without config.json": case_pretrained_without_config,
    "Composer checkpoint from outside the run": case_outside_checkpoint,
    "remote checkpoint not listed as trusted": case_remote_checkpoint,
    "train.py without a config": case_no_config_file,
    "prompt longer than the model (generate)": case_long_prompt,
    "every generated answer empty (generate)": case_empty_answers,
}


def test_every_row_is_covered():
    assert set(table()) == set(REPRODUCED) | set(ELSEWHERE)


@pytest.mark.parametrize("case", list(REPRODUCED))
def test_row_is_what_the_command_prints(case, tmp_path, capsys, monkeypatch):
    err = REPRODUCED[case](tmp_path, capsys, monkeypatch)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    line = lines[0].replace(str(tmp_path), "").replace("`", "")  # a table cell cannot quote backticks
    assert line.startswith("composer-dlm: "), line
    for message in table()[case]:
        assert re.search(pattern(message), line), (message, line)


def word_runs(pieces: list[str]) -> set[tuple[str, ...]]:
    """Every three consecutive plain words (letters only, case folded) inside each piece of text; anything else
    (a number, a path, a placeholder such as ``N``, a quoted or bracketed value, a break between pieces)
    interrupts a run."""
    runs = set()
    for piece in pieces:
        words: list[str] = []
        for token in piece.split() + [""]:
            if token[:1] in "('\"[`":
                words = []  # a value starts here: in the code, usually an f-string field
            word = token.strip(".,;:!?()[]'\"`")
            if word.isalpha() and word.isascii() and not (len(word) == 1 and word.isupper()):
                words.append(word.casefold())
                if len(words) >= 3:
                    runs.add(tuple(words[-3:]))
            else:
                words = []
    return runs


@functools.cache
def source_literals() -> list[str]:
    """The text of every string literal in composer_dlm/, f-string fields cut out (each literal part apart)."""
    pieces = []
    for path in sorted((ROOT / "composer_dlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.append(node.value)
    return pieces


def function_source(path: str, name: str) -> str | None:
    """The source of the test function ``name`` in ``path``: its decorators (a parametrized test keeps its
    messages there) and its body, not its signature (whose name alone must not pass for a reproduction); None when
    the file has no such function."""
    text = (ROOT / path).read_text()
    lines = text.splitlines()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return "\n".join(
                lines[start - 1 : node.lineno - 1] + lines[node.body[0].lineno - 1 : node.end_lineno]
            )
    return None


@pytest.mark.parametrize("case", list(ELSEWHERE))
def test_row_is_reproduced_elsewhere_and_worded_as_the_code(case):
    test_id, anchor = ELSEWHERE[case]
    path, name = test_id.split("::")
    tree = ast.parse((ROOT / path).read_text())
    assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, test_id
    # The pointer is to the right test: the anchor is in the row's messages (its text if it quotes none) and in
    # the named test's source.
    texts = table()[case] or [row_texts()[case]]
    assert any(anchor in text for text in texts), (case, anchor, texts)
    body = function_source(path, name)
    assert body is not None and anchor in body, (case, anchor, test_id)
    # The README's wording is the code's: the runs of plain words it quotes are in our string literals (all but
    # a few, which straddle two literals of one message, such as a message and the fix appended to it).
    source = word_runs(source_literals())
    for message in table()[case]:
        quoted = word_runs(message.split("..."))
        missing = sorted(" ".join(run) for run in quoted - source)
        assert len(missing) <= 0.2 * len(quoted), (case, missing)
