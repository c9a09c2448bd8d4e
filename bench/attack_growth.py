"""Perturbation growth beside robustness (issue 17): does less growth mean more robustness?

    python -m bench.attack_growth RUN_DIR [RUN_DIR ...] --recipe pgd-l2 --out DIR [--skip-unattacked]

For each fine-tuned run folder attacked with PGD (``ode-bert attack RUN_DIR --recipe pgd-l2``, finished:
``RUN_DIR/attacks/<split>-<recipe>/summary.json``), on the examples that attack used (read from its
``records.jsonl``, batched in the attack's own chunks), the worst-direction growth of a perturbation of
``h_0`` (the first encoder layer's input, where the PGD attack perturbs) to the last layer's output:
``stability_analysis.perturbation.initial_value_growth``, the largest singular value of ``dh_L / dh_0``
over the real tokens by power iteration, on the model loaded as it was trained and evaluated
(``ode_bert.from_pretrained``: its own connection and solver settings). Per run: the median over examples
(and the 10% / 90% quantiles), beside the attack's robust accuracy per radius and median minimal radius;
across runs, Pearson's r with its 95% interval (``stats.correlation``, Fisher z) and Spearman's rank
correlation, and a scatter per radius (``report.plot_growth_vs_robustness``).

Writes into ``--out``: ``points.json`` (the points, correlations, settings, machine, command),
``table.md`` and ``growth_vs_robust@<radius>.png``, atomically; per run ``runs/<group>--<run>.json`` (the
per-example growth), which a rerun with the same settings, examples and model weights reuses. A run
without a finished attack is refused before any work (``--skip-unattacked``: skipped, said on stderr and
listed in ``points.json``). ``--partial`` takes unfinished attacks too: every run is cut to the examples all
of them have completed (the first ``n`` of the same example order) and its robust accuracy recomputed on them,
as ``ode-bert attack --report-only`` does. Progress (one line per chunk) goes to stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PGD_RECIPES = ("pgd-l2", "pgd-linf")


class Refused(ValueError):
    """A run folder or option the measurement cannot use (said before any work)."""


def _attack(
    run_dir: Path, recipe: str, split: str, partial: bool = False
) -> tuple[Path, dict[str, Any], list[dict[str, Any]]]:
    """(folder, summary, records) of the finished ``recipe`` attack of ``run_dir``; ``Refused`` if it is not
    there or not finished. ``partial``: an unfinished one too, summarized from its complete chunks."""
    import json

    from ode_bert.attack.files import (
        ATTACK_CONFIG_FILE,
        RECORDS_FILE,
        SUMMARY_FILE,
        attack_folder,
        read_records,
    )
    from ode_bert.attack.runner import resolve_split
    from ode_bert.train import RunDirError, read_train_config

    if not (run_dir / "train_config.json").is_file() or not (run_dir / "model" / "config.json").is_file():
        raise Refused(f"{run_dir} is not a finished training run (expected train_config.json and model/)")
    try:
        task = read_train_config(run_dir)["task"]
    except RunDirError as err:
        raise Refused(str(err)) from None
    folder = attack_folder(run_dir, resolve_split(task, split), recipe)
    if partial and not (folder / SUMMARY_FILE).is_file() and (folder / ATTACK_CONFIG_FILE).is_file():
        records = read_records(folder / RECORDS_FILE)
        if not records:
            raise Refused(f"{run_dir}: its {recipe} attack has no complete chunk yet ({folder})")
        settings = json.loads((folder / ATTACK_CONFIG_FILE).read_text())
        return folder, _summary(records, settings), records
    if not (folder / SUMMARY_FILE).is_file():
        state = "unfinished (records but no summary yet)" if (folder / RECORDS_FILE).is_file() else "not run"
        raise Refused(
            f"{run_dir} has no finished {recipe} attack: {folder / SUMMARY_FILE} is missing, the "
            f"attack is {state}; run 'ode-bert attack {run_dir} --recipe {recipe}' to the end"
        )
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    records = read_records(folder / RECORDS_FILE)
    if len(records) != summary["n"]:
        raise Refused(f"{folder}: {len(records)} records but the summary counts {summary['n']}")
    return folder, summary, records


def _summary(records: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """An attack's summary of ``records`` (as ``summary.json`` holds it), from its saved ``settings``."""
    import dataclasses

    from ode_bert.attack.runner import AttackConfig, summarize_records

    names = {f.name for f in dataclasses.fields(AttackConfig)}
    config = AttackConfig(**{k: v for k, v in settings.items() if k in names})
    return {**summarize_records(records, config), "settings": settings}


