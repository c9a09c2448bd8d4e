"""Experiments: plans of fine-tuning runs (task x variant x seed x size), run through an executor (local
worker processes, Ray tasks, or inline), skipping finished runs after a settings check, and summarized as
paired differences over seeds in markdown tables and plots.

    from ode_bert.experiments import Experiment, PLANS, LocalExecutor, named_groups, plan_runs

    runs = plan_runs(named_groups(["core"]), seeds=[1, 2, 3], out="runs/grid")
    Experiment("runs/grid", runs, executor=LocalExecutor(workers=2)).run()

``compare(variants, seeds, task, ...)`` is the one-task form behind ``ode-bert compare``; ``ode-bert
experiment`` (``bench/experiments/grid.py``) runs named plans and reports ``results.jsonl`` records.
See docs/experiments.md.
"""

from .executors import (
    EXECUTORS,
    Executor,
    InlineExecutor,
    LocalExecutor,
    Outcome,
    RayExecutor,
    make_executor,
    train_and_evaluate,
)
from .plans import (
    BASELINE,
    COMMON,
    NOT_TAKEN,
    PLANS,
    VARIANTS,
    Group,
    Run,
    named_groups,
    not_taken,
    plan_defaults,
    plan_runs,
    variant_settings,
)
from .records import RESULTS_FILE, append_record, load_records, result_line
from .report import (
    format_markdown,
    format_pairs,
    format_report,
    format_seeds,
    format_tables,
    plot_differences,
    plot_scores,
)
from .reuse import check_reuse, reuse_problem
from .runner import SUMMARY_FILE, TABLES_FILE, Experiment, RunsFailed, compare, ensure_run
from .stats import METRICS, by_group, paired_difference, summarize, summarize_groups

__all__ = [
    "BASELINE", "COMMON", "EXECUTORS", "METRICS", "NOT_TAKEN", "PLANS", "RESULTS_FILE", "SUMMARY_FILE",
    "TABLES_FILE", "VARIANTS", "Executor", "Experiment", "Group", "InlineExecutor", "LocalExecutor",
    "Outcome", "RayExecutor", "Run", "RunsFailed", "append_record", "by_group", "check_reuse", "compare",
    "ensure_run", "format_markdown", "format_pairs", "format_report", "format_seeds", "format_tables",
    "load_records", "make_executor", "named_groups", "not_taken", "paired_difference", "plan_defaults",
    "plan_runs", "plot_differences", "plot_scores", "result_line", "reuse_problem", "summarize",
    "summarize_groups", "train_and_evaluate", "variant_settings",
]  # fmt: skip
