"""The ``ode-bert`` command line: ``train``, ``eval``, ``compare``, ``analyze`` and ``demo`` subcommands.

A subcommand is one function registered with ``@command(name, help)``: it receives its own
``argparse`` parser, adds its arguments and returns the function that runs it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import solvers

from .data import TASKS
from .train import VARIANTS, TrainConfig

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
    s.add_argument("--solver", choices=solvers.available(), help="step method for variant 'ode'")
    s.add_argument("--layers", help="layers to convert: 'all', '0-5', '0,2,4' (default all)")
    s.add_argument(
        "--step", type=float, help="step size h of every converted layer (default 0.5 for ex and im)"
    )
    s.add_argument("--field", choices=["residual", "layer"], help="vector field: Layer(h) - h or Layer(h)")
    s.add_argument("--root", choices=solvers.available_root_finders(), help="root finder of implicit solvers")
    s.add_argument("--grad", help="gradient mode of implicit solvers (e.g. implicit, unroll)")
    s.add_argument("--tol", type=float, help="relative tolerance of the implicit solve")
    s.add_argument("--max-iter", type=int, help="iteration cap of the implicit solve")


_TRAINING_FIELDS = (
    "model", "epochs", "batch_size", "lr", "warmup_ratio", "weight_decay", "max_length", "train_samples",
    "data_seed", "holdout", "solver", "layers", "step", "field", "root", "grad", "tol", "max_iter",
)  # fmt: skip


def _training_options(args: argparse.Namespace) -> dict[str, object]:
    return {name: getattr(args, name) for name in _TRAINING_FIELDS}


@command("train", help="fine-tune one variant on one task, then evaluate it")
def _train_command(parser: argparse.ArgumentParser) -> Handler:
    _add_task(parser)
    parser.add_argument(
        "--variant", default="im", choices=VARIANTS, help="bert, ex (EX-BERT), im (IM-BERT) or ode"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--output-dir", default="runs/run", help="run directory (default runs/run)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output-dir")
    parser.add_argument(
        "--no-eval", action="store_true", help="train only; evaluate later with 'ode-bert eval'"
    )
    parser.add_argument(
        "--dev-samples", type=int, help="evaluate on a fixed subset of this many clean dev examples"
    )
    _add_data_dir(parser)
    _add_training_options(parser)

    def run(args: argparse.Namespace) -> None:
        from .evaluate import evaluate, format_metrics
        from .train import train

        config = TrainConfig(
            task=args.task, variant=args.variant, seed=args.seed, output_dir=args.output_dir,
            resume=args.resume, data_dir=args.data_dir, **_training_options(args),
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
    _add_data_dir(parser)

    def run(args: argparse.Namespace) -> None:
        from .evaluate import evaluate, format_metrics

        metrics = evaluate(args.run_dir, args.data_dir, args.dev_samples, args.batch_size)
        print(format_metrics(metrics))

    return run


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
    parser.add_argument(
        "--variants", nargs="+", action=_CommaList, valid=VARIANTS, default=variants,
        help=f"variants, e.g. bert,ex,im (default {','.join(variants)})",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", nargs="+", action=_CommaList, item_type=int, default=seeds,
        help=f"seeds, e.g. 1,2,3,4,5 (default {','.join(map(str, seeds))})",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", default="bert", choices=VARIANTS, help="variant the others are paired with"
    )
    parser.add_argument(
        "--dev-samples", type=int, help="evaluate on a fixed subset of this many clean dev examples"
    )
    _add_data_dir(parser)


def _run_compare(args: argparse.Namespace, options: dict[str, object]) -> None:
    from .compare import compare

    start = time.perf_counter()
    result = compare(
        args.variants, args.seeds, args.task, args.output_dir, args.baseline, args.dev_samples, args.data_dir,
        **options,
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


# Small enough for a CPU: IM-BERT's implicit solve is capped at 10 iterations per layer (an inexact solve).
@command("analyze", help="stability regions, perturbation growth and layer spectra of an encoder per solver")
def _analyze_command(parser: argparse.ArgumentParser) -> Handler:
    # stability_analysis builds on ode_bert; the command line is the one place that composes the two,
    # so it is imported here rather than at module level.
    from stability_analysis.cli import add_analyze_arguments, run_analyze

    add_analyze_arguments(parser)
    return run_analyze


DEMO_OPTIONS = {
    "train_samples": 128,
    "epochs": 2,
    "batch_size": 16,
    "lr": 2e-4,
    "max_length": 48,
}


def _demo_settings(text: str) -> dict[str, object]:
    """``--settings``: a JSON object whose keys are training settings; anything else is a usage error."""
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(settings, dict):
        example = json.dumps(DEMO_OPTIONS)
        raise argparse.ArgumentTypeError(f"expected a JSON object like {example}, got {text!r}")
    unknown = [key for key in settings if key not in _TRAINING_FIELDS]
    if unknown:
        hints = "".join(
            f" ({key!r}: did you mean {close[0]!r}?)"
            for key in unknown
            if (close := difflib.get_close_matches(key, _TRAINING_FIELDS, n=1))
        )
        raise argparse.ArgumentTypeError(
            f"unknown setting(s) {', '.join(map(repr, unknown))}{hints}; valid: {', '.join(_TRAINING_FIELDS)}"
        )
    return settings


@command("demo", help="small real comparison on CPU: MiniLM, SST-2 low-resource, BERT vs IM-BERT")
def _demo_command(parser: argparse.ArgumentParser) -> Handler:
    parser.set_defaults(task="sst2")
    _add_compare_arguments(parser, ["bert", "im"], [1, 2])
    parser.set_defaults(dev_samples=200)
    parser.add_argument(
        "--output-dir", default="runs/demo", help="directory of the demo runs (default runs/demo)"
    )
    parser.add_argument(
        "--settings",
        type=_demo_settings,
        default={},
        help=f"JSON object overriding demo training settings (default {json.dumps(DEMO_OPTIONS)}); "
        f"keys: {', '.join(_TRAINING_FIELDS)}",
    )

    def run(args: argparse.Namespace) -> None:
        settings = {**DEMO_OPTIONS, **args.settings}
        print(
            "ode-bert demo: all-MiniLM-L6-v2 fine-tuned on a low-resource SST-2 subset, scored on clean dev "
            f"(subset of {args.dev_samples}) and AdvGLUE sst2; IM-BERT with its default settings.\n"
            "A small illustration: conclusions need >= 5 seeds "
            "and more data (use 'ode-bert compare')."
        )
        _run_compare(args, settings)

    return run


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="ode-bert", description="Transformer encoder layers as ODE solver steps (IM-BERT)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, setup) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(handler=setup(sub_parser))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ode-bert`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
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
    "demo": "Run the same command again: finished runs are kept, an interrupted run resumes from its "
    "last finished epoch.",
    "eval": "Nothing was written; run the same command again.",
}
