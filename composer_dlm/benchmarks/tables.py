"""The README's benchmark tables, made from the raw JSON under ``results/``: ``python scripts/benchmark.py table``.

    python scripts/benchmark.py table train_1b_h200.json train_1b_h200_ga4.json   # print one table
    python scripts/benchmark.py table kernel_h200.json hidden=4096               # only rows with hidden 4096
    python scripts/benchmark.py table --update README.md                         # regenerate every marked table

In the README each table follows a marker comment and a blank line, ``<!-- table: FILE [FILE ...] [key=value
...] -->``, naming its raw files (bare names are looked up in ``results/``) and optional row filters;
``--update`` rewrites the table under every marker and ``tests/test_readme_figures.py`` fails when a table
differs from what its raw files give. The formatter is chosen by the file's ``"benchmark"`` field: a new
benchmark adds its own to :data:`FORMATTERS`. A figure timed repeatedly is stored as
:func:`composer_dlm.benchmarks.repeats` (every value, their median and range) and shown as
``median (min-max, n=N)``; ratios are taken between medians.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from composer_dlm.benchmarks import RESULTS_DIR, repeats
from composer_dlm.cli import ArgumentParser, fail

Raw = dict[str, Any]
MARKER = re.compile(r"^(?P<indent>[ \t]*)<!-- table: (?P<args>[^>]*?) -->[ \t]*$")


def central(value: float | dict[str, Any]) -> float:
    """The figure to compare or divide: the value itself, or the median of a ``repeats`` record."""
    return float(value["median"]) if isinstance(value, dict) else float(value)


def fmt(value: float | dict[str, Any], spec: str) -> str:
    """``value`` formatted with ``spec``; a ``repeats`` record as "median (min-max, n=N)"."""
    if not isinstance(value, dict):
        return format(value, spec)
    n = len(value["repeats"])
    return f"{value['median']:{spec}} ({value['min']:{spec}}-{value['max']:{spec}}, n={n})"


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _branch(files: list[tuple[str, Raw]], name: str) -> str:
    """The torch branch a file's rows ran on."""
    return "torch27 (forced)" if dict(files)[name]["environment"]["torch27_branch_forced"] else "native"


def _throughput_cells(r: Raw) -> list[str]:
    """A ``train``-style result's tokens/s, MFU, executed FLOPs' utilisation and peak memory (OOM: says so)."""
    if r.get("oom"):
        return ["out of memory", "", "", ""]
    tokens = fmt(r["tokens_per_s_per_gpu"], ",.0f")
    if "tokens_per_s_steps" in r:  # the run's figure, then the range of its timed steps
        steps = r["tokens_per_s_steps"]
        tokens += f" (steps {steps['min']:,.0f}-{steps['max']:,.0f}, n={len(steps['repeats'])})"
    return [
        tokens,
        f"{100 * r['mfu']:.1f}%",
        f"{100 * r['executed_utilisation']:.1f}%",
        f"{r['peak_gib']:.1f}",
    ]


