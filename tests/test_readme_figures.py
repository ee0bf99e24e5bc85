"""The README's benchmark tables are what their raw files under composer_dlm/benchmarks/results/ give, cell for cell.

Each table follows a marker ``<!-- table: FILE ... -->`` (composer_dlm/benchmarks/tables.py); the tables are made
again from the raw files and compared with the README's text. Spot checks recompute a few cells by hand from
the raw JSON, so that a formatter that misreads a field fails too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from composer_dlm.benchmarks import RESULTS_DIR, repeats
from composer_dlm.benchmarks.tables import MARKER, refresh, render

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(text: str, title: str) -> str:
    start = text.index(f"\n{title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _marked_tables(text: str) -> list[tuple[str, list[str]]]:
    """(marker arguments, table lines) for every marker of ``text``."""
    lines = text.split("\n")
    found = []
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if marker:
            j = i + 1
            while j < len(lines) and not lines[j].strip():
                j += 1
            table = []
            while j < len(lines) and lines[j].strip().startswith("|"):
                table.append(lines[j].strip())
                j += 1
            found.append((marker["args"], table))
    return found


def _first_difference(text: str) -> str:
    for (args, table), (_, fresh) in zip(_marked_tables(text), _marked_tables(refresh(text)), strict=True):
        for old, new in zip(table + [""] * len(fresh), fresh + [""] * len(table), strict=False):
            if old != new:
                return f"table of {args}: README has {old!r}, its raw files give {new!r}"
    return ""


def test_readme_tables_match_their_raw_files():
    assert refresh(README) == README, (
        f"{_first_difference(README)}; run `python scripts/benchmark.py table --update README.md`"
    )
    # The LoRA and start-up tables and the six of ## Benchmarks are made from raw files.
    assert len(_marked_tables(README)) >= 8


def test_every_benchmarks_table_names_its_raw_files():
    lines = _section(README, "## Benchmarks").split("\n")
    for i, line in enumerate(lines):
        if re.match(r"^\s*\|[-| ]+\|\s*$", line):  # a table's separator row; its marker is above its header
            above = [x for x in lines[: i - 1] if x.strip()][-1]
            assert MARKER.match(above), (
                f"a table in ## Benchmarks has no <!-- table: ... --> marker: {lines[i - 1]}"
            )


def test_an_edited_cell_or_raw_value_fails(tmp_path):
    # A cell changed in a copy of the README: its table no longer matches.
    edited = README.replace("| 50,726 |", "| 50,762 |", 1)
    assert edited != README and refresh(edited) != edited
    assert "50,762" in _first_difference(edited)
    # A figure changed in a raw file: the table made from it changes (and the README's copy would fail).
    raw = json.loads((RESULTS_DIR / "train_1b_h200.json").read_text())
    raw["results"][0]["tokens_per_s_per_gpu"] = 49_000.4
    path = tmp_path / "train.json"
    path.write_text(json.dumps(raw))
    assert "| 49,000 |" in render([str(path)]) and "50,726" not in render([str(path)])


def test_cells_recomputed_by_hand(tmp_path):
    # train_1b_h200.json, ours: 50726.318 tokens/s, MFU 0.54118, executed 0.50272, 66.214 GiB.
    train = render(["train_1b_h200.json"]).split("\n")
    assert train[2].endswith("| train_1b_h200.json | native | 8 | 50,726 | 54.1% | 50.3% | 66.2 |")
    assert train[4].endswith("| 8 | out of memory |  |  |  |")
    # likelihood_h200_bf0c4ee.json (the call before --repeats, renamed from likelihood_h200.json):
    # 35.7865 / 13.8331 = 2.587 at 512/1/1 with distinct contexts.
    assert "| 512 / 1 / 1 | 256 (1) | 35.8 | 13.8 | 2.59x |" in render(["likelihood_h200_bf0c4ee.json"])
    # likelihood_h200.json, --repeats 3, same row: medians 38.2051 / 11.9051 = 3.209; ranges 33.23-38.53, 11.81-15.73.
    assert "| 512 / 1 / 1 | 256 (1) | 38.2 (33.2-38.5, n=3) | 11.9 (11.8-15.7, n=3) | 3.21x |" in render(
        ["likelihood_h200.json"]
    )
    # moe_h200_c2ecf09.json: compiled blocks 67825.42 / the loop over experts' 6813.40 = 9.955, MFU 0.40905, 77.457 GiB.
    assert "| ours, compiled blocks | 4 | 67,825 | 9.95x | 40.9% | 77.5 |" in render(
        ["moe_h200_c2ecf09.json"]
    )
    # moe_h200.json (medians of 5 steps): compiled 62861.31 / the loop's 6715.90 = 9.360, MFU 0.37911, 78.197 GiB.
    assert "| ours, compiled blocks | 4 | 62,861 (61,134-65,940, n=5) | 9.36x | 37.9% | 78.2 |" in render(
        ["moe_h200.json"]
    )
    # fp8_curve_h200.json: final losses 1.07560 (tensorwise) over 1.07205 (bf16) = +0.331%.
    assert "| tensorwise | 300 | 1.0756 | +0.33% |" in render(["fp8_curve_h200.json"])
    # fp8_1.65b_h200.json: 58664.70 / 50958.27 = 1.1512.
    assert "| 8 | 58,665 | 62.6% | 58.1% | 66.5 | 1.151x |" in render(["fp8_1.65b_h200.json"])
    # With its timed steps the run's tokens/s is followed by their range: 50,958 (steps 50,012-51,499, n=3).
    raw = json.loads((RESULTS_DIR / "fp8_1.65b_h200.json").read_text())
    raw["throughput"][0]["tokens_per_s_steps"] = {"repeats": [50012.4, 51000.0, 51499.2], "median": 51000.0,
                                                   "min": 50012.4, "max": 51499.2}  # fmt: skip
    (tmp_path / "fp8.json").write_text(json.dumps(raw))
    assert "| 8 | 50,958 (steps 50,012-51,499, n=3) | 54.4% |" in render([str(tmp_path / "fp8.json")])
    # fp8_8b_tensorwise_h200.json: 48624.89 tokens/s, MFU 0.74673, speed-up 1.27086 over bf16.
    assert "| 4 | 48,625 | 74.7% | 67.4% | 70.3 | 1.271x |" in render(["fp8_8b_tensorwise_h200.json"])
    # sampler_h200_llada_code.json: 9.10587 / 2.76269 = 3.296 at batch 1; 204 of 1 x 256 tokens differ.
    sampler = render(["sampler_h200_llada_code.json"])
    assert "| 1 | 256 | ours | 2.76 (2.76-2.76, n=2) | 92.7 | 3.30x | no (204 of 256 differ) |" in sampler
    # sampler_h200.json: the reference's 1.68202 s over ours' 0.72667 s at batch 1, 64 steps = 2.315.
    assert "| 1 | 64 | ours | 0.73 | 352.3 | 2.31x | yes |" in render(["sampler_h200.json"])
    # kernel rows with their repetitions: median (range); 39.54 / 39.40 / 39.90 -> "39.54 (39.40-39.90, n=3)".
    raw = json.loads((RESULTS_DIR / "kernel_h200_budgets.json").read_text())
    raw["results"][0]["ms"] = {
        "repeats": [39.54, 39.40, 39.90],
        "median": 39.54,
        "min": 39.40,
        "max": 39.90,
    }
    (tmp_path / "kernel.json").write_text(json.dumps(raw))
    assert "| ours (C=2048) | native | 39.54 (39.40-39.90, n=3) | 0.56 |" in render(
        [str(tmp_path / "kernel.json")]
    )
    # With the idle repetitions and the sampled clock, two more cells: 35.36 / 35.40 / 35.90 after idle; SM clock
    # samples 1500 / 1620 / 1980 with the power cap in 3 of 4 -> "1620 (75%)"; rows without them stay empty.
    raw["results"][0]["ms_after_idle"] = repeats([35.36, 35.40, 35.90])
    raw["results"][0]["clocks"] = {"sm_mhz": repeats([1500, 1620, 1980]), "power_capped_share": 0.75}
    (tmp_path / "kernel.json").write_text(json.dumps(raw))
    idle = render([str(tmp_path / "kernel.json")]).split("\n")
    assert idle[0].endswith(
        "| ms | ms after idle | SM MHz (power-capped) | transient GiB | d(hidden) err | d(weight) err |"
    )
    assert "| native | 39.54 (39.40-39.90, n=3) | 35.40 (35.36-35.90, n=3) | 1620 (75%) | 0.56 |" in idle[2]
    assert idle[3].split(" | ")[5:7] == ["", ""]
    # kernel_h200_power.json, Liger-Kernel: 25 steps, median 44.6156 (43.6378-52.4630); after idle 40.1085
    # (39.7370-40.3214); SM clock median 1530 MHz over 37 samples, 22 of them power-capped (59%).
    assert (
        "| 44.62 (43.64-52.46, n=25) | 40.11 (39.74-40.32, n=4) | 1530 (59%) | 0.12 |"
        in render(["kernel_h200_power.json"]).split("\n")[-1]
    )
    # kernel_h200.json filtered to one row kind: 11 methods x 1 target kind at H = 2048.
    kernel = render(["kernel_h200.json", "hidden=2048", "targets=sft"]).split("\n")
    assert len(kernel) == 2 + 11 and all(row.startswith("| 2048 | sft |") for row in kernel[2:])
    # Start-up: the overrides only the "before" call has.
    startup = render(["startup_8b_h200_before.json", "startup_8b_h200_after.json"])
    assert (
        "| `fsdp.sync_module_states=false` `model.master_weights=bf16` `model.load_on_gpu=false` | 10.8 |"
        in startup
    )
    assert "| startup_8b_h200_after.json | (defaults) | 6.9 | 19.0 |" in startup
    # fast_accuracy_quickstart2400.json: dual cache 90 of 426 = 21.13%, exact mode 86: +0.94 points; same answer
    # 380 / 426 = 89.2%, same tokens 127 / 426 = 29.8%.
    fast = render(["fast_accuracy_quickstart2400.json"])
    assert "| dual cache | 90 of 426 | 21.1% | +0.9 | 380 (89.2%) | 127 (29.8%) | 10 / 6 | 1.00 |" in fast
    assert "| exact | 86 of 426 | 20.2% | - |" in fast
    # tests/fixtures/lladamoe/check.json: ours vs dLLM's code 1.1920928955078125e-07, its export read back 0.0.
    peer = render([str(ROOT / "tests/fixtures/lladamoe/check.json")])
    assert "| ours vs dLLM's code | 1.19e-07 |" in peer and "vs its own logits | 0 |" in peer


def test_repeated_figures_show_median_and_range_and_ratios_divide_medians(tmp_path):
    raw = {
        "benchmark": "likelihood",
        "rows": [
            {"prompt": 8, "answer": 1, "mc_num": 1, "requests": 4, "answers_per_context": 1,
             "reference_ms": repeats([30.0, 10.0, 20.0, 40.0, 25.0]), "ours_ms": repeats([5.0, 4.0, 6.0])},
        ],
    }  # fmt: skip
    path = tmp_path / "likelihood.json"
    path.write_text(json.dumps(raw))
    # Medians 25 and 5: the speed-up is 5.00x, not the slowest reference (40) over anything.
    assert render([str(path)]).split("\n")[2] == (
        "| 8 / 1 / 1 | 4 (1) | 25.0 (10.0-40.0, n=5) | 5.0 (4.0-6.0, n=3) | 5.00x |"
    )


def test_table_command(tmp_path):
    copy = tmp_path / "README.md"
    copy.write_text(README.replace("| 50,726 |", "| 50,762 |", 1))
    run = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "table"]
    done = subprocess.run([*run, "--update", str(copy)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "tables updated" in done.stdout
    assert copy.read_text() == README
    done = subprocess.run([*run, "no_such_file.json"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("composer-dlm: error: no raw file") and done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args", [["sampler_h200.json", "train_1b_h200.json"], ["train_1b_h200.json", "hidden=1"]]
)
def test_tables_refuse_mixed_files_and_empty_filters(args):
    with pytest.raises(ValueError, match="one benchmark|matches"):
        render(args)
