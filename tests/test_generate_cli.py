"""scripts/generate.py: sampling from an exported HF folder and from a Composer checkpoint of a real run, with the
toy-task model (so the printed answer is known), --show, --chat, batches, and clear errors."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import toy_task as tt
from composer import Trainer
from composer.core import Callback
from tiny_runs import embedded_run_overrides, fit
from torch.utils.data import DataLoader

from composer_dlm.data import load_tokenizer
from composer_dlm.diffusion import DiffusionConfig
from composer_dlm.generate import generate
from composer_dlm.generate_cli import MASK_GLYPH, main
from composer_dlm.models import LLaDAConfig, LLaDAModel
from composer_dlm.models.composer_llada import ComposerLLaDA, llada_weights

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A run folder as our trainer lays it out: checkpoints/*.pt from a Composer Trainer, hf/final export."""
    root = tmp_path_factory.mktemp("run")
    model = ComposerLLaDA(tt.trained_model(), DiffusionConfig(random_length_prob=0.0), loss_impl="plain")
    batch = {"input_ids": torch.tensor([[tt.token(s), *tt.answer(s)] for s in range(4)])}
    Trainer(
        model=model,
        train_dataloader=DataLoader([batch], batch_size=None),
        max_duration="1ba",
        device_train_microbatch_size=4,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.0),
        save_folder=str(root / "checkpoints"),
        save_interval="1ba",
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    ).fit()
    model.model.save_pretrained(root / "hf" / "final")
    return {
        "pt": root / "checkpoints" / "ep0-ba1-rank0.pt",
        "hf": root / "hf" / "final",
        "tokenizer": tt.tokenizer_folder(root / "tokenizer"),
    }


def cli(capsys, *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("source", ["hf", "pt"])
def test_prints_the_learnt_answer(run, capsys, source):
    code, out, err = cli(
        capsys, run[source], "--prompt", "t3", "--tokenizer", run["tokenizer"], "--gen-length", "4"
    )
    assert code == 0, err
    assert out == "t4 t5 t6 t7\n"
    if source == "pt":
        assert "composer-dlm: warning:" in err and "pickle" in err and "weights_only=False" in err
    else:
        assert err == ""


def test_show_prints_masks_filling_in(run, capsys):
    argv = [run["hf"], "--prompt", "t11", "--tokenizer", run["tokenizer"], "--gen-length", "4", "--show"]
    code, out, _ = cli(capsys, *argv)
    assert code == 0
    lines = out.splitlines()
    assert [line.split(" ", 2)[1] for line in lines[:4]] == ["1/4:", "2/4:", "3/4:", "4/4:"]
    assert [line.count(MASK_GLYPH) for line in lines[:4]] == [3, 2, 1, 0]  # one token committed per step
    assert lines[3].endswith("t12 t13 t14 t15") and lines[4] == "t12 t13 t14 t15"


def test_batch_of_prompts_of_different_lengths(run, capsys):
    argv = [
        run["hf"],
        "--prompt",
        "t5",
        "--prompt",
        "t0 t1 t2 t7",
        "--tokenizer",
        run["tokenizer"],
        "--gen-length",
        "4",
    ]
    code, out, _ = cli(capsys, *argv)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "[0] t6 t7 t8 t9"
    # Row 1 under left padding is what the same prompt gives alone.
    code, alone, _ = cli(
        capsys, run["hf"], "--prompt", "t0 t1 t2 t7", "--tokenizer", run["tokenizer"], "--gen-length", "4"
    )
    assert lines[1] == "[1] " + alone.strip()


def test_chat_wraps_the_prompt_in_the_template(run, capsys):
    tok = load_tokenizer(str(run["tokenizer"]))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "t2"}], add_generation_prompt=True, tokenize=False
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [
        tt.WORDS.index("<|startoftext|>"),
        tt.WORDS.index("<|start_header_id|>"),
        tt.WORDS.index("user"),
    ]
    model = LLaDAModel.from_pretrained(run["hf"], dtype=torch.float32).eval()
    expected = generate(
        model, torch.tensor([ids]), steps=8, gen_length=8, block_length=4, mask_token_id=tt.MASK
    )
    argv = [
        run["hf"],
        "--prompt",
        "t2",
        "--chat",
        "--tokenizer",
        run["tokenizer"],
        "--gen-length",
        "8",
        "--block-length",
        "4",
    ]
    code, out, _ = cli(capsys, *argv)
    assert code == 0
    assert out == tok.decode(expected[0, len(ids) :].tolist(), skip_special_tokens=True) + "\n"


