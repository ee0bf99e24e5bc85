"""LLaDA-MoE through the real trainer: pretraining from yamls/llada_moe_tiny.yaml on the embedded corpus, the router
losses in the objective, exact resume, an export LLaDA-MoE's format loads, sampling from it, two processes
through Composer's launcher, and lm-eval's command on an export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from faults import ROOT, rank0_metrics, run_ranks
from test_train import LossTrace

from composer_dlm import builders
from composer_dlm.config import load_config
from composer_dlm.data import load_tokenizer, mask_token_id
from composer_dlm.generate import generate
from composer_dlm.models.architectures import from_pretrained
from composer_dlm.models.llada_moe import LLaDAMoEModel

TINY_MOE = ROOT / "yamls" / "llada_moe_tiny.yaml"


def moe_overrides(base: Path, run: str = "moe", **extra: str) -> list[str]:
    over = {
        "base_path": str(base),
        "run_name": run,
        "model.config.hidden_size": "32",
        "model.config.expert_intermediate_size": "32",
        "model.config.shared_expert_intermediate_size": "32",
        "model.config.dense_intermediate_size": "64",
        "model.loss_impl": "plain",
        "max_seq_len": "32",
        "global_train_batch_size": "8",
        "device_train_microbatch_size": "4",
        "device_eval_batch_size": "8",
        "max_duration": "4ba",
        "eval_interval": "2ba",
        "eval_subset_num_batches": "1",
        "checkpoint.save_interval": "2ba",
        "callbacks.samples": "null",
        "train_loader.num_workers": "0",
        "optimizer.lr": "3e-3",
    } | extra
    return [f"{k}={v}" for k, v in over.items()]


def fit(base: Path, **extra: str) -> tuple[object, list[float]]:
    cfg = load_config(TINY_MOE, moe_overrides(base, **extra))
    trace = LossTrace()
    trainer = builders.build_trainer(cfg, extra_callbacks=[trace])
    trainer.fit()
    trainer.close()
    return trainer, trace.losses


def test_tiny_moe_trains_exports_samples_and_resumes_bit_identical(tmp_path):
    trainer, losses = fit(tmp_path / "full")
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    model = trainer.state.model.model
    assert isinstance(model, LLaDAMoEModel)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # The objective is the diffusion loss plus the weighted router losses of the same forward.
    composer_model = trainer.state.model
    batch = {"input_ids": torch.randint(0, 4000, (2, 16))}
    composer_model.set_noise_step(7)
    with_router = composer_model(batch).loss
    router = model.router_loss
    assert router is not None and 0 < float(router) < 0.1
    model.config.router_aux_loss_coef = model.config.router_z_loss_coef = 0.0
    composer_model.set_noise_step(7)
    torch.testing.assert_close(with_router - composer_model(batch).loss, router)

    # Stopped after batch 2 (its checkpoint), then resumed to batch 4: the same weights, bit for bit.
    fit(tmp_path / "resumed", max_duration="2ba")
    resumed, resumed_losses = fit(tmp_path / "resumed")
    assert resumed_losses == losses[2:]
    for name, tensor in resumed.state.model.model.state_dict().items():
        assert torch.equal(tensor, final[name]), name

    export = tmp_path / "full" / "moe" / "hf" / "final"
    loaded = from_pretrained(export, dtype=torch.float32)
    assert isinstance(loaded, LLaDAMoEModel)
    ids = torch.randint(0, 4000, (2, 12))
    with torch.no_grad():  # the export is bf16: the trained weights rounded to bf16
        rounded = LLaDAMoEModel(model.config)
        rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in final.items()})
        torch.testing.assert_close(loaded(ids), rounded(ids), rtol=1e-5, atol=1e-5)
    tokenizer = load_tokenizer("embedded")
    prompt = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    mask = mask_token_id(tokenizer)
    inputs: list[torch.Tensor] = []  # what the sampler gives the model: the answer starts as mask tokens
    loaded.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    out = generate(loaded.eval(), prompt, steps=4, gen_length=8, block_length=8, mask_token_id=mask)
    assert len(inputs) == 4 and torch.equal(inputs[0], torch.cat([prompt, torch.full((1, 8), mask)], 1))
    assert out.shape == (1, prompt.shape[1] + 8) and torch.equal(out[:, : prompt.shape[1]], prompt)


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_tiny_moe_with_two_processes(tmp_path):
    args = moe_overrides(tmp_path, "moe2", **{"callbacks.hf_export": "null"})
    run_ranks(2, [str(ROOT / "composer_dlm" / "train.py"), str(TINY_MOE), *args], {"TRITON_INTERPRET": "0"})
    run = tmp_path / "moe2"
    assert len(list((run / "logs").glob("rank1-*.txt"))) == 1
    losses = rank0_metrics(run, "loss/train/total")
    assert sorted(losses) == [0, 1, 2, 3] and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert (run / "checkpoints" / "ep0-ba4-rank0.pt").is_file()


def test_sft_fine_tunes_a_release_style_bf16_folder_in_fp32_masters(tmp_path):
    """A bf16 folder stated as inclusionAI's release states it (model_type "llada" with LLaDA-MoE's keys, no
    mask id): model.pretrained loads it as LLaDA-MoE, the mask id comes from the tokenizer, the parameters train
    as fp32 masters on the embedded SFT shards, and the export keeps the release's model type."""
    import json

    base = tmp_path / "release"
    config = load_config(TINY_MOE, moe_overrides(tmp_path)).model.config
    assert config is not None
    LLaDAMoEModel.from_config(config, seed=1).save_pretrained(base, dtype=torch.bfloat16)
    data = json.loads((base / "config.json").read_text())
    data["model_type"] = "llada"
    del data["mask_token_id"]
    (base / "config.json").write_text(json.dumps(data))

    extra = {
        "model.config": "null",
        "model.pretrained": str(base),
        "diffusion.mode": "sft",
        "max_seq_len": "128",
        "max_duration": "2ba",
        "eval_interval": "2ba",
    }
    cfg = load_config(TINY_MOE, [*moe_overrides(tmp_path, "sft"), *(f"{k}={v}" for k, v in extra.items())])
    trainer = builders.build_trainer(cfg)
    trainer.fit()
    model = trainer.state.model.model
    assert isinstance(model, LLaDAMoEModel) and model.config.mask_token_id == mask_token_id(
        load_tokenizer("embedded")
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    exported = json.loads((tmp_path / "sft" / "hf" / "final" / "config.json").read_text())
    assert exported["model_type"] == "llada" and exported["num_experts"] == 4
    trainer.close()


@pytest.mark.slow  # about 40 s: lm-eval's start-up in a subprocess
def test_lm_eval_command_on_a_tiny_moe_export(tmp_path):
    """``composer-dlm-eval`` (the installed lm-eval entry) on a LLaDA-MoE export, in a subprocess, on the shipped
    quickstart task: the results file holds the task's accuracy over the samples, and every score in the samples
    file is ``mc_log_likelihood`` of the same request on the same model with the documented seed."""
    import json
    import os
    import subprocess
    import sys
    import zlib

    from composer_dlm.likelihood import mc_log_likelihood

    command = Path(sys.executable).parent / "composer-dlm-eval"
    if not command.is_file():
        pytest.skip("composer-dlm-eval is not installed (pip install -e '.[eval]')")
    tokenizer = load_tokenizer("embedded")
    config = load_config(TINY_MOE, []).model.config
    assert config is not None
    fields = config.to_dict() | {
        "mask_token_id": mask_token_id(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }
    LLaDAMoEModel.from_config(fields, seed=4).save_pretrained(tmp_path / "moe", tokenizer=tokenizer)

    model_args = f"pretrained={tmp_path / 'moe'},mc_num=4,batch_size=4,seed=3,device=cpu"
    args = ["--model", "composer_dlm", "--include_path", "yamls/lm_eval", "--tasks", "quickstart_capitals"]
    args += [
        "--model_args",
        model_args,
        "--limit",
        "3",
        "--log_samples",
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    (results_file,) = (tmp_path / "out").glob("*/results_*.json")
    results = json.loads(results_file.read_text())
    (samples_file,) = (tmp_path / "out").glob("*/samples_quickstart_capitals_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 3 and results["n-samples"]["quickstart_capitals"]["effective"] == 3
    model = from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert isinstance(model, LLaDAMoEModel)
    right = 0
    for sample in samples:
        scores = []
        for i, resp in enumerate(sample["filtered_resps"]):
            context, continuation = (sample["arguments"][f"gen_args_{i}"][f"arg_{j}"] for j in (0, 1))
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (context, continuation)]
            seed = torch.Generator().manual_seed(3 * 1_000_003 + zlib.crc32(context.encode()))
            expected = mc_log_likelihood(
                model,
                *ids,
                mask_token_id=mask_token_id(tokenizer),
                num_samples=4,
                batch_size=4,
                generator=seed,
            )
            assert float(resp[0]) == pytest.approx(expected, rel=1e-5, abs=1e-5)
            scores.append(expected)
        right += max(range(len(scores)), key=scores.__getitem__) == int(sample["target"])
    assert results["results"]["quickstart_capitals"]["acc,none"] == pytest.approx(right / 3)
