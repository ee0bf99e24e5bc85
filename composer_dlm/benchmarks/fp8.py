"""FP8 against bf16 training: ``python scripts/benchmark.py fp8 --out-dir DIR [options]`` (one GPU).

Throughput: the train benchmark's path (:func:`composer_dlm.benchmarks.train.run_ours`: the real trainer, compiled
blocks, the fused loss, synthetic shards, seq 4096) for each shape with ``model.fp8`` off and with each recipe
asked for, and each recipe's tokens/s over bf16's. Shapes: ``8b`` is LLaDA-8B's width (d 4096, MLP 12288, 32
heads) with 8 of its 32 layers, as the full model does not train on one GPU; ``1.65b`` the train benchmark's
default (d 2048, 22 layers, MLP 5632).

Loss curves: a small LLaDA (``--curve-shape``) pretrained on the embedded corpus (real text, the quickstart's data)
for ``--curve-steps`` steps in bf16 and with each recipe, from the same initial weights on the same batches with
the same noise; the final loss of each (mean over the last 10% of steps) and its relative difference to bf16.

Writes ``DIR/fp8_h200.json`` (the raw figures, the per-step losses and the environment) and
``DIR/fp8_loss_h200.png`` (the curves), and prints both tables. ``--replot DIR/fp8_h200.json`` draws the PNG
again from the JSON alone (on a machine with matplotlib).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from composer_dlm.benchmarks import write_json
from composer_dlm.benchmarks.train import bench_data, parser, print_table, release_trainers, run_ours
from composer_dlm.cli import ArgumentParser

SHAPES = {
    "8b": ["--d-model", "4096", "--n-layers", "8", "--n-heads", "32", "--mlp", "12288", "--micro-batch", "4"],
    "1.65b": [
        "--d-model",
        "2048",
        "--n-layers",
        "22",
        "--n-heads",
        "32",
        "--mlp",
        "5632",
        "--micro-batch",
        "8",
    ],
}
CURVE_SHAPES = {  # (d_model, n_layers, n_heads, mlp) on the embedded corpus (vocab 4096, seq 128)
    "small": (768, 8, 12, 2048),
    "tiny": (64, 2, 4, 128),
}
FINAL_FRACTION = 0.1  # the final loss: the mean over the last 10% of steps (one step's loss is noisy)


class _Losses(Callback):
    """Each batch's training loss, kept on the device until the run ends (no synchronisation per step)."""

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        assert isinstance(state.loss, torch.Tensor)
        self.losses.append(state.loss.detach().float().reshape(()))

    def values(self) -> list[float]:
        return torch.stack(self.losses).tolist()


def throughput(
    shape: str, recipes: list[str], steps: int, warmup: int, micro_batch: int = 0
) -> Iterator[dict[str, Any]]:
    """The train benchmark at ``shape`` (its micro-batch, or ``micro_batch``) in bf16 and with each recipe, one
    row per run as it ends, each with its ``speedup`` over bf16; the table after the last."""
    rows: list[dict[str, Any]] = []
    for recipe in ["off", *recipes]:
        argv = [*SHAPES[shape], "--steps", str(steps), "--warmup", str(warmup), "--fp8", recipe]
        if micro_batch:
            argv += ["--micro-batch", str(micro_batch)]  # the last one given wins
        args = parser().parse_args(argv)
        with tempfile.TemporaryDirectory(prefix="cdlm-fp8-") as tmp:
            try:
                row = run_ours(args, bench_data(args), Path(tmp))
            except torch.OutOfMemoryError:
                row = {"path": "ours", "micro_batch": args.micro_batch, "oom": True}
        release_trainers()  # the next run starts from an empty GPU and compiles afresh (after the handler)
        row |= {"shape": shape, "fp8": recipe}
        base = rows[0].get("tokens_per_s_per_gpu") if rows else row.get("tokens_per_s_per_gpu")
        if base and "tokens_per_s_per_gpu" in row:
            row["speedup"] = row["tokens_per_s_per_gpu"] / base
        rows.append(row)
        yield row
    print_table(args, rows)


