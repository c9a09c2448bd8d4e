"""Smoke tests of the benchmark scripts: each runs in ``--quick`` mode on a tiny BERT; its JSON is checked.

The scripts run in this process (``main(argv)``, as ``python -m bench.NAME ARGS`` would) to save start-up.

The invariants are the ones the tables rely on: residuals agree when computed twice (by the finder and by
the harness), budgets are respected, the best residual within a budget cannot grow with the budget,
errors are recomputable from the stored states, and unrolled gradients keep more activations than
implicit ones.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bench import (
    _common,
    cost,
    garble_lean,
    implicit_step,
    paired_records,
    report,
    rng_trace,
    separation,
    stiff,
    train_curves,
    training_overhead,
)
from ode_bert.data import DATA_DIR_ENV
from ode_bert.experiments.report import format_sign_test

DATA_DIR = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")


@pytest.fixture(autouse=True)
def keep_torch_threads() -> Iterator[None]:
    """The scripts set torch's CPU thread count; restore it for the rest of the test session."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide random BERT with the real MiniLM tokenizer, saved like a checkpoint."""
    import transformers

    from ode_bert.pretrained import resolve_model_path

    path = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path(None))
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_quick(main: Callable[[Sequence[str]], None], name: str, out: Path, *extra: str) -> dict[str, Any]:
    """Run ``python -m bench.NAME --quick --out OUT EXTRA...`` and return its JSON."""
    main(["--quick", "--out", str(out), *extra])
    data = json.loads(out.read_text())
    assert data["benchmark"] == name
    assert data["command"] == f"python -m bench.{name} --quick --out {out} {' '.join(extra)}".strip()
    assert data["machine"]["cpu"] and data["machine"]["cpu_cores"] >= 1
    assert report.RENDERERS[name](data).count("|") > 10  # BENCHMARKS.md tables render from it
    return data


def test_flop_count_counts_forward_and_vjp() -> None:
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 8, requires_grad=True)
    with _common.FlopCount() as counter:
        y = layer(x)
    assert counter.total == 2 * 3 * 8 * 4
    with _common.FlopCount() as counter:
        torch.autograd.grad(layer(x).sum(), x)
    assert counter.total == 2 * (2 * 3 * 8 * 4)  # forward + input VJP (weights' grads not asked)
    assert y.shape == (3, 4)


def test_best_within_takes_best_point_inside_budget() -> None:
    trace = [(2.0, torch.tensor([0.5, 0.4])), (3.0, torch.tensor([0.1, 0.6])),
             (5.0, torch.tensor([0.01, 0.01]))]
    assert math.isnan(implicit_step.best_within(trace, 1.0))  # nothing evaluated within the budget
    assert implicit_step.best_within(trace, 3.0) == pytest.approx(0.4)  # per sample best, worst sample
    assert implicit_step.best_within(trace, 10.0) == pytest.approx(0.01)


def test_relative_residual_per_sample() -> None:
    z = torch.zeros(2, 3, 4)
    gz = torch.ones(2, 3, 4)
    gz[1] *= 2
    assert torch.allclose(implicit_step.relative_residual(z, gz), torch.ones(2, dtype=torch.float64))


def test_stiff_counter_counts_jvp_twice() -> None:
    f = stiff.Counter(stiff.robertson_torch)
    y = torch.tensor([1.0, 1e-5, 0.0], dtype=torch.float64)
    f(0.0, y)
    torch.func.jvp(lambda v: f(0.0, v), (y,), (torch.ones_like(y),))
    assert f.evals == 3


