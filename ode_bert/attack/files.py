"""Where an attack's files live in a run folder and how to read them back; imports no torch (the reports of
``ode_bert.experiments`` read attacks without loading a model)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..settings import EVALS_DIR, solver_changes_dir

ATTACKS_DIR = "attacks"
RECORDS_FILE = "records.jsonl"
COSTS_FILE = "costs.jsonl"
SUMMARY_FILE = "summary.json"
ATTACK_CONFIG_FILE = "config.json"
PLOT_FILE = "robust_accuracy.png"
# PGD settings key: every flip counted was confirmed on the evaluated model (embedding.pgd)
FLIPS_CONFIRMED = "flips_confirmed_on_target"
_RUN_NAME = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")


def attack_folder(
    run_dir: str | Path, split: str, recipe: str, solver_changes: Mapping[str, Any] | None = None
) -> Path:
    """``RUN_DIR/attacks/<split>-<recipe>``: one attack's files; with ``solver_changes`` (the model attacked
    with other solver settings than the trained ones) ``RUN_DIR/evals/<changes>/attacks/<split>-<recipe>``."""
    base = Path(run_dir) if solver_changes is None else solver_changes_dir(run_dir, solver_changes)
    return base / ATTACKS_DIR / f"{split}-{recipe}"


def solver_change_attacks(run_dir: str | Path, split: str, recipe: str) -> dict[str, Path]:
    """The attacks of ``run_dir`` with solver changes (``attack_folder``), by the changes' label
    (``tol=0.1``), finished or not."""
    pattern = f"*/{ATTACKS_DIR}/{split}-{recipe}/{ATTACK_CONFIG_FILE}"
    return {path.parents[2].name: path.parent for path in sorted((Path(run_dir) / EVALS_DIR).glob(pattern))}


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of the complete chunks in ``path`` (a partly written last chunk or line is dropped)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    ends = [i for i, r in enumerate(records, 1) if r.get("last_in_chunk")]
    return records[: max(ends, default=0)]


def robust_correct(records: list[dict[str, Any]], radius_index: int) -> list[bool]:
    """PGD, per example: correct and not flipped at any radius up to ``radius_index`` (a perturbation found in
    a smaller ball lies in every larger one, so robust accuracy never increases with the radius)."""
    return [
        r["clean_correct"] and all(b is None for b in r["flipped_by"][: radius_index + 1]) for r in records
    ]


def correct_under_attack(records: list[dict[str, Any]]) -> list[bool]:
    """Text recipes, per example: correct and the attack did not flip it."""
    return [bool(r["clean_correct"] and not r["flipped"]) for r in records]


def run_identity(run_dir: Path) -> tuple[str, str, int]:
    """(group, variant, seed) of a run folder: ``<group>/<variant>-seed<seed>`` as experiments lay them out,
    else the training config's variant and seed."""
    match = _RUN_NAME.match(run_dir.name)
    if match:
        return run_dir.parent.name, match["variant"], int(match["seed"])
    config = json.loads((run_dir / "train_config.json").read_text())
    return run_dir.parent.name, config["variant"], config["seed"]


def per_example_metrics(folder: Path, partial: bool = False) -> tuple[list[int], dict[str, list[bool]]]:
    """(example indices, metric -> per-example 0/1 outcome) of one finished attack folder: ``clean`` and,
    for PGD, ``robust@<radius>`` per radius, for text recipes ``under attack``. ``partial``: an unfinished
    attack too, with the examples of its complete chunks."""
    summary_path = folder / SUMMARY_FILE
    if partial and (folder / ATTACK_CONFIG_FILE).is_file():
        summary = json.loads((folder / ATTACK_CONFIG_FILE).read_text())  # the radii, if PGD
    elif not summary_path.is_file():
        raise FileNotFoundError(
            f"{folder} has no finished attack ({SUMMARY_FILE}); run 'ode-bert attack' first"
        )
    else:
        summary = json.loads(summary_path.read_text())
    records = read_records(folder / RECORDS_FILE)
    metrics = {"clean": [bool(r["clean_correct"]) for r in records]}
    if "radii" in summary:
        for k, radius in enumerate(summary["radii"]):
            metrics[f"robust@{radius:g}"] = robust_correct(records, k)
    else:
        metrics["under attack"] = correct_under_attack(records)
    return [r["index"] for r in records], metrics