def _chunks(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The attack's batches, in its order (records end a chunk with ``last_in_chunk``)."""
    chunks: list[list[dict[str, Any]]] = [[]]
    for record in records:
        chunks[-1].append(record)
        if record["last_in_chunk"]:
            chunks.append([])
    return [c for c in chunks if c]


def _weights_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def measure_run(
    run_dir: Path,
    summary: dict[str, Any],
    records: list[dict[str, Any]],
    tol: float,
    max_iterations: int,
    seed: int,
    data_dir: str | None,
    cache: Path,
    label: str,
) -> dict[str, Any]:
    """Per-example growth of one run on its attack's examples (``cache`` reused when its settings, examples
    and model weights are the same)."""
    import json

    import numpy as np
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import ode_bert
    from ode_bert.data import load_clean_dev
    from ode_bert.io import write_json_atomic
    from ode_bert.train import read_train_config
    from stability_analysis.perturbation import initial_value_growth

    train = read_train_config(run_dir)
    key = {
        "indices": [r["index"] for r in records],
        "tol": tol,
        "max_iterations": max_iterations,
        "seed": seed,
        "weights_sha256": _weights_digest(run_dir / "model"),
    }
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            print(f"{label}: reusing {cache}", file=sys.stderr, flush=True)
            return cached
    split = summary["settings"]["split"]
    examples = load_clean_dev(train["task"], data_dir if data_dir is not None else train.get("data_dir"))[
        split
    ]
    wrong = [
        r["index"] for r in records if r["index"] >= len(examples) or examples[r["index"]].label != r["label"]
    ]
    if wrong:
        raise Refused(
            f"{run_dir}: the attack's records do not match the {split} split here (examples "
            f"{wrong[:5]}: index out of range or another label); is --data-dir the one attacked?"
        )
    model = ode_bert.from_pretrained(run_dir / "model", AutoModelForSequenceClassification).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    out: dict[str, list[Any]] = {"growth": [], "relative_growth": [], "converged": []}
    iterations, residuals, mismatch = [], [], 0.0
    start = time.perf_counter()
    chunks = _chunks(records)
    for k, chunk in enumerate(chunks):
        texts_a = [examples[r["index"]].text_a for r in chunk]
        texts_b = [examples[r["index"]].text_b for r in chunk]
        inputs = dict(
            tokenizer(
                texts_a,
                texts_b if texts_b[0] is not None else None,
                padding=True,
                truncation=True,
                max_length=train["max_length"],
                return_tensors="pt",
            )
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = initial_value_growth(model, inputs, tol, max_iterations, seed)
        for w in caught:
            print(f"{label}: warning: {w.message}", file=sys.stderr, flush=True)
        out["growth"] += result.growth.tolist()
        out["relative_growth"] += result.relative_growth.tolist()
        out["converged"] += result.converged.tolist()
        iterations.append(result.iterations)
        residuals.append(result.max_residual)
        mismatch = max(mismatch, result.forward_mismatch)
        print(
            f"{label}: chunk {k + 1}/{len(chunks)}, {len(chunk)} examples, {result.iterations} power "
            f"iterations, median growth {float(np.median(result.growth)):.3g}, "
            f"{time.perf_counter() - start:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    measured = {
        "key": key,
        "run": str(run_dir),
        **out,
        "power_iterations": iterations,
        "max_residual": max((r for r in residuals if r is not None), default=None),
        "forward_mismatch": mismatch,
        "seconds": time.perf_counter() - start,
    }
    write_json_atomic(cache, measured)
    return measured


def _point(
    run_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]], measured: dict[str, Any]
) -> dict[str, Any]:
    """One run's point: its growth (median and quantiles over examples), robust accuracy per radius (%) and
    the attack's median minimal radius, and the per-example rank correlation of growth and minimal radius."""
    import numpy as np
    from scipy import stats

    from ode_bert.attack.files import run_identity

    group, variant, seed = run_identity(run_dir)
    growth = np.array(measured["growth"])
    within = None
    correct = [(g, r["min_radius"]) for g, r in zip(growth, records, strict=True) if r["clean_correct"]]
    if len(correct) >= 3:  # None: not flipped at the largest radius, ranked above every flipped example
        rho = stats.spearmanr([g for g, _ in correct], [math.inf if m is None else m for _, m in correct])
        within = None if math.isnan(rho.statistic) else float(rho.statistic)  # NaN: a constant column
    return {
        "run": str(run_dir),
        "group": group,
        "variant": variant,
        "seed": seed,
        "n": len(records),
        "growth": float(np.median(growth)),
        "growth_q10": float(np.quantile(growth, 0.1)),
        "growth_q90": float(np.quantile(growth, 0.9)),
        "relative_growth": float(np.median(measured["relative_growth"])),
        "unconverged_examples": int(sum(not c for c in measured["converged"])),
        "clean_accuracy": 100 * summary["clean_accuracy"],
        "radii": summary["radii"],
        "robust_accuracy": [100 * v for v in summary["robust_accuracy"]],
        "median_min_radius": summary["median_min_radius"],
        "median_censored": summary["median_censored"],
        "spearman_growth_min_radius_by_example": within,
        "max_residual": measured["max_residual"],
        "seconds": measured["seconds"],
    }