def _train(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``train`` results (one row per result; OOM rows say so): MFU and the executed FLOPs' utilisation."""
    out = [
        [r["path"], name, _branch(files, name), r["micro_batch"], *_throughput_cells(r)] for name, r in rows
    ]
    header = ["run", "raw", "torch branch", "micro-batch", "tokens/s per GPU", "MFU", "executed FLOPs util."]
    return _table([*header, "peak GiB"], out)


def _kernel(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``kernel`` results: forward + backward time, transient memory, gradient errors against fp32; where the
    file has them, the time after idle and the SM clock sampled over the back-to-back repetitions."""
    timed = [r for _, r in rows if "ms" in r]
    idle = any("ms_after_idle" in r for r in timed)
    clocked = any("clocks" in r for r in timed)
    out = []
    for r in timed:
        cells = [r["hidden"], r["targets"], r["method"], r["branch"], fmt(r["ms"], ".2f")]
        if idle:
            cells.append(fmt(r["ms_after_idle"], ".2f") if "ms_after_idle" in r else "")
        if clocked:
            c = r.get("clocks")
            cells.append(f"{c['sm_mhz']['median']:.0f} ({100 * c['power_capped_share']:.0f}%)" if c else "")
        cells += [f"{r['transient_gib']:.2f}", f"{r['err_dh']:.1e}", f"{r['err_dw']:.1e}"]
        out.append(cells)
    header = ["H", "targets", "method", "branch", "ms"]
    header += ["ms after idle"] * idle + ["SM MHz (power-capped)"] * clocked
    return _table([*header, "transient GiB", "d(hidden) err", "d(weight) err"], out)


def _is_reference_sampler(name: str) -> bool:
    """The sampler every other row is compared with: LLaDA's own ``generate.py`` or a transcription of it."""
    return name == "LLaDA generate.py" or name.startswith("reference")


def _seconds(r: Raw) -> float | dict[str, Any]:
    """A sampler row's seconds: with every repeat (``seconds_all``), as a ``repeats`` record."""
    times = r.get("seconds_all")
    return repeats(times) if times and len(times) > 1 else r["seconds"]  # "seconds" is their median


def _sampler(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``sampler`` results; "vs reference" divides the reference's seconds at the same batch and steps (medians
    where repeated); "tokens identical" counts the differing tokens where the row records them."""
    reference = {
        (r["batch"], r["steps"]): central(r["seconds"])
        for _, r in rows
        if _is_reference_sampler(r["sampler"])
    }
    out = []
    for name, r in rows:
        ref = reference.get((r["batch"], r["steps"]))
        speed = "-" if ref is None else f"{ref / central(r['seconds']):.2f}x"
        same = "yes" if r["identical_to_reference"] else "no"
        if _is_reference_sampler(r["sampler"]):
            same = "-"
        elif "tokens_differing_from_reference" in r and not r["identical_to_reference"]:
            total = r["batch"] * dict(files)[name]["options"]["gen_length"]
            same = f"no ({r['tokens_differing_from_reference']} of {total} differ)"
        out.append(
            [
                r["batch"],
                r["steps"],
                r["sampler"],
                fmt(_seconds(r), ".2f"),
                fmt(r["tokens_per_s"], ".1f"),
                speed,
                same,
            ]  # fmt: skip
        )
    header = ["batch", "steps", "sampler", "seconds", "tokens/s", "vs reference", "tokens identical"]
    return _table(header, out)


def _likelihood(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``likelihood`` rows, milliseconds per request; the speed-up divides the medians where timed repeatedly."""
    out = [
        [
            f"{r['prompt']} / {r['answer']} / {r['mc_num']}",
            f"{r['requests']} ({r['answers_per_context']})",
            fmt(r["reference_ms"], ".1f"),
            fmt(r["ours_ms"], ".1f"),
            f"{central(r['reference_ms']) / central(r['ours_ms']):.2f}x",
        ]  # fmt: skip
        for _, r in rows
    ]
    header = ["P / A / M", "requests (answers per context)", "reference loop ms", "ours ms", "speed-up"]
    return _table(header, out)


def _startup(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``startup`` calls: the overrides a call has beyond those all the files share (its temporary folder aside)."""
    shared = set.intersection(*(set(raw["overrides"]) for _, raw in files))
    out = []
    for name, raw in rows:
        extra = [o for o in raw["overrides"] if o not in shared and not o.startswith("base_path=")]
        label = " ".join(f"`{o}`" for o in extra) or "(defaults)"
        out.append(
            [name, label, f"{raw['max_peak_rss_gib_at_start']:.1f}", f"{raw['max_to_first_batch_s']:.1f}"]
        )
    return _table(["raw", "overrides", "peak host RSS GiB", "to first batch s"], out)


def _peer_logits(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``peer_logits`` checks (a fixture made with a peer's modeling code, e.g. tests/fixtures/lladamoe/check.json):
    the largest absolute logit difference of each comparison."""
    labels = {
        "ours_vs_dllm": "ours vs dLLM's code",
        "ours_vs_dllm_attention_mask": "ours vs dLLM's code, padding mask",
        "dllm_on_our_export_vs_fixture": "dLLM's code loading our export vs its own logits",
    }
    out = [
        [name, f"`{r['dllm']}`", r["torch"], labels.get(key, key), f"{value:.3g}"]
        for name, r in rows
        for key, value in r["max_abs_logit_difference"].items()
    ]
    return _table(["raw", "peer code", "torch", "comparison (fp32)", "max abs logit difference"], out)


def _moe(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``moe`` results as the benchmark prints them; "vs reference" divides by its file's reference row (the loop
    over experts), whatever its micro-batch."""
    reference = {
        name: next(
            central(r["tokens_per_s"])
            for r in raw["results"]
            if r["path"].startswith("reference") and "tokens_per_s" in r
        )
        for name, raw in files
    }
    out = []
    for name, r in rows:
        if r.get("oom"):
            out.append([r["path"], r["micro_batch"], "out of memory", "", "", ""])
            continue
        out.append(
            [
                r["path"],
                r["micro_batch"],
                fmt(r["tokens_per_s"], ",.0f"),
                f"{central(r['tokens_per_s']) / reference[name]:.2f}x",
                f"{100 * r['mfu_active']:.1f}%",
                f"{r['peak_gib']:.1f}",
            ]  # fmt: skip
        )
    return _table(["path", "micro-batch", "tokens/s", "vs reference", "active-param MFU", "peak GiB"], out)


def _grouped_gemm(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``moe --grouped-gemm`` paths: each expert projection's GEMM by each path, TFLOP/s over the routed rows."""
    out = [
        [
            f"{r['gemm']} ({r['n']} x {r['k']})",
            r["path"],
            f"{r['fwd_ms']:.3f}",
            f"{r['fwd_tflops']:.0f}",
            f"{r['fwd_bwd_ms']:.3f}",
            f"{r['fwd_bwd_tflops']:.0f}",
        ]  # fmt: skip
        for _, r in rows
    ]
    header = ["GEMM (N x K)", "path", "fwd ms", "fwd TFLOP/s", "fwd+bwd ms", "fwd+bwd TFLOP/s"]
    return _table(header, out)


def _fp8(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``fp8`` throughput: each shape in bf16 and each FP8 recipe; the speed-up is over bf16 in the same call."""
    out = [
        [
            *[r["shape"], r["fp8"], name, _branch(files, name), r["micro_batch"]],
            *_throughput_cells(r),
            "" if r.get("oom") else f"{r['speedup']:.3f}x",
        ]
        for name, r in rows
    ]
    header = ["shape", "fp8", "raw", "torch branch", "micro-batch", "tokens/s per GPU", "MFU"]
    return _table([*header, "executed FLOPs util.", "peak GiB", "vs bf16"], out)


def _fp8_curve(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``fp8`` loss curves (a file without throughput rows): each precision's final loss against bf16's."""
    out = [
        [
            fp8,
            len(raw["curve"]["losses"][fp8]),
            f"{final['final_loss']:.4f}",
            f"{100 * final['relative_to_bf16']:+.2f}%",
        ]
        for _, raw in rows
        for fp8, final in raw["curve"]["final"].items()
    ]
    return _table(["fp8", "steps", "final loss (mean of the last 10%)", "vs bf16"], out)


def _fast_accuracy(files: list[tuple[str, Raw]], rows: list[tuple[str, Raw]]) -> list[str]:
    """``fast_accuracy`` modes: accuracy, its difference from exact mode's in the same file, agreement with exact
    mode (prompts whose graded leading words, and whose generated tokens, are its), the prompts gained and lost
    against it, tokens per forward."""
    exact = {name: next(r for r in raw["results"] if r["mode"] == "exact") for name, raw in files}
    out = []
    for name, r in rows:
        reference = exact[name]
        out.append(
            [
                r["mode"],
                f"{r['correct']} of {r['prompts']}",
                f"{100 * r['accuracy']:.1f}%",
                "-" if r is reference else f"{100 * (r['accuracy'] - reference['accuracy']):+.1f}",
                f"{r['same_answer']} ({100 * r['answer_agreement']:.1f}%)",
                f"{r['same_tokens']} ({100 * r['token_agreement']:.1f}%)",
                f"{r['gained']} / {r['lost']}",
                f"{r['tokens_per_forward']:.2f}",
            ]  # fmt: skip
        )
    header = [
        "mode",
        "right",
        "accuracy",
        "vs exact (points)",
        "same answer as exact",
        "same tokens as exact",
    ]
    return _table([*header, "gained / lost", "tokens/forward"], out)


# benchmark name -> (where its rows are, formatter)
FORMATTERS: dict[
    str, tuple[str | None, Callable[[list[tuple[str, Raw]], list[tuple[str, Raw]]], list[str]]]
] = {
    "train": ("results", _train),
    "kernel": ("results", _kernel),
    "sampler": ("results", _sampler),
    "likelihood": ("rows", _likelihood),
    "startup": (None, _startup),  # one row per file
    "peer_logits": (None, _peer_logits),
    "moe": ("results", _moe),
    "moe --grouped-gemm": ("paths", _grouped_gemm),
    "fp8": ("throughput", _fp8),
    "fp8 curve": (None, _fp8_curve),  # an fp8 file without throughput rows: one table per file
    "fast_accuracy": ("results", _fast_accuracy),
}


def resolve(name: str) -> Path:
    """A raw file: the path as given, or a bare name under ``results/``."""
    path = Path(name)
    return path if path.is_file() or path.is_absolute() or "/" in name else RESULTS_DIR / name


def _matches(row: Raw, filters: dict[str, str]) -> bool:
    return all(str(row.get(key)) == value for key, value in filters.items())


def render(args: Sequence[str]) -> str:
    """The markdown table of raw files ``FILE ...`` with ``key=value`` row filters (all files of one benchmark)."""
    names = [a for a in args if "=" not in a]
    filters = dict(a.split("=", 1) for a in args if "=" in a)
    if not names:
        raise ValueError("name at least one raw JSON file")
    files = []
    for name in names:
        path = resolve(name)
        if not path.is_file():
            raise ValueError(f"no raw file {path}; benchmarks write one with --out")
        files.append((Path(name).name, json.loads(path.read_text())))
    kinds = {raw.get("benchmark") for _, raw in files}
    if len(kinds) != 1 or (kind := kinds.pop()) not in FORMATTERS:
        raise ValueError(
            f"{', '.join(names)}: one table takes files of one benchmark of {sorted(FORMATTERS)}"
        )
    if kind == "fp8" and not any(raw.get("throughput") for _, raw in files):
        kind = "fp8 curve"
    key, formatter = FORMATTERS[str(kind)]
    rows = [(name, row) for name, raw in files for row in (raw[key] if key else [raw])]
    rows = [(name, row) for name, row in rows if _matches(row, filters)]
    if not rows:
        raise ValueError(f"no row of {', '.join(names)} matches {filters}")
    return "\n".join(formatter(files, rows))


def refresh(text: str) -> str:
    """``text`` (a README) with the table under every ``<!-- table: ... -->`` marker made again from its raw files."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        out.append(lines[i])
        marker = MARKER.match(lines[i])
        i += 1
        if marker is None:
            continue
        while i < len(lines) and (not lines[i].strip() or lines[i].strip().startswith("|")):
            i += 1  # the blank line and the table there now, replaced
        out.append("")
        out.extend(marker["indent"] + line for line in render(marker["args"].split()).split("\n"))
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    p = ArgumentParser(prog="benchmark.py table", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "files", nargs="*", help="raw JSON files (bare names: under results/) and key=value filters"
    )
    p.add_argument(
        "--update", type=Path, default=None, help="regenerate every marked table of this markdown file"
    )
    args = p.parse_args(argv)
    try:
        if args.update is not None:
            text = args.update.read_text()
            new = refresh(text)
            if new != text:
                args.update.write_text(new)
            print(
                f"{args.update}: {'tables updated' if new != text else 'tables already match their raw files'}"
            )
        else:
            print(render(args.files))
    except ValueError as e:
        fail(str(e))
