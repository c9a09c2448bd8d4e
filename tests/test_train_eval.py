"""Training, evaluation, resuming, comparison and CLI end to end: a tiny random BERT on the real data."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scipy import stats
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import ode_bert
import solvers
from ode_bert import cli, data, experiments
from ode_bert import train as train_module
from ode_bert.convert import LayerStats
from ode_bert.data import load_advglue
from ode_bert.evaluate import (
    evaluate,
    evaluation_settings,
    format_metrics,
    official_scores,
    predict,
    split_metrics,
    summarize_solver,
)
from ode_bert.io import atomic_open
from ode_bert.train import TrainConfig, train

DATA_DIR = Path(os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")
pytestmark = [
    pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present"),
    # the tiny random model's implicit solves are capped on purpose (FAST_IM); their warnings are expected
    pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning"),
]
FAST_IM = {"tol": 1e-2, "max_iter": 8}  # loose solve: the tiny random model only has to run, not converge


def _config(tiny_model: str, out: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "task": "sst2", "model": tiny_model, "variant": "im", "epochs": 1, "batch_size": 8,
        "train_samples": 16, "max_length": 32, "lr": 1e-3, "data_dir": str(DATA_DIR),
        "output_dir": str(out), **FAST_IM,
    }  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def test_split_metrics_and_official_scoring_by_hand() -> None:
    # QQP: labels/predictions -> TP=2, FP=1, FN=1, TN=1: acc 3/5, F1 = 4/6.
    qqp = split_metrics("qqp", [1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert qqp == {"n": 5, "accuracy": 0.6, "f1": pytest.approx(2 / 3)}
    splits = {
        "qqp": qqp,
        "mnli": {"n": 4, "accuracy": 0.5},
        "mnli-mm": {"n": 2, "accuracy": 1.0},
        "sst2": {"n": 3, "accuracy": 1 / 3},
    }
    scores = official_scores(splits)
    expected = {"qqp": (0.6 + 2 / 3) / 2, "mnli": 0.75, "sst2": 1 / 3}
    assert scores["tasks"] == pytest.approx(expected)
    assert scores["overall"] == pytest.approx(sum(expected.values()) / 3)


def test_evaluation_settings_keep_or_clear_the_trained_eval_tol(tmp_path: Path) -> None:
    """Solver changes on a run saved with ``eval_tol``: another ``eval_tol`` or another implicit solver keeps
    the rest; a changed ``tol`` alone is what evaluation then solves to (``eval_tol`` cleared); an explicit
    solver drops both."""
    trained = ode_bert.ODESettings.preset("im", eval_tol=0.1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"ode_bert": trained.to_dict()}))
    assert evaluation_settings(tmp_path, {"eval_tol": 0.3}).eval_tol == 0.3
    assert evaluation_settings(tmp_path, {"solver": "trapezoid"}).eval_tol == 0.1
    tighter = evaluation_settings(tmp_path, {"tol": 1e-4})
    assert (tighter.tol, tighter.eval_tol) == (1e-4, None)
    both = evaluation_settings(tmp_path, {"tol": 1e-4, "eval_tol": 0.05})
    assert (both.tol, both.eval_tol) == (1e-4, 0.05)
    explicit = evaluation_settings(tmp_path, {"solver": "euler"})
    assert (explicit.tol, explicit.eval_tol) == (None, None)


def test_solver_summary_counts_batches_and_examples_by_hand() -> None:
    """A batch solve converges only if all its examples do; the per-example fraction counts each one."""

    def layer(index: int, converged: list[bool], iterations: list[int]) -> LayerStats:
        residuals = torch.tensor([1e-5 if c else 0.25 for c in converged])  # 0.25: exact in float32
        root = solvers.RootInfo(
            iterations=torch.tensor(iterations), nfev=max(iterations) + 1, abs_residual=residuals,
            rel_residual=residuals, converged=torch.tensor(converged), tol=1e-4,
        )
        return LayerStats(index, "implicit_euler", root.nfev, max(iterations), root.max_rel_residual,
                          root.all_converged, root.tol, root)

    summary = summarize_solver([layer(0, [True, False, True], [3, 20, 5]), layer(1, [True, True], [4, 6])])
    assert summary == {
        "layer_solves": 2, "mean_iterations": (20 + 6) / 2, "max_iterations": 20, "max_rel_residual": 0.25,
        "converged_fraction": 1 / 2, "example_solves": 5, "example_converged_fraction": 4 / 5, "tol": 1e-4,
    }
    metrics = {"advglue": {"splits": {"sst2": {"n": 3, "accuracy": 1.0}}, "overall": 1.0, "solver": summary}}
    assert "advglue implicit solves: 80% of 5 (example, layer) solves converged" in format_metrics(metrics)
    metrics["advglue"]["solver"] = summarize_solver([])  # a model without ODE layers prints no solver line
    assert "implicit solves" not in format_metrics(metrics)


def test_train_and_evaluate_end_to_end(tiny_model: str, tmp_path: Path) -> None:
    run_dir = train(_config(tiny_model, tmp_path / "run", task="qqp"))  # 16 examples, batch 8: 2 steps
    assert json.loads((run_dir / "train_config.json").read_text())["task"] == "qqp"
    assert len(json.loads((run_dir / "train_history.json").read_text())) == 1
    assert not (run_dir / "checkpoint.safetensors").exists()

    metrics = evaluate(run_dir, dev_samples=40)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    predictions = json.loads((run_dir / "predictions.json").read_text())
    for name, expected_n in (("clean", 40), ("advglue", 78)):
        saved = predictions[name]["qqp"]
        labels, predicted = saved["labels"], saved["predictions"]
        assert len(labels) == len(predicted) == expected_n
        tp = sum(y == p == 1 for y, p in zip(labels, predicted))
        fp = sum(y == 0 and p == 1 for y, p in zip(labels, predicted))
        fn = sum(y == 1 and p == 0 for y, p in zip(labels, predicted))
        accuracy = sum(y == p for y, p in zip(labels, predicted)) / expected_n
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        assert metrics[name]["splits"]["qqp"]["accuracy"] == pytest.approx(accuracy)
        assert metrics[name]["overall"] == pytest.approx((accuracy + f1) / 2)
    # A model that always predicted the majority training class (0 of 16 stratified QQP examples) would score,
    # from the AdvGLUE qqp counts in SOURCE.md (0: 46, 1: 32): accuracy 46/78, F1 0.
    assert metrics["advglue"]["constant_baseline"] == {"label": 0, "overall": pytest.approx(46 / 78 / 2)}
    solver = metrics["advglue"]["solver"]  # 78 AdvGLUE items = 2 batches of <= 64, each solving 2 IM layers
    assert solver["layer_solves"] == 4 and 0 <= solver["mean_iterations"] <= solver["max_iterations"] <= 8
    assert (solver["converged_fraction"] == 1.0) == (solver["max_rel_residual"] <= FAST_IM["tol"])
    assert solver["example_solves"] == 2 * 78 and 0 <= solver["example_converged_fraction"] <= 1
    assert (solver["example_converged_fraction"] == 1.0) == (solver["converged_fraction"] == 1.0)
    # The AdvGLUE labels scored are those of the real file.
    advglue = json.loads((DATA_DIR / "advglue" / "dev.json").read_text())["qqp"]
    assert predictions["advglue"]["qqp"]["labels"] == [item["label"] for item in advglue]

    # Evaluated with a tighter solve than in training: the files go to evals/, the run's own stay, and the
    # solves meet the tighter tolerance at more iterations than the trained 1e-2 needed.
    tight = evaluate(run_dir, dev_samples=40, solver_changes={"tol": 1e-6, "max_iter": 40})
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
    assert json.loads((run_dir / "evals" / "max_iter=40,tol=1e-06" / "metrics.json").read_text()) == tight
    assert tight["solver_settings"]["tol"] == 1e-6
    assert tight["solver_changes"] == {"tol": 1e-6, "max_iter": 40}
    assert tight["advglue"]["solver"]["max_rel_residual"] <= 1e-6 < solver["max_rel_residual"]
    assert tight["advglue"]["solver"]["mean_iterations"] > solver["mean_iterations"]
    # The explicit step on the trained weights: EX-BERT's computation (same step and field), by ex_bert
    explicit = evaluate(run_dir, dev_samples=40, solver_changes={"solver": "euler"})
    trained_model = ode_bert.from_pretrained(run_dir / "model", AutoModelForSequenceClassification)
    ex_model = ode_bert.ex_bert(trained_model)
    ex_predicted = predict(ex_model, AutoTokenizer.from_pretrained(run_dir / "model"),
                           load_advglue("qqp", DATA_DIR)["qqp"], max_length=32)  # fmt: skip
    saved = json.loads((run_dir / "evals" / "solver=\"euler\"" / "predictions.json").read_text())
    assert saved["advglue"]["qqp"]["predictions"] == ex_predicted
    assert explicit["solver_settings"]["solver"] == "euler" and explicit["solver_settings"]["tol"] is None
    assert explicit["advglue"]["solver"]["mean_iterations"] == 0 < solver["mean_iterations"]  # no root solve
    # eval_tol: evaluation solves to it, as a changed tol makes it (the same predictions, the same solves)
    loose = evaluate(run_dir, dev_samples=40, solver_changes={"eval_tol": 0.3})
    as_tol = evaluate(run_dir, dev_samples=40, solver_changes={"tol": 0.3})
    saved = {name: json.loads((run_dir / "evals" / name / "predictions.json").read_text())
             for name in ("eval_tol=0.3", "tol=0.3")}  # fmt: skip
    assert saved["eval_tol=0.3"] == saved["tol=0.3"]
    assert loose["advglue"]["solver"] == as_tol["advglue"]["solver"]
    assert loose["advglue"]["solver"]["tol"] == 0.3 > solver["tol"]
    for bad, named in (({"tol": "x"}, "tol"), ({"rootz": "anderson"}, "rootz"), ({}, "non-empty")):
        with pytest.raises((ValueError, TypeError), match=named):
            evaluate(run_dir, dev_samples=40, solver_changes=bad)

    # The saved model reloads as the same IM-model and reproduces the saved predictions.
    model = ode_bert.from_pretrained(run_dir / "model", AutoModelForSequenceClassification)
    assert ode_bert.ode_config(model)["solver"] == "implicit_euler"

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    again = predict(model, tokenizer, load_advglue("qqp", DATA_DIR)["qqp"], max_length=32)
    assert again == predictions["advglue"]["qqp"]["predictions"]


def test_resume_after_interruption_matches_uninterrupted_run(
    tiny_model: str, tmp_path: Path, train_until_first_checkpoint: Callable[[TrainConfig], None]
) -> None:
    straight = train(_config(tiny_model, tmp_path / "straight", epochs=2))
    train_until_first_checkpoint(_config(tiny_model, tmp_path / "resumed", epochs=2))
    checkpoint = train_module.load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")
    assert checkpoint["epoch"] == 0 and not (tmp_path / "resumed" / "model").exists()

    with pytest.raises(FileExistsError, match="resume"):
        train(_config(tiny_model, tmp_path / "resumed", epochs=2))
    with pytest.raises(ValueError, match=r"settings differ .*\['lr'\]"):
        train(_config(tiny_model, tmp_path / "resumed", epochs=2, lr=1e-4, resume=True))
    resumed = train(_config(tiny_model, tmp_path / "resumed", epochs=2, resume=True))

    weights_a = load_file(straight / "model" / "model.safetensors")
    weights_b = load_file(resumed / "model" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    history = json.loads((resumed / "train_history.json").read_text())
    assert history == json.loads((straight / "train_history.json").read_text()) and len(history) == 2
    metrics_a = evaluate(straight, dev_samples=40)
    metrics_b = evaluate(resumed, dev_samples=40)
    assert {k: metrics_a[k] for k in ("clean", "advglue")} == {k: metrics_b[k] for k in ("clean", "advglue")}


def test_holdout_is_excluded_from_training_and_scored(tiny_model: str, tmp_path: Path) -> None:
    config = _config(
        tiny_model, tmp_path / "run", variant="bert", train_samples=20, holdout=0.2, tol=None, max_iter=None
    )
    trained_on, held_out = train_module.split_training_data(config)
    assert len(trained_on) == 16 and len(held_out) == 4 and not set(trained_on) & set(held_out)
    metrics = evaluate(train(config), dev_samples=20)
    assert metrics["heldout"]["splits"]["sst2"]["n"] == 4
    saved = json.loads((tmp_path / "run" / "predictions.json").read_text())["heldout"]["sst2"]
    assert saved["labels"] == [ex.label for ex in held_out]
    assert metrics["clean"]["solver"] is None  # the stock model has no implicit solves


def test_explicit_euler_residual_variant_trains_like_the_stock_model(tiny_model: str, tmp_path: Path) -> None:
    """Euler, residual field, step 1 is the stock computation: same seed and data give the same weights."""
    stock = train(_config(tiny_model, tmp_path / "bert", variant="bert", tol=None, max_iter=None))
    euler = train(
        _config(
            tiny_model,
            tmp_path / "ode",
            variant="ode",
            solver="euler",
            field="residual",
            tol=None,
            max_iter=None,
        )
    )
    weights_stock = load_file(stock / "model" / "model.safetensors")
    weights_euler = load_file(euler / "model" / "model.safetensors")
    # Attention key biases get a zero gradient up to rounding (softmax ignores a per-query shift), which Adam
    # rescales to full-size steps: they differ by rounding noise amplified, so they are left out.
    compared = [k for k in weights_stock if not k.endswith("attention.self.key.bias")]
    assert len(compared) == len(weights_stock) - 2  # two layers
    assert all(torch.allclose(weights_stock[k], weights_euler[k], atol=1e-5) for k in compared)
    losses = [json.loads((run / "train_history.json").read_text())[0]["mean_loss"] for run in (stock, euler)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert json.loads((euler / "model" / "config.json").read_text())["ode_bert"]["solver"] == "euler"


def test_dropout_setting_trains_as_a_model_saved_without_dropout(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``dropout=0.0`` is the stock model with its config's dropout probabilities at zero: the same weights
    as training a copy saved that way by hand; the run records the setting and the saved config the
    probabilities. A config with no dropout to set, and a value outside [0, 1), are refused."""
    from transformers import AutoConfig, BertModel, GPT2Config, PretrainedConfig

    by_hand = tmp_path / "no-dropout-model"
    config = AutoConfig.from_pretrained(tiny_model)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    BertModel.from_pretrained(tiny_model, config=config).save_pretrained(by_hand)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(by_hand)
    runs = [train(_config(tiny_model, tmp_path / "set", variant="im", dropout=0.0)),
            train(_config(str(by_hand), tmp_path / "by-hand", variant="im"))]  # fmt: skip
    weights = [load_file(run / "model" / "model.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    saved = json.loads((runs[0] / "model" / "config.json").read_text())
    assert (saved["hidden_dropout_prob"], saved["attention_probs_dropout_prob"]) == (0.0, 0.0)
    assert json.loads((runs[0] / "train_config.json").read_text())["dropout"] == 0.0
    default = train(_config(tiny_model, tmp_path / "default", variant="im"))  # dropout 0.1: other weights
    assert not torch.equal(load_file(default / "model" / "model.safetensors")["classifier.weight"],
                           weights[0]["classifier.weight"])  # fmt: skip

    gpt2 = tmp_path / "gpt2-like"  # names of another family
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    assert ode_bert.pretrained.dropout_overrides(str(gpt2), 0.0) == dict.fromkeys(
        ["attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout"], 0.0)
    bare = PretrainedConfig()  # the base class: no dropout of any kind
    monkeypatch.setattr(ode_bert.pretrained.transformers.AutoConfig, "from_pretrained", lambda path: bare)
    with pytest.raises(ValueError, match="no dropout probability to set"):
        ode_bert.pretrained.dropout_overrides(str(gpt2), 0.0)
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="dropout must be a probability in \\[0, 1\\)"):
            _config(tiny_model, tmp_path / "bad", dropout=bad).validate()


def test_history_records_each_step_s_loss_gradient_norm_and_solves(tiny_model: str, tmp_path: Path) -> None:
    """One IM step on the whole training set: the recorded loss, pre-clipping gradient norm and worst
    forward and adjoint residuals are those of the same model's forward and backward by hand; clipping to a
    tiny norm does not change the recorded norm and counts the step as clipped. BERT has no solves."""
    from transformers import set_seed

    from ode_bert.encoding import Collator, EncodedDataset
    from ode_bert.pretrained import dropout_overrides, load_model

    settings = {"dropout": 0.0, "batch_size": 16}
    config = _config(tiny_model, tmp_path / "free", **settings, max_grad_norm=1e9)
    runs = [train(config), train(_config(tiny_model, tmp_path / "clipped", **settings, max_grad_norm=1e-6))]
    epochs = [json.loads((run / "train_history.json").read_text())[0] for run in runs]

    set_seed(config.seed)
    model, tokenizer = load_model(tiny_model, num_labels=2, **dropout_overrides(tiny_model, 0.0))
    train_module.apply_variant(model, config)
    examples, _ = train_module.split_training_data(config)
    dataset = EncodedDataset(examples, tokenizer, config.max_length)
    adjoint: list[solvers.AdjointSolve] = []
    loss = model.train()(**Collator(tokenizer)([dataset[i] for i in range(len(dataset))])).loss
    forward = ode_bert.solver_stats(model)
    with solvers.watch_adjoint_solves(adjoint.append):
        loss.backward()
    norm = math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None))

    assert len(forward) == len(adjoint) == 2  # both layers implicit
    for epoch in epochs:
        steps = epoch["steps"]
        assert steps["loss"] == [pytest.approx(loss.item(), rel=1e-5)]
        assert steps["grad_norm"] == [pytest.approx(norm, rel=1e-4)]
        assert steps["max_rel_residual"] == [pytest.approx(max(s.residual for s in forward), rel=1e-4)]
        assert steps["adjoint_max_rel_residual"] == [
            pytest.approx(max(a.info.max_rel_residual for a in adjoint), rel=1e-4)]
        assert epoch["grad_norm"]["max"] == epoch["grad_norm"]["mean"] == steps["grad_norm"][0]
        assert (epoch["adjoint"]["layer_solves"], epoch["adjoint"]["example_solves"]) == (2, 2 * len(dataset))
        assert epoch["adjoint"]["example_converged"] == sum(int(a.info.converged.sum()) for a in adjoint)
    assert [e["grad_norm"]["clipped_fraction"] for e in epochs] == [0.0, 1.0]
    assert train_module.grad_norm_summary([], 1.0) is None

    bert = train(_config(tiny_model, tmp_path / "bert", variant="bert", tol=None, max_iter=None))
    record = json.loads((bert / "train_history.json").read_text())[0]
    assert record["solver"] is None and record["adjoint"] is None
    assert set(record["steps"]) == {"loss", "grad_norm"}