def correlations(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Across runs: Pearson's r (95% Fisher-z interval) and Spearman's rho of the median growth (and the
    relative growth) against robust accuracy at each radius and against the median minimal radius; ``None``
    where either side is constant (no correlation is defined)."""
    from scipy import stats as scipy_stats

    from ode_bert.experiments.stats import correlation

    targets = [
        (f"robust@{r:g}", [p["robust_accuracy"][k] for p in points]) for k, r in enumerate(points[0]["radii"])
    ]
    if not any(p["median_censored"] for p in points):
        targets.append(("median min. radius", [p["median_min_radius"] for p in points]))
    rows = []
    for x_name in ("growth", "relative_growth"):
        x = [p[x_name] for p in points]
        for y_name, y in targets:
            if len(set(x)) == 1 or len(set(y)) == 1:
                rows.append({"x": x_name, "y": y_name, "n": len(x), "r": None, "note": "constant values"})
                continue
            pearson = correlation(x, y)
            spearman = scipy_stats.spearmanr(x, y)
            rows.append(
                {
                    "x": x_name,
                    "y": y_name,
                    **pearson,
                    "spearman": float(spearman.statistic),
                    "spearman_p": float(spearman.pvalue),
                }
            )
    return rows


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def format_tables(points: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, then the correlations."""
    radii = points[0]["radii"]
    lines = [
        "| run | variant | seed | growth median [q10, q90] | relative growth | clean | "
        + " | ".join(f"robust@{r:g}" for r in radii)
        + " | median min. radius | ρ(growth, min. radius) by example |",
        "|---|---|---|---|---|---|" + "---|" * len(radii) + "---|---|",
    ]
    for p in points:
        radius = "censored" if p["median_censored"] else _fmt(p["median_min_radius"], ".3f")
        lines.append(
            f"| {Path(p['run']).name} | {p['variant']} | {p['seed']} | {p['growth']:.3g} "
            f"[{p['growth_q10']:.3g}, {p['growth_q90']:.3g}] | {p['relative_growth']:.3g} | "
            f"{p['clean_accuracy']:.1f} | "
            + " | ".join(f"{v:.1f}" for v in p["robust_accuracy"])
            + f" | {radius} | {_fmt(p['spearman_growth_min_radius_by_example'])} |"
        )
    lines += [
        "",
        "| x | y | runs | Pearson r [95% CI] | p | Spearman ρ | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["r"] is None:
            lines.append(f"| {row['x']} | {row['y']} | {row['n']} | {row['note']}: undefined | | | |")
            continue
        interval = "" if row["ci_low"] is None else f" [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"
        lines.append(
            f"| {row['x']} | {row['y']} | {row['n']} | {row['r']:+.2f}{interval} | "
            f"{row['p_value']:.3g} | {_fmt(row['spearman'], '+.2f')} | {_fmt(row['spearman_p'], '.3g')} |"
        )
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.attack_growth", description=__doc__.split("\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="fine-tuned run folders")
    parser.add_argument("--recipe", default="pgd-l2", choices=PGD_RECIPES, help="the PGD attack to read")
    parser.add_argument(
        "--split", default="dev", help="the attacked clean dev split (default: the task's first)"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-2,
        help="power iteration: stop when every estimate changes by at most this relative "
        "(default 0.01; the estimate rises towards the largest singular value)",
    )
    parser.add_argument(
        "--max-iterations", type=int, default=50, help="power iterations at most (default 50)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the power iteration's start (default 0)")
    parser.add_argument(
        "--skip-unattacked",
        action="store_true",
        help="skip (and list) runs without a finished attack instead of refusing them",
    )
    parser.add_argument(
        "--partial",
        action="store_true",
        help="take unfinished attacks too, every run cut to the examples all runs have completed",
    )
    parser.add_argument("--data-dir", help="data directory (default: the run's, or ODE_BERT_DATA_DIR)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    typed = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python", "-m", "bench.attack_growth", *map(shlex.quote, typed)])
    try:
        if not args.tol > 0 or args.max_iterations < 1 or args.threads < 1:
            raise Refused("--tol must be > 0, --max-iterations and --threads >= 1")
        attacked, skipped = [], []
        for run_dir in args.run_dirs:
            try:
                attacked.append((run_dir, *_attack(run_dir, args.recipe, args.split, args.partial)))
            except Refused as err:
                if not args.skip_unattacked:
                    raise Refused(f"{err} (or pass --skip-unattacked)") from None
                print(f"SKIPPED {run_dir}: {err}", file=sys.stderr, flush=True)
                skipped.append({"run": str(run_dir), "reason": str(err)})
        if not attacked:
            raise Refused("no run folder has a finished attack")
        if args.partial:  # every run cut to the examples all have completed, its summary recomputed on them
            n = min(len(records) for _, _, _, records in attacked)
            attacked = [
                (run_dir, folder, _summary(records[:n], summary["settings"]), records[:n])
                for run_dir, folder, summary, records in attacked
            ]
        first = attacked[0]
        for run_dir, folder, summary, records in attacked[1:]:
            if (
                [r["index"] for r in records] != [r["index"] for r in first[3]]
                or summary["radii"] != first[2]["radii"]
                or folder.name != first[1].name
            ):
                raise Refused(
                    f"{run_dir} was attacked on other examples or radii than {first[0]} "
                    f"({folder.name}, {summary['n']} examples, radii {summary['radii']}); attack every "
                    "run with the same --split, --limit and --radii"
                )
    except Refused as err:
        parser.error(str(err))
    run(args, attacked, skipped, command)


