"""LLaDA's Hugging Face folder format: exports that LLaDA's own configuration class reads as this network,
files beside the weights, hub ids from huggingface_hub's cache, meta-device loading, a typed model.config."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import huggingface_hub.constants
import pytest
import test_llada
import torch
from safetensors.torch import load_file
from test_llada import RELEASE_CONFIG, release_tensors, write_release_folder

from composer_dlm import train
from composer_dlm.config import ConfigError, load_config
from composer_dlm.data import load_tokenizer, mask_token_id
from composer_dlm.generate_cli import main as generate_main
from composer_dlm.models import CheckpointError, LLaDAConfig, LLaDAModel
from composer_dlm.models.hf_format import REMOTE_AUTO_MAP, resolve_folder

ROOT = Path(__file__).resolve().parents[1]

# LLaDA's release config.json (GSAI-ML/LLaDA-8B-Base / -Instruct), the keys that do not depend on the model's
# size, written out by hand from the published file: every one of them differs from, or is absent in, the
# defaults of LLaDA's configuration class, so an export must state them.
LLADA_RELEASE_KEYS = {
    "model_type": "llada",
    "architectures": ["LLaDAModelLM"],
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "embedding_dropout": 0.0,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "multi_query_attention": None,
    "residual_dropout": 0.0,
    "rope": True,
    "rope_full_precision": True,
    "scale_logits": False,
    "use_cache": False,
    "weight_tying": False,
}
# The keys that describe the size of the network; an export states them all.
SIZE_KEYS = (
    "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
    "rope_theta", "rms_norm_eps", "mask_token_id", "eos_token_id", "pad_token_id", "max_sequence_length",
)  # fmt: skip


def tiny(**overrides) -> LLaDAModel:
    """test_llada's tiny model, with an EOS id inside its vocabulary."""
    return test_llada.tiny(**{"eos_token_id": 48} | overrides)


def embedded_sized(tokenizer) -> LLaDAModel:
    """A tiny model whose embedding and special ids fit ``tokenizer``."""
    return tiny(
        vocab_size=len(tokenizer), mask_token_id=mask_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id
    )


