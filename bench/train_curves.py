"""How fine-tuning runs went, step by step, from their ``train_history.json``: per epoch the mean loss, the
gradient norm before clipping (median, largest, share of steps clipped) and the implicit and adjoint solves'
convergence; per run the step with the largest gradient norm, with its loss and worst residuals, and the
loss of the steps after it. ``--plot PNG`` draws every run's loss and gradient norm per step.

For a run that stopped learning: was there a gradient spike, and did a solve fail at it?

    R=runs/diag/sst2-n1000
    python -m bench.train_curves $R/im-tol1e-2-seed15 $R/im-tol1e-2-seed14 --plot curves.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ode_bert.train import HISTORY_FILE

AFTER = 8  # steps before and after the spike whose mean loss is shown


def load_steps(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """A run's epochs and its steps over all epochs (lists keyed as in ``train_history.json``); an error
    naming the run if it has no history or one recorded before per-step figures (ode-bert 0.3.0)."""
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir}: no {HISTORY_FILE} (not a finished training run)")
    epochs = json.loads(path.read_text())
    if not epochs or any("steps" not in e for e in epochs):
        raise ValueError(f"{path} has no per-step figures: trained before ode-bert 0.3.1 recorded them")
    steps: dict[str, list[Any]] = {}
    for epoch in epochs:
        for key, values in epoch["steps"].items():
            steps.setdefault(key, []).extend(values)
    return epochs, steps


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _solves(record: dict[str, Any] | None) -> str:
    if record is None:
        return "–"
    return f"{100 * record['example_converged_fraction']:.1f}% / {record['max_rel_residual']:.2g}"


def epoch_rows(name: str, epochs: list[dict[str, Any]]) -> list[str]:
    """One markdown row per epoch of the run ``name``."""
    rows = []
    for epoch in epochs:
        norm = epoch["grad_norm"] or {}
        rows.append(
            f"| {name} | {epoch['epoch']} | {epoch['mean_loss']:.3f} | "
            f"{_fmt(norm.get('median'), '.2f')} | {_fmt(norm.get('max'), '.2f')} | "
            f"{_fmt(norm.get('clipped_fraction'), '.0%')} | "
            f"{_solves(epoch['solver'])} | {_solves(epoch.get('adjoint'))} |"
        )
    return rows


def spike_row(name: str, steps: dict[str, list[Any]]) -> str:
    """The step of the run ``name`` with the largest gradient norm: its norm, loss and worst residuals, and
    the mean loss of the ``AFTER`` steps before and after it."""
    norms = steps.get("grad_norm", [])  # absent where the accelerator returned no norm (DeepSpeed)
    known = [i for i, n in enumerate(norms) if n is not None]
    if not known:
        raise ValueError(f"{name}: no gradient norm recorded")
    at = max(known, key=lambda i: norms[i])
    losses = steps["loss"]
    before = statistics.fmean(losses[max(0, at - AFTER) : at]) if at else None
    after = statistics.fmean(losses[at + 1 : at + 1 + AFTER]) if at + 1 < len(losses) else None
    residual = steps.get("max_rel_residual", [None] * len(norms))[at]
    adjoint = steps.get("adjoint_max_rel_residual", [None] * len(norms))[at]
    median = statistics.median(norms[i] for i in known)
    return (
        f"| {name} | {at + 1} of {len(norms)} | {norms[at]:.2f} ({norms[at] / median:.1f}x median) | "
        f"{losses[at]:.3f} | {_fmt(before, '.3f')} → {_fmt(after, '.3f')} | {_fmt(residual, '.2g')} | "
        f"{_fmt(adjoint, '.2g')} |"
    )


def plot(runs: Sequence[tuple[str, dict[str, list[Any]]]], out: Path) -> None:
    """Loss and gradient norm (log scale) per step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, norm_ax) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for name, steps in runs:
        loss_ax.plot(range(1, len(steps["loss"]) + 1), steps["loss"], label=name)
        norms = steps.get("grad_norm", [])
        norm_ax.plot(range(1, len(norms) + 1), norms, label=name)
    loss_ax.set_ylabel("training loss")
    norm_ax.set_ylabel("gradient norm before clipping")
    norm_ax.set_yscale("log")
    norm_ax.set_xlabel("step")
    loss_ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m bench.train_curves", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="training run folders")
    parser.add_argument("--plot", type=Path, help="also draw loss and gradient norm per step into this PNG")
    args = parser.parse_args(argv)
    runs = [(run_dir.name, *load_steps(run_dir)) for run_dir in args.runs]  # all read before any output
    lines = [
        "| run | epoch | mean loss | grad norm median | largest | steps clipped "
        "| implicit solves converged / worst residual | adjoint solves converged / worst residual |",
        "|---|---|---|---|---|---|---|---|",
        *(row for name, epochs, _ in runs for row in epoch_rows(name, epochs)),
        "",
        f"| run | largest gradient norm at step | norm | loss there | mean loss, {AFTER} steps before → "
        "after | worst implicit residual there | worst adjoint residual there |",
        "|---|---|---|---|---|---|---|",
        *(spike_row(name, steps) for name, _, steps in runs),
    ]
    text = "\n".join(lines)
    print(text)
    if args.plot:
        plot([(name, steps) for name, _, steps in runs], args.plot)
        print(f"wrote {args.plot}")
    return text


if __name__ == "__main__":
    main()
