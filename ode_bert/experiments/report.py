"""Markdown tables and plots of run records and summaries (``stats``)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ..attack.files import FLIPS_CONFIRMED
from ..io import atomic_open
from .plans import BASELINE, VARIANTS
from .stats import (
    METRICS,
    SEED_SPREAD_ALPHA,
    bootstrap_over_examples_and_seeds,
    by_group,
    correlation,
    fisher_exact,
    mcnemar,
    paired_difference,
    sign_test,
    summarize_groups,
    t_test,
    variance_components,
)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _interval(d: dict[str, Any]) -> str:
    """A paired difference as ``mean [low, high]`` (no interval with one seed)."""
    if d["ci_low"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def _display(variant: str) -> str:
    return "BERT" if variant == "bert" else variant


def format_markdown(summary: dict[str, dict[str, dict[str, Any]]], baseline: str, header: str) -> str:
    """One comparison (``stats.summarize``) as a markdown table: mean ± std per metric and the paired
    difference with its 95% CI."""
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


def format_tables(summary: dict[str, Any]) -> str:
    """One markdown table per group of ``stats.summarize_groups`` (scores in %, Δ = paired difference to the
    baseline with its 95% t CI)."""

    def diff(entry: dict[str, Any]) -> str:
        d = entry.get("diff")
        return "baseline" if d is None else _interval(d)

    def spread(entry: dict[str, Any]) -> str:
        std = "" if entry["std"] is None else f" ± {entry['std']:.2f}"
        return f"{entry['mean']:.2f}{std}"

    out = []
    for name, group in summary.items():
        const = group["constant"]
        out += [f"### {name}", "",
                f"Constant prediction (majority training class): clean {const['clean']:.2f}, "
                f"AdvGLUE {const['advglue']:.2f}.", "",
                "| variant | seeds | clean mean ± std | Δ clean [95% CI] | AdvGLUE mean ± std "
                "| Δ AdvGLUE [95% CI] | AdvGLUE solves converged | max rel. residual | s per run |",
                "|---|---|---|---|---|---|---|---|---|"]
        for variant, v in group["variants"].items():
            solver = v.get("advglue_solver")
            conv = f"{100 * solver['converged_fraction']:.0f}%" if solver else "-"
            resid = f"{solver['max_rel_residual']:.1e}" if solver else "-"
            secs = f"{v['mean_seconds']:.0f}" if v["mean_seconds"] is not None else "-"
            out.append(f"| {variant} | {len(v['seeds'])} | {spread(v['clean'])} | {diff(v['clean'])} | "
                       f"{spread(v['advglue'])} | {diff(v['advglue'])} | {conv} | {resid} | {secs} |")
        out.append("")
    return "\n".join(out)


def format_sign_test(differences: list[float]) -> str:
    """``k of n higher, p = ...``: the two-sided sign test of the nonzero ``differences``
    (``stats.sign_test``)."""
    test = sign_test(differences)
    nonzero = test["higher"] + test["lower"]
    if nonzero == 0:
        return "0 of 0 higher"
    return f"{test['higher']} of {nonzero} higher, p = {test['p_value']:.2g}"


def _tests_cell(differences: list[float]) -> str:
    """``t p; k of n higher, p`` of per-seed differences: the two-sided t test (``stats.t_test``) and the sign
    test."""
    t_p = t_test(differences)
    return f"{'n/a' if t_p is None else f'{t_p:.2g}'}; {format_sign_test(differences)}"


def format_pairs(records: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> str:
    """Markdown table of paired differences ``a - b`` between variants, per group, over their shared seeds,
    with the t and sign tests of each; then, where a pair's runs did not all learn (``not_learned``), the
    failure counts with Fisher's exact test."""
    out = ["| group | pair | seeds | Δ clean [95% CI] | Δ AdvGLUE [95% CI] | clean: t test p; sign test "
           "| AdvGLUE: t test p; sign test |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    failures = []
    for name, runs in by_group(records).items():
        for a, b in pairs:
            seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
            if not seeds:
                continue
            differences = {m: [100 * (runs[a][s][m]["overall"] - runs[b][s][m]["overall"]) for s in seeds]
                           for m in METRICS}  # fmt: skip
            cells = [_interval(paired_difference([100 * runs[a][s][m]["overall"] for s in seeds],
                                                 [100 * runs[b][s][m]["overall"] for s in seeds]))
                     for m in METRICS]
            tests = [_tests_cell(differences[m]) for m in METRICS]
            out.append(f"| {name} | {a} − {b} | {len(seeds)} | {' | '.join(cells + tests)} |")
            failed = {v: sum(not_learned(runs[v][s]) for s in runs[v]) for v in (a, b)}
            if any(failed.values()):
                p = fisher_exact(failed[a], len(runs[a]), failed[b], len(runs[b]))
                failures.append(f"{name}, {a} − {b}: {a} {failed[a]} of {len(runs[a])}, {b} {failed[b]} of "
                                f"{len(runs[b])} (Fisher's exact test p = {p:.2g})")
    if failures:
        out += ["", "Runs that did not learn (‡ below), every seed of each variant:", "",
                *(f"- {line}" for line in failures)]
    return "\n".join(out)


def _variant_order(variant: str) -> tuple[int, str]:
    """Named variants in ``VARIANTS`` order, any others after them by name."""
    order = list(VARIANTS)
    return (order.index(variant), "") if variant in order else (len(order), variant)


# A run whose clean dev score is within this many points of always answering the majority training class
# did not learn the task (``format_seeds`` marks it): its AdvGLUE score is a near-constant predictor's.
NOT_LEARNED_MARGIN = 5.0


def not_learned(record: dict[str, Any]) -> bool:
    """Whether a run's clean score is within ``NOT_LEARNED_MARGIN`` points of the constant prediction's
    (records without the constant level: ``False``)."""
    constant = record["clean"].get("constant")
    return constant is not None and 100 * (record["clean"]["overall"] - constant) < NOT_LEARNED_MARGIN


def format_seeds(records: list[dict[str, Any]]) -> str:
    """Per group, a markdown table of each run's clean / AdvGLUE score (%) by seed, variants in ``VARIANTS``
    order: the runs behind the means, with the runs that did not learn marked (``not_learned``)."""
    out = []
    for name, runs in by_group(records).items():
        variants = sorted(runs, key=_variant_order)
        seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
        out += [f"Per seed, {name}, clean / AdvGLUE:", "", f"| seed | {' | '.join(variants)} |",
                "|---" * (len(variants) + 1) + "|"]
        marked = False
        for seed in seeds:
            cells = []
            for variant in variants:
                run = runs[variant].get(seed)
                if run is None:
                    cells.append("-")
                    continue
                mark = " ‡" if not_learned(run) else ""
                marked |= bool(mark)
                cells.append(" / ".join(f"{100 * run[m]['overall']:.2f}" for m in METRICS) + mark)
            out.append(f"| {seed} | {' | '.join(cells)} |")
        out.append("")
        if marked:
            out += [f"‡ clean dev within {NOT_LEARNED_MARGIN:g} points of always answering the majority "
                    "training class: the run did not learn the task, and its AdvGLUE score is a "
                    "near-constant predictor's.", ""]  # fmt: skip
    return "\n".join(out)


def format_report(
    records: list[dict[str, Any]], pairs: list[tuple[str, str]], baseline: str = BASELINE
) -> str:
    """The report of run records: group tables, the paired differences ``pairs`` (if any), runs by seed."""
    parts = [format_tables(summarize_groups(records, baseline))]
    if pairs:
        parts.append(format_pairs(records, pairs) + "\n")
    parts.append(format_seeds(records))
    return "\n".join(parts)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(
    summary: dict[str, dict[str, dict[str, Any]]], path: Path, title: str, reference: dict[str, float]
) -> None:
    """Bar chart of one comparison (``stats.summarize``): mean score per variant and metric with std error
    bars, written atomically as PNG. ``reference`` (per metric) is drawn as a dashed line: the
    constant-prediction level."""
    plt = _pyplot()
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
    with atomic_open(Path(path), "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)


def plot_differences(
    summary: dict[str, Any], path: Path, baseline: str = BASELINE
) -> list[tuple[str, str, dict[str, Any]]]:
    """Forest plot of every variant's paired difference to ``baseline`` (mean and 95% CI) from
    ``stats.summarize_groups``, clean and AdvGLUE side by side, one row per (group, variant), written
    atomically as PNG. Returns the rows drawn, top to bottom."""
    rows = [(group, variant, stats) for group, entry in summary.items()
            for variant, stats in entry["variants"].items() if variant != baseline]
    if not rows:
        raise ValueError("no variant besides the baseline to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(METRICS), sharey=True, figsize=(10, 1.2 + 0.32 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    for ax, metric in zip(axes, METRICS):
        for y, (_, _, stats) in zip(ys, rows):
            d = stats[metric]["diff"]
            if d["ci_low"] is None:  # one seed: no interval, drawn grey
                ax.plot(d["mean"], y, "o", color="tab:gray")
                continue
            excludes_zero = d["ci_low"] > 0 or d["ci_high"] < 0
            ax.errorbar(d["mean"], y, xerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o",
                        capsize=3, color="tab:red" if excludes_zero else "tab:blue")
        ax.axvline(0, color="gray", linewidth=1)
        ax.set_xlabel(f"Δ {METRICS[metric]} vs {_display(baseline)} (points, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    labels = [f"{group} {variant} (n={len(stats['seeds'])})" for group, variant, stats in rows]
    axes[0].set_yticks(ys, labels)
    fig.suptitle(f"Paired difference to {_display(baseline)} by seed; red: interval excludes zero, "
                 "grey: one seed")
    fig.tight_layout()
    with atomic_open(Path(path), "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return rows


class AttackedRun(NamedTuple):
    """One attack of a run as a report lists it: ``changes`` is the label of its solver changes (``ode-bert
    attack --solver``; ``None``: the trained settings), an attack with changes a variant of its own in every
    table (``<variant>@<changes>``)."""

    run_dir: Path
    group: str
    run_variant: str
    seed: int
    folder: Path
    changes: str | None = None

    @property
    def variant(self) -> str:
        return self.run_variant if self.changes is None else f"{self.run_variant}@{self.changes}"

    @property
    def name(self) -> str:
        return str(self.run_dir) if self.changes is None else f"{self.run_dir}@{self.changes}"


def attacked_runs(
    run_dirs: list[Path], split: str, recipe: str, partial: bool = False
) -> tuple[list[AttackedRun], list[str]]:
    """(attacks, left out) of one attack over ``run_dirs``: each run's attack with its trained settings and
    every attack with solver changes it holds (``attack.files.solver_change_attacks``). Unfinished attacks
    with solver changes are left out (named ``<run>@<changes>``) unless ``partial``; a run with no attack at
    all is a ``FileNotFoundError``."""
    from ..attack.files import SUMMARY_FILE, attack_folder, run_identity, solver_change_attacks

    found, left_out = [], []
    for run_dir in map(Path, run_dirs):
        group, variant, seed = run_identity(run_dir)
        trained = attack_folder(run_dir, split, recipe)
        changed = solver_change_attacks(run_dir, split, recipe)
        if trained.is_dir() or not changed:  # no attack at all: per_example_metrics names the trained folder
            found.append(AttackedRun(run_dir, group, variant, seed, trained))
        for label, folder in changed.items():
            attacked = AttackedRun(run_dir, group, variant, seed, folder, label)
            if partial or (folder / SUMMARY_FILE).is_file():
                found.append(attacked)
            else:
                left_out.append(attacked.name)
    return found, left_out


def attack_outcomes(run_dirs: list[Path], split: str, recipe: str, partial: bool = False) -> dict[str, Any]:
    """Per group, variant and seed, the per-example outcomes of one attack (``ode_bert.attack.files``):
    ``{group: {variant: {seed: {metric: [0/1 per example]}}}}``, with the example indices under
    ``"_examples"`` per group; attacks with solver changes are variants ``<variant>@<changes>``
    (``attacked_runs``); runs of one group must have attacked the same examples. ``partial``: unfinished
    attacks too, every run of a group cut to the examples all of them have completed (an interim report)."""
    return _outcomes(attacked_runs(run_dirs, split, recipe, partial)[0], partial)


def _outcomes(attacks: list[AttackedRun], partial: bool) -> dict[str, Any]:
    """``attack_outcomes`` of the attacks ``attacked_runs`` found."""
    from ..attack.files import per_example_metrics

    found: dict[str, list[tuple[AttackedRun, list[int], dict[str, list[bool]]]]] = {}
    settings: dict[str, tuple[str, dict[str, Any]]] = {}
    for attacked in attacks:
        indices, metrics = per_example_metrics(attacked.folder, partial)
        mine = _attack_settings(attacked.folder)
        first_run, first = settings.setdefault(attacked.group, (attacked.name, mine))
        differing = sorted(k for k in set(first) | set(mine) if first.get(k) != mine.get(k))
        if differing:
            raise ValueError(f"{attacked.name}: attacked with other settings than {first_run} of group "
                             f"{attacked.group} (differing: {differing}); attack every run of a group with "
                             "the same options")  # fmt: skip
        found.setdefault(attacked.group, []).append((attacked, indices, metrics))
    out: dict[str, Any] = {}
    for group, runs in found.items():
        n = min(len(indices) for _, indices, _ in runs) if partial else len(runs[0][1])
        if n == 0:
            first = runs[0][0].name
            raise ValueError(f"group {group}: no example is attacked in every run yet ({first}, ...)")
        examples = runs[0][1][:n]
        entry = out.setdefault(group, {"_examples": examples})
        for attacked, indices, metrics in runs:
            if indices[: n if partial else None] != examples:
                raise ValueError(f"{attacked.name}: attacked other examples than the other runs of group "
                                 f"{group}; attack every run with the same --split and --limit")  # fmt: skip
            entry.setdefault(attacked.variant, {})[attacked.seed] = {k: v[:n] for k, v in metrics.items()}
    return out


# attack settings that may differ between the runs of one comparison: where the transfer source lives, the
# batch size (every random choice is drawn per example, so it does not change what is attacked), whether
# flips were confirmed on the evaluated model (attacks from before are flagged: ``unconfirmed_flips``), and
# the solver changes (part of the variant's name: ``attacked_runs``)
_RUN_SPECIFIC_ATTACK_SETTINGS = ("transfer_from", "batch_size", FLIPS_CONFIRMED, "solver_changes")


def _attack_settings(folder: Path) -> dict[str, Any]:
    """An attack's settings (its ``config.json``) that every run of a comparison must share."""
    import json

    from ..attack.files import ATTACK_CONFIG_FILE

    path = folder / ATTACK_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {ATTACK_CONFIG_FILE}: not written by 'ode-bert attack'")
    saved = json.loads(path.read_text())
    return {k: v for k, v in saved.items() if k not in _RUN_SPECIFIC_ATTACK_SETTINGS}


def unconfirmed_flips(folder: Path, examples: list[int] | None = None) -> list[int] | None:
    """For a PGD attack of an implicit model written before flips were confirmed on the target (settings
    without ``flips_confirmed_on_target``): per radius, the examples counted as not robust only through
    white-box flips, which were read from the model's autograd forward (``g(z*)`` for ``one_step`` and
    ``implicit`` layers, not the evaluated ``z*``): how far its robust accuracy may be understated.
    ``None`` where nothing is in doubt (confirmed flips, no implicit layers, or no such flips). ``folder``:
    the attack's (``attack.files.attack_folder``); ``examples``: count among these example indices only
    (default: all attacked)."""
    import json

    from ..attack.files import (
        ATTACK_CONFIG_FILE,
        COSTS_FILE,
        RECORDS_FILE,
        SUMMARY_FILE,
        read_records,
    )

    settings = json.loads((folder / ATTACK_CONFIG_FILE).read_text())
    if "radii" not in settings or settings.get(FLIPS_CONFIRMED):
        return None
    if (folder / SUMMARY_FILE).is_file():
        sources = json.loads((folder / SUMMARY_FILE).read_text()).get("sources") or []
    else:  # unfinished: the first chunk's costs name the gradient sources
        first = (folder / COSTS_FILE).read_text().splitlines()[:1] if (folder / COSTS_FILE).is_file() else []
        sources = json.loads(first[0]).get("sources", []) if first else []
    if "unroll" not in sources:  # no implicit layers, or unrolled ones: one forward with and without autograd
        return None
    records = read_records(folder / RECORDS_FILE)
    if examples is not None:
        records = [r for r in records if r["index"] in set(examples)]
    counts = [
        sum(1 for r in records if r["clean_correct"] and "white-box" in r["flipped_by"][: k + 1]
            and not {b for b in r["flipped_by"][: k + 1] if b is not None} - {"white-box"})
        for k in range(len(settings["radii"]))
    ]  # fmt: skip
    return counts if any(counts) else None


def flips_by_source(folder: Path, examples: list[int]) -> dict[str, list[int]]:
    """PGD: per gradient source, how many of ``examples`` the attack in ``folder`` flipped first at each grid
    radius (records' ``flipped_by``); a source that flips little beside the others is one whose gradients
    mislead."""
    import json

    from ..attack.files import ATTACK_CONFIG_FILE, RECORDS_FILE, read_records

    radii = json.loads((folder / ATTACK_CONFIG_FILE).read_text())["radii"]
    wanted = set(examples)
    records = [r for r in read_records(folder / RECORDS_FILE) if r["index"] in wanted and r["clean_correct"]]
    names = sorted({b for r in records for b in r["flipped_by"] if b is not None})
    return {name: [sum(r["flipped_by"][k] == name for r in records) for k in range(len(radii))]
            for name in names}  # fmt: skip


def _source_lines(attacks: list[AttackedRun], group: str, examples: list[int], config: Any) -> list[str]:
    """Flips per gradient source, summed over the seeds of each variant of ``group`` that has several
    sources (implicit layers: white-box, unroll, transfer), one line per variant."""
    totals: dict[str, dict[str, list[int]]] = {}
    for attacked in attacks:
        if attacked.group != group:
            continue
        for name, counts in flips_by_source(attacked.folder, examples).items():
            mine = totals.setdefault(attacked.variant, {}).setdefault(name, [0] * len(counts))
            totals[attacked.variant][name] = [a + b for a, b in zip(mine, counts)]
    lines = []
    radii = "/".join(f"{r:g}" for r in config.radii)
    for variant, by_source in totals.items():
        if len(by_source) > 1:
            parts = ", ".join(f"{name} {'/'.join(map(str, c))}" for name, c in sorted(by_source.items()))
            lines.append(f"Flipped first by each gradient source, {variant}, summed over seeds (radius "
                         f"{radii}): {parts}.")  # fmt: skip
    return [*lines, ""] if lines else []


def _flips_by_label(attacks: list[AttackedRun], group: str, examples: list[int]) -> list[str]:
    """Per variant of ``group``, over its seeds: how many of the clean-correct ``examples`` of each gold label
    a text attack flipped. An attack that can move one label only (garbling the second question of a QQP pair
    cannot make the pair more of a duplicate) leaves the other's answers standing, whatever the model."""
    from ..attack.files import RECORDS_FILE, read_records

    wanted = set(examples)
    counts: dict[str, dict[int, list[int]]] = {}
    for attacked in attacks:
        if attacked.group != group:
            continue
        for record in read_records(attacked.folder / RECORDS_FILE):
            if record["index"] in wanted and record["clean_correct"]:
                count = counts.setdefault(attacked.variant, {}).setdefault(record["label"], [0, 0])
                count[0] += 1
                count[1] += bool(record["flipped"])
    lines = ["Clean-correct answers flipped, by gold label (all seeds):", ""]
    for variant in sorted(counts, key=_variant_order):
        cells = [f"label {label}: {flipped} of {n} ({100 * flipped / n:.0f}%)"
                 for label, (n, flipped) in sorted(counts[variant].items())]  # fmt: skip
        lines.append(f"- {variant}: {', '.join(cells)}")
    return [*lines, ""]


def _paired_by_seed(
    a: dict[int, list[bool]], b: dict[int, list[bool]], label: str, too_close: list[str]
) -> str:
    """The difference ``a - b`` paired by seed with its t interval, marked † (and ``label`` with its p added
    to ``too_close``) where the seeds agree more closely than the examples' noise allows
    (``stats.variance_components``' seed_spread_p below ``SEED_SPREAD_ALPHA``)."""
    seeds = sorted(a)
    n = len(a[seeds[0]])
    cell = _interval(paired_difference([100 * sum(a[s]) / n for s in seeds],
                                       [100 * sum(b[s]) / n for s in seeds]))  # fmt: skip
    spread_p = variance_components(a, b)["seed_spread_p"] if len(seeds) > 1 and n > 1 else None
    if spread_p is not None and spread_p < SEED_SPREAD_ALPHA:
        too_close.append(f"{label} p = {spread_p:.2g}")
        return cell + " †"
    return cell


def _too_close_note(too_close: list[str]) -> list[str]:
    """The note under a table with † cells (``_paired_by_seed``), or nothing."""
    if not too_close:
        return []
    return [f"† The seeds' differences agree more closely than the examples' own noise allows "
            f"({', '.join(too_close)}: `stats.variance_components`, seed_spread_p): this t interval is "
            "narrower than the data support; read the one by example and seed.", ""]


def format_attack_report(run_dirs: list[Path], config: Any, pairs: list[tuple[str, str]],
                         baseline: str = BASELINE, partial: bool = False) -> str:  # fmt: skip
    """Markdown tables of one attack over runs: per variant, mean ± std over seeds of every metric (clean,
    robust accuracy per radius or accuracy under attack, in %) and the paired (same seed) difference to
    ``baseline`` with its 95% t interval; then for each pair ``A:B``, the difference paired by seed (t) and by
    example and seed (crossed bootstrap), and McNemar's test pooled over seeds and examples. ``partial``: an
    interim report of unfinished attacks, on the examples every run of a group has completed."""
    from ..attack.files import SUMMARY_FILE
    from ..attack.runner import resolve_split
    from ..train import read_train_config

    task = read_train_config(Path(run_dirs[0]))["task"]
    split = resolve_split(task, config.split)
    attacks, left_out = attacked_runs(run_dirs, split, config.recipe, partial)
    outcomes = _outcomes(attacks, partial)
    unfinished = any(not (a.folder / SUMMARY_FILE).is_file() for a in attacks)
    pairs = [*pairs, *_solver_change_pairs(attacks, pairs)]

    def sources(group: str, examples: list[int]) -> list[str]:
        if config.is_pgd:
            return _source_lines(attacks, group, examples, config)
        return _flips_by_label(attacks, group, examples)

    lines = _outcome_tables(outcomes, config.recipe, pairs, baseline, partial and unfinished, sources)
    doubts = {a.name: unconfirmed_flips(a.folder, outcomes[a.group]["_examples"]) for a in attacks}
    doubts = {name: counts for name, counts in doubts.items() if counts}
    if doubts:
        lines += ["**Warning: white-box flips not confirmed on the evaluated model** (attacked before "
                  "ode-bert confirmed them): robust accuracy may be understated by up to these examples per "
                  "radius; attack again in a new folder for exact figures.", ""]  # fmt: skip
        radii = ", ".join(f"{r:g}" for r in config.radii)
        lines += [f"- {run}: {', '.join(map(str, counts))} examples (radii {radii})"
                  for run, counts in doubts.items()]  # fmt: skip
        lines.append("")
    if left_out:
        lines += [f"Left out, attacks with solver changes not finished (no summary.json yet): "
                  f"{', '.join(left_out)}", ""]  # fmt: skip
    return "\n".join(lines)


WORST_CASE = "under every attack"


def worst_case_outcomes(
    run_dirs: list[Path], split: str, recipes: list[str], partial: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """(outcomes, left out): ``attack_outcomes`` of several text recipes combined per example, ``clean`` and
    ``under every attack`` (correct and flipped by none of them: the robust accuracy against the strongest
    recipe for each example), and the runs (``<group>/<variant>-seed<seed>``, with solver changes
    ``<variant>@<changes>``) that some recipe has not attacked, left out. Every run must have been attacked
    on the same examples by each recipe, and its clean outcome must be the same in each (the same model on
    the same sentences); a ``ValueError`` names what does not match."""
    per_recipe = {recipe: attack_outcomes(run_dirs, split, recipe, partial) for recipe in recipes}
    return _combine_worst_case(per_recipe, partial)


def _combine_worst_case(
    per_recipe: dict[str, dict[str, Any]], partial: bool
) -> tuple[dict[str, Any], list[str]]:
    """``worst_case_outcomes`` from each recipe's ``attack_outcomes``."""
    recipes = list(per_recipe)
    if len(recipes) < 2:
        raise ValueError(f"worst case: give two or more different recipes, got {recipes}")
    for recipe, outcomes in per_recipe.items():
        metrics = {m for entry in outcomes.values() for v, runs in entry.items() if v != "_examples"
                   for outcome in runs.values() for m in outcome}  # fmt: skip
        if metrics != {"clean", "under attack"}:
            raise ValueError(f"worst case: {recipe} is not a text recipe (its metrics: {sorted(metrics)}); "
                             "combine text recipes (deepwordbug, pwws)")  # fmt: skip
    first, *others = recipes
    combined: dict[str, Any] = {}
    runs_of = {recipe: {(g, v, s) for g, entry in outcomes.items() for v, runs in entry.items()
                        if v != "_examples" for s in runs}  # fmt: skip
               for recipe, outcomes in per_recipe.items()}
    everywhere = set.intersection(*runs_of.values())
    left_out = sorted(f"{g}/{v}-seed{s}" for g, v, s in set.union(*runs_of.values()) - everywhere)
    for group in sorted({g for g, _, _ in everywhere}):
        examples = per_recipe[first][group]["_examples"]
        for recipe in others:
            theirs = per_recipe[recipe][group]["_examples"]
            n = min(len(examples), len(theirs)) if partial else len(examples)
            if theirs[:n] != examples[:n] or (not partial and len(theirs) != n):
                raise ValueError(f"group {group}: {recipe} attacked other examples than {first}; attack with "
                                 "the same --split and --limit")  # fmt: skip
            examples = examples[:n]
        out = combined.setdefault(group, {"_examples": examples})
        for _, variant, seed in sorted(k for k in everywhere if k[0] == group):
            each = {recipe: per_recipe[recipe][group][variant][seed] for recipe in recipes}
            name = f"{group}/{variant}-seed{seed}"
            out.setdefault(variant, {})[seed] = _worst_case(each, len(examples), name)
    return combined, left_out


def _worst_case(outcomes: dict[str, dict[str, list[bool]]], n: int, name: str) -> dict[str, list[bool]]:
    """One run's ``clean`` and ``under every attack`` on its first ``n`` examples from its outcomes per
    recipe, whose clean outcomes must agree."""
    (first, mine), *others = outcomes.items()
    clean = mine["clean"][:n]
    for recipe, theirs in others:
        if theirs["clean"][:n] != clean:
            raise ValueError(f"{name}: the clean predictions of {recipe} and {first} differ; were both "
                             "attacked with the same solver settings?")  # fmt: skip
    robust = [all(outcome["under attack"][i] for outcome in outcomes.values()) for i in range(n)]
    return {"clean": clean, WORST_CASE: robust}


def format_worst_case_report(run_dirs: list[Path], split: str, recipes: list[str],
                             pairs: list[tuple[str, str]], baseline: str = BASELINE,
                             partial: bool = False) -> str:  # fmt: skip
    """``format_attack_report``'s tables for ``worst_case_outcomes``: accuracy under the strongest of several
    text recipes per example, paired by seed and by example and seed."""
    from ..attack.files import SUMMARY_FILE

    attacks = {recipe: attacked_runs(run_dirs, split, recipe, partial)[0] for recipe in recipes}
    outcomes, left_out = _combine_worst_case({r: _outcomes(a, partial) for r, a in attacks.items()}, partial)
    unfinished = partial and any(not (a.folder / SUMMARY_FILE).is_file() for runs in attacks.values()
                                 for a in runs)  # fmt: skip
    title = f"every one of {', '.join(recipes)}"
    lines = _outcome_tables(outcomes, title, pairs, baseline, unfinished, lambda group, examples: [])
    if left_out:
        lines += [f"Left out, not attacked with every recipe: {', '.join(left_out)}", ""]
    return "\n".join(lines)


def _outcome_tables(outcomes: dict[str, Any], title: str, pairs: list[tuple[str, str]], baseline: str,
                    interim: bool, extra: Callable[[str, list[int]], list[str]]) -> list[str]:  # fmt: skip
    """The lines of the attack tables of ``outcomes`` (``attack_outcomes``): per group, the variants' means
    and differences to ``baseline``, ``extra(group, examples)``, then each pair of ``pairs`` by seed and by
    example and seed; a closing line names the pairs no group has."""
    reported: set[tuple[str, str]] = set()
    lines = []
    for group, entry in outcomes.items():
        n = len(entry["_examples"])
        variants = sorted((v for v in entry if v != "_examples"), key=_variant_order)
        metrics = list(next(iter(entry[variants[0]].values())))
        scope = " completed by every run (interim report)" if interim else ""
        lines += [f"### {group}: {title}, {n} examples{scope} (scores in %)", "",
                  "| variant | seeds | " + " | ".join(f"{m} | Δ {m} vs {baseline}" for m in metrics) + " |",
                  "|---|---|" + "---|---|" * len(metrics)]  # fmt: skip
        too_close: list[str] = []
        for variant in variants:
            runs = entry[variant]
            cells = []
            for metric in metrics:
                values = [100 * sum(runs[s][metric]) / n for s in sorted(runs)]
                std = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
                cells.append(f"{statistics.fmean(values):.2f}{std}")
                shared = sorted(set(runs) & set(entry.get(baseline, {})))
                if variant == baseline or not shared:
                    cells.append("baseline" if variant == baseline else "-")
                else:
                    cells.append(_paired_by_seed({s: runs[s][metric] for s in shared},
                                                 {s: entry[baseline][s][metric] for s in shared},
                                                 f"{variant} {metric}", too_close))  # fmt: skip
            lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
        lines += ["", *_too_close_note(too_close)]
        lines += extra(group, entry["_examples"])
        for a, b in pairs:
            shared = sorted(set(entry.get(a, {})) & set(entry.get(b, {})))
            if not shared:
                continue
            reported.add((a, b))
            noise = "" if len(shared) > 1 else " (one seed: the bootstrap resamples examples only)"
            lines += [f"{a} − {b}, {len(shared)} shared seed(s){noise}:", "",
                      "| metric | Δ by seed [95% t CI] | by seed: t test p; sign test "
                      "| Δ by example and seed [95% bootstrap CI] | McNemar (only A / only B, p) |",
                      "|---|---|---|---|---|"]  # fmt: skip
            too_close = []
            for metric in metrics:
                xa = {s: entry[a][s][metric] for s in shared}
                xb = {s: entry[b][s][metric] for s in shared}
                by_seed = _paired_by_seed(xa, xb, metric, too_close)
                tests = _tests_cell([100 * (sum(xa[s]) - sum(xb[s])) / n for s in shared])
                boot = bootstrap_over_examples_and_seeds(xa, xb)
                test = mcnemar([x for s in shared for x in xa[s]], [x for s in shared for x in xb[s]])
                boot_cell = f"{boot['mean']:+.2f} [{boot['ci_low']:+.2f}, {boot['ci_high']:+.2f}]"
                lines.append(f"| {metric} | {by_seed} | {tests} | {boot_cell} | {test['only_a']} / "
                             f"{test['only_b']}, p = {test['p_value']:.3g} |")  # fmt: skip
            lines += ["", *_too_close_note(too_close)]
    missing = [f"{a} − {b}" for a, b in pairs if (a, b) not in reported]
    if missing:
        found = {v for entry in outcomes.values() for v in entry} - {"_examples"}
        variants = sorted(found, key=_variant_order)
        lines += [f"No paired comparison for {', '.join(missing)}: no group has both with a shared seed "
                  f"(variants: {', '.join(variants)}; --pairs A:B names them)", ""]  # fmt: skip
    return lines


def _solver_change_pairs(attacks: list[AttackedRun], pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """``<variant>@<changes>:<variant>`` for every attack with solver changes whose variant was attacked with
    its trained settings too (what the changes alone do), unless ``pairs`` has it already."""
    variants = {a.variant for a in attacks}
    wanted = sorted({(a.variant, a.run_variant) for a in attacks
                     if a.changes is not None and a.run_variant in variants})  # fmt: skip
    return [pair for pair in wanted if pair not in pairs]


def record_run_folders(
    results_paths: list[Path], records: list[dict[str, Any]]
) -> dict[tuple[str, str, int], Path]:
    """The run folder of each record (group, variant, seed) found beside the ``results.jsonl`` files that
    hold the records: ``<folder>/<group>/<variant>-seed<seed>`` (``ode-bert experiment``) or
    ``<folder>/<variant>-seed<seed>`` (``ode-bert compare``). Records without a folder there are left out; a
    run found in two different folders is a ``ValueError`` naming both."""
    found: dict[tuple[str, str, int], Path] = {}
    for record in records:
        key = (record["group"], record["variant"], record["seed"])
        name = f"{record['variant']}-seed{record['seed']}"
        candidates = {(Path(p).parent / sub / name).resolve(): Path(p).parent / sub / name
                      for p in results_paths for sub in (record["group"], ".")}  # fmt: skip
        folders = [path for path in candidates.values() if (path / "train_config.json").is_file()]
        if len(folders) > 1:
            raise ValueError(f"run {name} of group {record['group']} is in several folders "
                             f"({', '.join(map(str, folders))}); report one results.jsonl at a time")
        if folders:
            found[key] = folders[0]
    return found


def format_attack_sections(results_paths: list[Path], records: list[dict[str, Any]],
                           pairs: list[tuple[str, str]], baseline: str = BASELINE) -> str:  # fmt: skip
    """The attack columns of an experiment report: for each attack (split and recipe) that run folders of
    ``records`` hold (``record_run_folders``), ``format_attack_report`` over the runs that finished it (per
    variant, mean ± std over seeds of clean and robust accuracy per radius or accuracy under attack, the
    paired difference to ``baseline``, and per pair the differences by seed and by example); the runs of
    those groups without the attack, or with it unfinished (no ``summary.json``), are named below. Empty
    when no run folder holds an attack. Runs of a group attacked on other examples or with other settings
    are refused (``ValueError``), as the attack report refuses them."""
    import json
    from types import SimpleNamespace

    from ..attack.files import ATTACK_CONFIG_FILE, ATTACKS_DIR, SUMMARY_FILE, attack_folder

    folders = record_run_folders(results_paths, records)
    attacks: dict[tuple[str, str], dict[str, list[Path]]] = {}
    groups = {run_dir: group for (group, _, _), run_dir in folders.items()}
    for run_dir in folders.values():
        for folder in sorted((run_dir / ATTACKS_DIR).glob(f"*/{ATTACK_CONFIG_FILE}")):
            saved = json.loads(folder.read_text())
            state = "finished" if (folder.parent / SUMMARY_FILE).is_file() else "unfinished"
            attacks.setdefault((saved["split"], saved["recipe"]), {"finished": [], "unfinished": []})
            attacks[saved["split"], saved["recipe"]][state].append(run_dir)
    parts = []
    for (split, recipe), runs in sorted(attacks.items()):
        finished, unfinished = runs["finished"], runs["unfinished"]
        attacked_groups = {groups[d] for d in finished + unfinished}
        missing = [d for d, g in groups.items() if g in attacked_groups and d not in finished + unfinished]
        parts.append(f"## Attack {recipe} on {split} ({ATTACKS_DIR}/{split}-{recipe} of the run folders)\n")
        if finished:
            saved = json.loads((attack_folder(finished[0], split, recipe) / ATTACK_CONFIG_FILE).read_text())
            config = SimpleNamespace(split=split, recipe=recipe, is_pgd="radii" in saved,
                                     radii=saved.get("radii"))  # fmt: skip
            parts.append(format_attack_report(finished, config, pairs, baseline))
        for label, dirs in (("unfinished (no summary.json yet)", unfinished), ("not attacked", missing)):
            if dirs:
                names = ", ".join(f"{d.parent.name}/{d.name}" for d in sorted(dirs))
                parts.append(f"Left out, {label}: {names}\n")
    return "\n".join(parts)


def plot_growth_vs_robustness(points: list[dict[str, Any]], path: Path, title: str) -> dict[str, Any]:
    """Scatter of each fine-tuned model's perturbation growth (x: e.g. the last layer's worst-direction growth
    from ``stability_analysis.perturbation_growth``) against its robust accuracy (y, %), one colour per
    variant, with Pearson's r and its 95% interval in the title; written atomically as PNG. ``points``:
    dicts with ``variant``, ``growth``, ``robust``. Returns the correlation (``stats.correlation``)."""
    result = correlation([p["growth"] for p in points], [p["robust"] for p in points])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.8))
    for variant in sorted({p["variant"] for p in points}, key=_variant_order):
        mine = [p for p in points if p["variant"] == variant]
        ax.scatter([p["growth"] for p in mine], [p["robust"] for p in mine], label=_display(variant))
    interval = "" if result["ci_low"] is None else f" [{result['ci_low']:.2f}, {result['ci_high']:.2f}]"
    ax.set_title(f"{title}\nPearson r = {result['r']:.2f}{interval} (95%, Fisher z), n = {result['n']}",
                 fontsize=9)  # fmt: skip
    ax.set_xlabel("perturbation growth (last layer / input)")
    ax.set_ylabel("robust accuracy (%)")
    ax.legend()
    fig.tight_layout()
    with atomic_open(Path(path), "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return result