def test_export_states_every_release_key_and_is_world_readable(tmp_path):
    model = tiny(n_kv_heads=2, rope_theta=500000.0)
    model.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in LLADA_RELEASE_KEYS.items():
        assert key in written and written[key] == value, key
    expected_size = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48, vocab_size=50,
                         embedding_size=50, rope_theta=500000.0, rms_norm_eps=1e-5, mask_token_id=49, eos_token_id=48,
                         pad_token_id=48, max_sequence_length=4096)  # fmt: skip
    assert {k: written[k] for k in SIZE_KEYS} == expected_size
    assert written["auto_map"] == REMOTE_AUTO_MAP  # composer-dlm's own modeling files travel with it
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (48, 48)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    for path in (tmp_path / "out").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_a_source_folders_modeling_files_and_auto_map_are_kept(tmp_path):
    source = tmp_path / "release"
    tiny().save_pretrained(source)
    data = json.loads((source / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM"}
    (source / "config.json").write_text(json.dumps(data | {"auto_map": auto_map, "init_device": "meta"}))
    (source / "modeling_llada.py").write_text("# stand-in\n")
    (source / "configuration_llada.py").write_text("# stand-in too\n")
    loaded = LLaDAModel.from_pretrained(source)

    loaded.save_pretrained(tmp_path / "with", source=source)
    written = json.loads((tmp_path / "with" / "config.json").read_text())
    assert written["auto_map"] == auto_map and written["init_device"] == "meta"
    assert (tmp_path / "with" / "modeling_llada.py").read_text() == "# stand-in\n"
    assert (tmp_path / "with" / "configuration_llada.py").read_text() == "# stand-in too\n"

    loaded.save_pretrained(tmp_path / "without")  # source unknown: composer-dlm's own files and map instead
    assert json.loads((tmp_path / "without" / "config.json").read_text())["auto_map"] == REMOTE_AUTO_MAP
    assert "# stand-in" not in (tmp_path / "without" / "modeling_llada.py").read_text()


def test_tokenizer_written_beside_the_weights_loads_back(tmp_path):
    tokenizer = load_tokenizer("embedded")
    embedded_sized(tokenizer).save_pretrained(tmp_path / "out", tokenizer=tokenizer)
    again = load_tokenizer(str(tmp_path / "out"))
    text = "def f(x): return x"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["bos_token_id"] == (
        tokenizer.bos_token_id
    )


def test_meta_device_reads_the_config_only(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    meta = LLaDAModel.from_pretrained(tmp_path / "out", dtype=torch.float32, device="meta")
    assert all(p.is_meta and p.dtype == torch.float32 for p in meta.parameters())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: v.shape for k, v in meta.state_dict().items()} == shapes
    (tmp_path / "out" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LLaDAModel.from_pretrained(tmp_path / "out", device="meta")


def test_from_scratch_init_is_reproducible_and_keeps_its_distribution():
    a, b = tiny(n_layers=4), tiny(n_layers=4)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    c = tiny(n_layers=4, init_std=0.02)
    params = dict(c.named_parameters())
    assert torch.equal(params["model.transformer.ln_f.weight"], torch.ones(32))
    # N(0, init_std), and init_std / sqrt(2 * n_layers) for the projections into the residual stream (10%: the
    # standard error of a std estimated from >= 1024 samples is about 2%).
    assert params["model.transformer.wte.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert params["model.transformer.blocks.0.attn_out.weight"].std().item() == pytest.approx(
        0.02 / (2 * 4) ** 0.5, rel=0.1
    )
    meta = LLaDAModel.from_config(c.config, device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_param_init_fn_marks_unsynced_parameters_as_nan():
    model = tiny()
    block = model.blocks[0]
    model.param_init_fn(block.q_proj)
    assert torch.isnan(block.q_proj.weight).all() and not torch.isnan(block.k_proj.weight).any()


def test_model_config_typo_names_the_closest_key(tmp_path, capsys):
    with pytest.raises(
        ConfigError, match=r"unknown key 'model.config.rope_thetta'; did you mean 'rope_theta'"
    ):
        load_config(ROOT / "yamls" / "quickstart.yaml", ["model.config.rope_thetta=500000.0"])
    with pytest.raises(ConfigError, match=r"model.config.n_layers: expected int"):
        load_config(ROOT / "yamls" / "quickstart.yaml", ["model.config.n_layers=two"])
    code = train.main([str(ROOT / "yamls" / "quickstart.yaml"), "model.config.rope_thetta=500000.0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("composer-dlm: error: unknown key 'model.config.rope_thetta'")


def populate_hub_cache(cache: Path, repo_id: str, files_from: Path) -> Path:
    """huggingface_hub's cache layout: models--ORG--NAME/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files_from.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_resolves_from_the_offline_cache(tmp_path, monkeypatch, capsys):
    tokenizer = load_tokenizer("embedded")
    folder = tmp_path / "release"
    embedded_sized(tokenizer).save_pretrained(folder, tokenizer=tokenizer)
    cache = tmp_path / "hub"
    snapshot = populate_hub_cache(cache, "GSAI-ML/LLaDA-tiny", folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))

    assert resolve_folder("GSAI-ML/LLaDA-tiny", "model.pretrained") == snapshot
    assert load_tokenizer("GSAI-ML/LLaDA-tiny")("def")["input_ids"] == tokenizer("def")["input_ids"]
    with pytest.raises(
        CheckpointError, match=r"nor in the Hugging Face cache.*huggingface-cli download GSAI-ML/x"
    ):
        resolve_folder("GSAI-ML/x", "model.pretrained")

    # The user's path: a run that names the hub id for both the weights and the tokenizer.
    overrides = [
        f"base_path={tmp_path / 'runs'}", "run_name=hub", "model.config=null", "model.pretrained=GSAI-ML/LLaDA-tiny",
        "tokenizer.name=GSAI-ML/LLaDA-tiny", "max_seq_len=32", "global_train_batch_size=4", "max_duration=1ba",
        "device_train_microbatch_size=4", "callbacks.samples=null", "eval_loader=null", "train_loader.num_workers=0",
        "model.loss_impl=plain",
    ]  # fmt: skip
    assert train.main([str(ROOT / "yamls" / "quickstart.yaml"), *overrides]) == 0, capsys.readouterr().err
    assert (tmp_path / "runs" / "hub" / "hf" / "final" / "tokenizer.json").is_file()


def test_from_scratch_run_exports_a_release_folder(tmp_path, capsys):
    """The quickstart's path, two batches: the export states every key and holds the tokenizer."""
    overrides = [
        f"base_path={tmp_path}", "run_name=scratch", "model.config.d_model=32", "model.config.n_layers=2",
        "model.config.n_heads=2", "model.config.mlp_hidden_size=64", "model.loss_impl=plain", "max_seq_len=32",
        "global_train_batch_size=4", "device_train_microbatch_size=4", "max_duration=2ba", "eval_loader=null",
        "callbacks.samples=null", "train_loader.num_workers=0",
    ]  # fmt: skip
    assert train.main([str(ROOT / "yamls" / "quickstart.yaml"), *overrides]) == 0
    export = tmp_path / "scratch" / "hf" / "final"
    written = json.loads((export / "config.json").read_text())
    assert {k: written[k] for k in LLADA_RELEASE_KEYS} == LLADA_RELEASE_KEYS
    assert set(SIZE_KEYS) <= set(written) and written["auto_map"] == REMOTE_AUTO_MAP
    assert (export / "tokenizer.json").is_file() and (export / "generation_config.json").is_file()
    tokenizer = load_tokenizer(str(export))  # pads as LLaDA's generate.py asks, within the model's context
    assert tokenizer.pad_token_id == written["pad_token_id"] and tokenizer(["a", "b c"], padding=True)
    assert tokenizer.model_max_length == written["max_sequence_length"]
    model = LLaDAModel.from_pretrained(export)
    assert model.config.d_model == 32 and model.config.mask_token_id == written["mask_token_id"]
    capsys.readouterr()
    # 3: sampled, but only special tokens came out (an undertrained model); 2 would be an error.
    code = generate_main([str(export), "--prompt", "The", "--gen-length", "8"])
    assert code in (0, 3) and "error" not in capsys.readouterr().err


# --- folders: round trips, atomic writes, errors (moved here with the format code) ------------------------
@pytest.mark.parametrize("max_shard_size", ["5GB", 20_000])
def test_save_load_round_trip(tmp_path, max_shard_size):
    model = tiny(n_kv_heads=2)
    model.save_pretrained(tmp_path / "out", max_shard_size=max_shard_size)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert ("model.safetensors.index.json" in files) == (max_shard_size != "5GB")
    loaded = LLaDAModel.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 49, (2, 9))
    assert torch.equal(loaded(ids), model(ids))
    assert list(loaded.state_dict()) == list(model.state_dict())
    stored = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        stored |= load_file(str(f))
    assert set(stored) == set(model.state_dict())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_release_folder_round_trips_names_and_extra_keys(tmp_path):
    tensors = release_tensors(RELEASE_CONFIG)
    model = LLaDAModel.from_pretrained(write_release_folder(tmp_path / "r", RELEASE_CONFIG, tensors))
    model.save_pretrained(tmp_path / "again", dtype=torch.bfloat16)
    assert set(load_file(str(tmp_path / "again" / "model.safetensors"))) == set(tensors)
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert written["init_device"] == RELEASE_CONFIG["init_device"] and written["torch_dtype"] == "bfloat16"
    # The release's auto_map names files that are not given here: composer-dlm's own are written with their map.
    assert written["auto_map"] == REMOTE_AUTO_MAP and (tmp_path / "again" / "modeling_llada.py").is_file()
    reloaded = LLaDAModel.from_pretrained(tmp_path / "again")
    assert reloaded.output_weight.dtype == torch.bfloat16


def test_save_replaces_existing_folder_atomically(tmp_path):
    tiny().save_pretrained(tmp_path / "out")
    other = tiny(d_model=16, n_heads=2)
    other.save_pretrained(tmp_path / "out")
    assert LLaDAModel.from_pretrained(tmp_path / "out").config.d_model == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_previous_folder(tmp_path, monkeypatch):
    tiny().save_pretrained(tmp_path / "out")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("composer_dlm.models.hf_format.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        tiny(d_model=16, n_heads=2).save_pretrained(tmp_path / "out")
    assert LLaDAModel.from_pretrained(tmp_path / "out").config.d_model == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dtype_and_device_arguments(tmp_path):
    tiny().save_pretrained(tmp_path / "out")
    model = LLaDAModel.from_pretrained(tmp_path / "out", dtype=torch.float16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"alibi": True}, "alibi=True is not supported"),
        ({"block_type": "parallel"}, "block_type='parallel' is not supported"),
        ({"d_model": None}, "missing required field"),
        ({"n_heads": 5}, "divisible by n_heads"),
        ({"include_bias": True}, "include_bias"),
        ({"multi_query_attention": True}, "multi_query_attention=True is not supported"),
    ],
)
def test_bad_config_errors(tmp_path, change, message):
    cfg = {k: v for k, v in (RELEASE_CONFIG | change).items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        LLaDAConfig.from_json(tmp_path / "config.json")


def test_folder_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        LLaDAModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pickle"):
        LLaDAModel.from_pretrained(tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    tiny().save_pretrained(tmp_path / "out")
    path = tmp_path / "out" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        LLaDAModel.from_pretrained(tmp_path / "out")


def test_shape_mismatch_names_the_tensor(tmp_path):
    tensors = release_tensors(RELEASE_CONFIG)
    folder = write_release_folder(tmp_path / "r", RELEASE_CONFIG | {"mlp_hidden_size": 40}, tensors)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.\w+\.weight.* has shape \(32, 48\)"):
        LLaDAModel.from_pretrained(folder)
