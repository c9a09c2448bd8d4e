"""Perturbation growth beside robustness: ``stability_analysis.perturbation.initial_value_growth`` against the
largest singular value of an explicitly built Jacobian, and ``bench.attack_growth`` on run folders."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

import ode_bert
from bench import attack_growth
from ode_bert import data
from ode_bert.attack.embedding import InitialValueHook
from ode_bert.attack.runner import AttackConfig, summarize_records
from ode_bert.io import atomic_open, write_json_atomic
from ode_bert.train import TrainConfig, apply_variant
from stability_analysis.perturbation import initial_value_growth

DATA_DIR = Path(os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")

TEXTS = ["ok", "dull"]  # 4 and 6 tokens: batched, the first is padded


def _model(tiny_model: str, settings: dict | None) -> BertForSequenceClassification:
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(tiny_model, num_labels=2).double().eval()
    if settings is not None:
        ode_bert.convert(model, **settings)
    return model


def _last_hidden(model: torch.nn.Module, inputs: dict, delta: torch.Tensor | None) -> torch.Tensor:
    """The last layer's output with ``delta`` added to the first encoder layer's input."""
    hook = InitialValueHook(model)
    with hook:
        hook.delta = delta
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


def _reference_growth(model: torch.nn.Module, tokenizer: AutoTokenizer, text: str, autograd: bool) -> float:
    """The largest singular value of ``d h_L / d h_0`` for ``text`` alone (no padding), the Jacobian built
    column by column: by ``torch.autograd.functional.jacobian`` (``autograd``), or by central finite
    differences of the model's own no-grad forward, independent of any gradient mode."""
    inputs = dict(tokenizer([text], return_tensors="pt"))
    with torch.no_grad():
        shape = _last_hidden(model, inputs, None).shape
    size = shape[1] * shape[2]
    if autograd:
        jacobian = torch.autograd.functional.jacobian(
            lambda x: _last_hidden(model, inputs, x.reshape(shape)).flatten(),
            torch.zeros(size, dtype=torch.float64),
        )
    else:
        step = 1e-5
        directions = torch.eye(size, dtype=torch.float64).reshape(size, *shape[1:]) * step
        batch = {k: v.expand(2 * size, -1) for k, v in inputs.items()}
        with torch.no_grad():
            out = _last_hidden(model, batch, torch.cat([directions, -directions])).flatten(start_dim=1)
        jacobian = ((out[:size] - out[size:]) / (2 * step)).T
    return float(torch.linalg.matrix_norm(jacobian, ord=2))


@pytest.mark.parametrize(
    "settings",
    [None, {"solver": "implicit_euler", "step": 0.5, "grad": "one_step", "tol": 1e-3, "compact_rows": True}],
    ids=["bert", "im-one_step"],
)
def test_initial_value_growth_is_the_largest_singular_value_of_the_jacobian(
    tiny_model: str, settings
) -> None:
    """Batched and padded, each sentence's growth equals the spectral norm of its own Jacobian built alone:
    by autograd for the stock model; for an implicit model trained with ``one_step`` (whose own backward is
    only approximate: the measurement must not use it) and a loose tolerance, by finite differences of its
    evaluated map, unconverged solves included (per-row stopping, so the batch does not change the map)."""
    model = _model(tiny_model, settings)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    inputs = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no forward mismatch
        result = initial_value_growth(model, inputs, tol=1e-7, max_iterations=100)
    assert result.converged.all() and result.forward_mismatch < 1e-12
    for k, text in enumerate(TEXTS):
        reference = _reference_growth(model, tokenizer, text, autograd=settings is None)
        assert result.growth[k] == pytest.approx(reference, rel=1e-6)
    if settings is not None:
        assert ode_bert.ode_config(model)["grad"] == "one_step"
        assert result.max_residual is not None and 1e-4 < result.max_residual < 1e-3


ATTACKED = [3, 10, 17, 4, 11]  # SST-2 dev indices, in the attack's order; chunks of 2, 2, 1
RADII = [0.01, 0.05]


def _attacked_run(root: Path, tiny_model: str, variant: str, seed: int, outcomes: list[tuple]) -> Path:
    """A tiny run folder as ``train`` leaves it, and a PGD attack's files as ``attack_run`` writes them for
    ``outcomes``: per attacked example, (correct, flipped by at each radius, minimal radius)."""
    run_dir = root / f"{variant}-seed{seed}"
    settings = {"solver": "euler", "step": 0.25} if variant == "ode" else {}
    config = TrainConfig(task="sst2", model=tiny_model, variant=variant, seed=seed, max_length=16,
                         data_dir=str(DATA_DIR), output_dir=str(run_dir), **settings)  # fmt: skip
    torch.manual_seed(seed)
    model = apply_variant(BertForSequenceClassification.from_pretrained(tiny_model, num_labels=2), config)
    ode_bert.save_pretrained(model, run_dir / "model", AutoTokenizer.from_pretrained(tiny_model))
    write_json_atomic(run_dir / "train_config.json", config.to_json())
    attack = AttackConfig(recipe="pgd-l2", radii=RADII, limit=5, batch_size=2)
    examples = data.load_clean_dev("sst2", DATA_DIR)["sst2"]
    records = []
    for k, (index, (correct, flipped_by, radius)) in enumerate(zip(ATTACKED, outcomes, strict=True)):
        records.append({"index": index, "label": examples[index].label, "clean_correct": correct,
                        "flipped_by": flipped_by, "min_radius": radius, "chunk_size": 2 if k < 4 else 1,
                        "last_in_chunk": k in (1, 3, 4)})  # fmt: skip
    folder = run_dir / "attacks" / "sst2-pgd-l2"
    with atomic_open(folder / "records.jsonl") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    summary = summarize_records(records, attack)
    write_json_atomic(
        folder / "summary.json", {**summary, "settings": {**attack.to_json(), "split": "sst2", "n": 5}}
    )
    return run_dir


