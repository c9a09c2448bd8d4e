"""Paired statistics over seeds (the mean per-seed difference to a baseline with its 95% t interval, t and
sign tests), failure counts (Fisher's exact test) and over examples and seeds (crossed bootstrap, McNemar,
variance components and the intervals they project)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

# What every run is scored on (``metrics.json`` keys) and how tables call it.
METRICS = {"clean": "clean dev", "advglue": "AdvGLUE"}

# ``variance_components``' seed_spread_p below this (the lower tail of a two-sided 5% test): the seeds agree
# more closely than the examples' noise allows, and reports flag the t interval over seeds
SEED_SPREAD_ALPHA = 0.025


def paired_difference(values: Sequence[float], baseline: Sequence[float]) -> dict[str, float | None]:
    """Mean of the per-seed differences ``values - baseline`` with a 95% t confidence interval.

    With a single seed there is no interval (``None``).
    """
    diffs = [v - b for v, b in zip(values, baseline, strict=True)]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": len(diffs)}
    from scipy import stats  # 0.9 s to import: only when an interval is computed, not for --help

    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(diffs)}


def t_test(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of the one-sample t test that the mean of ``differences`` is 0 (the test behind
    ``paired_difference``'s interval); ``None`` below 2 values or when they are all equal. For a direction
    stated in advance, the one-sided p is half of it when the mean goes that way."""
    if len(differences) < 2 or len(set(differences)) == 1:
        return None
    from scipy import stats

    return float(stats.ttest_1samp(differences, 0.0).pvalue)


def sign_test(differences: Sequence[float]) -> dict[str, float | int]:
    """The two-sided sign test of the nonzero ``differences`` (ties left out): how many are positive and
    negative, and the binomial p of that split (McNemar's exact test, ``mcnemar``, on the two signs)."""
    test = mcnemar([d > 0 for d in differences], [d < 0 for d in differences])
    return {"higher": test["only_a"], "lower": test["only_b"], "p_value": test["p_value"]}


def fisher_exact(failed_a: int, runs_a: int, failed_b: int, runs_b: int) -> float:
    """Two-sided p-value of Fisher's exact test that two variants fail (e.g. ``report.not_learned``) at the
    same rate, from ``failed_a`` of ``runs_a`` and ``failed_b`` of ``runs_b`` runs."""
    if not (0 <= failed_a <= runs_a and 0 <= failed_b <= runs_b):
        raise ValueError(f"failures must lie between 0 and the runs, got {failed_a} of {runs_a} and "
                         f"{failed_b} of {runs_b}")
    from scipy import stats

    table = [[failed_a, runs_a - failed_a], [failed_b, runs_b - failed_b]]
    return float(stats.fisher_exact(table).pvalue)


