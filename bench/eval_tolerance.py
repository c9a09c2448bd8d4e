"""What evaluation needs apart from training: trained IM runs evaluated again with other solver settings.

Each run folder (written by ``ode-bert train``/``experiment``) is evaluated with each setting of ``--solver``
(JSON objects, e.g. ``'{"tol": 1e-4}'``) through ``ode_bert.evaluate(..., solver_changes=...)``; the scores
land in ``RUN_DIR/evals/<settings>/`` and an evaluation already there is reused (resumable). The table
pairs every setting with the run's own evaluation (its trained settings) by seed: mean difference in points
with a 95% t interval, and the mean iterations per layer solve.

    python -m bench.eval_tolerance runs/imfast/sst2-n1000/im-fast-seed{1,2,3,4,5} \\
        --solver '{"tol": 1e-4}' '{"tol": 1e-3}'
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import solvers
from ode_bert.evaluate import evaluate, evaluation_settings
from ode_bert.experiments.stats import paired_difference
from ode_bert.settings import changes_label, solver_changes_dir

from ._common import RESULTS_DIR, fmt, table, write_json


def _metrics(run_dir: Path, changes: dict[str, Any] | None, data_dir: str | None) -> dict[str, Any]:
    """The run's evaluation with ``changes`` (``None``: its own metrics.json), computed if not there yet."""
    folder = run_dir if changes is None else solver_changes_dir(run_dir, changes)
    path = folder / "metrics.json"
    if path.is_file():
        metrics = json.loads(path.read_text())
        if metrics.get("dev_samples") is not None:
            raise ValueError(f"{path} scores a subset of the dev set ({metrics['dev_samples']} examples): "
                             "delete it, or evaluate the run in full, to compare whole dev sets")
        return metrics
    if changes is None:
        raise FileNotFoundError(f"{run_dir} has no metrics.json: evaluate it first (ode-bert eval {run_dir})")
    print(f"evaluating {run_dir} with {changes_label(changes)}", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", solvers.ConvergenceWarning)  # the solver summary reports it
        return evaluate(run_dir, data_dir, solver_changes=changes)


def compare(
    runs: Sequence[Path], settings: Sequence[dict[str, Any]], data_dir: str | None
) -> list[dict[str, Any]]:
    """One row per setting (the trained one first): scores over the runs and paired differences to it."""
    trained = [_metrics(r, None, data_dir) for r in runs]
    rows = []
    for changes in [None, *settings]:
        evaluated = trained if changes is None else [_metrics(r, changes, data_dir) for r in runs]
        row: dict[str, Any] = {"setting": "as trained" if changes is None else changes_label(changes)}
        for metric in ("clean", "advglue"):
            values = [100 * m[metric]["overall"] for m in evaluated]
            row[f"{metric}_mean"] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
            if changes is not None:
                diff = paired_difference(values, [100 * m[metric]["overall"] for m in trained])
                row[f"{metric}_diff"] = diff
        row["iterations"] = statistics.fmean(m["clean"]["solver"]["mean_iterations"] for m in evaluated)
        row["converged"] = statistics.fmean(m["clean"]["solver"]["converged_fraction"] for m in evaluated)
        rows.append(row)
    return rows


def _interval(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return "-"
    return f"{diff['mean']:+.2f} [{fmt(diff['ci_low'], '+.2f')}, {fmt(diff['ci_high'], '+.2f')}]"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_tolerance",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="trained runs (one per seed)")
    parser.add_argument("--solver", nargs="+", required=True, type=json.loads, metavar="JSON",
                        help="solver settings to evaluate with, one JSON object each")
    parser.add_argument("--data-dir", default=None, help="data directory (default: the runs' own)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "eval_tolerance.json", help="JSON output")
    args = parser.parse_args(argv)
    for changes in args.solver:  # bad settings and stock runs fail here, before any evaluation
        if not isinstance(changes, dict):
            parser.error(f"--solver takes JSON objects, got {changes!r}")
        for run in args.runs:
            try:
                evaluation_settings(run, changes)
            except (ValueError, TypeError, OSError) as err:
                parser.error(str(err))
    rows = compare(args.runs, args.solver, args.data_dir)
    for row in rows:
        for metric in ("clean", "advglue"):
            row[f"{metric}_cell"] = f"{row[f'{metric}_mean']:.2f} ± {fmt(row[f'{metric}_std'], '.2f')}"
            row[f"{metric}_diff_cell"] = _interval(row.get(f"{metric}_diff"))
    columns = [("setting", "evaluated with", ""), ("clean_cell", "clean", ""),
               ("clean_diff_cell", "Δ clean [95% CI]", ""), ("advglue_cell", "AdvGLUE", ""),
               ("advglue_diff_cell", "Δ AdvGLUE [95% CI]", ""), ("iterations", "iterations/solve", ".2f"),
               ("converged", "converged", ".1%")]  # fmt: skip
    print(f"{len(args.runs)} runs; Δ: paired by run against the evaluation with the trained settings")
    print(table(rows, columns))
    command = " ".join(["python", "-m", "bench.eval_tolerance", *map(shlex.quote, sys.argv[1:] if argv is None
                                                                   else argv)])
    write_json(args.out, {"command": command, "runs": [str(r) for r in args.runs], "rows": rows})


if __name__ == "__main__":
    main()
