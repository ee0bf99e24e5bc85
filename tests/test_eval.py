"""lm-evaluation-harness through ``composer_dlm.eval``: local task YAMLs over JSONL files the tests write, a
tiny trained LLaDA exported as a Hugging Face folder. Every request's answer is checked against the library it
should come from (``mc_log_likelihood`` with the documented seed, ``generate``), the CLI against the in-process
run, and two processes under Composer's launcher against one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import toy_task as tt

lm_eval = pytest.importorskip("lm_eval")
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from composer_dlm.data import load_tokenizer  # noqa: E402
from composer_dlm.eval import DiffusionLM, EvalArgumentError  # noqa: E402
from composer_dlm.generate import generate  # noqa: E402
from composer_dlm.likelihood import mc_log_likelihood  # noqa: E402
from composer_dlm.models import LLaDAModel  # noqa: E402

TASKS = ["toy_mc", "toy_gen", "toy_roll"]
STARTS = list(range(0, tt.NUMBERS, 2))
MODEL_ARGS = dict(mc_num=16, batch_size=8, gen_length=4, steps=4, seed=5)
ROOT = Path(__file__).resolve().parents[1]


def _task(name: str, data: Path, body: str) -> str:
    head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    return head + body


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A folder with the exported model (weights + tokenizer) and three tasks: multiple choice whose labelled
    answer is the right one for half the questions, generation, and rolling log-likelihood."""
    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = load_tokenizer(str(tt.tokenizer_folder(root / "tok")))
    tt.trained_model().save_pretrained(root / "model", tokenizer=tokenizer)
    data = root / "tasks" / "toy.jsonl"
    data.parent.mkdir()
    with data.open("w") as f:
        for i, s in enumerate(STARTS):
            right, wrong = tt.words(tt.answer(s)), tt.words(tt.answer(s)[::-1])
            f.write(
                json.dumps({"prompt": f"t{s}", "choices": [right, wrong], "answer": i % 2, "target": right})
            )
            f.write("\n")
    tasks = root / "tasks"
    mc = 'output_type: multiple_choice\ndoc_to_text: "{{prompt}}"\ndoc_to_choice: "{{choices}}"\n'
    mc += 'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'
    (tasks / "mc.yaml").write_text(_task("toy_mc", data, mc))
    gen = 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
    gen += 'generation_kwargs:\n  until: ["<|eot_id|>"]\nmetric_list:\n  - metric: exact_match\n'
    (tasks / "gen.yaml").write_text(_task("toy_gen", data, gen))
    roll = 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{prompt}} {{target}}"\n'
    roll += "metric_list:\n  - metric: word_perplexity\n"
    (tasks / "roll.yaml").write_text(_task("toy_roll", data, roll))
    return root


def _lm(toy: Path, **kwargs) -> DiffusionLM:
    return DiffusionLM(**({"pretrained": str(toy / "model"), "device": "cpu"} | MODEL_ARGS | kwargs))


