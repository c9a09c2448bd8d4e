"""Choose the IM-connection's settings on held-out training data, one setting at a time.

Fine-tunes IM-BERT (seed 1) on a seeded, stratified low-resource SST-2 subset with a quarter of it held out,
and chooses in stages (a coordinate search): field and step, then which layers, then the iteration cap,
each stage starting from the choices before it. Only held-out accuracy decides; a tie keeps the earlier
candidate (from the second stage on, the first candidate is the incumbent). Dev and AdvGLUE are scored (a
small dev subset, to keep runs short) but never looked at. Every candidate is also compared with its
stage's choice on the same held-out examples (paired, 95% t interval), which says how clear the choice is.
``results.json`` in ``--out`` is rewritten atomically after every run; finished runs are reused, if their
settings are the ones asked for (``ode_bert.experiments.ensure_run``: a mismatch is refused with the
differing keys).

    python bench/experiments/im_select.py --out runs/im_select [--model DIR] [--data-dir DIR]

The comparison of the chosen IM-BERT with BERT and EX-BERT over seeds is ``grid.py``'s job.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from transformers import AutoConfig

from ode_bert.evaluate import METRICS_FILE, PREDICTIONS_FILE
from ode_bert.experiments import Group, Run, ensure_run, paired_difference
from ode_bert.io import write_json_atomic
from ode_bert.pretrained import resolve_model_path

# Settings of the first stage's runs that a later stage chooses.
START: dict[str, Any] = {"layers": "all", "max_iter": 10}
# Fine-tuning settings of every selection run (those of the comparisons in RESULTS.md).
COMMON: dict[str, Any] = {"task": "sst2", "variant": "im", "seed": 1, "epochs": 2, "batch_size": 32,
                          "lr": 2e-4, "max_length": 64, "holdout": 0.25}
DEV_SAMPLES = 100  # dev is not used for choosing; a small subset keeps each run short


def stages(num_layers: int) -> list[tuple[str, list[dict[str, Any]]]]:
    """The stages of the search and their candidates, for an encoder of ``num_layers`` layers."""
    def span(first: int, last: int) -> str:
        return str(first) if first == last else f"{first}-{last}"

    half = num_layers // 2  # lower half, upper half, the first layer alone (each once)
    subsets = list(dict.fromkeys([span(0, half - 1), span(half, num_layers - 1), "0"])) if half else []
    return [
        ("field and step", [{"field": "residual", "step": 1.0}, {"field": "residual", "step": 0.5},
                            {"field": "layer", "step": 0.25}]),
        ("layers", [{"layers": "all"}, *({"layers": subset} for subset in subsets)]),
        ("iteration cap", [{"max_iter": 10}, {"max_iter": 5}, {"max_iter": 20}]),
    ]


def run_name(settings: dict[str, Any]) -> str:
    """The run directory's name: every chosen setting, so that a run is reused only for the same ones."""
    return (f"select-im-{settings['field']}-s{settings['step']}-L{settings['layers']}"
            f"-it{settings['max_iter']}")


def choose(heldout_accuracies: list[float]) -> int:
    """Index of the best held-out accuracy; a tie keeps the earliest candidate."""
    return max(range(len(heldout_accuracies)), key=lambda i: (heldout_accuracies[i], -i))


def heldout_correct(run_dir: Path) -> list[float]:
    """Per held-out example, 100 if the run's prediction is right, else 0."""
    predictions = json.loads((run_dir / PREDICTIONS_FILE).read_text())["heldout"]
    return [100.0 * (p == label) for split in predictions.values()
            for p, label in zip(split["predictions"], split["labels"], strict=True)]


def fine_tune(run_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one candidate (skipped when its metrics already exist with the same settings);
    its metrics."""
    group = Group(options["task"], options.get("train_samples"), (options["variant"],))
    run = Run(group, options["variant"], options["seed"], run_dir, {**options, "output_dir": str(run_dir)})
    finished = (run_dir / METRICS_FILE).is_file()
    start = time.perf_counter()
    metrics = ensure_run(run, DEV_SAMPLES)
    if not finished:
        print(f"{run_dir.name}: {time.perf_counter() - start:.0f} s", flush=True)
    return metrics


def select(out: Path, common: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Run the stages in order; the record of every candidate and every choice (also in results.json)."""
    chosen: dict[str, Any] = dict(START)
    results: dict[str, Any] = {"settings": common, "start": START, "stages": []}
    for stage, candidates in stages(num_layers):
        entries = []
        for candidate in candidates:
            settings = {**chosen, **candidate}
            metrics = fine_tune(out / run_name(settings), {**common, **settings})
            entries.append({"settings": settings, "run": run_name(settings),
                            "heldout_acc": 100 * metrics["heldout"]["overall"],
                            "solver": metrics["heldout"]["solver"]})
        best = entries[choose([e["heldout_acc"] for e in entries])]
        for entry in entries:
            entry["diff_vs_chosen"] = paired_difference(heldout_correct(out / entry["run"]),
                                                        heldout_correct(out / best["run"]))
        chosen = best["settings"]
        results["stages"].append({"stage": stage, "candidates": entries, "chosen": chosen})
        write_json_atomic(out / "results.json", results)
        print(f"{stage}: chose {chosen}", flush=True)
    results["chosen"] = chosen
    write_json_atomic(out / "results.json", results)
    return results


def format_table(results: dict[str, Any]) -> str:
    """The selection as a markdown table."""
    lines = ["| stage | field, step | layers | max_iter | held-out accuracy | Δ vs stage's choice [95% CI] | "
             "iterations per layer solve (mean / max) | max rel. residual | solves converged |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stage in results["stages"]:
        for entry in stage["candidates"]:
            s, solver, diff = entry["settings"], entry["solver"], entry["diff_vs_chosen"]
            low, high = diff["ci_low"], diff["ci_high"]
            delta = "chosen" if s == stage["chosen"] else f"{diff['mean']:+.0f} [{low:+.1f}, {high:+.1f}]"
            iterations = f"{solver['mean_iterations']:.1f} / {solver['max_iterations']}"
            lines.append(
                f"| {stage['stage']} | `{s['field']}`, {s['step']} | {s['layers']} "
                f"| {s['max_iter']} | {entry['heldout_acc']:.0f}% | {delta} | {iterations} "
                f"| {solver['max_rel_residual']:.1e} | {100 * solver['converged_fraction']:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", help="model path or hub name (default: offline MiniLM)")
    parser.add_argument("--data-dir", help="data directory (default: ODE_BERT_DATA_DIR or ../shared/data)")
    parser.add_argument("--train-samples", type=int, default=400,
                        help="low-resource training size, a quarter of it held out (default 400)")
    parser.add_argument("--set", default="{}", metavar="JSON",
                        help="further TrainConfig settings for every run (tests use a tiny model's)")
    args = parser.parse_args(argv)
    common = {**COMMON, "model": args.model, "data_dir": args.data_dir, "train_samples": args.train_samples,
              **json.loads(args.set)}
    num_layers = AutoConfig.from_pretrained(resolve_model_path(args.model)).num_hidden_layers
    results = select(Path(args.out), common, num_layers)
    print(format_table(results), flush=True)
    print("chosen on held-out data:", results["chosen"], flush=True)


if __name__ == "__main__":
    main()
