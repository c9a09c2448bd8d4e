"""Skip-finished with a settings check: a run already in the output folder is reused (or resumed) only if
every one of its saved settings is the one asked for now; otherwise it is refused with the differing keys,
for every run of a plan before any of them starts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..evaluate import METRICS_FILE
from ..train import RunDirError, TrainConfig, check_run_dir


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