def test_implicit_step_quick(tiny_model: Path, tmp_path: Path) -> None:
    data = run_quick(implicit_step.main, "implicit_step", tmp_path / "out.json", "--model", str(tiny_model))
    config = data["config"]
    tol, cap, budgets = config["tol"], config["cap"], config["budgets"]
    finders = {r["finder"] for r in data["runs"]}
    assert finders == set(implicit_step.FINDERS)
    for run in data["runs"]:
        assert run["calls"] >= 2 and run["seconds"] > 0 and run["eval_seconds"] > 0
        assert run["cost"] <= cap + 2  # a VJP after the last allowed evaluation may overshoot by one
        assert run["converged"] == (run["evals_to_tol"] != math.inf)
        if run["converged"]:
            # the finder's residual and the harness's recomputation from the returned z agree
            assert run["residual"] <= tol * 1.05
            assert run["residual"] == pytest.approx(run["reported_residual"], rel=0.05, abs=1e-6)
        best = [run[f"res@{b:g}"] for b in budgets]
        finite = [b for b in best if b == b]
        assert finite == sorted(finite, reverse=True)  # best residual within a budget never grows with it
    assert {e["finder"] for e in data["over_layers"]} == finders
    implicit_step.main(["--resummarise", "--out", str(tmp_path / "out.json")])  # same summaries again
    again = json.loads((tmp_path / "out.json").read_text())
    assert again["summary"] == data["summary"] and again["runs"] == data["runs"]


