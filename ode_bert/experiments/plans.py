"""Plans of runs: task x variant x seed x training size.

A ``Group`` is one task and training size with named variants; a plan is a list of groups, run in order.
``plan_runs`` expands groups and seeds into ``Run``s (all variants of a seed together, so a plan stopped
early still leaves complete seeds to pair). A variant is a name for a set of training settings
(``VARIANTS``); the base variants ``bert``, ``ex``, ``im`` and ``ode`` are their own names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # train imports torch: loaded when a run's config is built, not for --help
    from ..train import TrainConfig

BASELINE = "bert"
# Fine-tuning settings of every run of a named plan: the ones the IM-connection was chosen with (RESULTS.md).
COMMON: dict[str, Any] = {"epochs": 2, "batch_size": 32, "lr": 2e-4}
MAX_LENGTH = {"sst2": 64}  # sentence-pair tasks: DEFAULT_MAX_LENGTH
DEFAULT_MAX_LENGTH = 128
# Variant name -> TrainConfig settings; unset solver settings take the im_bert / ex_bert defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "bert": {"variant": "bert"},
    "ex": {"variant": "ex"},
    "im": {"variant": "im"},
    "ode": {"variant": "ode"},  # convert() with --solver
    # the paper's solver, gradient descent on the residual: as the library runs it (step size from 0.5,
    # halved where a step does not decrease the residual) and with the paper's fixed step; a fixed 0.5
    # diverges on MiniLM's layers, 0.1 converges (bench/experiments/gd_residuals.py)
    "im-gd": {"variant": "im", "root": "gd"},
    "im-gd-fixed": {"variant": "im", "root": "gd", "solver_options": {"root_options": {"backtrack": False}}},
    "im-gd-lr0.1": {"variant": "im", "root": "gd",
                    "solver_options": {"root_options": {"lr": 0.1, "backtrack": False}}},
    "ex-layer": {"variant": "ex", "field": "layer", "step": 1.0},  # the paper's framing, h + Layer(h)
    "im-layer": {"variant": "im", "field": "layer", "step": 1.0},
    # the settings im_select.py chose on held-out data (MiniLM's upper half of layers, max_iter 10), and
    # their explicit control on the same layers
    "im-upper": {"variant": "im", "layers": "3-5", "max_iter": 10},
    "ex-upper": {"variant": "ex", "layers": "3-5"},
    # the cheapest combination of issue 18's levers (BENCHMARKS.md section 5): one-step gradient, loose
    # tolerance, converged rows skipped in evaluation; a candidate default until its accuracy is measured
    "im-fast": {"variant": "im", "grad": "one_step", "tol": 1e-2, "solver_options": {"compact_rows": True}},
    # im-fast's two training levers one at a time, to say which one costs its accuracy
    "im-onestep": {"variant": "im", "grad": "one_step"},
    "im-tol1e-2": {"variant": "im", "tol": 1e-2},
    # a tenth: evaluation at 1e-1 scores as at 1e-2 for about a third of the iterations (BENCHMARKS.md
    # section 5); does training at it keep the accuracy?
    "im-tol1e-1": {"variant": "im", "tol": 1e-1},
    # the default with the backward's adjoint solve loosened to 1e-1 (3.3 instead of 5.8 VJPs per solve,
    # BENCHMARKS.md section 5): does the less exact gradient keep the accuracy?
    "im-adjtol1e-1": {"variant": "im", "tol": 1e-2, "solver_options": {"adjoint_tol": 1e-1}},
    # with 0.3.0's fresh dropout draws some default IM runs collapse (RESULTS.md): the default and its
    # explicit control fine-tuned without dropout, to say whether dropout noise is what unsettles IM training
    "im-nodropout": {"variant": "im", "tol": 1e-2, "dropout": 0.0},
    "ex-nodropout": {"variant": "ex", "dropout": 0.0},
    # the same three connections at half the plan's learning rate: does a smaller step make the default
    # IM-BERT's fine-tuning reliable under fresh dropout draws, and where does IM - EX land then?
    "im-lr1e-4": {"variant": "im", "tol": 1e-2, "lr": 1e-4},
    "ex-lr1e-4": {"variant": "ex", "lr": 1e-4},
    "bert-lr1e-4": {"variant": "bert", "lr": 1e-4},
    # the failed IM runs' last layer never learned to write the sentence into the first token, behind a
    # connection that passes a third of its output (RESULTS.md): the default with MiniLM's last layer left
    # stock (layers 0-4 converted), and its explicit control
    "im-stocklast": {"variant": "im", "tol": 1e-2, "layers": "0-4"},
    "ex-stocklast": {"variant": "ex", "layers": "0-4"},
    # the control that separates "the last layer stock" from "one layer fewer implicit": the first layer
    # left stock instead (layers 1-5 converted), on the seeds where the default failed
    "im-stockfirst": {"variant": "im", "tol": 1e-2, "layers": "1-5"},
    # and a middle layer (3) left stock: does any one stock layer rescue those seeds?
    "im-stockmid": {"variant": "im", "tol": 1e-2, "layers": "0-2,4-5"},
}

# Solver settings a base variant does not take: each run gets only the ones that apply to it, so one set of
# options (command-line flags, ``--set``) serves every variant of a plan.
SOLVER_SETTINGS = frozenset({"solver", "layers", "step", "field", "root", "grad", "tol", "eval_tol",
                             "max_iter", "solver_options"})
NOT_TAKEN: dict[str, frozenset[str]] = {
    "bert": SOLVER_SETTINGS,
    "ex": frozenset({"solver", "root", "grad", "tol", "eval_tol", "max_iter", "solver_options"}),
}


def not_taken(variant: str) -> frozenset[str]:
    """The solver settings that base ``variant`` does not take (``ode_bert.settings`` says, where present)."""
    try:
        from ..settings import SETTING_NAMES, settings_taken_by
    except ImportError:
        return NOT_TAKEN.get(variant, frozenset())
    return frozenset(SETTING_NAMES) - set(settings_taken_by(variant))


@dataclass(frozen=True)
class Group:
    """Variants compared on one task and training size (``None``: the whole training set)."""

    task: str
    train_samples: int | None
    variants: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.task if self.train_samples is None else f"{self.task}-n{self.train_samples}"


# A plan's groups run in order; a group may add variants to one of an earlier plan (same name, same runs).
# Every group with "im" has "ex", its explicit control at the same step.
PLANS: dict[str, list[Group]] = {
    "core": [Group("sst2", 1000, ("im", "bert", "ex")), Group("rte", 1000, ("im", "bert", "ex"))],
    "extensions": [
        Group("sst2", 1000, ("im-gd", "im-gd-lr0.1", "im-gd-fixed")),
        Group("qnli", 1000, ("im", "bert", "ex")),
        Group("mnli", 1000, ("im", "bert", "ex")),
        Group("qqp", 1000, ("im", "bert", "ex")),
        Group("sst2", 2000, ("im", "bert", "ex")),
        Group("sst2", 500, ("im", "bert", "ex")),
        Group("sst2", 1000, ("im-layer", "ex-layer")),
        Group("sst2", 1000, ("im-upper", "ex-upper")),
        Group("sst2", 1000, ("im-fast",)),
        Group("sst2", 1000, ("im-onestep", "im-tol1e-2", "im-tol1e-1", "im-adjtol1e-1")),
        Group("sst2", 1000, ("im-nodropout", "ex-nodropout")),
        Group("sst2", 1000, ("im-lr1e-4", "ex-lr1e-4", "bert-lr1e-4")),
        Group("sst2", 1000, ("im-stocklast", "ex-stocklast")),
        Group("sst2", 1000, ("im-stockfirst", "im-stockmid")),
        Group("qqp", 1000, ("im-stocklast", "ex-stocklast")),
        Group("sst2", 2000, ("im-stocklast", "ex-stocklast")),
    ],
}


def plan_defaults(task: str) -> dict[str, Any]:
    """Training settings of a named plan's runs on ``task`` below any given options: ``COMMON`` and the
    task's ``max_length``."""
    return {**COMMON, "max_length": MAX_LENGTH.get(task, DEFAULT_MAX_LENGTH)}


