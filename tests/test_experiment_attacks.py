"""``ode-bert experiment --report`` with attacks: the attack columns of the runs the records name, read from
run folders written by the attack runner's own functions (no model, no attack run)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from scipy import stats

from ode_bert import cli
from ode_bert.attack.files import FLIPS_CONFIRMED
from ode_bert.attack.runner import AttackConfig, summarize_records
from ode_bert.experiments.records import append_record
from ode_bert.io import atomic_open, write_json_atomic
from ode_bert.train import TrainConfig

GROUP = "sst2-n8"
PGD = AttackConfig(recipe="pgd-l2", radii=[0.01, 0.05], limit=4, batch_size=4)


def _record(variant: str, seed: int) -> dict[str, object]:
    """A run record as ``records.result_line`` writes it (the scores do not matter here)."""
    scores = {"overall": 0.8, "tasks": {}, "solver": None, "splits": {}, "constant": 0.5}
    return {"group": GROUP, "task": "sst2", "variant": variant, "settings": {"variant": variant},
            "seed": seed, "train_samples": 8, "seconds": 10.0, "clean": scores, "advglue": scores}


def _attacked(out: Path, variant: str, seed: int, robust: list[int] | None, finished: bool = True,
              indices: tuple[int, ...] = (0, 1, 2, 3), config: AttackConfig = PGD) -> Path:  # fmt: skip
    """A run folder ``out/<group>/<variant>-seed<seed>`` with a PGD attack's files as the runner writes them:
    per example, ``robust`` gives the largest radius index it resists (-1: flipped at the first radius, -2:
    wrong when clean); ``None``: no attack."""
    run_dir = out / GROUP / f"{variant}-seed{seed}"
    write_json_atomic(
        run_dir / "train_config.json", TrainConfig(task="sst2", variant=variant, seed=seed).to_json()
    )
    append_record(out, _record(variant, seed))
    if robust is None:
        return run_dir
    records = []
    for k, (index, last) in enumerate(zip(indices, robust, strict=True)):
        flipped = [None if i <= last else "white-box" for i in range(len(config.radii))]
        records.append({"index": index, "label": 1, "clean_correct": last > -2, "flipped_by": flipped,
                        "min_radius": 0.03, "chunk_size": 4, "last_in_chunk": k == 3})  # fmt: skip
    folder = run_dir / "attacks" / "sst2-pgd-l2"
    write_json_atomic(folder / "config.json", {**config.to_json(), "split": "sst2", "n": 4})
    with atomic_open(folder / "records.jsonl") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if finished:
        write_json_atomic(folder / "summary.json", summarize_records(records, config))
    return run_dir


def _t_interval(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}]"


def test_experiment_report_adds_attack_columns_and_refuses_unpaired_attacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Robust accuracy per radius (mean ± std over seeds) with the paired difference to BERT and between
    the pair by seed (t intervals by hand); unfinished and missing attacks are named; a run attacked on other
    examples or radii than its group is refused, naming it."""
    out = tmp_path / "grid"
    _attacked(out, "bert", 1, [1, 0, -1, -2])  # robust@0.01: 2 of 4, robust@0.05: 1 of 4
    _attacked(out, "bert", 2, [1, 1, -1, -2])  # 2, 2
    _attacked(out, "im", 1, [1, 1, 1, -2])  # 3, 3
    _attacked(out, "im", 2, [1, 1, 0, 1])  # 4, 3
    _attacked(out, "ex", 1, [1, 0, 0, -2])  # 3, 1
    _attacked(out, "ex", 2, [1, 1, 1, 1], finished=False)
    _attacked(out, "im", 3, None)
    confirmed = out / GROUP / "im-seed2" / "attacks" / "sst2-pgd-l2" / "config.json"
    write_json_atomic(confirmed, {**json.loads(confirmed.read_text()), FLIPS_CONFIRMED: True})  # pairs still
    results = str(out / "results.jsonl")
    assert cli.main(["experiment", "--report", results, "--pairs", "im:ex"]) == 0
    report = capsys.readouterr().out
    assert "## Attack pgd-l2 on sst2" in report and "### sst2-n8: pgd-l2, 4 examples (scores in %)" in report
    im_01, bert_01 = [75.0, 100.0], [50.0, 50.0]
    im_05, bert_05 = [75.0, 75.0], [25.0, 50.0]
    assert (
        f"| im | 2 | 87.50 ± 17.68 | {_t_interval([75.0 - 75.0, 100.0 - 75.0])} | "
        f"{statistics.fmean(im_01):.2f} ± {statistics.stdev(im_01):.2f} | "
        f"{_t_interval([a - b for a, b in zip(im_01, bert_01)])} | "
        f"75.00 ± 0.00 | {_t_interval([a - b for a, b in zip(im_05, bert_05)])} |"
    ) in report
    assert "| ex | 1 | 75.00 | +0.00 | 75.00 | +25.00 | 25.00 | +0.00 |" in report  # one seed: no interval
    assert "im − ex, 1 shared seed(s)" in report and "| robust@0.05 | +50.00 |" in report
    assert "Left out, unfinished (no summary.json yet): sst2-n8/ex-seed2" in report
    assert "Left out, not attacked: sst2-n8/im-seed3" in report
    assert "†" not in report  # seeds that differ as examples do: no t interval flagged

    _attacked(out, "ex", 2, [1, 1, 1, 1], indices=(0, 1, 2, 5))
    assert cli.main(["experiment", "--report", results]) == 2
    error = capsys.readouterr()
    assert (
        not error.out
        and "ex-seed2: attacked other examples than the other runs of group sst2-n8" in error.err
    )
    other_radii = AttackConfig(recipe="pgd-l2", radii=[0.01, 0.1], limit=4, batch_size=4)
    _attacked(out, "ex", 2, [1, 1, 1, 1], config=other_radii)
    assert cli.main(["experiment", "--report", results]) == 2
    error = capsys.readouterr().err
    assert "ex-seed2: attacked with other settings than" in error and "(differing: ['radii'])" in error


