"""Exports that load without composer-dlm: the modeling files shipped in every export, run by transformers'
AutoModel / AutoModelForMaskedLM in a Python process where ``composer_dlm`` cannot be imported, give our model's
logits (fp32 and bf16 exports, and a folder in LLaDA's release layout); the exported tokenizer pads with
config.json's pad id and knows the model's context."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_llada import RELEASE_CONFIG, release_tensors, write_release_folder

from composer_dlm.data import load_tokenizer, mask_token_id
from composer_dlm.models import LLaDAModel
from composer_dlm.models.hf_format import REMOTE_AUTO_MAP, REMOTE_CODE, REMOTE_CODE_FILES

# Run with ``python -I`` (no PYTHONPATH, no cwd on sys.path) from a folder outside the repository, with an import
# hook in front that refuses composer_dlm however it is installed (an editable install would otherwise find it).
OUTSIDE = r"""
import json, sys
class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "composer_dlm":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NotInstalled())
try:
    import composer_dlm
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("composer_dlm is importable")
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
ids, mask = torch.tensor(args["ids"]), torch.tensor(args["mask"])
out = {}
for name, folder in args["folders"].items():
    for auto in (AutoModel, AutoModelForMaskedLM):
        model = auto.from_pretrained(folder, trust_remote_code=True, dtype="auto")
        with torch.no_grad():
            out[f"{name}/{auto.__name__}"] = (model(ids, attention_mask=mask).logits, type(model).__module__)
tokenizer = AutoTokenizer.from_pretrained(args["folders"]["fp32"])
batch = tokenizer(["a", "b c"], padding=True)
out["tokenizer"] = (batch["input_ids"], batch["attention_mask"], tokenizer.pad_token_id, tokenizer.model_max_length)
torch.save(out, args["out"])
"""


def _model(tokenizer) -> LLaDAModel:
    """A small grouped-query LLaDA sized for ``tokenizer``, with random norm weights so their use is checked."""
    fields = dict(
        d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=len(tokenizer)
    )
    fields |= dict(mask_token_id=mask_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
    model = LLaDAModel.from_config(fields | dict(rope_theta=500000.0, max_sequence_length=640), seed=3)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    return model


def test_export_loads_with_automodel_where_composer_dlm_is_not_installed(tmp_path):
    tokenizer = load_tokenizer("embedded")
    model = _model(tokenizer)
    folders = {"fp32": tmp_path / "fp32", "bf16": tmp_path / "bf16"}
    model.save_pretrained(folders["fp32"], tokenizer=tokenizer)
    model.save_pretrained(folders["bf16"], tokenizer=tokenizer, dtype=torch.bfloat16)
    config = json.loads((folders["fp32"] / "config.json").read_text())
    assert config["auto_map"] == REMOTE_AUTO_MAP
    assert {"configuration_llada.py", "modeling_llada.py", "llada_layers.py"} <= {
        p.name for p in folders["fp32"].iterdir()
    }

    # LLaDA's release layout (its config.json keys, random weights under its tensor names) with our files.
    folders["release"] = write_release_folder(
        tmp_path / "release", RELEASE_CONFIG | {"auto_map": REMOTE_AUTO_MAP}, release_tensors(RELEASE_CONFIG)
    )
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE / name, folders["release"] / name)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, RELEASE_CONFIG["vocab_size"], (2, 9), generator=g)  # in every model's vocabulary
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padded keys are hidden
    args = {
        "folders": {k: str(v) for k, v in folders.items()},
        "ids": ids.tolist(),
        "mask": mask.tolist(),
        "threads": torch.get_num_threads(),
        "out": str(tmp_path / "logits.pt"),
    }
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-I", "-c", OUTSIDE, json.dumps(args)],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = torch.load(tmp_path / "logits.pt")

    with torch.no_grad():
        ours = {
            "fp32": LLaDAModel.from_pretrained(folders["fp32"])(ids, mask),
            "bf16": LLaDAModel.from_pretrained(folders["bf16"])(ids, mask),
            "release": LLaDAModel.from_pretrained(folders["release"])(ids, mask),
        }
    assert ours["bf16"].dtype == torch.bfloat16
    for name, expected in ours.items():
        for auto in ("AutoModel", "AutoModelForMaskedLM"):
            logits, module = result[f"{name}/{auto}"]
            assert module.startswith("transformers_modules."), module  # the folder's own file ran
            assert logits.dtype == expected.dtype and torch.equal(logits, expected), (name, auto)

    # LLaDA's generate.py pads a batch of prompts: the pad token is config.json's pad id (EOS here).
    input_ids, attention, pad_id, max_length = result["tokenizer"]
    assert pad_id == config["pad_token_id"] == tokenizer.eos_token_id
    short, long = tokenizer("a")["input_ids"], tokenizer("b c")["input_ids"]
    padding = len(long) - len(short)
    assert padding > 0 and input_ids == [short + [pad_id] * padding, long]
    assert attention[0] == [1] * len(short) + [0] * padding
    assert max_length == 640


def test_tokenizer_pad_token_is_kept_and_stated_in_config(tmp_path):
    tokenizer = load_tokenizer("embedded")
    tokenizer.pad_token = "<|eot_id|>"  # a tokenizer with its own pad token keeps it; config.json follows
    _model(tokenizer).save_pretrained(tmp_path / "out", tokenizer=tokenizer)
    again = load_tokenizer(str(tmp_path / "out"))
    assert again.pad_token == "<|eot_id|>"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == again.pad_token_id
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["pad_token_id"] == (
        again.pad_token_id
    )


@pytest.mark.parametrize("setting", [{"block_type": "sequential"}, {"rope": False}])
def test_shipped_modeling_file_refuses_networks_it_does_not_compute(setting):
    from composer_dlm.models.hf_remote.configuration_llada import LLaDAConfig
    from composer_dlm.models.hf_remote.modeling_llada import LLaDAModelLM

    config = LLaDAConfig(d_model=8, n_layers=1, n_heads=2, vocab_size=10, **setting)
    key = next(iter(setting))
    with pytest.raises(ValueError, match=f"{key}=.* is not supported"):
        LLaDAModelLM(config)