def test_default_embedded_tokenizer(tmp_path, capsys):
    tok = load_tokenizer("embedded")
    model = LLaDAModel.from_config(
        dict(
            d_model=32, n_layers=1, n_heads=2, mlp_hidden_size=64, vocab_size=len(tok), mask_token_id=tt.MASK
        ),
        seed=0,
    ).eval()
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == tt.MASK
    model.save_pretrained(tmp_path / "hf")
    ids = tok("def f", add_special_tokens=False)["input_ids"]
    expected = generate(
        model, torch.tensor([ids]), steps=6, gen_length=6, block_length=6, mask_token_id=tt.MASK
    )
    code, out, err = cli(capsys, tmp_path / "hf", "--prompt", "def f", "--gen-length", "6")
    assert code == 0, err
    assert out == tok.decode(expected[0, len(ids) :].tolist(), skip_special_tokens=True) + "\n"


def test_errors_are_one_line_messages(run, tmp_path, capsys):
    tok = ["--tokenizer", run["tokenizer"], "--prompt", "t1"]
    cases = [
        ([tmp_path / "absent"], "absent: no such file or folder"),
        ([run["hf"] / "config.json"], "pass the folder that holds it"),
        ([run["hf"], "--gen-length", "6", "--block-length", "4"], "divisible by block_length"),
    ]
    lonely = tmp_path / "lonely" / "ckpt.pt"
    lonely.parent.mkdir()
    lonely.write_bytes(run["pt"].read_bytes())
    cases.append(([lonely], "pass --config"))
    other = tmp_path / "other.pt"
    torch.save({"weights": {}}, other)
    cases.append(([other, "--config", run["hf"] / "config.json"], "not a Composer checkpoint"))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    cases.append(([garbage, "--config", run["hf"] / "config.json"], "not a readable torch checkpoint"))
    bigger = LLaDAModel.from_config(tt.fresh_model().config.to_dict() | {"n_layers": 3})
    bigger.save_pretrained(tmp_path / "bigger")
    cases.append(([run["pt"], "--config", tmp_path / "bigger" / "config.json"], "does not fit .*missing"))
    for argv, message in cases:
        code, out, err = cli(capsys, *argv, *tok)
        assert code == 2, (argv, err)
        assert out == ""
        last = err.strip().splitlines()[-1]
        assert last.startswith("composer-dlm: error: ")
        assert re.search(message, last), (message, last)


def test_script_entry_point(run):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, str(ROOT / "scripts" / "generate.py"), str(run["hf"]), "--prompt", "t8",
            "--tokenizer", str(run["tokenizer"]), "--gen-length", "4"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "t9 t10 t11 t12\n"


def test_help_does_not_import_torch():
    script = str(ROOT / "scripts" / "generate.py")
    code = (
        f"import runpy, sys; sys.argv = [{script!r}, '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('torch' in sys.modules)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--no-chat" in done.stdout and "Exit codes" in done.stdout
    assert done.stdout.strip().endswith("False")  # torch was not imported
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), "ckpt", "--gen-length", "x", "--prompt", "a"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("composer-dlm: error: generate.py: argument --gen-length: invalid int value")


def test_an_sft_runs_checkpoint_gets_the_chat_template_by_default(run, tmp_path, capsys):
    """Inside a run folder whose config.yaml says diffusion.mode: sft (and names the tokenizer), the prompt goes
    through the chat template without --chat; --no-chat turns it off; a pretraining run's does not."""
    import shutil

    import yaml

    folder = tmp_path / "run"
    shutil.copytree(run["hf"], folder / "hf" / "final")
    final = folder / "hf" / "final"
    common = ["--prompt", "t2", "--gen-length", "8", "--block-length", "4"]
    with_chat = cli(capsys, run["hf"], *common, "--tokenizer", run["tokenizer"], "--chat")
    without = cli(capsys, run["hf"], *common, "--tokenizer", run["tokenizer"])
    assert with_chat[1] != without[1]  # the template changes the answer of this model
    for mode, flags, expected in [
        ("sft", [], with_chat),
        ("sft", ["--no-chat"], without),
        ("pretrain", [], without),
    ]:
        config = {"tokenizer": {"name": str(run["tokenizer"])}, "diffusion": {"mode": mode}}
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        code, out, err = cli(capsys, final, *common, *flags)  # no --tokenizer: the run's
        assert (code, out) == expected[:2], (mode, flags, err)
        assert ("chat template" in err) == (mode == "sft" and not flags)


# --- sampling a run while it trains: a run folder, a mid-run .pt ------------------------------------------------