def test_attacks_of_implicit_models_with_unconfirmed_white_box_flips_are_flagged(tmp_path: Path) -> None:
    """Attacks from before flips were confirmed on the evaluated model: the examples counted as not robust
    only through white-box flips bound how far robust accuracy may be understated, counted by hand."""
    from ode_bert.experiments.report import flips_by_source, unconfirmed_flips

    run_dir = _attacked(tmp_path, "im", 1, [1, 0, -1, -2])
    folder = run_dir / "attacks" / "sst2-pgd-l2"
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    records[2]["flipped_by"] = ["unroll", "white-box"]  # flipped by another source first: not in doubt
    with atomic_open(folder / "records.jsonl") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = summarize_records(records, PGD)
    settings = json.loads((folder / "config.json").read_text())
    write_json_atomic(folder / "summary.json", {**summary, "sources": ["white-box", "transfer"]})
    assert unconfirmed_flips(folder) is None  # no unroll source: no implicit layers
    write_json_atomic(folder / "summary.json", {**summary, "sources": ["white-box", "unroll", "transfer"]})
    # example 1 flips by white-box at 0.05 only; example 2 is flipped by unroll first; example 3 is wrong
    assert unconfirmed_flips(folder) == [0, 1]
    assert unconfirmed_flips(folder, examples=[0, 2, 3]) is None
    # the first source to flip each correct example, per radius (example 2: unroll at 0.01, then white-box)
    assert flips_by_source(folder, [0, 1, 2, 3]) == {"unroll": [1, 0], "white-box": [0, 2]}
    write_json_atomic(folder / "config.json", {**settings, FLIPS_CONFIRMED: True})
    assert unconfirmed_flips(folder) is None  # attacked with confirmation


def test_interim_report_compares_unfinished_attacks_on_examples_every_run_completed(tmp_path: Path) -> None:
    """``partial``: an unfinished attack (one complete chunk of two examples) is compared with a finished one
    on those two examples; without it the unfinished run is refused."""
    from ode_bert.experiments.report import attack_outcomes

    done = _attacked(tmp_path, "bert", 1, [1, 0, -1, -2])
    running = _attacked(tmp_path, "ex", 1, [0, -1, 1, 1], finished=False)
    records_path = running / "attacks" / "sst2-pgd-l2" / "records.jsonl"
    records = [json.loads(line) for line in records_path.read_text().splitlines()][:2]
    records[1]["last_in_chunk"] = True  # one complete chunk of two examples, the rest not attacked yet
    with atomic_open(records_path) as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    with pytest.raises(FileNotFoundError, match="no finished attack"):
        attack_outcomes([done, running], "sst2", "pgd-l2")
    outcomes = attack_outcomes([done, running], "sst2", "pgd-l2", partial=True)[GROUP]
    assert outcomes["_examples"] == [0, 1]
    # robust: [1, 0] -> both resist 0.01, only the first 0.05; [0, -1] -> the first resists 0.01 only
    assert outcomes["bert"][1] == {"clean": [True, True], "robust@0.01": [True, True],
                                   "robust@0.05": [True, False]}  # fmt: skip
    assert outcomes["ex"][1] == {"clean": [True, True], "robust@0.01": [True, False],
                                 "robust@0.05": [False, False]}  # fmt: skip


