"""The YAML schema: every shipped config validates; typos and wrong types are named with their full path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from composer_dlm.config import ConfigError, TrainConfig, load_config
from composer_dlm.grid import make_grid
from composer_dlm.schedulers import wsd_multiplier

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "yamls").glob("*.yaml") if p.name != "grid_example.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_yamls_validate(path):
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.run_folder == Path(cfg.base_path) / cfg.run_name


def test_llada_1b_shape_is_the_issues():
    cfg = load_config(ROOT / "yamls" / "llada_1b.yaml")
    m = cfg.model.config
    assert m is not None
    assert (m.d_model, m.n_layers, m.n_heads, m.mlp_hidden_size, m.vocab_size) == (
        2048,
        22,
        32,
        5632,
        126464,
    )
    assert cfg.max_seq_len == 4096


def test_overrides_merge_and_are_typed():
    cfg = load_config(
        ROOT / "yamls" / "quickstart.yaml", ["optimizer.lr=0.5", "train_loader.shuffle=false", "run_name=x"]
    )
    assert cfg.optimizer.lr == 0.5 and cfg.train_loader.shuffle is False and cfg.run_name == "x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train_loader.shufle=false", r"unknown key 'train_loader.shufle'; did you mean 'shuffle'\?"),
        ("optimizer.lrr=1", r"unknown key 'optimizer.lrr'; did you mean 'lr'\?"),
        (
            "callbacks.samples.gen_lenght=3",
            r"unknown key 'callbacks.samples.gen_lenght'; did you mean 'gen_length'\?",
        ),
        ("max_seq_lenn=4", r"unknown key 'max_seq_lenn'; did you mean 'max_seq_len'\?"),
        ("optimizer.lr=fast", r"optimizer.lr: expected float, got str 'fast'"),
        ("precision=amp_int3", r"precision: 'amp_int3' is not one of"),
        ("max_duration=10 steps", r"max_duration: '10 steps' is not a duration"),
        (
            "model.pretrained=/x",
            r"model: model.config and model.pretrained are both set.*add `model.config=null`",
        ),
        ("global_train_batch_size=0", r"global_train_batch_size must be positive"),
        (
            "model.loss_chunk_mib=0",
            r"model.loss_chunk_mib is the fused loss's logits buffer in MiB and must be at",
        ),
        ("diffusion.mode=ar", r"'ar' is not one of"),
        # Callbacks count batches: another unit, or zero (a modulo by zero at the first batch), is refused here.
        ("callbacks.samples.interval=1ep", r"callbacks.samples.interval must be in batches and at least 1"),
        ("callbacks.samples.interval=0ba", r"callbacks.samples.interval must be in batches and at least 1"),
        ("callbacks.hf_export.interval=2ep", r"callbacks.hf_export.interval must be in batches"),
        ("callbacks.samples.interval=often", r"callbacks.samples.interval: 'often' is not a duration"),
        # The sampler's geometry, checked before training rather than at the first sample.
        (
            "callbacks.samples.block_length=5",
            r"callbacks.samples: gen_length \(24\) must be divisible by block_length \(5\)",
        ),
        ("callbacks.samples.steps=0", r"callbacks.samples: steps must be a positive integer, got 0"),
        ("callbacks.nan_guard.max_consecutive=0", r"callbacks.nan_guard.max_consecutive must be >= 1, got 0"),
        ("callbacks.speed_window=0", r"callbacks.speed_window must be >= 1, got 0"),
        (
            "callbacks.likelihood_eval={data: mc.jsonl, num_samples: 0}",
            r"callbacks.likelihood_eval.num_samples must be >= 1, got 0",
        ),
        (
            "callbacks.likelihood_eval={data: mc.jsonl, interval: 1ep}",
            r"callbacks.likelihood_eval.interval must be in batches",
        ),
        # WSD counts warmup and duration in one unit (quickstart: wsd, max_duration 600ba).
        ("scheduler.t_warmup=1ep", r"scheduler.t_warmup \(1ep\) must use the unit of max_duration \(600ba\)"),
        ("optimizer.betas=[0.9", r"override 'optimizer.betas=\[0.9': .*did not find expected"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "yamls" / "quickstart.yaml", [override])


def test_missing_required_key_and_file(tmp_path):
    data = yaml.safe_load((ROOT / "yamls" / "quickstart.yaml").read_text())
    del data["max_duration"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="missing required key.*max_duration"):
        load_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(ROOT / "yamls" / "quickstart.yaml", ["lr"])
    (tmp_path / "broken.yaml").write_text("run_name: [x\n")
    with pytest.raises(
        ConfigError, match=f"{tmp_path / 'broken.yaml'}: while parsing a flow sequence"
    ) as err:
        load_config(tmp_path / "broken.yaml")
    assert "\n" not in str(err.value)  # one paragraph


def test_wsd_warmup_of_zero_may_use_any_unit():
    cfg = load_config(ROOT / "yamls" / "quickstart.yaml", ["scheduler.t_warmup=0ep"])
    assert cfg.scheduler.t_warmup == "0ep"
    cfg = load_config(ROOT / "yamls" / "quickstart.yaml", ["scheduler.name=cosine", "scheduler.t_warmup=1ep"])
    assert cfg.scheduler.t_warmup == "1ep"  # Composer's own schedulers convert units


def test_make_grid_writes_valid_configs(tmp_path):
    desc = tmp_path / "grid.yaml"
    desc.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "yamls" / "quickstart.yaml"),
                "models": {"tiny": {}, "wide": {"model.config.d_model": 256}},
                "datasets": {"d1": {"local": "/data/d1", "subset_size": 1000}},
                "modes": {"pretrain": {}, "sft": {"optimizer.lr": 1e-4}},
            }
        )
    )
    paths = make_grid(desc, out=tmp_path / "out")
    assert sorted(p.name for p in paths) == sorted(
        f"{m}_d1_{mode}.yaml" for m in ("tiny", "wide") for mode in ("pretrain", "sft")
    )
    cfg = load_config(tmp_path / "out" / "wide_d1_sft.yaml")
    assert cfg.model.config is not None and cfg.model.config.d_model == 256
    assert cfg.diffusion.mode == "sft" and cfg.optimizer.lr == 1e-4
    assert (
        cfg.train_loader.local == cfg.eval_loader.local == "/data/d1" and cfg.train_loader.subset_size == 1000
    )
    assert (cfg.train_loader.split, cfg.eval_loader.split) == ("train", "val")
    assert cfg.run_name == "wide_d1_sft"


def test_make_grid_rejects_bad_description(tmp_path):
    desc = tmp_path / "grid.yaml"
    desc.write_text(
        yaml.safe_dump(
            {
                "base": str(ROOT / "yamls" / "quickstart.yaml"),
                "models": {"a": {"optimizer.lrr": 1}},
                "datasets": {"d": {"local": "x"}},
            }
        )
    )
    with pytest.raises(ConfigError, match="a_d_pretrain: unknown key 'optimizer.lrr'"):
        make_grid(desc, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"base": "/nowhere/base.yaml"}, r"base config /nowhere/base.yaml does not exist"),
        ({"models": ["a", "b"]}, r"'models' must map each name to a mapping"),
        ({"datasets": {"d": "/data/d"}}, r"'datasets' must map each name to a mapping"),
        ({"modes": "sft"}, r"'modes' must map each name to a mapping \(modes may also be a list\)"),
        (
            {"models": {"a_b": {}, "a": {}}, "datasets": {"c": {"local": "x"}, "b_c": {"local": "y"}}},
            r"two grid entries are both named a_b_c_pretrain",
        ),
    ],
)
def test_make_grid_names_what_is_wrong_with_the_description(tmp_path, change, message):
    desc = tmp_path / "grid.yaml"
    spec = {
        "base": str(ROOT / "yamls" / "quickstart.yaml"),
        "models": {"a": {}},
        "datasets": {"d": {"local": "x"}},
    }
    desc.write_text(yaml.safe_dump(spec | change))
    with pytest.raises(ConfigError, match=message):
        make_grid(desc, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="grid description .*nope.yaml does not exist"):
        make_grid(tmp_path / "nope.yaml", out=tmp_path / "out")


def test_wsd_schedule_by_hand():
    kw = dict(warmup=10, total=100, decay_fraction=0.2, alpha_f=0.1)
    assert wsd_multiplier(0, **kw) == 0.0
    assert wsd_multiplier(5, **kw) == 0.5
    assert wsd_multiplier(10, **kw) == 1.0
    assert wsd_multiplier(79, **kw) == 1.0
    assert wsd_multiplier(90, **kw) == pytest.approx(0.55)
    assert wsd_multiplier(100, **kw) == pytest.approx(0.1)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_the_run_record_reads_back_as_the_same_config(path, tmp_path):
    """{run}/config.yaml (written at each start) is the resolved config: loading it gives the same TrainConfig."""
    from composer_dlm.config import write_run_config

    cfg = load_config(path, [f"base_path={tmp_path}"])
    cfg.run_folder.mkdir(parents=True)
    write_run_config(cfg)
    assert load_config(cfg.run_config_file) == cfg
    assert [p.name for p in cfg.run_folder.iterdir()] == ["config.yaml"]  # no temporary file left


@pytest.mark.parametrize("interval", ["1ep", "0ba", "soon"])
def test_console_interval_must_be_batches(interval):
    with pytest.raises(ConfigError, match="logging.console_interval"):
        load_config(ROOT / "yamls" / "quickstart.yaml", [f"logging.console_interval={interval}"])


def test_hf_export_keep_must_be_positive_or_null():
    quickstart = ROOT / "yamls" / "quickstart.yaml"
    with pytest.raises(
        ConfigError, match=r"callbacks.hf_export.keep must be >= 1 \(or null to keep every export\)"
    ):
        load_config(quickstart, ["callbacks.hf_export.keep=0"])
    cfg = load_config(quickstart, ["callbacks.hf_export.keep=null"])
    assert cfg.callbacks.hf_export is not None and cfg.callbacks.hf_export.keep is None