def run(
    args: argparse.Namespace,
    attacked: list[tuple[Path, Path, dict[str, Any], list[dict[str, Any]]]],
    skipped: list[dict[str, Any]],
    command: str,
) -> None:
    """Measure every attacked run, then write the points, correlations, table and scatter plots."""
    import torch

    from bench._common import machine
    from ode_bert.attack.files import run_identity
    from ode_bert.experiments.report import plot_growth_vs_robustness
    from ode_bert.io import atomic_open, write_json_atomic

    torch.set_num_threads(args.threads)
    points = []
    for i, (run_dir, _, summary, records) in enumerate(attacked, 1):
        group, variant, seed = run_identity(run_dir)
        label = f"[{i}/{len(attacked)}] {run_dir.name}"
        cache = args.out / "runs" / f"{group}--{run_dir.name}.json"
        measured = measure_run(
            run_dir, summary, records, args.tol, args.max_iterations, args.seed, args.data_dir, cache, label
        )
        points.append(_point(run_dir, summary, records, measured))
        p = points[-1]
        print(
            f"{label}: growth median {p['growth']:.3g} over {p['n']} examples, robust "
            f"{', '.join(f'{v:.1f}' for v in p['robust_accuracy'])} %, {measured['seconds']:.0f} s measuring",
            file=sys.stderr,
            flush=True,
        )
    rows = correlations(points) if len(points) >= 3 else []
    payload = {
        "command": command,
        "machine": machine("cpu"),
        "recipe": args.recipe,
        "tol": args.tol,
        "max_iterations": args.max_iterations,
        "seed": args.seed,
        "points": points,
        "correlations": rows,
        "skipped": skipped,
        "partial": args.partial,
    }
    write_json_atomic(args.out / "points.json", payload)
    text = format_tables(points, rows)
    if args.partial:
        text = f"Interim (--partial): each run cut to its first {points[0]['n']} attacked examples.\n\n{text}"
    if len(points) < 3:
        text += "\nFewer than 3 runs: no correlation.\n"
    with atomic_open(args.out / "table.md") as f:
        f.write(f"`{command}`\n\n{text}")
    if len(points) >= 3:
        for k, radius in enumerate(points[0]["radii"]):
            if any(row["r"] is None for row in rows if row["y"] == f"robust@{radius:g}"):
                continue
            plot_points = [
                {"variant": p["variant"], "growth": p["growth"], "robust": p["robust_accuracy"][k]}
                for p in points
            ]
            plot_growth_vs_robustness(
                plot_points,
                args.out / f"growth_vs_robust@{radius:g}.png",
                f"{args.recipe} robust accuracy at radius {radius:g} vs median growth",
            )
    if skipped:
        text += "\nSkipped (no finished attack): " + ", ".join(s["run"] for s in skipped) + "\n"
    print(text)
    print(f"wrote {args.out}/points.json, table.md" + (", growth_vs_robust@*.png" if rows else ""))


if __name__ == "__main__":
    main()