def test_seeds_that_agree_more_closely_than_the_examples_allow_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every seed's difference is +50 points, but from rotating examples: a zero-width t interval that the
    examples' own noise cannot produce is marked † with its seed-spread p (0 here), and the projection tool
    reads the same runs (an ordinary spread is not marked: the first test)."""
    from bench import attack_power

    out = tmp_path / "grid"
    for seed in range(4):
        _attacked(out, "im", seed + 1, [-1 if i == seed else 1 for i in range(4)])  # 3 of 4 robust
        _attacked(out, "ex", seed + 1, [1 if i == (seed + 1) % 4 else -1 for i in range(4)])  # 1 of 4
    runs = [out / GROUP / f"{v}-seed{s}" for v in ("im", "ex") for s in range(1, 5)]
    assert cli.main(["experiment", "--report", str(out / "results.jsonl"), "--pairs", "im:ex"]) == 0
    report = capsys.readouterr().out
    # no t test of four equal differences; the sign test's p is 2 / 2**4 (all four seeds ahead)
    assert f"| robust@0.01 | +50.00 [+50.00, +50.00] † | n/a; 4 of 4 higher, p = {2 / 2**4:.2g} |" in report
    assert "(robust@0.01 p = 0, robust@0.05 p = 0: `stats.variance_components`" in report
    assert "| clean | +0.00 |" not in report  # no spread:
    assert "| clean | +0.00 [+0.00, +0.00] | n/a; 0 of 0 higher |" in report

    attack_power.main([*map(str, runs), "--recipe", "pgd-l2", "--pairs", "im:ex", "--seeds", "4", "8",
                       "--examples", "4", "--target", "60"])  # fmt: skip
    power = capsys.readouterr().out
    # the difference is 100 on two examples and 0 on two in every seed, every example 100 in two seeds: no
    # seed or example part, all of the 16 x 50² points² of squares is the rest, on 3 x 3 degrees of freedom
    rest = 16 * 50**2 / 9
    assert (f"| sst2-n8 | im - ex | robust@0.01 | 4 x 4 | +50.00 | 0.00 | 0.00 | {rest**0.5:.2f} | 0 |"
            in power)  # fmt: skip
    by_seed = stats.t.ppf(0.975, 3) * math.sqrt(rest / 4 / 4)  # 4 seeds, 4 examples
    assert f"| im - ex | robust@0.01 | ±{by_seed:.2f} / ±" in power
    fewest = next(s for s in range(2, 101) if stats.t.ppf(0.975, s - 1) * math.sqrt(rest / 4 / s) <= 60)
    assert power.splitlines()[-2].endswith(f"| {fewest} |")

    for bad, message in ((["--pairs", "im"], "--pairs takes A:B variant pairs"),
                         (["--pairs", "im:ex", "--seeds", "1"], "--seeds must be >= 2"),
                         ([*map(str, runs[:1] + runs[4:5]), "--pairs", "im:ex"], "need at least 2 seeds")):
        args = bad if bad[0] != "--pairs" else [*map(str, runs), *bad]
        with pytest.raises(SystemExit):
            attack_power.main([*args, "--recipe", "pgd-l2"])
        assert message in capsys.readouterr().err


def test_variance_components_recover_simulated_parts_and_reproduce_the_t_interval() -> None:
    """On simulated differences with known seed, example and remaining parts the crossed ANOVA recovers
    them; projected at the measured size, the by-seed half-width is the paired t interval's."""
    import numpy as np

    from ode_bert.experiments.stats import paired_difference, projected_half_widths, variance_components

    rng = np.random.default_rng(0)
    seeds, examples = 300, 400
    diffs = (rng.normal(0, 2, (seeds, 1)) + rng.normal(0, 3, (1, examples))
             + rng.normal(0, 5, (seeds, examples))) / 100  # points: sd 2, 3 and 5
    found = variance_components(dict(enumerate(diffs)), {s: [0.0] * examples for s in range(seeds)})
    assert found["seed"] ** 0.5 == pytest.approx(2, rel=0.1)
    assert found["example"] ** 0.5 == pytest.approx(3, rel=0.1)
    assert found["residual"] ** 0.5 == pytest.approx(5, rel=0.02)
    assert found["seed_spread_p"] > 0.05  # a real seed part: nothing to flag

    few = (rng.normal(0, 8, (5, 1)) + rng.normal(0, 30, (5, 60))) / 100
    parts = variance_components(dict(enumerate(few)), {s: [0.0] * 60 for s in range(5)})
    assert parts["seed"] > 0  # unclipped, so the projection at 5 x 60 is the measured interval exactly
    measured = paired_difference([100 * row.mean() for row in few], [0.0] * 5)
    projected = projected_half_widths(parts, 5, 60)
    assert projected["by_seed"] == pytest.approx(measured["ci_high"] - measured["mean"], rel=1e-9)
    wider, more = projected_half_widths(parts, 5, 600), projected_half_widths(parts, 20, 60)
    assert wider["by_seed"] < projected["by_seed"] and more["by_seed"] < projected["by_seed"]
    assert projected["by_example_and_seed"] > projected_half_widths({**parts, "example": 0.0}, 5, 60)[
        "by_example_and_seed"]  # fmt: skip
    with pytest.raises(ValueError, match="at least 2 seeds"):
        variance_components({1: [1, 0]}, {1: [0, 0]})
    with pytest.raises(ValueError, match=r"same list of at least 2 examples, got lengths \[2, 3\]"):
        variance_components({1: [1, 0], 2: [1, 0, 1]}, {1: [0, 0], 2: [0, 0, 0]})
    with pytest.raises(ValueError, match="at least 2 seeds and 1 example"):
        projected_half_widths(parts, 1, 60)


