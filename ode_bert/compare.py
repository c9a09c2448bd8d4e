"""Paired comparison of variants (BERT, EX-BERT, IM-BERT, ...) over seeds on identical data.

Every (variant, seed) run trains on the same examples and starts from the same classifier initialisation
as the other variants with that seed, so differences to the baseline are paired by seed. Runs whose
``metrics.json`` exists are skipped and interrupted runs are resumed, so ``compare`` can be re-run after an
interruption. A run is reused only if its saved settings (``train_config.json``) are the ones it would be
run with and its ``metrics.json`` was evaluated the same way (``dev_samples``); every run is checked before
any work starts, and a mismatch is refused with the differing keys. Writes ``comparison.json``,
``comparison.md`` and ``comparison.png`` into ``output_dir``.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scipy import stats

from .data import check_data
from .evaluate import METRICS_FILE, evaluate
from .train import (
    CONFIG_FILE,
    RunDirError,
    TrainConfig,
    atomic_open,
    check_run_dir,
    train,
    write_json_atomic,
)

METRICS = {"clean": "clean dev", "advglue": "AdvGLUE"}
# Settings that a variant does not take: compare gives each variant only the solver settings that apply to it.
NOT_TAKEN = {
    "bert": {"solver", "layers", "step", "field", "root", "grad", "tol", "max_iter", "solver_options"},
    "ex": {"solver", "root", "grad", "tol", "max_iter", "solver_options"},
}


def reuse_problem(run_dir: Path, config: TrainConfig, dev_samples: int | None) -> str | None:
    """Why the run in ``run_dir`` cannot be reused (or resumed) as ``config`` evaluated with
    ``dev_samples`` (``None`` if it can: absent, unfinished with the same settings, or finished alike)."""
    try:
        check_run_dir(run_dir, config)
    except (RunDirError, FileExistsError) as err:
        return str(err).replace(f"cannot resume {run_dir}: ", "")
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        return None
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{metrics_path} is damaged ({err}); delete it to evaluate the run again"
    if not isinstance(metrics, dict):
        return f"{metrics_path} is damaged (not a dictionary); delete it to evaluate the run again"
    expected = {"task": config.task, "variant": config.variant, "seed": config.seed}
    expected["dev_samples"] = dev_samples
    differing = sorted(k for k, v in expected.items() if metrics.get(k, "absent") != v)
    if differing:
        found = {k: metrics.get(k, "absent") for k in differing}
        return (
            f"{metrics_path} was evaluated with other settings: {differing} (has {found}, wanted "
            f"{ {k: expected[k] for k in differing} }); delete it to evaluate the run again"
        )
    return None


def check_reuse(plan: Sequence[tuple[Path, TrainConfig]], dev_samples: int | None) -> None:
    """Refuse, before any work, to reuse or resume any run of ``plan`` whose settings differ (all named)."""
    problems = [f"- {run_dir}: {problem}" for run_dir, config in plan
                if (problem := reuse_problem(run_dir, config, dev_samples)) is not None]  # fmt: skip
    if problems:
        raise RunDirError(
            f"{len(problems)} run(s) already in the output folder were made with other settings than asked "
            "for now, so they are not reused (their results would be reported under the new settings):\n"
            + "\n".join(problems)
            + "\nUse another output folder, or delete these runs to make them again."
        )


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float | None]:
    """Mean of the per-seed differences ``values - baseline`` with a 95% t confidence interval.

    With a single seed there is no interval (``None``).
    """
    diffs = [v - b for v, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": len(diffs)}
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(diffs)}


def summarize(
    scores: dict[str, dict[int, dict[str, float]]], baseline: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant and metric: mean, sample std and the paired difference to ``baseline`` (in points)."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for variant, by_seed in scores.items():
        seeds = sorted(by_seed)
        summary[variant] = {}
        for metric in METRICS:
            values = [100 * by_seed[s][metric] for s in seeds]
            entry: dict[str, Any] = {
                "values": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else None,
            }
            if variant != baseline:
                entry["diff"] = paired_difference(values, [100 * scores[baseline][s][metric] for s in seeds])
            summary[variant][metric] = entry
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_markdown(summary: dict[str, dict[str, dict[str, Any]]], baseline: str, header: str) -> str:
    """The comparison as a markdown table: mean ± std per metric and the paired difference with its 95% CI."""
    columns = ["variant"]
    for label in METRICS.values():
        columns += [f"{label} (mean ± std)", f"{label} Δ vs {baseline} [95% CI]"]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for variant, metrics in summary.items():
        cells = [variant]
        for metric in METRICS:
            entry = metrics[metric]
            cells.append(f"{entry['mean']:.2f} ± {_fmt(entry['std'])}")
            diff = entry.get("diff")
            if diff is None:
                cells.append("baseline")
            else:
                cells.append(f"{diff['mean']:+.2f} [{_fmt(diff['ci_low'])}, {_fmt(diff['ci_high'])}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    summary: dict[str, dict[str, dict[str, Any]]], path: Path, title: str, reference: dict[str, float]
) -> None:
    """Bar chart of mean score per variant and metric with std error bars, written atomically.

    ``reference`` (per metric) is drawn as a dashed line: the constant-prediction level.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(variants), 3.6))
    width = 0.8 / len(METRICS)
    for k, (metric, label) in enumerate(METRICS.items()):
        xs = [i + (k - (len(METRICS) - 1) / 2) * width for i in range(len(variants))]
        means = [summary[v][metric]["mean"] for v in variants]
        errors = [summary[v][metric]["std"] or 0.0 for v in variants]
        bars = ax.bar(xs, means, width, yerr=errors, capsize=4, label=label)
        ax.axhline(reference[metric], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=1)
    ax.set_xticks(range(len(variants)), variants)
    ax.set_ylabel("score (%); dashed: constant prediction")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def compare(
    variants: Sequence[str] = ("bert", "ex", "im"),
    seeds: Sequence[int] = (1, 2, 3, 4, 5),
    task: str = "sst2",
    output_dir: str | Path = "runs/compare",
    baseline: str = "bert",
    dev_samples: int | None = None,
    data_dir: str | Path | None = None,
    **train_options: Any,
) -> dict[str, Any]:
    """Train and evaluate every variant with every seed, then summarize the paired comparison.

    ``train_options`` are further ``TrainConfig`` fields (model, epochs, lr, train_samples, ...), the same
    for every run. Returns what ``comparison.json`` holds.
    """
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} must be one of the compared variants {list(variants)}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    if dev_samples is not None and (isinstance(dev_samples, bool) or not isinstance(dev_samples, int)
                                    or dev_samples < 1):  # fmt: skip
        raise ValueError(f"dev_samples must be a positive integer, got {dev_samples!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output dir {output_dir} is a file, not a folder; choose another --output-dir")
    plan: list[tuple[Path, TrainConfig]] = []
    for variant in variants:
        for seed in seeds:
            run_dir = output_dir / f"{variant}-seed{seed}"
            run_options = {k: v for k, v in train_options.items() if k not in NOT_TAKEN.get(variant, ())}
            config = TrainConfig(
                task=task,
                variant=variant,
                seed=seed,
                output_dir=str(run_dir),
                data_dir=None if data_dir is None else str(data_dir),
                resume=(run_dir / CONFIG_FILE).is_file(),
                **run_options,
            )
            config.validate()
            plan.append((run_dir, config))
    check_reuse(plan, dev_samples)
    check_data(task, None if data_dir is None else str(data_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    scores: dict[str, dict[int, dict[str, float]]] = {variant: {} for variant in variants}
    for run_dir, config in plan:
        metrics_path = run_dir / METRICS_FILE
        if not metrics_path.is_file():
            evaluate(train(config), dev_samples=dev_samples)
        metrics = json.loads(metrics_path.read_text())
        scores[config.variant][config.seed] = {metric: metrics[metric]["overall"] for metric in METRICS}

    summary = summarize(scores, baseline)
    first_run = json.loads((output_dir / f"{baseline}-seed{seeds[0]}" / METRICS_FILE).read_text())
    constant = {metric: 100 * first_run[metric]["constant_baseline"]["overall"] for metric in METRICS}
    options = {"task": task, "dev_samples": dev_samples, **train_options}
    result = {
        "baseline": baseline,
        "seeds": list(seeds),
        "options": options,
        "summary": summary,
        "constant_baseline": constant,
    }
    header = (
        f"## {task}: {', '.join(variants)} over seeds {', '.join(map(str, seeds))} (scores in %)\n\n"
        f"Settings: {json.dumps(options, default=str)}. Δ is the mean paired (same seed) difference to "
        f"{baseline}, with a 95% t confidence interval.\n\nReference: always predicting the majority "
        f"training class scores {constant['clean']:.2f} on clean dev and {constant['advglue']:.2f} on "
        "AdvGLUE; a variant near these has learned nothing, whatever its AdvGLUE difference."
    )
    if len(seeds) < 5:
        header += f"\n\n**Only {len(seeds)} seed(s): too few for conclusions; use at least 5.**"
    write_json_atomic(output_dir / "comparison.json", result)
    markdown = format_markdown(summary, baseline, header)
    with atomic_open(output_dir / "comparison.md") as f:
        f.write(markdown)
    plot(summary, output_dir / "comparison.png", f"{task}: mean ± std over {len(seeds)} seed(s)", constant)
    result["markdown"] = markdown
    return result