def _seeded(context: str, seed: int = MODEL_ARGS["seed"]) -> torch.Generator:
    """The documented rule: seed * 1_000_003 + crc32(context)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(context.encode()))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def in_process(toy):
    lm = _lm(toy)
    manager = TaskManager(include_path=str(toy / "tasks"), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=TASKS, task_manager=manager, log_samples=True)
    return lm, results


def test_every_request_is_the_library_s_answer(in_process):
    lm, results = in_process
    model = LLaDAModel.from_pretrained(Path(lm.tokenizer.name_or_path), dtype=torch.float32).eval()
    tok = lm.tokenizer
    scored = 0
    for sample in results["samples"]["toy_mc"]:
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"], strict=True):
            expected = mc_log_likelihood(
                model, _ids(tok, context), _ids(tok, continuation), mask_token_id=tt.MASK, num_samples=16,
                batch_size=8, generator=_seeded(context),
            )  # fmt: skip
            assert resp[0][0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
            assert resp[0][1] is False  # no greedy check asked for
            scored += 1
    assert scored == 2 * len(STARTS)
    for sample in results["samples"]["toy_gen"]:
        prompt = torch.tensor(_ids(tok, sample["arguments"][0][0]))
        out = generate(model, prompt, steps=4, gen_length=4, block_length=4, mask_token_id=tt.MASK)
        assert sample["resps"][0][0] == tok.decode(out[len(prompt) :].tolist(), skip_special_tokens=True)
    for sample in results["samples"]["toy_roll"]:
        (text,) = sample["arguments"][0]
        expected = mc_log_likelihood(
            model, [tt.EOS], _ids(tok, text), mask_token_id=tt.MASK, num_samples=16, batch_size=8,
            generator=_seeded(f"0\0{text}"),
        )  # fmt: skip
        assert sample["resps"][0][0] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    metrics = results["results"]
    assert (
        metrics["toy_mc"]["acc,none"] == 0.5
    )  # the labelled answer is the right one for every other question
    assert metrics["toy_gen"]["exact_match,none"] == 1.0  # the model has learnt the task


def test_greedy_check_and_one_token_answers(toy):
    lm = _lm(toy, greedy_check=True)
    right, wrong = " " + tt.words(tt.answer(3)), " " + tt.words(tt.answer(3)[::-1])
    requests = [
        Instance("loglikelihood", {}, ("t3", cont), i) for i, cont in enumerate([right, wrong, " t4", " t9"])
    ]
    (_, greedy_right), (_, greedy_wrong), (one_right, _), (one_wrong, _) = lm.loglikelihood(requests)
    assert greedy_right is True and greedy_wrong is False
    # A one-token continuation is scored exactly (one row): log softmax of the model at the masked position.
    model = lm.model
    x = torch.tensor([[tt.token(3), tt.MASK]])
    logp = torch.log_softmax(model(x)[0, 1].double(), -1)
    assert one_right == pytest.approx(float(logp[tt.token(4)]), abs=1e-5)
    assert one_wrong == pytest.approx(float(logp[tt.token(9)]), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mc_num=0), "mc_num must be a positive integer"),
        (dict(remasking="best"), "remasking must be"),
        (dict(temperture=1.0), "unknown model_args temperture"),
    ],
)
def test_bad_model_args(toy, kwargs, message):
    with pytest.raises(EvalArgumentError, match=message):
        _lm(toy, **kwargs)


def _cli(toy: Path, out: Path, nproc: int, extra: str = "") -> subprocess.CompletedProcess[str]:
    args = ["--model", "composer_dlm", "--tasks", ",".join(TASKS), "--include_path", str(toy / "tasks")]
    model_args = ",".join(f"{k}={v}" for k, v in MODEL_ARGS.items())
    args += ["--model_args", f"pretrained={toy / 'model'},{model_args}{extra}"]
    args += ["--output_path", str(out), "--log_samples"]
    launcher = [sys.executable, "-m", "composer_dlm.eval"]
    if nproc > 1:
        launcher = [
            "composer",
            "-n",
            str(nproc),
            "--stdout",
            str(out / "rank{rank}.out"),
            "-m",
            "composer_dlm.eval",
        ]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(launcher + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=550)


def _read(out: Path) -> tuple[dict, dict[str, list]]:
    (results,) = out.glob("*/results_*.json")
    samples = {}
    for task in TASKS:
        (path,) = out.glob(f"*/samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        samples[task] = sorted(rows, key=lambda r: r["doc_id"])
    return json.loads(results.read_text())["results"], samples


def _leaves(value) -> list:
    """The scalars of nested lists/tuples (a JSON round trip turns tuples into lists)."""
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _check_against_in_process(out: Path, expected: dict) -> None:
    metrics, samples = _read(out)
    for task in TASKS:
        assert len(samples[task]) == len(STARTS), task
        for got, want in zip(samples[task], expected["samples"][task], strict=True):
            assert got["doc_id"] == want["doc_id"]
            # lm-eval writes the responses as strings
            for g, w in zip(_leaves(got["resps"]), _leaves(want["resps"]), strict=True):
                if type(w) is float:
                    assert float(g) == pytest.approx(w, rel=1e-5), task
                else:
                    assert str(g) == str(w), task
    assert metrics["toy_mc"]["acc,none"] == expected["results"]["toy_mc"]["acc,none"]
    assert metrics["toy_gen"]["exact_match,none"] == expected["results"]["toy_gen"]["exact_match,none"]
    want = expected["results"]["toy_roll"]["word_perplexity,none"]
    assert metrics["toy_roll"]["word_perplexity,none"] == pytest.approx(want, rel=1e-5)


def test_cli_gives_the_in_process_results(toy, in_process, tmp_path):
    done = _cli(toy, tmp_path, 1)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_against_in_process(tmp_path, in_process[1])


@pytest.mark.slow
@pytest.mark.world_size(2)
def test_two_processes_give_the_one_process_results(toy, in_process, tmp_path):
    """Composer's launcher, gloo on CPU: each rank scores its share, rank 0 gathers and writes the results."""
    done = _cli(toy, tmp_path, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_against_in_process(tmp_path, in_process[1])


def test_cli_bad_checkpoint_is_one_line(toy, tmp_path):
    args = ["--model", "composer_dlm", "--tasks", "toy_mc", "--include_path", str(toy / "tasks")]
    args += ["--model_args", f"pretrained={tmp_path / 'absent'}"]
    done = subprocess.run(
        [sys.executable, "-m", "composer_dlm.eval", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"composer-dlm: error: {tmp_path / 'absent'}: no such file or folder"], done.stderr[
        -2000:
    ]
    assert "Traceback" not in done.stderr


def test_installed_command_and_simple_evaluate_by_name(toy, tmp_path, monkeypatch):
    """The README's route to lm-eval: ``composer-dlm-eval`` (lm-eval's CLI with the model registered; lm-eval
    0.4.13 has no plugin discovery) in a subprocess, and ``simple_evaluate(model="composer_dlm")`` after
    ``import composer_dlm.eval``, on the shipped quickstart task, give the same scores."""
    command = Path(sys.executable).parent / "composer-dlm-eval"
    if not command.is_file():
        pytest.skip("composer-dlm-eval is not installed (pip install -e '.[eval]')")
    model_args = f"pretrained={toy / 'model'},mc_num=4,batch_size=4,seed=3,device=cpu"
    args = ["--model", "composer_dlm", "--include_path", "yamls/lm_eval", "--tasks", "quickstart_capitals"]
    args += ["--model_args", model_args, "--limit", "3", "--log_samples", "--output_path", str(tmp_path)]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([command, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quickstart_capitals" in done.stdout
    (path,) = tmp_path.glob("*/samples_quickstart_capitals_*.jsonl")
    cli = [json.loads(line)["filtered_resps"] for line in path.read_text().splitlines()]

    monkeypatch.chdir(ROOT)  # the task's data path is relative to the checkout
    manager = TaskManager(include_path="yamls/lm_eval", include_defaults=False)
    results = simple_evaluate(
        model="composer_dlm", model_args=model_args, tasks=["quickstart_capitals"], task_manager=manager,
        limit=3, log_samples=True,
    )  # fmt: skip
    here = [row["filtered_resps"] for row in results["samples"]["quickstart_capitals"]]
    assert len(here) == len(cli) == 3
    for got, want in zip(cli, here, strict=True):
        assert [float(g[0]) for g in got] == pytest.approx([w[0] for w in want], rel=1e-5)


# --- the training callback ----------------------------------------------------------------------------------------
def test_callback_logs_lm_eval_metrics_during_training_and_pt_checkpoints_load(toy, in_process, tmp_path):
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from torch.utils.data import DataLoader

    from composer_dlm.callbacks.lm_eval import LMEval
    from composer_dlm.config import LMEvalConfig
    from composer_dlm.diffusion import DiffusionConfig
    from composer_dlm.models.composer_llada import ComposerLLaDA

    lm, expected = in_process
    cfg = LMEvalConfig(
        tasks=["toy_mc", "toy_gen"], interval="2ba", include_path=str(toy / "tasks"), include_defaults=False,
        mc_num=16, batch_size=8, gen_length=4, steps=4, seed=5,
    )  # fmt: skip
    model = ComposerLLaDA(tt.trained_model(), DiffusionConfig(random_length_prob=0.0), loss_impl="plain")
    logger = InMemoryLogger()
    batches = [{"input_ids": torch.tensor([[tt.token(s), *tt.answer(s)] for s in range(4)])}] * 3
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(batches, batch_size=None),
        max_duration="3ba",
        device_train_microbatch_size=4,
        optimizers=torch.optim.SGD(model.parameters(), lr=0.0),  # the weights stay those of the trained model
        callbacks=[LMEval(cfg, lm.tokenizer)],
        loggers=[logger],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    for name, key in [
        ("lm_eval/toy_mc/acc", ("toy_mc", "acc,none")),
        ("lm_eval/toy_gen/exact_match", ("toy_gen", "exact_match,none")),
    ]:
        logged = logger.data[name]
        assert [int(ts.batch) for ts, _ in logged] == [2, 3]  # the interval, then fit end
        assert [value for _, value in logged] == [expected["results"][key[0]][key[1]]] * 2
    assert model.training  # train mode restored
    # The run's Composer checkpoint scores as the HF folder does (shape and tokenizer from the run's export).
    import shutil
    import warnings

    checkpoint = Path(trainer.save_checkpoint(str(tmp_path / "run" / "checkpoints" / "last.pt")))
    shutil.copytree(toy / "model", tmp_path / "run" / "hf" / "final")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unpickling warning
        from_pt = _lm(toy, pretrained=str(checkpoint))
    requests = [
        Instance("loglikelihood", {}, ("t3", " t4 t5 t6 t7"), 0),
        Instance("loglikelihood", {}, ("t8", " t2"), 1),
    ]
    assert from_pt.loglikelihood(requests) == lm.loglikelihood(requests)


def test_lm_eval_config_checks():
    from composer_dlm.config import ConfigError, LMEvalConfig

    with pytest.raises(ConfigError, match="tasks is empty"):
        LMEvalConfig(tasks=[])
    with pytest.raises(ConfigError, match="mc_num must be >= 1"):
        LMEvalConfig(tasks=["arc_easy"], mc_num=0)
    with pytest.raises(ValueError, match="lm_eval.interval"):
        LMEvalConfig(tasks=["arc_easy"], interval="1ep")


@pytest.mark.gpu
@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.world_size(2))])
def test_callback_under_fsdp(tmp_path, nproc):
    """The training callback on a FULL_SHARD model (every rank runs every request: each forward is collective)
    logs the same accuracy as the same weights give through the CLI's model class after the run."""
    import re

    from faults import run_ranks
    from test_gpu_multigpu import ENV, QUICKSTART, TRAIN, overrides

    lm_eval_cfg = (
        "{tasks: [quickstart_capitals], include_path: yamls/lm_eval, include_defaults: false, interval: 2ba, "
        "mc_num: 8, batch_size: 8, limit: 8}"
    )
    fsdp = {"sharding_strategy": "FULL_SHARD", "state_dict_type": "full"}
    args = overrides(
        tmp_path, "fsdp_eval", fsdp, **{"callbacks.lm_eval": lm_eval_cfg, "callbacks.hf_export": "{}"}
    )
    run_ranks(nproc, [TRAIN, QUICKSTART, *args, "max_duration=4ba"], ENV)
    folder = tmp_path / "fsdp_eval"
    logs = "".join(p.read_text() for p in (folder / "logs").glob("rank0-*.txt"))
    logged = dict(re.findall(r"\[metric\]\[batch=(\d+)\]: lm_eval/quickstart_capitals/acc: (\S+)", logs))
    assert sorted(logged) == ["2", "4"], logs[-3000:]
    # The final weights, exported, scored through the CLI's model class on one GPU.
    lm = DiffusionLM(pretrained=str(folder / "hf" / "final"), mc_num=8, batch_size=8, dtype="fp32")
    manager = TaskManager(include_path=str(ROOT / "yamls" / "lm_eval"), include_defaults=False)
    cwd = Path.cwd()
    os.chdir(ROOT)  # the task's data path is relative to the repository root
    try:
        results = simple_evaluate(model=lm, tasks=["quickstart_capitals"], task_manager=manager, limit=8)
    finally:
        os.chdir(cwd)
    # Training evaluated under bf16 autocast, this in fp32: one question of the eight may flip.
    assert float(logged["4"]) == pytest.approx(
        results["results"]["quickstart_capitals"]["acc,none"], abs=0.126
    )