def _text_attacked(out: Path, variant: str, seed: int, recipe: str, outcome: str,
                   indices: tuple[int, ...] = (0, 1, 2, 3), changes: dict | None = None,
                   labels: tuple[int, ...] = (1, 1, 1, 1)) -> Path:  # fmt: skip
    """A run folder (its model's config a stand-in) with a text recipe's files as the runner writes them (with
    ``changes``: attacked with those solver settings); per example of ``outcome``: ``w`` wrong when clean,
    ``f`` flipped, ``r`` resisted; its gold label from ``labels``."""
    from ode_bert.attack.files import attack_folder

    run_dir = out / GROUP / f"{variant}-seed{seed}"
    write_json_atomic(
        run_dir / "train_config.json", TrainConfig(task="sst2", variant=variant, seed=seed).to_json()
    )
    write_json_atomic(run_dir / "model" / "config.json", {})
    config = AttackConfig(recipe=recipe, limit=len(outcome), batch_size=4, wordnet="wn",
                          solver_changes=changes)  # fmt: skip
    records = [{"index": index, "label": label, "clean_correct": o != "w", "flipped": o == "f", "queries": 3,
                "words_changed": 1, "words_total": 5, "edit_distance": 2, "chunk_size": 4,
                "last_in_chunk": k == len(outcome) - 1}
               for k, (index, o, label) in enumerate(zip(indices, outcome, labels, strict=True))]  # fmt: skip
    folder = attack_folder(run_dir, "sst2", recipe, changes)
    write_json_atomic(folder / "config.json", {**config.to_json(), "split": "sst2", "n": len(outcome)})
    with atomic_open(folder / "records.jsonl") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    write_json_atomic(folder / "summary.json", summarize_records(records, config))
    return run_dir


def test_text_attack_report_counts_flips_by_gold_label(tmp_path: Path) -> None:
    """The flips of clean-correct answers per gold label, summed over a variant's seeds (counted by hand):
    an attack that flips one label only shows as 0% on the other."""
    from ode_bert.experiments.report import format_attack_report

    labels = (0, 1, 0, 1)
    runs = [_text_attacked(tmp_path, "im", 1, "deepwordbug", "rfff", labels=labels),  # 0: 1 of 2, 1: 2 of 2
            _text_attacked(tmp_path, "im", 2, "deepwordbug", "wrrf", labels=labels),  # 0: 0 of 1, 1: 1 of 2
            _text_attacked(tmp_path, "ex", 1, "deepwordbug", "rfrf", labels=labels)]  # 0: 0 of 2, 1: 2 of 2
    report = format_attack_report(runs, AttackConfig(recipe="deepwordbug", limit=4), [("im", "ex")])
    assert "- ex: label 0: 0 of 2 (0%), label 1: 2 of 2 (100%)" in report
    assert "- im: label 0: 1 of 3 (33%), label 1: 3 of 4 (75%)" in report


