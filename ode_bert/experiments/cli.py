"""The experiments command line: ``ode-bert experiment`` (and ``bench/experiments/grid.py``, the same
command under the name RESULTS.md uses), and the executor options that ``ode-bert compare`` shares.

    ode-bert experiment --plan core --out runs/grid --workers 14
    ode-bert experiment --plan core --out /shared/runs/grid --executor ray --address auto --gpus-per-run 0.25
    ode-bert experiment --report runs/grid/results.jsonl --pairs im:ex --plot runs/grid/diff.png

``--report`` also reports the attacks the run folders hold (``report.format_attack_sections``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .executors import EXECUTORS, Executor, make_executor
from .plans import BASELINE, PLANS, VARIANTS, named_groups, plan_runs
from .records import RESULTS_FILE, load_records
from .report import format_attack_sections, format_report, plot_differences
from .stats import summarize_groups

DESCRIPTION = ("Run a plan of fine-tuning comparisons (task x variant x seed x size) through an executor "
               "and summarize it group by group.")


class UsageError(ValueError):
    """Options that do not fit together or name unknown things (``grid.py`` exits with status 2)."""


def add_executor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor``, ``--workers``, ``--threads``, ``--address``, ``--gpus-per-run``."""
    g = parser.add_argument_group("executor (where runs train)")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local: worker processes on this machine (default); ray: Ray tasks on a cluster "
                   "(pip install 'ode-bert[ray]'); inline: in this process, one at a time")
    g.add_argument("--workers", type=int,
                   help="runs at a time (local default 1; ray default: all, as resources allow)")
    g.add_argument("--threads", type=int,
                   help="CPU threads per run (local default: cores / workers); with ray, the CPUs each run "
                   "requests (default 1)")
    g.add_argument("--address", help="with --executor ray: the cluster, e.g. auto or ray://HOST:10001 "
                   "(default: start Ray on this machine)")
    g.add_argument("--gpus-per-run", type=float, default=0.0,
                   help="with --executor ray: GPUs each run requests; 0.25 puts four runs on a GPU "
                   "(default 0)")


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor the options of ``add_executor_arguments`` ask for."""
    if args.executor != "ray" and (args.address is not None or args.gpus_per_run):
        raise UsageError("--address and --gpus-per-run are options of --executor ray")
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    return make_executor(args.executor, args.workers, args.threads, args.address, args.gpus_per_run)


def _variant_pair(text: str) -> tuple[str, str]:
    """``--pairs`` argument ``A:B`` as (A, B), both known variants."""
    a, _, b = text.partition(":")
    if not {a, b} <= set(VARIANTS):
        raise argparse.ArgumentTypeError(f"takes A:B with A, B among {', '.join(VARIANTS)}; got {text!r}")
    return a, b


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``ode-bert experiment`` / ``grid.py``."""
    parser.add_argument("--plan", nargs="+", choices=list(PLANS), default=["core"], help="plans, in order")
    parser.add_argument("--out", default="runs/grid", help="output directory (default runs/grid)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="seeds (default 1-5)")
    parser.add_argument("--groups", nargs="+", metavar="GROUP", help="only these groups, e.g. sst2-n1000")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help=f"only these variants (and the baseline, {BASELINE})")
    parser.add_argument("--deadline", type=float, help="stop after this many seconds, ending runs in flight")
    parser.add_argument("--model", help="model path or hub name (default: the offline MiniLM)")
    parser.add_argument("--data-dir", help="data directory (default: ODE_BERT_DATA_DIR or ../shared/data)")
    parser.add_argument("--dev-samples", type=int, help="score a stratified subset of each clean dev split")
    parser.add_argument("--set", default="{}", metavar="JSON",
                        help='further TrainConfig settings for every run, e.g. \'{"epochs": 3}\'')
    add_executor_arguments(parser)
    r = parser.add_argument_group("report (run nothing)")
    r.add_argument("--report", nargs="+", type=Path, metavar="JSONL",
                   help=f"run nothing: print the tables of these {RESULTS_FILE} records, and of the attacks "
                   "('ode-bert attack') their run folders hold")
    r.add_argument("--pairs", nargs="+", type=_variant_pair, default=[], metavar="A:B",
                   help="with --report: also paired differences A - B between variants, e.g. im:ex")
    r.add_argument("--plot", type=Path, metavar="PNG",
                   help=f"with --report: also draw every variant's difference to {BASELINE} into this PNG")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``grid.py`` (also parses the report commands quoted in RESULTS.md, in tests)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_experiment_arguments(parser)
    return parser


def run_experiment(args: argparse.Namespace) -> None:
    """Run (or, with ``--report``, report) what ``args`` ask for: options that do not fit raise
    ``UsageError``, bad settings and runs made with other settings ``ValueError`` (``RunDirError``)."""
    if args.report:
        records = load_records(args.report)
        attacks = format_attack_sections(args.report, records, args.pairs)  # refused before printing anything
        print(format_report(records, args.pairs))
        if attacks:
            print(attacks)
        if args.plot:
            plot_differences(summarize_groups(records), args.plot)
            print(f"wrote {args.plot}")
        return
    known = {g.name for g in named_groups(args.plan)}
    if args.groups and not set(args.groups) <= known:
        unknown = sorted(set(args.groups) - known)
        raise UsageError(f"unknown group(s) {unknown}; the plans have {sorted(known)}")
    offered = {v for g in named_groups(args.plan) if not args.groups or g.name in args.groups
               for v in g.variants}
    if args.variants and not set(args.variants) <= offered:
        raise UsageError(f"variant(s) {sorted(set(args.variants) - offered)} are in none of the selected "
                         f"groups, which have {sorted(offered)}")
    try:
        extra = json.loads(args.set)
    except json.JSONDecodeError as err:
        raise UsageError(f"--set is not valid JSON ({err}): {args.set!r}") from None
    if not isinstance(extra, dict):
        raise UsageError(f"--set takes a JSON object of training settings, got {args.set!r}")
    options = {k: v for k, v in (("model", args.model), ("data_dir", args.data_dir)) if v is not None}
    options.update(extra)
    runs = plan_runs(named_groups(args.plan), args.seeds, args.out, options, keep_groups=args.groups,
                     keep_variants=args.variants)
    executor = executor_from_args(args)
    try:
        from .runner import Experiment

        experiment = Experiment(args.out, runs, args.dev_samples, executor)
        deadline = None if args.deadline is None else time.perf_counter() + args.deadline
        experiment.run(deadline)
    finally:
        executor.close()


def main(argv: Sequence[str] | None = None, prog: str = "grid") -> None:
    """``grid.py``'s entry point: errors (bad options, runs made with other settings) exit with
    ``PROG: error: ...``."""
    parser = build_parser(f"{prog}.py")
    args = parser.parse_args(argv)
    try:
        run_experiment(args)
    except UsageError as err:
        parser.error(str(err))
    except ValueError as err:  # a bad option or setting, or runs in --out made with other settings
        sys.exit(f"{prog}: error: {err}")
