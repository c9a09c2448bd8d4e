"""Experiments: plans of fine-tuning runs (task x variant x seed x size), run through an executor (local
worker processes, Ray tasks, or inline), skipping finished runs after a settings check, and summarized as
paired differences over seeds in markdown tables and plots.

    from ode_bert.experiments import Experiment, PLANS, LocalExecutor, named_groups, plan_runs

    runs = plan_runs(named_groups(["core"]), seeds=[1, 2, 3], out="runs/grid")
    Experiment("runs/grid", runs, executor=LocalExecutor(workers=2)).run()

``compare(variants, seeds, task, ...)`` is the one-task form behind ``ode-bert compare``; ``ode-bert
experiment`` (``bench/experiments/grid.py``) runs named plans and reports ``results.jsonl`` records.
See docs/experiments.md.

The names load on first use (PEP 562), so the command line's parsers (``ode-bert compare --help``) can
read ``VARIANTS`` and the executor options without importing torch or transformers.
"""

from __future__ import annotations

from .._lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "EXECUTORS": "executors",
    "Executor": "executors",
    "InlineExecutor": "executors",
    "LocalExecutor": "executors",
    "Outcome": "executors",
    "RayExecutor": "executors",
    "make_executor": "executors",
    "train_and_evaluate": "executors",
    "BASELINE": "plans",
    "COMMON": "plans",
    "NOT_TAKEN": "plans",
    "PLANS": "plans",
    "VARIANTS": "plans",
    "Group": "plans",
    "Run": "plans",
    "named_groups": "plans",
    "not_taken": "plans",
    "plan_defaults": "plans",
    "plan_runs": "plans",
    "variant_settings": "plans",
    "RESULTS_FILE": "records",
    "append_record": "records",
    "load_records": "records",
    "result_line": "records",
    "format_markdown": "report",
    "format_pairs": "report",
    "format_report": "report",
    "format_seeds": "report",
    "format_tables": "report",
    "plot_differences": "report",
    "plot_scores": "report",
    "check_reuse": "reuse",
    "reuse_problem": "reuse",
    "SUMMARY_FILE": "runner",
    "TABLES_FILE": "runner",
    "Experiment": "runner",
    "RunsFailed": "runner",
    "compare": "runner",
    "ensure_run": "runner",
    "METRICS": "stats",
    "by_group": "stats",
    "paired_difference": "stats",
    "summarize": "stats",
    "summarize_groups": "stats",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
