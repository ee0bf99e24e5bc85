"""A grid of run configs (model x dataset x mode) from one small description; used by scripts/make_yamls.py.

The description is a YAML file:

    base: yamls/llada_1b.yaml            # every generated config starts from this one
    out: yamls/generated                 # where to write {model}_{dataset}_{mode}.yaml
    models:                              # name -> dotted overrides
      llada_1b: {}
      llada_8b: {model.pretrained: /models/LLaDA-8B-Base, tokenizer.name: /models/LLaDA-8B-Base}
    datasets:                            # local: what convert_to_mds.py --out wrote (train/ and val/ inside)
      wiki: {local: /data/mds/wiki, subset_size: 100000, eval_subset_size: 2000}
    modes: [pretrain, sft]               # optional per-mode overrides: {sft: {optimizer.lr: 2.5e-5}}

A dataset is the folder that scripts/convert_to_mds.py --out wrote (``local``), or its copy in object
storage (``remote``, with ``local`` as the cache); both loaders read it, the train loader its split
``train`` and the eval loader its split ``val``. ``subset_size`` and ``eval_subset_size`` are the original
trainer's --train_subset_size / --ref_subset_size.
Every generated file is validated against the schema before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from composer_dlm.config import ConfigError, TrainConfig, build, read_yaml
from composer_dlm.fsutil import write_text_atomic


def _dataset_overrides(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    known = {"local", "remote", "subset_size", "eval_subset_size"}
    unknown = set(spec) - known
    if unknown:
        raise ConfigError(
            f"datasets.{name}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))} "
            "(local: the folder convert_to_mds.py --out wrote, holding train/ and val/)"
        )
    if "local" not in spec and "remote" not in spec:
        raise ConfigError(
            f"datasets.{name}: needs 'local' (the folder convert_to_mds.py --out wrote) or 'remote'"
        )
    out: dict[str, Any] = {"train_loader.split": "train", "eval_loader.split": "val"}
    for key in ("local", "remote"):
        if key in spec:
            out[f"train_loader.{key}"] = out[f"eval_loader.{key}"] = spec[key]
    if "subset_size" in spec:
        out["train_loader.subset_size"] = spec["subset_size"]
    if "eval_subset_size" in spec:
        out["eval_loader.subset_size"] = spec["eval_subset_size"]
    return out


def missing_description(description: Path) -> ConfigError:
    """The error for a description path that is not there, naming the example of that name shipped in the
    source tree (``yamls/grid_example.yaml``) when it can be found, and how to run it (its ``base`` path is
    relative to the checkout's root)."""
    checkout = Path(__file__).resolve().parents[1]
    shipped = checkout / "yamls" / description.name
    if shipped.is_file():
        hint = (
            f"the example of that name is {shipped}; its base config is named relative to {checkout}, so run "
            f"`cd {checkout} && composer-dlm-make-yamls yamls/{shipped.name} --out DIR`"
        )
    else:
        hint = (
            "the example (yamls/grid_example.yaml) ships with the composer-dlm source repository, not the installed "
            "package: run from a clone's root, or copy it and the base config it names"
        )
    return ConfigError(f"grid description {description} does not exist; {hint}")


def make_grid(description: str | Path, *, out: str | Path | None = None) -> list[Path]:
    """Writes one YAML per (model, dataset, mode) and returns their paths."""
    if not Path(description).is_file():
        raise missing_description(Path(description))
    desc = OmegaConf.to_container(read_yaml(description, "grid description"), resolve=True)
    if not isinstance(desc, dict):
        raise ConfigError(f"{description}: expected a mapping")
    unknown = set(desc) - {"base", "out", "models", "datasets", "modes"}
    if unknown:
        raise ConfigError(f"{description}: unknown key(s) {', '.join(sorted(unknown))}")
    for key in ("base", "models", "datasets"):
        if key not in desc:
            raise ConfigError(f"{description}: missing '{key}'")
    modes = desc.get("modes") or ["pretrain"]
    mode_overrides = {m: {} for m in modes} if isinstance(modes, list) else modes
    for key, table in (("models", desc["models"]), ("datasets", desc["datasets"]), ("modes", mode_overrides)):
        if not isinstance(table, dict) or not all(isinstance(v, dict | None) for v in table.values()):
            raise ConfigError(
                f"{description}: '{key}' must map each name to a mapping (modes may also be a list), got {table!r}"
            )
    base = read_yaml(desc["base"], "base config")
    out_dir = Path(out or desc.get("out") or "yamls/generated")
    rendered: dict[str, str] = {}
    for model_name, model_over in desc["models"].items():
        for data_name, data_spec in desc["datasets"].items():
            for mode, mode_over in mode_overrides.items():
                run = f"{model_name}_{data_name}_{mode}"
                if run in rendered:  # e.g. model a_b with dataset c, and model a with dataset b_c
                    raise ConfigError(f"{description}: two grid entries are both named {run}; rename one")
                dotted = {"run_name": run, "diffusion.mode": mode}
                dotted |= model_over or {}
                dotted |= _dataset_overrides(data_name, data_spec or {})
                dotted |= mode_over or {}
                cfg = OmegaConf.create(OmegaConf.to_container(base))
                assert cfg is not None  # create() gives None only for None, and base is a loaded YAML config
                for key, value in dotted.items():
                    OmegaConf.update(cfg, key, value, merge=False)
                data = OmegaConf.to_container(cfg, resolve=True)
                try:
                    build(TrainConfig, data)
                except ConfigError as err:
                    raise ConfigError(f"{run}: {err}") from None
                rendered[run] = OmegaConf.to_yaml(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for run, text in rendered.items():
        path = out_dir / f"{run}.yaml"
        write_text_atomic(path, f"# generated by scripts/make_yamls.py from {description}\n{text}")
        paths.append(path)
    return paths
