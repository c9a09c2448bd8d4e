"""Run a plan of fine-tuning comparisons in parallel worker processes and summarize them group by group.

A thin front-end over ``ode_bert.experiments``: the same command as ``ode-bert experiment``, under the name
RESULTS.md quotes. A group is one task and training size with named variants (BERT, EX-BERT, IM-BERT,
IM-BERT with the paper's gradient-descent solver, ...), each run for every seed; the variants of a seed train
on the same examples from the same classifier initialisation, so differences to BERT are paired by seed.
Each run lives in ``OUT/<group>/<variant>-seed<seed>``: finished runs are skipped and interrupted ones
resumed, both only if their saved settings are the ones the plan asks for (every run is checked before any
starts, and a mismatch is refused with the differing keys). After every finished run ``results.jsonl`` gets
a line and ``summary.json`` and ``tables.md`` are rewritten atomically (docs/experiments.md).

Several workers pay off on a GPU, where one small model's run is bound by kernel launches, not arithmetic;
on a CPU use ``--workers 1``; beyond one machine, ``--executor ray --address ...``. The core table of
RESULTS.md::

    python bench/experiments/grid.py --plan core --out runs/grid --workers 14
    python bench/experiments/grid.py --report runs/grid/results.jsonl --pairs im:ex --plot runs/grid/diff.png
"""

from __future__ import annotations

from ode_bert.experiments import PLANS, VARIANTS, Group, load_records, plot_differences, summarize_groups
from ode_bert.experiments.cli import build_parser, main
from ode_bert.experiments.report import format_report

__all__ = ["PLANS", "VARIANTS", "Group", "build_parser", "format_report", "load_records", "main",
           "plot_differences", "summarize_groups"]

if __name__ == "__main__":
    main(prog="grid")
