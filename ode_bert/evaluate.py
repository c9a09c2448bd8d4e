"""Clean-dev and AdvGLUE accuracy of a trained run, with the official AdvGLUE scoring.

Official scoring (``advglue/SOURCE.md``, the benchmark's ``evaluate.py``): accuracy per task; QQP also
reports F1 and scores as the mean of accuracy and F1; MNLI scores as the mean of ``mnli`` and ``mnli-mm``;
the overall score is the mean over the tasks. The same scoring is applied to the clean dev sets.
Scores are fractions in [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from .convert import LayerStats, convert, solver_stats
from .data import Example, load_advglue, load_clean_dev, stratified_subset
from .encoding import Collator, EncodedDataset
from .io import write_json_atomic
from .pretrained import from_pretrained
from .settings import CONFIG_KEY, METHOD_SETTINGS, SETTING_NAMES, ODESettings, solver_changes_dir
from .train import (
    CONFIG_FILE,
    MODEL_DIR,
    RunDirError,
    TrainConfig,
    machine_record,
    read_train_config,
    split_training_data,
    stored_conversion,
)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.json"
DEV_SUBSET_SEED = 0  # the clean-dev subset is the same for every run, so runs stay comparable
# A model that gives one label to this share of the clean dev examples (where the labels are more mixed)
# did not learn the task: its scores are those of a near-constant predictor (NotLearnedWarning).
ONE_LABEL_SHARE = 0.95


class NotLearnedWarning(UserWarning):
    """A fine-tuned model predicts (nearly) one label for every clean dev example: it did not learn the
    task, and its scores, AdvGLUE's included, say nothing about robustness."""