@dataclass(frozen=True, eq=False)
class Run:
    """One (group, variant, seed) run: where it lives and every training setting it is made with."""

    group: Group
    variant: str
    seed: int
    run_dir: Path
    settings: Mapping[str, Any]  # TrainConfig fields, output_dir included, resume left out

    @property
    def label(self) -> str:
        return f"{self.group.name} {self.variant} seed {self.seed}"

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.group.name, self.variant, self.seed)

    def config(self) -> TrainConfig:
        """This run's ``TrainConfig``, checked (resumed if its folder has settings already)."""
        from ..train import CONFIG_FILE, TrainConfig

        try:
            config = TrainConfig(**self.settings, resume=(self.run_dir / CONFIG_FILE).is_file())
        except TypeError as err:
            raise ValueError(f"unknown training setting in the options or the plan: {err}") from err
        config.validate()
        return config


def variant_settings(variant: str) -> dict[str, Any]:
    """The training settings that name ``variant`` (a base variant names itself)."""
    return dict(VARIANTS.get(variant, {"variant": variant}))


def plan_runs(
    groups: Sequence[Group],
    seeds: Sequence[int],
    out: str | Path,
    options: Mapping[str, Any] | None = None,
    *,
    defaults: Callable[[str], dict[str, Any]] | None = plan_defaults,
    flat: bool = False,
    keep_groups: Iterable[str] | None = None,
    keep_variants: Iterable[str] | None = None,
    baseline: str = BASELINE,
) -> list[Run]:
    """Every (group, variant, seed) run of ``groups``, group by group, all variants of a seed together.

    A run's settings are, later ones winning: ``defaults(task)``, ``options`` less the solver settings its
    variant does not take, the variant's own, and task / train_samples / seed / output_dir. Runs live in
    ``out/<group>/<variant>-seed<seed>`` (``flat``: ``out/<variant>-seed<seed>``). ``keep_groups`` /
    ``keep_variants`` keep only those names (and ``baseline``, which the others are paired with).
    """
    out = Path(out)
    options = dict(options or {})
    groups_kept = None if keep_groups is None else set(keep_groups)
    kept = None if keep_variants is None else {*keep_variants, baseline}
    runs = []
    for group in groups:
        if groups_kept is not None and group.name not in groups_kept:
            continue
        for seed in seeds:
            for variant in group.variants:
                if kept is not None and variant not in kept:
                    continue
                own = variant_settings(variant)
                skipped = not_taken(own["variant"])
                run_dir = (out if flat else out / group.name) / f"{variant}-seed{seed}"
                settings = {**(defaults(group.task) if defaults else {}),
                            **{k: v for k, v in options.items() if k not in skipped}, **own,
                            "task": group.task, "train_samples": group.train_samples, "seed": seed,
                            "output_dir": str(run_dir)}  # fmt: skip
                runs.append(Run(group, variant, seed, run_dir, settings))
    return runs


def named_groups(plans: Sequence[str]) -> list[Group]:
    """The groups of the named ``PLANS``, in order."""
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        raise ValueError(f"unknown plan(s) {unknown}; valid: {', '.join(PLANS)}")
    return [group for plan in plans for group in PLANS[plan]]