@needs_data
def test_bench_measures_attacked_runs_on_their_examples_and_refuses_unattacked_ones(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Per run, the median growth over exactly the attacked examples (as ``initial_value_growth`` gives on
    them), the attack's robust accuracy, Pearson's r across runs; a run without a finished attack is
    refused before any work, or skipped and listed with ``--skip-unattacked``."""
    robust, flipped = (True, [None, None], None), (True, [None, "white-box"], 0.03)
    wrong = (False, [None, None], 0.0)
    runs = [
        _attacked_run(tmp_path / "grid", tiny_model, "bert", 1, [robust, robust, flipped, wrong, robust]),
        _attacked_run(tmp_path / "grid", tiny_model, "ex", 1, [robust, flipped, flipped, wrong, robust]),
        _attacked_run(tmp_path / "grid", tiny_model, "ode", 1, [flipped, flipped, flipped, wrong, robust]),
    ]
    unattacked = tmp_path / "grid" / "bert-seed2"
    (unattacked / "model").mkdir(parents=True)
    (unattacked / "model" / "config.json").write_text("{}")
    write_json_atomic(
        unattacked / "train_config.json", TrainConfig(task="sst2", variant="bert", seed=2).to_json()
    )
    out = tmp_path / "growth"
    argv = [*map(str, [*runs, unattacked]), "--out", str(out), "--tol", "1e-3"]
    with pytest.raises(SystemExit) as exit_info:
        attack_growth.main(argv)
    assert exit_info.value.code == 2 and not out.exists()
    assert f"{unattacked} has no finished pgd-l2 attack" in capsys.readouterr().err

    attack_growth.main([*argv, "--skip-unattacked"])
    assert f"SKIPPED {unattacked}" in capsys.readouterr().err
    result = json.loads((out / "points.json").read_text())
    assert result["skipped"][0]["run"] == str(unattacked)
    examples = data.load_clean_dev("sst2", DATA_DIR)["sst2"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = ode_bert.from_pretrained(runs[-1] / "model", BertForSequenceClassification).eval()  # one run
    growth = []
    for chunk in ([3, 10], [17, 4], [11]):  # the attack's chunks
        texts = [examples[i].text_a for i in chunk]
        inputs = dict(tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt"))
        growth += initial_value_growth(model, inputs, tol=1e-3, max_iterations=50).growth.tolist()
    assert result["points"][-1]["growth"] == pytest.approx(float(np.median(growth)), rel=1e-9)
    assert [p["robust_accuracy"] for p in result["points"]] == [[80.0, 60.0], [80.0, 40.0], [80.0, 20.0]]
    x = [p["growth"] for p in result["points"]]
    pearson = next(r for r in result["correlations"] if r["x"] == "growth" and r["y"] == "robust@0.05")
    assert pearson["r"] == pytest.approx(float(np.corrcoef(x, [60.0, 40.0, 20.0])[0, 1]))
    assert (out / "growth_vs_robust@0.05.png").stat().st_size > 0
    assert not (out / "growth_vs_robust@0.01.png").exists()  # constant robust accuracy: no correlation
    assert "| growth | robust@0.01 | 3 | constant values: undefined |" in (out / "table.md").read_text()


@needs_data
def test_partial_cuts_every_run_to_the_examples_all_completed(tiny_model: str, tmp_path: Path) -> None:
    """``--partial``: an unfinished attack (its complete chunks: the first 4 of 5 examples) is measured beside
    a finished one, both cut to those 4 examples and scored on them; without it the unfinished run is
    refused."""
    robust, flipped = (True, [None, None], None), (True, [None, "white-box"], 0.03)
    grid = tmp_path / "grid"
    finished = _attacked_run(grid, tiny_model, "bert", 1, [robust, robust, flipped, robust, flipped])
    unfinished = _attacked_run(grid, tiny_model, "ex", 1, [flipped, robust, robust, robust, robust])
    folder = unfinished / "attacks" / "sst2-pgd-l2"
    settings = json.loads((folder / "summary.json").read_text())["settings"]
    (folder / "summary.json").unlink()
    write_json_atomic(folder / "config.json", settings)
    lines = (folder / "records.jsonl").read_text().splitlines()
    (folder / "records.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # a torn last line

    out = tmp_path / "growth"
    argv = [str(finished), str(unfinished), "--out", str(out), "--tol", "1e-3"]
    with pytest.raises(SystemExit):
        attack_growth.main(argv)
    attack_growth.main([*argv, "--partial"])
    result = json.loads((out / "points.json").read_text())
    assert result["partial"] and [p["n"] for p in result["points"]] == [4, 4]
    assert [p["robust_accuracy"] for p in result["points"]] == [[100.0, 75.0], [100.0, 75.0]]
    examples = data.load_clean_dev("sst2", DATA_DIR)["sst2"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = ode_bert.from_pretrained(finished / "model", BertForSequenceClassification).eval()
    growth = []
    for chunk in ([3, 10], [17, 4]):  # the first two chunks of the attack
        texts = [examples[i].text_a for i in chunk]
        inputs = dict(tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt"))
        growth += initial_value_growth(model, inputs, tol=1e-3, max_iterations=50).growth.tolist()
    assert result["points"][0]["growth"] == pytest.approx(float(np.median(growth)), rel=1e-9)
    assert "Interim (--partial): each run cut to its first 4" in (out / "table.md").read_text()
