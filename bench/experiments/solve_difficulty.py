"""Are AdvGLUE inputs harder implicit equations than the GLUE sentences they were made from?

For fine-tuned IM-BERT runs (run directories of ``ode-bert train`` or ``grid.py``), every AdvGLUE item that
perturbs a GLUE original is solved as the original and as the adversarial text, with the run's own solver
settings (the adversarial records are those of the pass over all of ``dev.json``). Per run: the mean over
pairs of the iterations summed over the implicit layers, of the worst relative residual, the share of inputs
whose solves all converged, and the share of pairs whose prediction the perturbation changed; over runs,
adversarial minus original with a 95% t interval (one run per seed). Also per run: AdvGLUE accuracy (all of
``dev.json``) of the examples whose solves converged and of those whose solves did not. Each run's numbers
are written to ``--out`` as soon as it is measured; calling again with the same ``--out`` measures only the
runs not yet in it.

    python bench/experiments/solve_difficulty.py runs/grid_cpu/sst2-n1000/im-seed{1,2,3,4,5} \\
        --out runs/solve_difficulty.json
    python bench/experiments/solve_difficulty.py --report runs/solve_difficulty.json   # the tables again
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import solvers
from ode_bert import from_pretrained
from ode_bert.data import load_advglue
from ode_bert.experiments import paired_difference
from ode_bert.io import write_json_atomic
from ode_bert.train import CONFIG_FILE, MODEL_DIR
from stability_analysis import ExampleSolves, example_solves
from stability_analysis.perturbation import advglue_pairs

# (key, label, number format) of the per-pair means compared between original and adversarial inputs
PAIRED = [("iterations", "iterations over the implicit layers", ".2f"),
          ("max_residual", "worst relative residual", ".2e"),
          ("converged", "inputs with every solve converged (%)", ".2f")]


def _means(solves: ExampleSolves) -> dict[str, float]:
    """The per-input quantities of ``PAIRED``, averaged over the inputs of one pass."""
    return {
        "iterations": float(solves.total_iterations.double().mean()),
        "max_residual": float(solves.rel_residual.max(dim=1).values.double().mean()),
        "converged": 100 * float(solves.all_converged.double().mean()),
    }


def measure_run(run_dir: Path, data_dir: str | None, batch_size: int) -> dict[str, Any]:
    """Original vs adversarial solve statistics and converged vs unconverged accuracy of one run."""
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    data_dir = data_dir if data_dir is not None else config.get("data_dir")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = from_pretrained(run_dir / MODEL_DIR, AutoModelForSequenceClassification).to(device)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / MODEL_DIR)
    result: dict[str, Any] = {"run": str(run_dir), "task": config["task"], "splits": {}}
    for split, examples in load_advglue(config["task"], data_dir).items():
        texts = [ex.text_a if ex.text_b is None else (ex.text_a, ex.text_b) for ex in examples]
        full = example_solves(model, tokenizer, texts, config["max_length"], batch_size)
        # the adversarial side of each pair is a dev.json item: take its record from the full pass
        row = {text: i for i, text in enumerate(texts)}
        pairs = advglue_pairs(split, data_dir)
        missing = [text for _, text in pairs if text not in row]
        if missing:
            raise ValueError(f"{len(missing)} adversarial texts of dev_ann.json are not in dev.json's "
                             f"{split!r} split (first: {missing[0]!r}); both files must come from one "
                             "AdvGLUE release")
        original = example_solves(model, tokenizer, [p[0] for p in pairs], config["max_length"], batch_size)
        adversarial = full.select([row[p[1]] for p in pairs])
        correct = [int(p) == ex.label for p, ex in zip(full.predictions, examples)]
        by_convergence = {}
        for name, flag in (("converged", True), ("unconverged", False)):
            hits = [c for c, done in zip(correct, full.all_converged.tolist()) if done == flag]
            accuracy = 100 * statistics.fmean(hits) if hits else None
            by_convergence[name] = {"n": len(hits), "accuracy": accuracy}
        result["splits"][split] = {
            "pairs": len(pairs),
            "original": _means(original),
            "adversarial": _means(adversarial),
            "flipped": 100 * float((original.predictions != adversarial.predictions).double().mean()),
            "advglue": by_convergence,
        }
    return result


def _interval(values: list[float], baseline: list[float], spec: str = ".2f") -> str:
    d = paired_difference(values, baseline)
    interval = "" if d["ci_low"] is None else f" [{d['ci_low']:+{spec}}, {d['ci_high']:+{spec}}]"
    return f"{d['mean']:+{spec}}{interval}"


def format_report(runs: list[dict[str, Any]]) -> str:
    """Markdown tables over runs: per split, paired original/adversarial means and accuracy by convergence."""
    lines = []
    for split in runs[0]["splits"]:
        rows = [r["splits"][split] for r in runs]
        lines += [f"### {split}: {rows[0]['pairs']} original/adversarial pairs, {len(runs)} runs", "",
                  "| per input, mean over pairs | original | adversarial | Δ adv. − orig. [95% CI] |",
                  "|---|---|---|---|"]
        for key, label, spec in PAIRED:
            orig = [r["original"][key] for r in rows]
            adv = [r["adversarial"][key] for r in rows]
            lines.append(f"| {label} | {statistics.fmean(orig):{spec}} | {statistics.fmean(adv):{spec}} "
                         f"| {_interval(adv, orig, spec)} |")
        flipped = [r["flipped"] for r in rows]
        lines += ["", f"Predictions changed by the perturbation: {statistics.fmean(flipped):.1f}% of pairs "
                  f"(runs: {', '.join(f'{f:.1f}' for f in flipped)}).", ""]
        groups = [(r["advglue"]["converged"], r["advglue"]["unconverged"]) for r in rows]
        counts = ", ".join(f"{c['n']}/{u['n']}" for c, u in groups)
        lines.append(f"AdvGLUE examples with all solves converged / not, per run: {counts}.")
        both = [(c["accuracy"], u["accuracy"]) for c, u in groups if c["n"] and u["n"]]
        if len(both) >= 2:
            conv, unconv = (list(column) for column in zip(*both))
            lines.append(f"Accuracy, converged {statistics.fmean(conv):.2f}%, unconverged "
                         f"{statistics.fmean(unconv):.2f}%; unconverged − converged "
                         f"{_interval(unconv, conv)} over the {len(both)} runs with both.")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="*", type=Path, help="run directories of fine-tuned IM models")
    parser.add_argument("--data-dir", help="data directory (default: the run's, else ../shared/data)")
    parser.add_argument("--batch-size", type=int, default=64, help="inputs per forward (default 64)")
    parser.add_argument("--out", type=Path, help="write the per-run numbers here (JSON)")
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="run nothing: print the tables of an --out file")
    args = parser.parse_args(argv)
    if args.report:
        print(format_report(json.loads(args.report.read_text())))
        return
    if not args.runs:
        parser.error("name at least one run directory (or --report JSON)")
    for run_dir in args.runs:
        if not (run_dir / MODEL_DIR / "config.json").is_file():
            parser.error(f"{run_dir} is not a finished training run (expected {MODEL_DIR}/config.json)")
    warnings.filterwarnings("ignore", category=solvers.ConvergenceWarning)  # counted, not printed
    # an interrupted call resumes: runs already in --out are kept, not measured again
    done = {r["run"]: r for r in json.loads(args.out.read_text())} if args.out and args.out.is_file() else {}
    runs = []
    for index, run_dir in enumerate(args.runs, 1):
        kept = done.get(str(run_dir))
        runs.append(kept if kept is not None else measure_run(run_dir, args.data_dir, args.batch_size))
        print(f"[{index}/{len(args.runs)}] {run_dir}{' (kept from --out)' if kept else ''}", flush=True)
        if args.out:
            write_json_atomic(args.out, runs)
    print(format_report(runs))


if __name__ == "__main__":
    main()