def test_worst_case_over_text_recipes_counts_an_example_only_if_no_recipe_flips_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--recipe deepwordbug pwws --report-only``: each recipe's tables, then the accuracy under every one
    of them per example (counted by hand), paired by seed, which the projection tool reads too; an attack
    with solver changes that one recipe lacks is named and left out; clean outcomes that differ between
    recipes (another model), other examples and a PGD attack are refused, naming the run or recipe."""
    from ode_bert.experiments.report import WORST_CASE, worst_case_outcomes

    recipes = ["deepwordbug", "pwws"]
    outcomes_by_run = {("im", 1): ("rrfw", "rfrw"), ("ex", 1): ("rffr", "ffrr"),
                       ("im", 2): ("rrrr", "rrfr"), ("ex", 2): ("rfrr", "rrrf")}  # fmt: skip
    runs = list(dict.fromkeys(
        _text_attacked(tmp_path, variant, seed, recipe, outcome)
        for (variant, seed), both in outcomes_by_run.items() for recipe, outcome in zip(recipes, both)
    ))  # fmt: skip
    _text_attacked(tmp_path, "im", 1, "deepwordbug", "rrrr", changes={"tol": 0.1})
    outcomes, left_out = worst_case_outcomes(runs, "sst2", recipes)
    assert left_out == [f"{GROUP}/im@tol=0.1-seed1"] and set(outcomes[GROUP]) == {"_examples", "im", "ex"}
    assert outcomes[GROUP]["im"][1] == {"clean": [True, True, True, False],
                                        WORST_CASE: [True, False, False, False]}  # fmt: skip
    assert outcomes[GROUP]["ex"][2][WORST_CASE] == [True, False, True, False]
    # under every attack: im 1 of 4 and 3 of 4, ex 1 of 4 and 2 of 4 -> im - ex +0 and +25 by seed
    argv = ["attack", *map(str, runs), "--recipe", *recipes, "--limit", "4", "--wordnet", "wn",
            "--report-only"]  # fmt: skip
    assert cli.main(argv) == 0
    report = capsys.readouterr().out
    assert "### sst2-n8: deepwordbug, 4 examples" in report and "### sst2-n8: pwws, 4 examples" in report
    worst = report[report.index("every one of deepwordbug, pwws"):]
    assert "| im | 2 | 87.50 ± 17.68 | - | 50.00 ± 35.36 | - |" in worst
    assert "| ex | 2 | 100.00 ± 0.00 | - | 37.50 ± 17.68 | - |" in worst
    assert f"| under every attack | {_t_interval([0.0, 25.0])} |" in worst
    assert f"Left out, not attacked with every recipe: {GROUP}/im@tol=0.1-seed1" in worst
    from bench import attack_power

    attack_power.main([*map(str, runs), "--recipe", *recipes, "--pairs", "im:ex", "--seeds", "2"])
    assert "| sst2-n8 | im - ex | under every attack | 2 x 4 | +12.50 |" in capsys.readouterr().out

    _text_attacked(tmp_path, "im", 2, "pwws", "rrfw")  # the clean outcome of another model
    with pytest.raises(ValueError, match=r"im-seed2: the clean predictions of pwws and deepwordbug differ"):
        worst_case_outcomes(runs, "sst2", recipes)
    for variant, seed in outcomes_by_run:
        _text_attacked(tmp_path, variant, seed, "pwws", "rrrr", indices=(0, 1, 2, 5))
    with pytest.raises(ValueError, match="pwws attacked other examples than deepwordbug"):
        worst_case_outcomes(runs, "sst2", recipes)
    with pytest.raises(ValueError, match="two or more different recipes"):
        worst_case_outcomes(runs, "sst2", ["pwws", "pwws"])
    pgd = [_attacked(tmp_path / "pgd", variant, 1, [1, 0, -1, -2]) for variant in ("im", "ex")]
    for variant in ("im", "ex"):
        _text_attacked(tmp_path / "pgd", variant, 1, "pwws", "rrrr")
    with pytest.raises(ValueError, match="pgd-l2 is not a text recipe"):
        worst_case_outcomes(pgd, "sst2", ["pgd-l2", "pwws"])