def loss_curve(shape: str, recipe: str, steps: int, batch: int) -> list[float]:
    """Per-step training losses of the ``shape`` model on the embedded corpus with ``model.fp8: recipe``."""
    from composer_dlm.builders import build_trainer
    from composer_dlm.config import TrainConfig, build

    d_model, n_layers, n_heads, mlp = CURVE_SHAPES[shape]
    with tempfile.TemporaryDirectory(prefix="cdlm-fp8-curve-") as tmp:
        raw = {
            "run_name": f"curve-{recipe}",
            "base_path": tmp,
            "seed": 17,
            "tokenizer": {"name": "embedded"},
            "model": {
                "config": {
                    "d_model": d_model,
                    "n_layers": n_layers,
                    "n_heads": n_heads,
                    "mlp_hidden_size": mlp,
                    "vocab_size": 4096,
                    "max_sequence_length": 128,
                    "rope_theta": 10000.0,
                },
                "compile_blocks": torch.cuda.is_available(),
                "fp8": recipe,
            },
            "train_loader": {"local": "embedded", "split": "train", "num_workers": 2},
            # full-length batches only: no recompilation for a cut length (the throughput runs do the same)
            "diffusion": {"random_length_prob": 0.0},
            "max_seq_len": 128,
            "max_duration": f"{steps}ba",
            "global_train_batch_size": batch,
            "device_train_microbatch_size": batch,
            "precision": "amp_bf16",
            "optimizer": {"lr": 1e-3, "weight_decay": 0.01},
            "scheduler": {"name": "cosine", "t_warmup": f"{max(1, steps // 20)}ba"},
            "checkpoint": {"save": False, "autoresume": False},
            "callbacks": {"hf_export": None, "samples": None},
            "logging": {"console_interval": f"{steps}ba", "plot": False},
            "loggers": {"file": None},
            "eval_interval": f"{10 * steps}ba",
        }
        trace = _Losses()
        trainer = build_trainer(build(TrainConfig, raw), extra_callbacks=[trace])
        trainer.fit()
        trainer.close()
    losses = trace.values()
    del trainer, trace
    release_trainers()
    return losses


def final_loss(losses: list[float]) -> float:
    tail = losses[-max(1, int(len(losses) * FINAL_FRACTION)) :]
    return sum(tail) / len(tail)


def plot(curves: dict[str, list[float]], title: str, path: Path) -> None:
    """The loss curves (and a 20-step moving average of each) as a PNG; a note instead without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot at {path}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, losses in curves.items():
        line = ax.plot(losses, alpha=0.25, linewidth=0.8)[0]
        window = 20
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(losses))
        ]
        ax.plot(smooth, color=line.get_color(), label=f"{label} (final {final_loss(losses):.4f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (masked-diffusion ELBO)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = ArgumentParser(prog="benchmark.py fp8", description=__doc__)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--shapes", default="8b,1.65b", help=f"comma list of {', '.join(SHAPES)} ('' for none)")
    p.add_argument("--recipes", default="rowwise", help="comma list of rowwise, tensorwise")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="micro-batch of every shape (0: each shape's own: 8b 4, 1.65b 8)",
    )
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--curve-shape", default="small", choices=list(CURVE_SHAPES))
    p.add_argument("--curve-steps", type=int, default=300, help="0: no loss curves")
    p.add_argument("--curve-batch", type=int, default=64)
    p.add_argument(
        "--replot",
        type=Path,
        default=None,
        help="only draw fp8_loss_h200.png beside this fp8_h200.json from its losses (where the GPU lacked matplotlib)",
    )
    args = p.parse_args(argv)
    if args.replot is not None:
        raw = json.loads(args.replot.read_text())
        plot(raw["curve"]["losses"], raw["curve"]["model"], args.replot.with_name("fp8_loss_h200.png"))
        return
    recipes = [r for r in args.recipes.split(",") if r]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    d, layers, heads, mlp = CURVE_SHAPES[args.curve_shape]
    curve_desc = (
        f"LLaDA d {d}, {layers} layers, {heads} heads, MLP {mlp} on the embedded corpus, seq 128, batch "
        f"{args.curve_batch}, {args.curve_steps} steps, amp_bf16, compiled blocks"
    )
    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    summary: dict[str, dict[str, float]] = {}

    def save() -> (
        None
    ):  # after each shape and each curve (and the plot): a run cut short keeps what it measured
        write_json(
            args.out_dir / "fp8_h200.json",
            {
                "benchmark": "fp8",
                "command": "python scripts/benchmark.py fp8 " + " ".join(argv),
                "throughput": rows,
                "curve": {
                    "model": curve_desc,
                    "final_fraction": FINAL_FRACTION,
                    "final": summary,
                    "losses": curves,
                },
            },
        )

    for shape in (s for s in args.shapes.split(",") if s):
        for row in throughput(shape, recipes, args.steps, args.warmup, args.micro_batch):
            rows.append(row)
            save()
    for recipe in ["off", *recipes] if args.curve_steps else []:
        curves[recipe] = loss_curve(args.curve_shape, recipe, args.curve_steps, args.curve_batch)
        finals = {name: final_loss(losses) for name, losses in curves.items()}
        summary = {
            name: {"final_loss": loss, "relative_to_bf16": loss / finals["off"] - 1}
            for name, loss in finals.items()
        }
        save()
        plot(curves, curve_desc, args.out_dir / "fp8_loss_h200.png")
    for row in rows:
        if "speedup" in row and row["fp8"] != "off":
            print(f"{row['shape']}, fp8={row['fp8']}: {row['speedup']:.3f}x the tokens/s of bf16")
    if curves:
        print(f"\n{curve_desc}\n| fp8 | final loss (last {FINAL_FRACTION:.0%}) | vs bf16 |\n|---|---|---|")
        for recipe, s in summary.items():
            print(f"| {recipe} | {s['final_loss']:.4f} | {100 * s['relative_to_bf16']:+.2f}% |")