class Snapshot(Callback):
    """At the start of batch ``at + 1`` (batch ``at``'s export and checkpoint written): a copy of the run folder
    as a user would find it then, and the weights the model had."""

    def __init__(self, run_folder: Path, copy_to: Path, at: int) -> None:
        self.run_folder, self.copy_to, self.at = run_folder, copy_to, at
        self.weights: dict[str, torch.Tensor] = {}

    def batch_start(self, state, logger) -> None:
        if int(state.timestamp.batch) == self.at:
            shutil.copytree(self.run_folder, self.copy_to, symlinks=True)
            self.weights = {k: v.detach().clone() for k, v in llada_weights(state.model.state_dict()).items()}


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> dict:
    """A tiny quickstart-style run (real Trainer, embedded corpus, exports every 2 batches keeping 1), copied as it
    stood after batch 4 of 6, and the finished run."""
    base = tmp_path_factory.mktemp("live")
    snap = Snapshot(base / "run", base / "at4", at=4)
    # No warmup and a high rate, so that 4 batches teach the model some text (an answer that is not empty).
    learn = ["scheduler.t_warmup=0ba", "optimizer.lr=0.02", "callbacks.hf_export.keep=1"]
    fit(embedded_run_overrides(base, "run", "6ba") + learn, [snap])
    return {"finished": base / "run", "at4": base / "at4", "weights": snap.weights}


def generate_script(*argv: str | Path) -> subprocess.CompletedProcess:
    """scripts/generate.py in a subprocess, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), *map(str, argv)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)


def expected_answer(weights: dict[str, torch.Tensor], run_folder: Path, prompt: str, gen_length: int) -> str:
    """The answer of a model holding ``weights``, shaped as the run's hf export says, with the embedded tokenizer."""
    tok = load_tokenizer("embedded")
    with torch.device("meta"):
        model = LLaDAModel(LLaDAConfig.from_json(run_folder / "hf" / "final" / "config.json"))
    model.load_state_dict(weights, assign=True)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out = generate(
        model.eval(), torch.tensor([ids]), steps=gen_length, gen_length=gen_length,
        block_length=gen_length, mask_token_id=model.config.mask_token_id,
        eos_token_id=model.config.eos_token_id, min_new_tokens=gen_length,
    )  # fmt: skip
    return tok.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True) + "\n"


# EOS forbidden: a model 4 batches into training would otherwise answer with EOS only (an empty answer).
PROMPT = ["--prompt", "The capital of France is", "--gen-length", "8", "--min-new-tokens", "8"]


def test_mid_run_folder_holds_the_newest_interval_export_only(live_run):
    assert sorted(p.name for p in (live_run["at4"] / "hf").iterdir()) == ["ba4"]  # keep 1: ba2 removed
    # The last batch gets final only; the newest interval export stays beside it.
    assert sorted(p.name for p in (live_run["finished"] / "hf").iterdir()) == ["ba4", "final"]


def test_generate_on_a_mid_run_checkpoint_takes_the_model_from_the_runs_config(live_run, tmp_path):
    """A .pt with no --config and no export beside it: the shape comes from the run's config.yaml."""
    at4 = tmp_path / "at4"
    shutil.copytree(live_run["at4"], at4, symlinks=True)
    shutil.rmtree(at4 / "hf")  # nothing to borrow a config.json from
    pt = at4 / "checkpoints" / "ep0-ba4-rank0.pt"
    done = generate_script(pt, *PROMPT)
    assert done.returncode == 0, done.stderr
    expected = expected_answer(live_run["weights"], live_run["finished"], PROMPT[1], 8)
    assert expected.strip() and done.stdout == expected
    assert "pickle" in done.stderr


def test_generate_on_a_run_folder_samples_its_latest_export(live_run, tmp_path):
    at4 = tmp_path / "at4"
    shutil.copytree(live_run["finished"], at4, symlinks=True)
    shutil.rmtree(at4 / "hf" / "final")  # as the run stood mid-run: ba4 is the newest export
    done = generate_script(at4, *PROMPT)
    assert done.returncode == 0, done.stderr
    assert f"sampling {at4 / 'hf' / 'ba4'}, the run's latest export" in done.stderr
    bf16 = {k: v.to(torch.bfloat16).float() for k, v in live_run["weights"].items()}  # exports are bf16
    expected = expected_answer(bf16, live_run["finished"], PROMPT[1], 8)
    assert expected.strip() and done.stdout == expected


def test_a_run_folder_without_exports_samples_its_latest_checkpoint(live_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(live_run["finished"], run, symlinks=True)
    shutil.rmtree(run / "hf")
    code, out, err = cli(capsys, run, *PROMPT)
    assert code == 0, err
    assert (
        f"sampling {(run / 'checkpoints' / 'ep0-ba6-rank0.pt').resolve()}, the run's latest checkpoint" in err
    )
    assert out == cli(capsys, run / "checkpoints" / "ep0-ba6-rank0.pt", *PROMPT)[1]


def test_a_run_folder_with_nothing_to_sample_is_one_line(live_run, tmp_path, capsys):
    empty = tmp_path / "starting"
    empty.mkdir()
    shutil.copy(live_run["finished"] / "config.yaml", empty / "config.yaml")
    code, out, err = cli(capsys, empty, *PROMPT)
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err
    assert err.startswith(f"composer-dlm: error: {empty} is a run folder with no Hugging Face export")
    assert "checkpoint.save_interval" in err