def split_metrics(split: str, labels: Sequence[int], predictions: Sequence[int]) -> dict[str, float]:
    """Accuracy of one split (and binary F1 of the 'duplicate' class for QQP)."""
    if len(labels) != len(predictions) or not labels:
        raise ValueError(
            f"{split}: need equally many labels and predictions, got {len(labels)}/{len(predictions)}"
        )
    correct = sum(int(y == p) for y, p in zip(labels, predictions))
    result: dict[str, float] = {"n": len(labels), "accuracy": correct / len(labels)}
    if split == "qqp":
        tp = sum(int(y == 1 and p == 1) for y, p in zip(labels, predictions))
        fp = sum(int(y == 0 and p == 1) for y, p in zip(labels, predictions))
        fn = sum(int(y == 1 and p == 0) for y, p in zip(labels, predictions))
        result["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return result


def official_scores(splits: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Task scores and their mean from per-split metrics, by the AdvGLUE rules (see the module docstring)."""
    per_split = {
        split: (m["accuracy"] + m["f1"]) / 2 if split == "qqp" else m["accuracy"]
        for split, m in splits.items()
    }
    grouped: dict[str, list[float]] = {}
    for split, score in per_split.items():
        grouped.setdefault("mnli" if split == "mnli-mm" else split, []).append(score)
    tasks = {task: sum(scores) / len(scores) for task, scores in grouped.items()}
    return {"tasks": tasks, "overall": sum(tasks.values()) / len(tasks)}


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int,
    batch_size: int = 64,
    solver_log: list[LayerStats] | None = None,
    desc: str | None = None,
) -> list[int]:
    """Argmax predictions for ``examples``, batched, without gradients (bf16 autocast on CUDA).

    For a converted model, each batch's per-layer ``solver_stats`` are appended to ``solver_log``. ``desc``
    labels a progress bar over the batches (none when ``None``).
    """
    device = next(model.parameters()).device
    loader = DataLoader(
        EncodedDataset(examples, tokenizer, max_length), batch_size=batch_size, collate_fn=Collator(tokenizer)
    )
    model.eval()
    predictions: list[int] = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=desc is None, leave=False):
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(**batch).logits
        predictions.extend(logits.argmax(-1).tolist())
        if solver_log is not None:
            solver_log.extend(solver_stats(model))
    return predictions


def summarize_solver(log: Sequence[LayerStats]) -> dict[str, Any] | None:
    """How hard the implicit solves were over an evaluation (``None`` for a model without ODE layers)."""
    if not log:
        return None
    residuals = [s.residual for s in log if s.residual is not None]
    tols = [s.tol for s in log if s.tol is not None]
    # a layer solve covers a batch and converges only if every example in it does; per example is finer
    per_example = [s.root.converged for s in log if s.root is not None]
    example_solves = sum(c.numel() for c in per_example)
    return {
        "layer_solves": len(log),
        "mean_iterations": sum(s.iterations for s in log) / len(log),
        "max_iterations": max(s.iterations for s in log),
        "max_rel_residual": max(residuals) if residuals else None,
        "converged_fraction": sum(s.converged for s in log) / len(log),
        "example_solves": example_solves,
        "example_converged_fraction": (
            sum(int(c.sum()) for c in per_example) / example_solves if example_solves else None
        ),
        "tol": max(tols) if tols else None,
    }


def constant_baseline(sets: dict[str, list[Example]], label: int) -> dict[str, Any]:
    """Official score of always predicting ``label`` (the majority training class): the level a model that
    learned nothing reaches, so a variant near it is degenerate however its AdvGLUE score compares."""
    splits = {
        split: split_metrics(split, [ex.label for ex in exs], [label] * len(exs))
        for split, exs in sets.items()
    }
    return {"label": label, "overall": official_scores(splits)["overall"]}


def one_label_share(predictions: Mapping[str, Mapping[str, list[int]]]) -> tuple[int, float, float]:
    """(the most predicted label, its share of the predictions, the most common true label's share) over
    every split of ``predictions`` (``_score``'s: ``{split: {"labels": [...], "predictions": [...]}}``)."""
    predicted = Counter(p for split in predictions.values() for p in split["predictions"])
    labels = Counter(label for split in predictions.values() for label in split["labels"])
    label, count = predicted.most_common(1)[0]
    total = sum(predicted.values())
    return label, count / total, labels.most_common(1)[0][1] / total


def _score(
    model: torch.nn.Module, tokenizer: Any, sets: dict[str, list[Example]], max_length: int, batch_size: int,
    name: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, predictions) of every split in ``sets``; ``name`` (clean, advglue, ...) labels progress."""
    predictions, splits, log = {}, {}, []
    for split, examples in sets.items():
        labels = [ex.label for ex in examples]
        predicted = predict(model, tokenizer, examples, max_length, batch_size, log, desc=f"{name} {split}")
        predictions[split] = {"labels": labels, "predictions": predicted}
        splits[split] = split_metrics(split, labels, predicted)
    return {"splits": splits, **official_scores(splits), "solver": summarize_solver(log)}, predictions


def evaluation_settings(run_dir: str | Path, changes: Mapping[str, Any]) -> ODESettings:
    """The ODE settings a run was trained with, ``changes`` applied (settings such as ``tol``, ``max_iter``,
    ``root``, ``solver``; other keys are solver options such as ``compact_rows``); checked, so bad changes
    fail before any work. With another ``solver``, the trained settings and options that method does not take
    (an implicit solve's ``tol``, ``eval_tol``, ``grad``, ... for ``euler``) are dropped. A changed ``tol``
    without ``eval_tol`` clears the trained ``eval_tol``, so that evaluation solves to the ``tol`` asked for.
    A run without ODE layers (``bert``) is a ``ValueError``."""
    config_json = Path(run_dir) / MODEL_DIR / "config.json"
    stored = stored_conversion(Path(run_dir))
    if stored is None:
        raise ValueError(
            f"{run_dir} is a stock model (no {CONFIG_KEY!r} settings in {config_json}): there are no solver "
            "settings to change; evaluate it without solver changes"
        )
    if not isinstance(changes, Mapping) or not changes:
        raise ValueError(f"solver changes must be a non-empty mapping of settings, got {changes!r}")
    trained = ODESettings.from_dict(stored, str(config_json))
    fields = {k: v for k, v in changes.items() if k in SETTING_NAMES and k != "solver_options"}
    if "tol" in fields and "eval_tol" not in fields:  # a changed tol is the one evaluation solves to
        fields["eval_tol"] = None
    kept = trained.solver_options
    if fields.get("solver", trained.solver) != trained.solver:  # carry over only what the new method takes
        import solvers

        accepted = solvers.option_names(solvers.METHODS.lookup(fields["solver"]))
        dropped = [k for k in METHOD_SETTINGS if k not in accepted]
        if "tol" not in accepted:  # an evaluation tolerance without a solve to apply it to
            dropped.append("eval_tol")
        fields = {**{k: None for k in dropped}, **fields}
        kept = {k: v for k, v in kept.items() if k in accepted}
    options = {k: v for k, v in changes.items() if k not in SETTING_NAMES}
    options = {**kept, **changes.get("solver_options", {}), **options}
    return dataclasses.replace(trained, **fields, solver_options=options)


def evaluate(
    run_dir: str | Path,
    data_dir: str | Path | None = None,
    dev_samples: int | None = None,
    batch_size: int = 64,
    solver_changes: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Clean dev and AdvGLUE scores of the model in ``run_dir``; writes metrics.json and predictions.json.

    A run trained with ``holdout`` is also scored on its held-out training examples (``"heldout"``), the set
    to choose hyperparameters on.

    ``dev_samples`` evaluates a fixed stratified subset of each clean dev split (for quick checks);
    AdvGLUE is always scored in full. ``data_dir`` defaults to the one the run was trained with.

    ``solver_changes`` evaluates the trained weights with other solver settings (``{"tol": 1e-4}``: a tighter
    solve than in training; ``{"solver": "euler"}``: the explicit step), for what evaluation needs apart
    from training; the files then go to ``RUN_DIR/evals/<changes>/`` (``solver_changes_dir``), and the
    run's own metrics.json stays that of its trained settings.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    if not (run_dir / MODEL_DIR / "config.json").is_file() or not config_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a finished training run (expected {CONFIG_FILE} and {MODEL_DIR}/)"
        )
    settings = evaluation_settings(run_dir, solver_changes) if solver_changes is not None else None
    for name, value in (("dev_samples", dev_samples), ("batch_size", batch_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    config = read_train_config(run_dir)
    try:
        TrainConfig(**config).validate()
    except (TypeError, ValueError) as err:
        raise RunDirError(
            f"{config_path} is damaged: its settings are not valid ({err}). To recover, restore the file or "
            "train again in a new folder (--output-dir)"
        ) from err
    data_dir = data_dir if data_dir is not None else config.get("data_dir")
    # the data first (seconds), so a missing or damaged file is named before the model is loaded
    clean = load_clean_dev(config["task"], data_dir)
    if dev_samples is not None:
        clean = {
            s: stratified_subset(exs, min(dev_samples, len(exs)), DEV_SUBSET_SEED) for s, exs in clean.items()
        }
    adv = load_advglue(config["task"], data_dir)
    trained_on, heldout = split_training_data(TrainConfig(**{**config, "data_dir": data_dir}))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_run_model(run_dir / MODEL_DIR)
    if settings is not None:
        convert(model, settings)
    model = model.to(device)
    max_length = config["max_length"]
    clean_metrics, clean_predictions = _score(model, tokenizer, clean, max_length, batch_size, "clean")
    adv_metrics, adv_predictions = _score(model, tokenizer, adv, max_length, batch_size, "advglue")

    majority = Counter(ex.label for ex in trained_on).most_common(1)[0][0]
    for metrics_of_set, sets in ((clean_metrics, clean), (adv_metrics, adv)):
        metrics_of_set["constant_baseline"] = constant_baseline(sets, majority)
    label, share, label_share = one_label_share(clean_predictions)
    clean_metrics["prediction_share"] = share
    if share >= ONE_LABEL_SHARE and share > label_share + 0.1:
        scores = (f"clean {100 * clean_metrics['overall']:.2f}, always answering {majority}: "
                  f"{100 * clean_metrics['constant_baseline']['overall']:.2f}; AdvGLUE "
                  f"{100 * adv_metrics['overall']:.2f}")
        warnings.warn(
            f"{run_dir}: the model predicts label {label} for {share:.0%} of the clean dev examples (the "
            f"most common label is {label_share:.0%} of them): it did not learn the task. Its scores "
            f"({scores}) are a near-constant predictor's; see its training loss in train_history.json",
            NotLearnedWarning, stacklevel=2,
        )  # fmt: skip
    if heldout:
        heldout_metrics, heldout_predictions = _score(
            model, tokenizer, {config["task"]: heldout}, config["max_length"], batch_size, "heldout"
        )
    metrics = {
        "task": config["task"],
        "variant": config["variant"],
        "seed": config["seed"],
        "dev_samples": dev_samples,
        "machine": machine_record(),
        "clean": clean_metrics,
        "advglue": adv_metrics,
    }
    predictions = {"clean": clean_predictions, "advglue": adv_predictions}
    if heldout:
        metrics["heldout"], predictions["heldout"] = heldout_metrics, heldout_predictions
    out_dir = run_dir
    if settings is not None:
        metrics["solver_changes"], metrics["solver_settings"] = dict(solver_changes), settings.to_dict()
        out_dir = solver_changes_dir(run_dir, solver_changes)
        out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / PREDICTIONS_FILE, predictions)
    write_json_atomic(out_dir / METRICS_FILE, metrics)
    return metrics


def load_run_model(model_dir: Path) -> tuple[torch.nn.Module, Any]:
    """The trained model and tokenizer of a run, from safetensors only (no pickle, so loading runs no code);
    a damaged file is a ``RunDirError`` naming it."""
    from safetensors import SafetensorError, safe_open

    run_dir = model_dir.parent
    recovery = (
        f"to recover, train the run again in a new folder (--output-dir), or delete {model_dir} and "
        f"{run_dir / 'train_history.json'} and run train --resume in {run_dir} (it trains again with the "
        "saved settings)"
    )
    weights = sorted(model_dir.glob("*.safetensors"))
    if not weights:
        raise RunDirError(f"{model_dir} has no model weights (*.safetensors); " + recovery)
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise RunDirError(f"{path} is damaged or truncated ({err}); " + recovery) from err
    try:
        model = from_pretrained(model_dir, AutoModelForSequenceClassification, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError, RuntimeError, json.JSONDecodeError) as err:
        raise RunDirError(f"{model_dir} cannot be loaded ({type(err).__name__}: {err}); " + recovery) from err
    return model, tokenizer


def format_metrics(metrics: dict[str, Any]) -> str:
    """A plain-text table of one run's metrics, in percent."""
    lines = [f"{'set':<8} {'split':<8} {'n':>5} {'acc %':>7} {'F1 %':>7}"]
    for name in ("heldout", "clean", "advglue"):
        if name not in metrics:
            continue
        for split, m in metrics[name]["splits"].items():
            f1 = f"{100 * m['f1']:7.2f}" if "f1" in m else f"{'':>7}"
            lines.append(f"{name:<8} {split:<8} {m['n']:>5} {100 * m['accuracy']:7.2f} {f1}")
        lines.append(f"{name:<8} {'score':<8} {'':>5} {100 * metrics[name]['overall']:7.2f}")
    for name in ("heldout", "clean", "advglue"):
        solver = metrics.get(name, {}).get("solver")
        if solver and solver.get("example_converged_fraction") is not None:
            lines.append(
                f"{name} implicit solves: {100 * solver['example_converged_fraction']:.0f}% of "
                f"{solver['example_solves']} (example, layer) solves converged to tol {solver['tol']:.0e}, "
                f"{solver['mean_iterations']:.1f} iterations per batch solve on average, "
                f"max relative residual {solver['max_rel_residual']:.1e}"
            )
    return "\n".join(lines)
