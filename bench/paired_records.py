"""Runs from two sets of record files, paired by seed: what changed between two versions of the code.

``grid.py --report`` pairs variants within one set of records; this pairs a variant across two sets (e.g.
IM-BERT trained with ode-bert 0.3.0 against the runs of 0.2.0, README "Changed in 0.3.0"), or against
another variant of the other set (``--old-variant``: the 0.3.0 IM-BERT against the recorded EX-BERT).
Prints, for clean dev and AdvGLUE, each set's per-seed scores, the paired difference NEW − OLD with its 95%
t interval (``ode_bert.experiments.stats.paired_difference``) over the seeds both sets hold, and in how many
seeds NEW is higher, with the two-sided sign test (ties left out).

    python -m bench.paired_records --new runs/v030/results.jsonl --old bench/results/im-tol1e-2-cpu.jsonl \
        bench/results/sst2-seeds6-10-cpu.jsonl --variant im-tol1e-2 --group sst2-n1000
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ode_bert.experiments.report import format_sign_test
from ode_bert.experiments.stats import METRICS, paired_difference


def runs_by_seed(paths: Sequence[Path], variant: str, group: str) -> dict[int, dict[str, Any]]:
    """The records of ``variant`` in ``group`` in the JSON-lines files ``paths``, by seed (a seed twice is an
    error: which one to pair would be a guess)."""
    runs: dict[int, dict[str, Any]] = {}
    for path in paths:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():  # blank lines, as ode_bert.experiments.load_records skips them
                continue
            record = json.loads(line)
            if record.get("variant") != variant or record.get("group") != group:
                continue
            if record["seed"] in runs:
                raise ValueError(f"{path}:{number}: a second {variant} record for seed {record['seed']}")
            runs[record["seed"]] = record
    return runs


def compare(new: Sequence[Path], old: Sequence[Path], variant: str, group: str,
            old_variant: str | None = None) -> str:
    """The per-seed scores of both sets of files and the paired NEW − OLD differences, as markdown."""
    old_variant = old_variant or variant
    runs = {"new": runs_by_seed(new, variant, group), "old": runs_by_seed(old, old_variant, group)}
    seeds = sorted(set(runs["new"]) & set(runs["old"]))
    if len(seeds) < 2:
        raise ValueError(f"{variant} against {old_variant} in {group}: {len(seeds)} seed(s) in both sets; "
                         "an interval needs 2")
    files = {k: ", ".join(map(str, paths)) for k, paths in (("new", new), ("old", old))}
    lines = [f"{group}: NEW = {variant} of {files['new']}, OLD = {old_variant} of {files['old']}",
             f"seeds {', '.join(map(str, seeds))}", "",
             "| metric | NEW per seed | OLD per seed | NEW − OLD [95% t CI] | sign test |",
             "|---|---|---|---|---|"]
    for metric, label in METRICS.items():
        scores = {k: [100 * runs[k][s][metric]["overall"] for s in seeds] for k in runs}
        d = paired_difference(scores["new"], scores["old"])
        signs = format_sign_test([a - b for a, b in zip(scores["new"], scores["old"])])
        lines.append(f"| {label} | {' / '.join(f'{x:.2f}' for x in scores['new'])} | "
                     f"{' / '.join(f'{x:.2f}' for x in scores['old'])} | "
                     f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] | NEW {signs} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=Path, nargs="+", required=True,
                        help="records (results.jsonl) of the new code")
    parser.add_argument("--old", type=Path, nargs="+", required=True, help="records of the old code")
    parser.add_argument("--variant", required=True, help="the variant of the NEW records (and of OLD's)")
    parser.add_argument("--old-variant", help="the variant of the OLD records, if another (e.g. ex)")
    parser.add_argument("--group", required=True, help="e.g. sst2-n1000")
    args = parser.parse_args(argv)
    text = compare(args.new, args.old, args.variant, args.group, args.old_variant)
    print(text)
    return text


if __name__ == "__main__":
    main()