def test_training_overhead_quick(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    data = run_quick(training_overhead.main, "training_overhead", out, "--model", str(tiny_model))
    rows = {r["config"]: r for r in data["rows"]}
    assert rows["stock"]["step_ratio"] == 1.0 and rows["stock"]["peak_ratio"] == 1.0
    for row in rows.values():
        for key in ("step_ratio", "infer_ratio", "peak_ratio", "saved_ratio", "fwd_bwd_ratio"):
            assert 0 < row[key] < math.inf, (row["config"], key)
        assert row["peak_mb"] >= row["fwd_bwd_mb"] > 0
    sweep = {(e["grad"], e["iterations"]): e for e in data["memory_vs_iterations"]}
    for (grad, iterations), entry in sweep.items():
        if grad == "unroll" and ("implicit", iterations) in sweep:
            assert entry["saved_mb"] > sweep[("implicit", iterations)]["saved_mb"]


def test_cost_training_counts_the_adjoint_solves(tiny_model: Path, tmp_path: Path) -> None:
    """bench.cost's training part: a looser adjoint tolerance spends fewer VJPs per adjoint solve and the
    same forward evaluations; BERT has none; every ratio is a finite positive number."""
    out = tmp_path / "cost.json"
    cost.main(["--parts", "training", "--configs", "bert", "im tol=1e-2", "im adjoint_tol=1e-1",
               "--rounds", "1", "--train-batch-size", "4", "--eval-batch-size", "4", "--max-length", "32",
               "--model", str(tiny_model), "--out", str(out)])  # fmt: skip
    rows = {r["config"]: r for r in json.loads(out.read_text())["training"]["rows"]}
    assert rows["bert"]["adjoint_evals"] == 0 and rows["bert"]["train_x"] == 1.0
    assert 0 < rows["im adjoint_tol=1e-1"]["adjoint_evals"] < rows["im tol=1e-2"]["adjoint_evals"]
    assert rows["im adjoint_tol=1e-1"]["train_evals"] == rows["im tol=1e-2"]["train_evals"]
    for row in rows.values():
        for key in ("train_x", "backward_x", "infer_x", "run_x"):
            assert 0 < row[key] < math.inf, (row["config"], key)


def test_stiff_quick(tmp_path: Path) -> None:
    data = run_quick(stiff.main, "stiff", tmp_path / "out.json")
    for result in data["problems"].values():
        reference = np.array(result["reference"])
        methods = {r["method"] for r in result["runs"]}
        assert methods == {"implicit_euler", "scipy BDF", "scipy Radau", "torchdiffeq dopri5"}
        for run in result["runs"]:
            assert run["evals"] > 0
            if not run["capped"]:
                assert run["error"] == pytest.approx(stiff.relative_error(np.array(run["y"]), reference))
        for row in result["cheapest"]:
            hits = [r["evals"] for r in result["runs"]
                    if r["method"] == "implicit_euler" and not r["capped"] and r["error"] <= row["target"]]
            assert row["implicit_euler"] == (min(hits) if hits else None)


def test_format_sign_test_matches_the_binomial_distribution() -> None:
    """The two-sided exact sign test: 8 of 9 higher is p = 2 * (9 + 1) / 2**9; ties are dropped."""
    assert format_sign_test([1.0] * 8 + [-1.0]) == f"8 of 9 higher, p = {20 / 512:.2g}"
    assert format_sign_test([1.0, 0.0, 2.0]) == f"2 of 2 higher, p = {0.5:.2g}"
    assert format_sign_test([0.0]) == "0 of 0 higher"


def test_paired_records_pairs_one_variant_across_two_files(tmp_path: Path) -> None:
    """NEW − OLD by seed over the seeds both files hold, with scipy's paired t interval and the sign count;
    other variants and groups are left out unless named by --old-variant; a seed twice in one file is
    refused."""
    import scipy.stats

    def write(name: str, scores: dict[int, tuple[float, float]], extra: str = "",
              variant: str = "im") -> Path:
        lines = [json.dumps({"group": "sst2-n1000", "variant": variant, "seed": seed,
                             "clean": {"overall": c}, "advglue": {"overall": a}})
                 for seed, (c, a) in scores.items()]
        lines.append(json.dumps({"group": "sst2-n1000", "variant": "ex", "seed": 1,
                                 "clean": {"overall": 0.0}, "advglue": {"overall": 0.0}}))
        path = tmp_path / name
        path.write_text("\n".join(lines) + extra + "\n")
        return path

    new = write("new.jsonl", {1: (0.80, 0.40), 2: (0.75, 0.45), 3: (0.78, 0.50), 9: (0.1, 0.1)})
    old = write("old.jsonl", {1: (0.79, 0.42), 2: (0.77, 0.40), 3: (0.76, 0.44)})
    options = ["--variant", "im", "--group", "sst2-n1000"]
    text = paired_records.main(["--new", str(new), "--old", str(old), *options])
    assert "seeds 1, 2, 3" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    expected = {"clean dev": [(80, 79), (75, 77), (78, 76)], "AdvGLUE": [(40, 42), (45, 40), (50, 44)]}
    for label, pairs in expected.items():
        a, b = zip(*pairs)
        reference = scipy.stats.ttest_rel(a, b).confidence_interval()
        mean = sum(a) / 3 - sum(b) / 3
        assert f"{mean:+.2f} [{reference.low:+.2f}, {reference.high:+.2f}]" in rows[label]
    # clean: NEW higher in 2 of 3 seeds; AdvGLUE: 2 of 3 (seed 1 lower)
    assert "NEW 2 of 3 higher, p = 1 |" in rows["clean dev"]
    assert "NEW 2 of 3 higher, p = 1 |" in rows["AdvGLUE"]
    controls = write("ex.jsonl", {2: (0.70, 0.40), 3: (0.70, 0.40)}, variant="ex")  # and ex seed 1 at 0
    across = paired_records.main(["--new", str(new), "--old", str(controls), "--old-variant", "ex", *options])
    assert "seeds 1, 2, 3\n" in across and "OLD = ex of" in across
    assert "80.00 / 75.00 / 78.00 | 0.00 / 70.00 / 70.00 |" in across
    with pytest.raises(ValueError, match="1 seed"):
        paired_records.compare([new], [old], "im", "sst2-n1000", old_variant="ex")  # old: ex seed 1 only
    twice = write("twice.jsonl", {1: (0.8, 0.4), 2: (0.7, 0.4)},
                  extra="\n" + json.dumps({"group": "sst2-n1000", "variant": "im", "seed": 2,
                                           "clean": {"overall": 0.7}, "advglue": {"overall": 0.4}}))
    with pytest.raises(ValueError, match="second im record for seed 2"):
        paired_records.main(["--new", str(twice), "--old", str(old), *options])


def test_rng_trace_sees_no_generator_state_twice() -> None:
    """Since 0.3.0 training draws fresh random numbers: over three steps of a 3-layer IM model, every step and
    every implicit layer starts from a state not seen before (0.2.0 started a step at a state already used,
    RESULTS.md)."""
    lines = rng_trace.trace(steps=3, layers=3)
    names = re.findall(r"\bs\d+\b", " ".join(lines))
    assert len(lines) == 3 and len(names) == 3 * 4
    assert len(set(names)) == len(names)


def test_train_curves_finds_the_spike_and_the_loss_around_it(tmp_path: Path) -> None:
    """A history written by hand: the largest norm's step, its ratio to the median, the mean loss of the
    steps before and after it across the epoch boundary, and the residuals there; a history without
    per-step figures is refused naming the file."""
    solves = {"example_converged_fraction": 0.5, "max_rel_residual": 0.3}

    def epoch(number: int, losses: list[float], norms: list[float]) -> dict[str, object]:
        return {"epoch": number, "mean_loss": sum(losses) / len(losses),
                "grad_norm": {"median": 1.0, "max": max(norms), "clipped_fraction": 0.25}, "solver": solves,
                "adjoint": None, "steps": {"loss": losses, "grad_norm": norms,
                                           "max_rel_residual": [0.01 * (i + 1) for i in range(len(losses))]}}
    run = tmp_path / "im-seed1"
    run.mkdir()
    history = [epoch(1, [0.7] * 8 + [0.4] * 2, [1.0] * 9 + [20.0]), epoch(2, [0.9] * 10, [2.0] * 10)]
    (run / "train_history.json").write_text(json.dumps(history))
    text = train_curves.main([str(run), "--plot", str(tmp_path / "curves.png")])
    # step 10 of 20: norm 20 against the median 2.0 (nine 1.0s, ten 2.0s, one 20); before: seven 0.7s, one 0.4
    assert "| im-seed1 | 10 of 20 | 20.00 (10.0x median) | 0.400 | 0.662 → 0.900 | 0.1 | – |" in text
    assert "| im-seed1 | 1 | 0.640 | 1.00 | 20.00 | 25% | 50.0% / 0.3 | – |" in text
    assert (tmp_path / "curves.png").stat().st_size > 0
    del history[1]["steps"]
    (run / "train_history.json").write_text(json.dumps(history))
    with pytest.raises(ValueError, match="has no per-step figures"):
        train_curves.main([str(run)])
    with pytest.raises(ValueError, match="no train_history.json"):
        train_curves.main([str(tmp_path)])


def test_separation_figures_against_brute_force() -> None:
    """AUC against counting every (label-1, label-0) pair, ties one half, and against scipy's Mann-Whitney;
    the best threshold against trying every cut; the mean pairwise cosine against a double loop."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(0)
    margins = np.round(rng.normal(size=40), 1)  # rounded: ties
    labels = (margins + rng.normal(size=40) > 0).astype(int)
    pos, neg = margins[labels == 1], margins[labels == 0]
    pairs = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert separation.auc(margins, labels) == pytest.approx(pairs)
    statistic = mannwhitneyu(pos, neg).statistic
    assert separation.auc(margins, labels) == pytest.approx(statistic / (len(pos) * len(neg)))
    cuts = [-np.inf, *margins]
    best = max(((margins > c) == labels).mean() for c in cuts)
    assert separation.best_threshold_accuracy(margins, labels) == best
    states = torch.tensor(rng.normal(size=(7, 5)))
    unit = [s / s.norm() for s in states]
    loop = [float(unit[i] @ unit[j]) for i in range(7) for j in range(7) if i != j]
    assert separation.mean_pairwise_cosine(states) == pytest.approx(sum(loop) / len(loop))
    with pytest.raises(ValueError, match="both labels"):
        separation.auc(margins, np.ones(40, dtype=int))


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")
def _ex_run(tiny_model: Path, tmp_path: Path) -> tuple[Path, Any]:
    """A run folder of an EX model (ODE layers, untrained, margins centred so that predictions split between
    the labels) and its training config."""
    import transformers

    import ode_bert
    from ode_bert.data import load_clean_dev
    from ode_bert.io import write_json_atomic
    from ode_bert.train import TrainConfig, apply_variant

    run = tmp_path / "ex-seed1"
    config = TrainConfig(task="sst2", model=str(tiny_model), variant="ex", max_length=32, train_samples=16,
                         data_dir=str(DATA_DIR), output_dir=str(run))
    torch.manual_seed(1)
    classifier = transformers.BertForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = apply_variant(classifier, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    texts = [ex.text_a for ex in load_clean_dev("sst2", DATA_DIR)["sst2"][:64]]
    with torch.no_grad():
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        logits = model(**encoded).logits
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    ode_bert.save_pretrained(model, run / "model", tokenizer)
    write_json_atomic(run / "train_config.json", config.to_json())
    return run, config


def test_separation_of_a_run_agrees_with_evaluate(tiny_model: Path, tmp_path: Path) -> None:
    """On a run folder of an EX model (ODE layers, untrained, margins centred): the probe's accuracy is the
    one ``evaluate`` scores on the same dev subset, and its first-token similarity has one entry per hidden
    state (embeddings and each layer)."""
    from ode_bert.evaluate import evaluate
    from ode_bert.io import write_json_atomic

    run, config = _ex_run(tiny_model, tmp_path)
    text = separation.main([str(run), "--limit", "40", "--batch-size", "16", "--out", str(tmp_path / "s.md")])
    row = separation.probe_run(run, None, 40, 16)
    scored = evaluate(run, dev_samples=40)["clean"]["overall"]
    assert row["n"] == 40 and row["accuracy"] == pytest.approx(scored) and row["one_label_share"] < 0.9
    assert len(row["first_token_cosine"]) == 3 and all(-1 <= c <= 1 for c in row["first_token_cosine"])
    assert f"| ex-seed1 | 40 | {100 * scored:.2f} |" in text and (tmp_path / "s.md").read_text() == text
    with pytest.raises(ValueError, match="not a finished training run"):
        separation.main([str(run), str(tmp_path)])  # refused before the first run is probed
    with pytest.raises(SystemExit):  # argparse's error, before any run is read
        separation.main([str(run), "--batch-size", "0"])
    write_json_atomic(run / "train_config.json", {**config.to_json(), "task": "mnli"})
    with pytest.raises(ValueError, match="task mnli has 3 labels; the margin needs two"):
        separation.main([str(run)])


def test_last_layer_output_recovered_from_the_two_states(tiny_model: Path) -> None:
    """The last layer's output recovered from the hidden states of a stock, an explicit (euler) and an
    implicit (implicit_euler, solved tightly) model, in both framings where one-stage, equals the stock layer
    applied where the step evaluates it (the layer's input for euler, its output for implicit_euler)."""
    import transformers

    import ode_bert
    from ode_bert.settings import ODESettings

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model)
    inputs = tokenizer(["a gripping, funny film"], return_tensors="pt")  # one sentence: no padding mask
    stock = transformers.BertModel.from_pretrained(tiny_model).eval()
    last = stock.encoder.layer[-1]
    exact = {"tol": 1e-7, "max_iter": 200}
    cases = [(None, "before"),
             (ODESettings(solver="euler", step=0.5, field="residual"), "before"),
             (ODESettings(solver="euler", step=0.5, field="layer"), "before"),
             (ODESettings(solver="implicit_euler", step=0.5, field="residual", **exact), "after"),
             (ODESettings(solver="implicit_euler", step=0.5, field="layer", **exact), "after")]
    for settings, evaluated_at in cases:
        model = transformers.BertModel.from_pretrained(tiny_model).eval()
        if settings is not None:
            ode_bert.convert(model, settings)
        with torch.no_grad():
            states = model(**inputs, output_hidden_states=True).hidden_states
            recovered = separation.last_layer_output(states[-2], states[-1], settings, len(states) - 1)
            expected = last(states[-1] if evaluated_at == "after" else states[-2])
        assert torch.allclose(recovered, expected, atol=1e-5), settings
    rk4 = ODESettings(solver="rk4", step=0.5)
    assert separation.last_layer_output(states[-2], states[-1], rk4, len(states) - 1) is None
    first_only = ODESettings(solver="euler", layers="0")  # the last layer stock
    assert separation.last_layer_output(states[-2], states[-1], first_only, 2) is states[-1]


def test_garble_edits_k_content_words_by_one_deepwordbug_edit_each() -> None:
    """Exactly ``k`` words change, none a stopword, each within one character edit (a swap: two
    substitutions) of the original; the same seed gives the same text."""
    import random

    from ode_bert.attack.text import STOPWORDS, levenshtein, words

    text = "the film is a charming and often affecting journey through the lives of two brothers"
    for k in (1, 2, 3):
        edited = garble_lean.garble(text, k, random.Random(k))
        assert edited == garble_lean.garble(text, k, random.Random(k))
        before = [text[a:b] for a, b in words(text)]
        after = [edited[a:b] for a, b in words(edited)]
        changed = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
        assert len(changed) == k
        assert all(x.lower() not in STOPWORDS and 1 <= levenshtein(x, y) <= 2 for x, y in changed)


def test_garble_lean_correlates_the_lean_with_an_attack_seed_by_seed(tmp_path: Path) -> None:
    """``--attack``: per pair, Pearson's r between the per-seed differences in lean and in accuracy under the
    attack (numpy's corrcoef as the reference), read from each run's attack summary; an attack on other
    examples, or none, is refused by name."""
    from ode_bert.io import write_json_atomic

    rng = np.random.default_rng(0)
    rows, under = [], {}
    for variant in ("im", "ex"):
        for seed in range(1, 7):
            run = tmp_path / f"{variant}-seed{seed}"
            under[variant, seed] = float(rng.uniform(0, 30))
            write_json_atomic(run / "train_config.json",
                              {"task": "sst2", "variant": variant, "seed": seed, "max_length": 32})
            write_json_atomic(run / "attacks" / "sst2-deepwordbug" / "summary.json", {
                "accuracy_under_attack": under[variant, seed] / 100, "settings": {"limit": 100, "seed": 0}})
            clean, edited = rng.uniform(40, 60, size=2)
            rows.append({"run": str(run), "variant": variant, "seed": seed, "label0_clean": clean,
                         "label0_edited": edited, "flipped_label0": 1.0, "flipped_label1": 2.0})
    text = garble_lean.report(rows, [("im", "ex")], "deepwordbug", 100)
    by = {(r["variant"], r["seed"]): r for r in rows}
    d_under = [under["im", s] - under["ex", s] for s in range(1, 7)]
    for metric, lean_of in (("label0_edited", lambda r: r["label0_edited"]),
                            ("label0_shift", lambda r: r["label0_edited"] - r["label0_clean"])):
        d_lean = [lean_of(by["im", s]) - lean_of(by["ex", s]) for s in range(1, 7)]
        r = np.corrcoef(d_lean, d_under)[0, 1]
        assert f"| {metric} | {r:+.2f} [" in text
    assert f"(mean {np.mean(d_under):+.2f})" in text
    write_json_atomic(tmp_path / "ex-seed3" / "attacks" / "sst2-deepwordbug" / "summary.json",
                      {"accuracy_under_attack": 0.1, "settings": {"limit": 50, "seed": 0}})
    with pytest.raises(ValueError, match="attacked other examples"):
        garble_lean.report(rows, [("im", "ex")], "deepwordbug", 100)
    with pytest.raises(ValueError, match="attack .* with pwws first"):
        garble_lean.report(rows, [("im", "ex")], "pwws", 100)
    with pytest.raises(ValueError, match="different limits"):
        garble_lean.report([{**rows[0], "limit": 40}, *rows[1:]], [], None, 100)
    with pytest.raises(ValueError, match="different groups"):  # the same variant names in two groups
        garble_lean.report([{**row, "group": "sst2-n1000"} for row in rows[:6]]
                           + [{**row, "group": "sst2-n2000"} for row in rows[6:]], [], None, 100)
    with pytest.raises(ValueError, match=r"runs probed twice among the rows: \[\('im', 1\)\]"):
        garble_lean.report([*rows, {**rows[0], "label0_edited": 0.0}], [], None, 100)


def test_swap_synonyms_replaces_k_words_that_have_synonyms_by_one_of_theirs() -> None:
    """Exactly ``k`` words change where enough have synonyms (all that have, where fewer do), each to one of
    its own synonyms in its case, never a stopword; the same seed gives the same text."""
    import random

    from ode_bert.attack.text import words

    table = {"film": ["movie", "picture"], "charming": ["endearing"], "journey": ["trip"], "the": ["a"]}

    def synonyms(word: str) -> list[str]:
        return table.get(word.lower(), [])

    text = "The film is a Charming and often affecting journey"
    before = [text[a:b] for a, b in words(text)]
    for k, expected in ((1, 1), (2, 2), (5, 3)):
        edited = garble_lean.swap_synonyms(text, k, random.Random(k), synonyms)
        assert edited == garble_lean.swap_synonyms(text, k, random.Random(k), synonyms)
        after = [edited[a:b] for a, b in words(edited)]
        changed = [(x, y) for x, y in zip(before, after, strict=True) if x != y]
        assert len(changed) == expected
        assert all(y.lower() in table[x.lower()] and y[0].isupper() == x[0].isupper() for x, y in changed)
        assert after[0] == "The"
    assert garble_lean.swap_synonyms("is a and", 2, random.Random(0), synonyms) == "is a and"


def test_garble_lean_counts_flips_against_its_clean_predictions(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """With the edit replaced by the identity nothing flips and the edited predictions lean as the clean ones
    (the draws line up with their examples); with real edits the shares stay percentages."""
    run, _ = _ex_run(tiny_model, tmp_path)
    real = garble_lean.lean(run, 40, 3, 2, 0)
    assert all(0 <= real[m] <= 100 for m in real if m.startswith(("label0_", "flipped_")))
    assert real["texts_changed"] == 100.0
    same = garble_lean.lean(run, 40, 3, 2, 0, lambda text, k, rng: text, "identity")
    assert same["flipped_label0"] == same["flipped_label1"] == same["texts_changed"] == 0.0
    assert same["label0_edited"] == same["label0_clean"] == real["label0_clean"]
    assert "| ex | 1 |" in garble_lean.report([same], [])
    with pytest.raises(ValueError, match="different edits"):
        garble_lean.report([real, same], [])
    out = tmp_path / "rows.json"
    text = garble_lean.main([str(run), "--limit", "40", "--draws", "1", "--out", str(out)])
    assert garble_lean.main(["--rows", str(out)]) == text
    with pytest.raises(SystemExit):  # run folders and --rows together
        garble_lean.main([str(run), "--rows", str(out)])
    for bad in ([], ["--wordnet", str(tmp_path)]):  # synonyms without a WordNet folder: refused before work
        with pytest.raises(SystemExit):
            garble_lean.main([str(run), "--edit", "synonyms", *bad])
    assert "not a WordNet database folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --attack with a run never attacked: named before any probing
        garble_lean.main([str(run), "--attack", "deepwordbug"])
    assert "with deepwordbug first" in capsys.readouterr().err
    for bad, named in (([str(run), str(tmp_path / "missing")], "missing"),  # named before any probing
                       ([str(run), str(run)], "runs probed twice")):
        with pytest.raises(SystemExit):
            garble_lean.main(bad)
        assert named in capsys.readouterr().err
