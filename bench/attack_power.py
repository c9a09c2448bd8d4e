"""What an attack comparison needs to be decisive (issue 17): seeds and examples for a given interval.

    python -m bench.attack_power RUN_DIR [RUN_DIR ...] --recipe NAME [NAME ...] --pairs A:B [A:B ...]
        [--split dev] [--seeds 5 10 20] [--examples 100 872] [--target 3] [--out FILE.json]

Reads the finished attacks of the run folders (``ode-bert attack``; the runs of a group attacked on the same
examples with the same settings, as ``--report-only`` requires), and for each pair of variants and each
metric under attack (robust accuracy per radius for PGD, accuracy under attack for the text recipes; with
several text recipes, the accuracy under every one of them: ``report.worst_case_outcomes``) splits
the noise of the paired difference into its seed, example and remaining parts
(``stats.variance_components``), then projects the 95% half-widths at other numbers of seeds and examples
(``stats.projected_half_widths``): by seed (the paired t interval on one set of examples) and by example
and seed (examples drawn anew too). A small seed-spread p marks seeds that agree more closely than the
examples' noise allows: the measured t interval is then too narrow (the projection, built from the parts,
is not). Also the fewest seeds that bring the by-seed half-width to ``--target`` points at each number of
examples (none up to 100 seeds: the seed part alone is too wide). The seed part is estimated from the
measured seeds only, so with 5 seeds a projection is a rough guide (S - 1 = 4 degrees of freedom), not a
promise. Statistics only, seconds; prints Markdown, writes JSON atomically with ``--out``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_SEEDS = 100


def fewest_seeds(components: dict[str, Any], examples: int, target: float) -> int | None:
    """The fewest seeds (2 to ``MAX_SEEDS``) whose projected by-seed half-width is at most ``target``."""
    from ode_bert.experiments.stats import projected_half_widths

    for seeds in range(2, MAX_SEEDS + 1):
        if projected_half_widths(components, seeds, examples)["by_seed"] <= target:
            return seeds
    return None


def analyse(outcomes: dict[str, Any], pairs: list[tuple[str, str]], seeds: list[int], examples: list[int],
            target: float) -> list[dict[str, Any]]:  # fmt: skip
    """One row per group, pair and attacked metric: the components, the projections and the fewest seeds."""
    from ode_bert.experiments.stats import projected_half_widths, variance_components

    rows = []
    for group, entry in outcomes.items():
        for a, b in pairs:
            if a not in entry or b not in entry:
                continue
            metrics = [m for m in next(iter(entry[a].values())) if m != "clean"]
            for metric in metrics:
                components = variance_components({s: v[metric] for s, v in entry[a].items()},
                                                 {s: v[metric] for s, v in entry[b].items()})  # fmt: skip
                rows.append({
                    "group": group, "pair": f"{a} - {b}", "metric": metric, "components": components,
                    "projected": [{"seeds": s, "examples": n, **projected_half_widths(components, s, n)}
                                  for s in seeds for n in examples],
                    "fewest_seeds": {str(n): fewest_seeds(components, n, target) for n in examples},
                })  # fmt: skip
    return rows


def markdown(rows: list[dict[str, Any]], target: float) -> str:
    """The rows as two tables: the measured components, then the projected half-widths."""
    lines = ["| group | pair | metric | seeds x examples | mean | sd seed | sd example | sd rest "
             "| seed spread p |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        c = r["components"]
        spread = "n/a" if c["seed_spread_p"] is None else f"{c['seed_spread_p']:.2g}"
        lines.append(f"| {r['group']} | {r['pair']} | {r['metric']} | {c['seeds']} x {c['examples']} | "
                     f"{c['mean']:+.2f} | {c['seed'] ** 0.5:.2f} | {c['example'] ** 0.5:.2f} | "
                     f"{c['residual'] ** 0.5:.2f} | {spread} |")  # fmt: skip
    sizes = [(p["seeds"], p["examples"]) for p in rows[0]["projected"]] if rows else []
    counts = list(rows[0]["fewest_seeds"]) if rows else []
    lines += ["", "Projected 95% half-widths in points, by seed / by example and seed; fewest seeds for "
              f"±{target:g} by seed:", "",
              "| pair | metric | " + " | ".join(f"{s} seeds x {n}" for s, n in sizes)
              + " | " + " | ".join(f"seeds for ±{target:g} at {n}" for n in counts) + " |",
              "|---|---|" + "---|" * (len(sizes) + len(counts))]  # fmt: skip
    for r in rows:
        cells = [f"±{p['by_seed']:.2f} / ±{p['by_example_and_seed']:.2f}" for p in r["projected"]]
        cells += [str(v) if v is not None else f"> {MAX_SEEDS}" for v in r["fewest_seeds"].values()]
        lines.append(f"| {r['pair']} | {r['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.attack_power", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="attacked run folders")
    parser.add_argument("--recipe", required=True, nargs="+",
                        help="the attack to read (e.g. deepwordbug, pgd-l2); several text recipes: the "
                        "accuracy under every one of them")
    parser.add_argument("--split", default="dev", help="the attacked split (default: the task's first)")
    parser.add_argument("--pairs", nargs="+", required=True, metavar="A:B", help="variant pairs, e.g. im:ex")
    parser.add_argument("--seeds", nargs="+", type=int, default=[5, 10, 20], help="seed counts to project")
    parser.add_argument("--examples", nargs="+", type=int, default=[100, 872],
                        help="example counts to project (872: the whole SST-2 dev set)")
    parser.add_argument("--target", type=float, default=3.0, help="half-width goal in points (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from ode_bert.attack.runner import resolve_split
    from ode_bert.experiments.report import attack_outcomes, worst_case_outcomes
    from ode_bert.train import read_train_config

    parser = _parser()
    args = parser.parse_args(argv)
    typed = sys.argv[1:] if argv is None else list(argv)
    pairs = [tuple(p.split(":")) for p in args.pairs]
    if any(len(p) != 2 or not all(p) for p in pairs):
        parser.error(f"--pairs takes A:B variant pairs, got {args.pairs}")
    if min(args.seeds) < 2 or min(args.examples) < 1 or not args.target > 0:
        parser.error("--seeds must be >= 2, --examples >= 1 and --target > 0")
    try:
        split = resolve_split(read_train_config(args.run_dirs[0])["task"], args.split)
        if len(args.recipe) == 1:
            outcomes = attack_outcomes(args.run_dirs, split, args.recipe[0])
        else:
            outcomes = worst_case_outcomes(args.run_dirs, split, args.recipe)[0]
        rows = analyse(outcomes, pairs, args.seeds, args.examples, args.target)
    except (FileNotFoundError, ValueError) as err:  # e.g. a pair with fewer than 2 shared seeds
        parser.error(str(err))
    if not rows:
        parser.error(f"no pair of {args.pairs} has both variants among the run folders")
    print(markdown(rows, args.target))
    if args.out is not None:
        from ode_bert.io import write_json_atomic

        command = " ".join(["python", "-m", "bench.attack_power", *map(shlex.quote, typed)])
        write_json_atomic(args.out, {"command": command, "target": args.target, "rows": rows})


if __name__ == "__main__":
    main()
