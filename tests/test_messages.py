"""User mistakes end in one line naming the fix, with exit code 2, run the way a user runs them: the installed
commands (their own name in the message), the training entry point with the quickstart YAML, Composer's launcher."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faults import free_port

from composer_dlm import commands, train
from composer_dlm.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = str(ROOT / "yamls" / "quickstart.yaml")


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if "error" in line.lower()]


def test_installed_generate_names_itself(tmp_path):
    command = BIN / "composer-dlm-generate"
    if not command.is_file():
        pytest.skip("composer-dlm-generate is not installed (pip install -e .)")
    done = subprocess.run([command, "ckpt"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "composer-dlm: error: composer-dlm-generate: the following arguments are required: --prompt "
        "(see composer-dlm-generate --help)"
    ]


def test_pretrained_on_the_quickstart_names_model_config_null(capsys):
    assert train.main([QUICKSTART, "model.pretrained=GSAI-ML/LLaDA-8B-Base"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("composer-dlm: error: model: model.config and model.pretrained are both set")
    assert "add `model.config=null` to the command line" in line


def test_gpt2_config_is_not_a_llada_config(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    # The keys of GPT-2's config.json (openai-community/gpt2), no weights needed: the config is read first.
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12}
    (gpt2 / "config.json").write_text(json.dumps(config | {"n_head": 12, "vocab_size": 50257}))
    argv = [QUICKSTART, "model.config=null", f"model.pretrained={gpt2}", f"base_path={tmp_path}"]
    assert train.main(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(
        f"composer-dlm: error: {gpt2 / 'config.json'}: not a LLaDA config (model_type 'gpt2')"
    )


def test_stream_proportions_that_do_not_sum_to_one_are_rescaled_aloud(tmp_path, caplog):
    streams = f"{{a: {{local: {tmp_path}, proportion: 0.5}}, b: {{local: {tmp_path}, proportion: 0.2}}}}"
    plain = ["train_loader.local=null", "eval_loader.local=embedded"]
    with caplog.at_level(logging.WARNING):
        load_config(QUICKSTART, [f"train_loader.streams={streams}", *plain])
    (record,) = [r for r in caplog.records if "proportions" in r.getMessage()]
    assert record.getMessage() == (
        "stream proportions sum to 0.7, not 1; they are relative weights, rescaled to a 0.5 -> 0.7143, b 0.2 -> 0.2857"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_config(QUICKSTART, [f"train_loader.streams={streams.replace('0.5', '0.8')}", *plain])
    assert not [r for r in caplog.records if "proportions" in r.getMessage()]


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_refused_two_process_run_prints_once_with_exit_2(tmp_path):
    """``composer -n 2``: every rank refuses the config; the user sees the error once and the exit code 2."""
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", "--master_port", str(free_port())]
    args = [
        str(ROOT / "composer_dlm" / "train.py"),
        QUICKSTART,
        "model.pretrained=x",
        f"base_path={tmp_path}",
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1", "TRITON_INTERPRET": "0"}
    done = subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert len([line for line in errors(output) if line.startswith("composer-dlm: error:")]) == 1, output[
        -3000:
    ]


def test_make_yamls_outside_the_checkout_says_where_the_example_is(tmp_path, monkeypatch):
    command = BIN / "composer-dlm-make-yamls"
    if not command.is_file():
        pytest.skip("composer-dlm-make-yamls is not installed (pip install -e .)")
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # this checkout's code, run by the installed command
    done = subprocess.run(
        [command, "grid_example.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    shipped = ROOT / "yamls" / "grid_example.yaml"
    assert line.startswith("composer-dlm: error: grid description grid_example.yaml does not exist; ")
    hint = f"`cd {ROOT} && composer-dlm-make-yamls yamls/grid_example.yaml --out DIR`"
    assert f"the example of that name is {shipped}" in line and hint in line
    # The hint works: from the checkout's root, the example writes its grid.
    monkeypatch.chdir(ROOT)
    assert commands.make_yamls(["yamls/grid_example.yaml", "--out", str(tmp_path / "grid")]) == 0
    assert sorted(p.name for p in (tmp_path / "grid").iterdir()) == [
        "llada_1b_wiki_pretrain.yaml", "llada_1b_wiki_sft.yaml", "llada_8b_wiki_pretrain.yaml", "llada_8b_wiki_sft.yaml"
    ]  # fmt: skip