def test_evaluation_warns_when_the_model_gives_one_label_to_nearly_everything(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that answers one label for (nearly) every clean dev example did not learn: evaluation says so
    (``NotLearnedWarning``, with the scores) and records the share; a model that answers the true labels
    does not warn, and its share is the most common label's."""
    import warnings

    from ode_bert import evaluate as evaluate_module

    run = train(_config(tiny_model, tmp_path / "run", variant="bert", tol=None, max_iter=None))
    monkeypatch.setattr(evaluate_module, "predict", lambda model, tok, examples, *a, **k: [1] * len(examples))
    with pytest.warns(evaluate_module.NotLearnedWarning, match="predicts label 1 for 100% of the clean dev"):
        metrics = evaluate(run, dev_samples=40)
    assert metrics["clean"]["prediction_share"] == 1.0
    monkeypatch.setattr(evaluate_module, "predict",
                        lambda model, tok, examples, *a, **k: [ex.label for ex in examples])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error", evaluate_module.NotLearnedWarning)
        metrics = evaluate(run, dev_samples=40)
    labels = json.loads((run / "predictions.json").read_text())["clean"]["sst2"]["labels"]
    assert len(labels) == 40 and 0 < sum(labels) < 40
    assert metrics["clean"]["prediction_share"] == max(labels.count(0), labels.count(1)) / 40
    assert metrics["clean"]["overall"] == 1.0


def test_config_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown variant 'xx'; valid variants: bert, ex, im, ode"):
        TrainConfig(variant="xx").validate()
    with pytest.raises(ValueError, match="unknown task 'cola'"):
        TrainConfig(task="cola").validate()
    with pytest.raises(ValueError, match="takes no solver options"):
        TrainConfig(variant="bert", solver="rk4").validate()


def test_paired_difference_matches_t_interval() -> None:
    values, baseline = [80.0, 82.0, 85.0], [79.0, 80.0, 81.0]
    diffs = [1.0, 2.0, 4.0]
    result = experiments.paired_difference(values, baseline)
    half = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / math.sqrt(3)
    assert result["mean"] == pytest.approx(7 / 3)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((7 / 3 - half, 7 / 3 + half))


def test_compare_two_variants_two_seeds(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cmp"
    argv = [
        "compare", "--variants", "bert", "im", "--seeds", "1", "2", "--task", "sst2",
        "--output-dir", str(out),
        "--model", tiny_model, "--epochs", "1", "--batch-size", "8", "--train-samples", "16", "--max-length",
        "32", "--lr", "1e-5", "--dev-samples", "30", "--data-dir", str(DATA_DIR), "--tol", "1e-2",
        "--max-iter", "8", "--executor", "inline",  # in this process: the local worker pool is tested below
    ]  # fmt: skip
    assert cli.main(argv) == 0
    assert "Only 2 seed(s)" in capsys.readouterr().out
    for name in ("comparison.md", "comparison.json", "comparison.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "comparison.json").read_text())
    summary = result["summary"]
    for metric in ("clean", "advglue"):
        per_seed = {
            v: [
                100 * json.loads((out / f"{v}-seed{s}" / "metrics.json").read_text())[metric]["overall"]
                for s in (1, 2)
            ]
            for v in ("bert", "im")
        }
        assert summary["bert"][metric]["values"] == pytest.approx(per_seed["bert"])
        assert summary["bert"][metric]["mean"] == pytest.approx(statistics.fmean(per_seed["bert"]))
        expected_diff = statistics.fmean(i - b for i, b in zip(per_seed["im"], per_seed["bert"]))
        if metric == "advglue":  # a near-untrained model: scores differ by seed, so the pairing is tested
            assert len(set(per_seed["bert"] + per_seed["im"])) > 1
        assert summary["im"][metric]["diff"]["mean"] == pytest.approx(expected_diff)
    assert result["constant_baseline"]["advglue"] == pytest.approx(100 * 76 / 148)  # always "positive"
    markdown = (out / "comparison.md").read_text()
    assert "| im |" in markdown and "| bert |" in markdown

    # Resumable: with every metrics.json present, a re-run trains nothing (the model dirs are not touched).
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/model/model.safetensors")}
    assert cli.main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/model/model.safetensors")} == stamps

    # The comparison's run records are the experiments layer's: `ode-bert experiment --report` pairs them.
    capsys.readouterr()
    assert cli.main(["experiment", "--report", str(out / "results.jsonl"), "--pairs", "im:bert"]) == 0
    pair_row = capsys.readouterr().out.split("| sst2-n16 | im − bert | 2 |")[1].splitlines()[0]
    assert f"{summary['im']['advglue']['diff']['mean']:+.2f} [" in pair_row.split("|")[1]


def test_cli_rejects_unknown_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["train", "--variant", "xx"])
    assert "invalid choice: 'xx' (choose from 'bert', 'ex', 'im', 'ode')" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--solver", "nope"])
    assert "implicit_euler" in capsys.readouterr().err
    assert cli.main(["eval", "/nonexistent/run"]) == 2
    assert "not a finished training run" in capsys.readouterr().err


def test_grid_runs_plan_in_parallel_and_pairs_by_seed(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """bench/experiments/grid.py over ode_bert.experiments: two local workers, every run recorded,
    Δ = mean of the per-seed differences."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench" / "experiments"))
    import grid

    monkeypatch.setitem(experiments.PLANS, "tiny", [experiments.Group("sst2", 16, ("bert", "im"))])
    settings = {"epochs": 1, "batch_size": 8, "max_length": 16, "lr": 1e-3, **FAST_IM}
    argv = ["--plan", "tiny", "--seeds", "1", "2", "--workers", "2", "--out", str(tmp_path), "--model",
            tiny_model, "--data-dir", str(DATA_DIR), "--dev-samples", "20", "--set", json.dumps(settings)]
    grid.main(argv)

    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    runs = [("bert", 1), ("bert", 2), ("im", 1), ("im", 2)]
    assert sorted((r["variant"], r["seed"]) for r in lines) == runs
    scores = {}
    for variant, seed in runs:
        run = tmp_path / "sst2-n16" / f"{variant}-seed{seed}"
        config = json.loads((run / "train_config.json").read_text())
        assert (config["max_iter"], config["train_samples"], config["seed"]) == (
            8 if variant == "im" else None, 16, seed)
        scores[variant, seed] = json.loads((run / "metrics.json").read_text())["advglue"]["overall"]
    summary = json.loads((tmp_path / "summary.json").read_text())["sst2-n16"]["variants"]
    expected = sum(100 * (scores["im", s] - scores["bert", s]) for s in (1, 2)) / 2
    assert summary["im"]["advglue"]["diff"]["mean"] == pytest.approx(expected)
    assert summary["im"]["advglue_solver"]["mean_iterations"] > 0 and "advglue_solver" not in summary["bert"]
    assert "### sst2-n16" in (tmp_path / "tables.md").read_text()

    grid.main(argv)  # everything done: nothing is rerun, nothing appended
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 4

    # Runs that another grid finishes while they wait in the queue are taken as done, not started again.
    late = tmp_path / "late"
    late.mkdir()
    options = {"model": tiny_model, "data_dir": str(DATA_DIR), **settings}
    late_runs = experiments.plan_runs(experiments.named_groups(["tiny"]), [1, 2], late, options)
    experiment = experiments.Experiment(late, late_runs, 20, experiments.LocalExecutor(workers=2, threads=1))
    assert len(experiment.pending) == 4
    (late / "sst2-n16").symlink_to(tmp_path / "sst2-n16")
    experiment.run()
    taken = [json.loads(line) for line in (late / "results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in taken) == runs
    assert all(r["seconds"] is None for r in taken)

    linked = tmp_path / "linked"  # finished runs linked into a new folder are recorded there, once
    linked.mkdir()
    (linked / "sst2-n16").symlink_to(tmp_path / "sst2-n16")
    for _ in range(2):  # with the same settings: a reused run must match every one
        grid.main([*argv[:argv.index("--out")], "--out", str(linked), *argv[argv.index("--out") + 2:]])
    relinked = [json.loads(line) for line in (linked / "results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in relinked) == runs
    assert all(r["seconds"] is None for r in relinked)

    # --report: tables from the records, the timed record of a run preferred; --pairs: variant - variant
    capsys.readouterr()
    both = [str(linked / "results.jsonl"), str(tmp_path / "results.jsonl")]
    grid.main(["--report", *both, "--pairs", "im:bert"])
    report = capsys.readouterr().out
    assert "| sst2-n16 | im − bert | 2 |" in report
    assert f"{expected:+.2f} [" in report.split("im − bert")[1]
    metrics = {(v, s): json.loads((tmp_path / "sst2-n16" / f"{v}-seed{s}" / "metrics.json").read_text())
               for v, s in runs}
    per_seed = report.split("Per seed, sst2-n16, clean / AdvGLUE:")[1]
    for seed in (1, 2):  # per-seed rows: bert, then im, each clean / AdvGLUE, ‡ if at the constant level
        clean = {v: metrics[v, seed]["clean"] for v in ("bert", "im")}
        marks = {v: " ‡" if 100 * (c["overall"] - c["constant_baseline"]["overall"]) < 5 else ""
                 for v, c in clean.items()}  # fmt: skip
        cells = [f"{100 * clean[v]['overall']:.2f} / {100 * scores[v, seed]:.2f}{marks[v]}"
                 for v in ("bert", "im")]
        assert f"| {seed} | {cells[0]} | {cells[1]} |" in per_seed
    records = experiments.load_records([linked / "results.jsonl", tmp_path / "results.jsonl"])
    assert len(records) == 4 and all(r["seconds"] is not None for r in records)
    grid.main(["--report", *both, "--plot", str(tmp_path / "differences.png")])
    assert (tmp_path / "differences.png").read_bytes().startswith(b"\x89PNG")
    drawn = experiments.plot_differences(experiments.summarize_groups(records), tmp_path / "again.png")
    assert [(group, variant) for group, variant, _ in drawn] == [("sst2-n16", "im")]  # BERT is the zero line
    assert drawn[0][2]["advglue"]["diff"]["mean"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="no variant besides the baseline"):
        experiments.plot_differences({"sst2-n16": {"variants": {"bert": {}}}}, tmp_path / "empty.png")
    with pytest.raises(SystemExit):
        grid.main(["--report", str(tmp_path / "results.jsonl"), "--pairs", "im-bert"])


def test_grid_filters_groups_and_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--groups`` / ``--variants`` keep only the named runs and the baseline they pair with, seeds still
    outermost; a typo is refused."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench" / "experiments"))
    import grid

    runs = experiments.plan_runs(experiments.named_groups(["core", "extensions"]), [1, 2], "out",
                                 keep_groups=["sst2-n1000"], keep_variants=["im", "im-layer"])
    assert [(r.group.name, r.variant, r.seed) for r in runs] == [
        ("sst2-n1000", "im", 1), ("sst2-n1000", "bert", 1), ("sst2-n1000", "im", 2),
        ("sst2-n1000", "bert", 2), ("sst2-n1000", "im-layer", 1), ("sst2-n1000", "im-layer", 2)]
    assert len(experiments.plan_runs(experiments.named_groups(["core"]), [1], "out")) == 6
    with pytest.raises(SystemExit):
        grid.main(["--plan", "core", "--groups", "sst2-n999"])
    with pytest.raises(SystemExit, match="2"):  # im-layer is in no group of the core plan
        grid.main(["--plan", "core", "--variants", "im-layer"])
    assert cli.main(["experiment", "--plan", "core", "--variants", "im-layer"]) == 2  # the same command


def test_im_select_stages_reuse_runs_and_keep_the_incumbent_on_ties(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bench/experiments/im_select.py: each stage starts from the previous choice (the shared run is not
    retrained), ties keep the earlier candidate, and Δ is the per-example held-out difference."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench" / "experiments"))
    import im_select

    assert im_select.choose([50.0, 75.0, 75.0]) == 1 and im_select.choose([60.0, 60.0]) == 0
    layer_candidates = {n: [c["layers"] for c in im_select.stages(n)[1][1]] for n in (1, 2, 6)}
    assert layer_candidates == {1: ["all"], 2: ["all", "0", "1"], 6: ["all", "0-2", "3-5", "0"]}
    monkeypatch.setattr(im_select, "stages", lambda num_layers: [
        ("step", [{"field": "residual", "step": 0.5}, {"field": "residual", "step": 1.0}]),
        ("iteration cap", [{"max_iter": 3}, {"max_iter": 2}]),
    ])
    monkeypatch.setattr(im_select, "START", {"layers": "all", "max_iter": 3})
    settings = {"epochs": 1, "batch_size": 8, "max_length": 16, "lr": 1e-3, "tol": 1e-2}
    argv = ["--out", str(tmp_path), "--model", tiny_model, "--data-dir", str(DATA_DIR),
            "--train-samples", "32", "--set", json.dumps(settings)]
    im_select.main(argv)

    results = json.loads((tmp_path / "results.json").read_text())
    first, second = results["stages"]
    accuracies = [e["heldout_acc"] for e in first["candidates"]]
    assert first["chosen"] == first["candidates"][im_select.choose(accuracies)]["settings"]
    assert second["candidates"][0]["settings"] == first["chosen"]  # the incumbent is the earlier choice
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 3  # three distinct runs, one shared
    for entry in second["candidates"]:
        run = tmp_path / entry["run"]
        config = json.loads((run / "train_config.json").read_text())
        assert config["max_iter"] == entry["settings"]["max_iter"]
        assert json.loads((run / "metrics.json").read_text())["heldout"]["splits"]["sst2"]["n"] == 8
        ours = im_select.heldout_correct(run)
        chosen = im_select.heldout_correct(tmp_path / im_select.run_name(second["chosen"]))
        expected = statistics.fmean(ours) - statistics.fmean(chosen)
        assert entry["diff_vs_chosen"]["mean"] == pytest.approx(expected)
    assert results["chosen"] == second["chosen"]
    assert "iteration cap" in im_select.format_table(results)


def test_two_process_training_reports_once(tiny_model: str, tmp_path: Path) -> None:
    """Data-parallel training on CPU (what ``accelerate launch`` / ``torchrun`` start): both processes train,
    the main one writes the run and evaluates it, no process returns before the run directory is complete."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ode_bert", "train", "--task", "sst2", "--variant", "im", "--model", tiny_model,
               "--train-samples", "32", "--epochs", "1", "--batch-size", "4", "--max-length", "16",
               "--dev-samples", "20", "--data-dir", str(DATA_DIR), "--output-dir", str(out),
               "--tol", str(FAST_IM["tol"]), "--max-iter", str(FAST_IM["max_iter"])]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "in 2 process(es)" in result.stdout
    assert result.stdout.count("run directory:") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["clean"]["splits"]["sst2"]["n"] == 20
    assert len(json.loads((out / "train_history.json").read_text())) == 1


def test_atomic_open_replaces_only_on_success(tmp_path: Path) -> None:
    path = tmp_path / "out.json"
    with atomic_open(path) as f:
        f.write("old")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half-writ")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    # new files: the umask's permissions, not mkstemp's owner-only; a replaced file keeps its own
    old_umask = os.umask(0o027)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        with atomic_open(tmp_path / "new.json") as f:
            f.write("{}")
    finally:
        os.umask(old_umask)
    modes = [(tmp_path / name).stat().st_mode & 0o777 for name in ("new.json", "plain")]
    assert modes == [0o640, 0o640]
    path.chmod(0o600)
    with atomic_open(path) as f:
        f.write("new")
    assert path.stat().st_mode & 0o777 == 0o600


def test_solve_difficulty_counts_agree_with_evaluation(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """bench/experiments/solve_difficulty.py on a trained IM run: its converged/unconverged accuracies
    recombine to ``evaluate``'s AdvGLUE accuracy, and its changed-prediction share to ``predict``'s."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench" / "experiments"))
    import solve_difficulty

    from stability_analysis import example_solves
    from stability_analysis.perturbation import advglue_pairs

    run_dir = train(_config(tiny_model, tmp_path / "run", max_iter=4, tol=5e-3))  # some solves stop short
    pairs = advglue_pairs("sst2", DATA_DIR)
    model = ode_bert.from_pretrained(run_dir / "model", AutoModelForSequenceClassification).eval()
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    # Centre the tiny model's logit margin on the originals, so that its predictions split and substitutions
    # can flip them (trained on 16 examples it predicts one class throughout).
    originals = [p[0] for p in pairs]
    inputs = tokenizer(originals, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    model.save_pretrained(run_dir / "model")

    metrics = evaluate(run_dir, dev_samples=16)
    out = tmp_path / "difficulty.json"
    solve_difficulty.main([str(run_dir), str(run_dir), "--out", str(out)])
    first, second = json.loads(out.read_text())
    assert first["splits"] == second["splits"]  # the same run measured twice: deterministic
    report = solve_difficulty.format_report([first, second])
    assert "### sst2: 131 original/adversarial pairs, 2 runs" in report
    capsys.readouterr()
    solve_difficulty.main(["--report", str(out)])  # the tables again, from the file alone
    assert capsys.readouterr().out == report + "\n"
    with pytest.raises(SystemExit):
        solve_difficulty.main([])  # neither runs nor --report
    with monkeypatch.context() as patch:  # an annotation file that does not match dev.json is refused
        patch.setattr(solve_difficulty, "advglue_pairs", lambda *args: [("clean", "not an AdvGLUE item")])
        with pytest.raises(ValueError, match="1 adversarial texts of dev_ann.json are not in dev.json's"):
            solve_difficulty.measure_run(run_dir, str(DATA_DIR), 64)
    monkeypatch.setattr(solve_difficulty, "measure_run", lambda *args: pytest.fail("measured again"))
    solve_difficulty.main([str(run_dir), "--out", str(out)])  # resumes: the run is in --out already
    assert json.loads(out.read_text()) == [first]
    sst2 = first["splits"]["sst2"]
    assert sst2["pairs"] == len(pairs) == 131
    groups = sst2["advglue"].values()
    assert sum(g["n"] for g in groups) == 148 and all(g["n"] for g in groups)  # both kinds occur
    recombined = sum(g["n"] * g["accuracy"] for g in groups) / 148
    assert recombined == pytest.approx(100 * metrics["advglue"]["splits"]["sst2"]["accuracy"])

    original, adversarial = (
        predict(model, tokenizer, [data.Example(p[i], None, 0) for p in pairs], max_length=32) for i in (0, 1)
    )
    changed = 100 * sum(a != b for a, b in zip(original, adversarial)) / len(pairs)
    assert changed > 0 and sst2["flipped"] == pytest.approx(changed)
    for side in ("original", "adversarial"):
        assert 0 < sst2[side]["iterations"] <= 2 * 4 and 0 <= sst2[side]["converged"] <= 100
    # the adversarial records, taken from the pass over dev.json, equal the adversarial texts solved alone
    alone = solve_difficulty._means(example_solves(model, tokenizer, [p[1] for p in pairs], max_length=32))
    assert sst2["adversarial"] == pytest.approx(alone, rel=1e-3)
