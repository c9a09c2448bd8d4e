"""Run records: one JSON line per finished run in ``results.jsonl`` (scores per split, solver statistics,
wall time), the input of every table and plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .plans import Run, variant_settings
from .stats import METRICS

RESULTS_FILE = "results.jsonl"


def result_line(run: Run, metrics: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """The record of one finished run: scores per split, solver statistics, wall time (``None``: not run
    here)."""
    line: dict[str, Any] = {"group": run.group.name, "task": run.group.task, "variant": run.variant,
                            "settings": variant_settings(run.variant), "seed": run.seed,
                            "train_samples": run.group.train_samples, "seconds": seconds}
    for metric in METRICS:
        m = metrics[metric]
        line[metric] = {"overall": m["overall"], "tasks": m["tasks"], "solver": m["solver"],
                        "splits": m["splits"], "constant": m["constant_baseline"]["overall"]}
    return line


def load_records(paths: list[Path]) -> list[dict[str, Any]]:
    """The run records of ``results.jsonl`` files, one per (group, variant, seed): a record with a wall
    time wins over one without (a run linked into a second folder is recorded there without one)."""
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in paths:
        for line in filter(None, Path(path).read_text().splitlines()):
            record = json.loads(line)
            key = (record["group"], record["variant"], record["seed"])
            if key not in records or record["seconds"] is not None:
                records[key] = record
    return list(records.values())


def recorded(out: Path) -> set[tuple[str, str, int]]:
    """(group, variant, seed) of the runs ``out/results.jsonl`` already has a line for."""
    path = out / RESULTS_FILE
    return {(r["group"], r["variant"], r["seed"]) for r in (load_records([path]) if path.is_file() else [])}


def append_record(out: Path, line: dict[str, Any]) -> None:
    """Append a finished run's record to ``out/results.jsonl``."""
    with open(out / RESULTS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