def summarize(
    scores: dict[str, dict[int, dict[str, float]]], baseline: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per variant and metric: mean, sample std and the paired difference to ``baseline`` (in points).

    ``scores`` is variant -> seed -> metric -> score (a fraction); every variant has the baseline's seeds.
    """
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


def by_group(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """Run records (``records.result_line``) as group -> variant -> seed -> record."""
    groups: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in records:
        groups.setdefault(r["group"], {}).setdefault(r["variant"], {})[r["seed"]] = r
    return groups


def summarize_groups(records: list[dict[str, Any]], baseline: str = "bert") -> dict[str, Any]:
    """Per group: mean, std and paired difference to ``baseline`` over the seeds each variant shares with it,
    the seeds, the mean wall time and the AdvGLUE solver statistics; groups without the baseline are left
    out."""
    summary: dict[str, Any] = {}
    for name, by_variant in by_group(records).items():
        baseline_seeds = set(by_variant.get(baseline, {}))
        scores = {
            v: {s: {m: r[m]["overall"] for m in METRICS} for s, r in runs.items() if s in baseline_seeds}
            for v, runs in by_variant.items()
        }
        scores = {v: s for v, s in scores.items() if s}
        if baseline not in scores:
            continue
        stats_ = summarize(scores, baseline)
        for v, runs in by_variant.items():
            if v not in stats_:
                continue
            kept = [runs[s] for s in sorted(scores[v])]
            seconds = [r["seconds"] for r in kept if r["seconds"] is not None]
            stats_[v]["seeds"] = sorted(scores[v])
            stats_[v]["mean_seconds"] = sum(seconds) / len(seconds) if seconds else None
            # explicit connections have no solve to report (no residual)
            solver = [r["advglue"]["solver"] for r in kept
                      if r["advglue"]["solver"] and r["advglue"]["solver"]["max_rel_residual"] is not None]
            if solver:
                stats_[v]["advglue_solver"] = {
                    "converged_fraction": sum(s["converged_fraction"] for s in solver) / len(solver),
                    "mean_iterations": sum(s["mean_iterations"] for s in solver) / len(solver),
                    "max_rel_residual": max(s["max_rel_residual"] or 0.0 for s in solver),
                }
        first = next(iter(by_variant[baseline].values()))
        summary[name] = {"variants": stats_, "constant": {m: 100 * first[m]["constant"] for m in METRICS}}
    return summary


def _paired_differences(
    a: dict[int, Sequence[float]], b: dict[int, Sequence[float]], min_seeds: int, min_examples: int
) -> Any:
    """``a - b`` per shared seed (rows, in seed order) and example (columns) as a float array; fewer than
    ``min_seeds`` shared seeds, or rows of other lengths or with fewer than ``min_examples`` examples, are a
    ``ValueError``."""
    import numpy as np

    seeds = sorted(set(a) & set(b))
    if len(seeds) < min_seeds:
        plural = "s" if min_seeds > 1 else ""
        raise ValueError(f"need at least {min_seeds} seed{plural} shared by the two variants, got "
                         f"{len(seeds)}")  # fmt: skip
    lengths = {len(x[s]) for s in seeds for x in (a, b)}
    if len(lengths) != 1 or min(lengths) < min_examples:
        plural = "s" if min_examples > 1 else ""
        raise ValueError(f"every seed needs the same list of at least {min_examples} example{plural}, got "
                         f"lengths {sorted(lengths)}")  # fmt: skip
    return np.array([np.asarray(a[s], dtype=float) - np.asarray(b[s], dtype=float) for s in seeds])


def bootstrap_over_examples_and_seeds(
    a: dict[int, Sequence[float]], b: dict[int, Sequence[float]], samples: int = 2000, seed: int = 0
) -> dict[str, float | int]:
    """Mean of ``a - b`` over seeds and examples, in points, with a 95% percentile interval from a crossed
    bootstrap: seeds and examples are resampled independently (the same resampled examples for every seed,
    since every seed is scored on the same examples), so the interval reflects both sources of noise.

    ``a`` and ``b`` map seed -> per-example outcome (e.g. 1 = robust), the same examples in the same order.
    """
    import numpy as np

    diffs = _paired_differences(a, b, min_seeds=1, min_examples=1)
    rng = np.random.default_rng(seed)
    n_seeds, n_examples = diffs.shape
    means = np.empty(samples)
    for k in range(samples):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = rng.integers(0, n_examples, n_examples)
        means[k] = diffs[np.ix_(rows, cols)].mean()
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": 100 * float(diffs.mean()), "ci_low": 100 * float(low), "ci_high": 100 * float(high),
            "seeds": n_seeds, "examples": n_examples}  # fmt: skip


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict[str, float | int]:
    """McNemar's exact test on paired 0/1 outcomes: the discordant pairs (``a`` right and ``b`` wrong, and the
    reverse) and the two-sided binomial p-value of their split."""
    if len(a) != len(b):
        raise ValueError(f"need paired outcomes, got {len(a)} and {len(b)}")
    from scipy import stats

    only_a = sum(bool(x) and not bool(y) for x, y in zip(a, b))
    only_b = sum(bool(y) and not bool(x) for x, y in zip(a, b))
    p = stats.binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": float(p)}


def correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
    """Pearson's r of paired values with a 95% interval from Fisher's z transform (``None`` below 4 points,
    where the transform's standard error ``1 / sqrt(n - 3)`` is undefined or useless), and its p-value."""
    if len(x) != len(y) or len(x) < 3:
        raise ValueError(f"need at least 3 paired values, got {len(x)} and {len(y)}")
    from scipy import stats

    r, p = stats.pearsonr(x, y)
    r = float(r)
    if len(x) < 4 or abs(r) == 1.0:
        return {"r": r, "ci_low": None, "ci_high": None, "p_value": float(p), "n": len(x)}
    half = stats.norm.ppf(0.975) / math.sqrt(len(x) - 3)
    z = math.atanh(r)
    return {"r": r, "ci_low": math.tanh(z - half), "ci_high": math.tanh(z + half), "p_value": float(p),
            "n": len(x)}  # fmt: skip


def variance_components(
    a: dict[int, Sequence[float]], b: dict[int, Sequence[float]]
) -> dict[str, float | int | None]:
    """Where the noise of a paired comparison comes from: the per-example differences ``a - b`` (seed ->
    outcomes on the same examples, as in ``bootstrap_over_examples_and_seeds``) split by the crossed two-way
    random-effects ANOVA (one outcome per seed and example) into a seed part (how the difference moves from
    one seed to the next), an example part (how it moves from one example to the next, the same for every
    seed) and the rest, in points squared; a part whose estimate is negative is reported as 0. What
    ``projected_half_widths`` extrapolates from; with few seeds the seed part is itself rough (S - 1 degrees
    of freedom).

    ``seed_spread_p``: how likely per-seed differences agree as closely as these do if the seed part were 0
    (the F ratio of the seed and remaining mean squares, lower tail). A small value means the seeds agree
    more closely than the examples' own noise allows: the paired t interval over seeds is then narrower than
    the data support, by chance, and the interval by example and seed is the one to read."""
    from scipy import stats

    diffs = 100 * _paired_differences(a, b, min_seeds=2, min_examples=2)
    n_seeds, n_examples = diffs.shape
    grand = diffs.mean()
    seed_means, example_means = diffs.mean(axis=1), diffs.mean(axis=0)
    ms_seed = n_examples * float(((seed_means - grand) ** 2).sum()) / (n_seeds - 1)
    ms_example = n_seeds * float(((example_means - grand) ** 2).sum()) / (n_examples - 1)
    residuals = diffs - seed_means[:, None] - example_means[None, :] + grand
    ms_residual = float((residuals**2).sum()) / ((n_seeds - 1) * (n_examples - 1))
    spread_p = (float(stats.f.cdf(ms_seed / ms_residual, n_seeds - 1, (n_seeds - 1) * (n_examples - 1)))
                if ms_residual > 0 else None)  # fmt: skip
    return {"mean": float(grand), "seed": max(0.0, (ms_seed - ms_residual) / n_examples),
            "example": max(0.0, (ms_example - ms_residual) / n_seeds), "residual": ms_residual,
            "seed_spread_p": spread_p, "seeds": n_seeds, "examples": n_examples}  # fmt: skip


def projected_half_widths(components: dict[str, Any], seeds: int, examples: int) -> dict[str, float]:
    """The 95% half-widths (points) a comparison with ``components`` (``variance_components``) would get with
    ``seeds`` seeds and ``examples`` examples: ``by_seed``, the paired t interval over seeds on one fixed set
    of examples (``paired_difference``), whose noise is the seed part and the rest; ``by_example_and_seed``,
    the normal interval with examples drawn anew too (what ``bootstrap_over_examples_and_seeds`` estimates),
    which adds the example part. At the measured seeds and examples ``by_seed`` is the measured t interval's
    half-width (unless the seed part was clipped at 0)."""
    if seeds < 2 or examples < 1:
        raise ValueError(f"need at least 2 seeds and 1 example, got {seeds} and {examples}")
    from scipy import stats

    seed, example, residual = components["seed"], components["example"], components["residual"]
    by_seed = stats.t.ppf(0.975, seeds - 1) * math.sqrt((seed + residual / examples) / seeds)
    crossed_variance = seed / seeds + example / examples + residual / (seeds * examples)
    crossed = stats.norm.ppf(0.975) * math.sqrt(crossed_variance)
    return {"by_seed": float(by_seed), "by_example_and_seed": float(crossed)}
