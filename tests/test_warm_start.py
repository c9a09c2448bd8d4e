"""Warm starts of implicit steps (issue 18): the solver's initial guess, the per-example store, training.

References: the cold solve of the same equation (the fixed point does not depend on the start), the
analytic implicit steps of a linear ODE, central finite differences for the implicit gradient, and the
uninterrupted training run for resuming.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel

import ode_bert
import solvers
from ode_bert import data
from ode_bert import train as train_module
from ode_bert.train import TrainConfig, train
from ode_bert.warm_start import WarmStartStore

F64 = torch.float64
DATA_DIR = Path(os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")


def _tiny_bert(dtype: torch.dtype = F64, **changes: object) -> BertModel:
    """A 2-layer random BERT without dropout (so two forwards solve the same equation) whose implicit
    equations take several Anderson iterations (initializer range 0.2)."""
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config).to(dtype)
    ode_bert.im_bert(model, **{"tol": 1e-10, "max_iter": 60, **changes})
    return model.train()


def _padded_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(5, 50, (4, 10), generator=generator)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    return {"input_ids": input_ids, "attention_mask": mask}


def _perturb(model: torch.nn.Module, size: float = 0.01, seed: int = 1) -> None:
    """Multiply every weight by ``1 + size * noise``: the drift of an epoch of fine-tuning, roughly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + size * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _nfev(model: torch.nn.Module) -> list[int]:
    return [s.nfev for s in ode_bert.solver_stats(model)]


def test_warm_start_reaches_the_cold_fixed_point_with_fewer_evaluations() -> None:
    model, batch = _tiny_bert(), _padded_batch()
    real = batch["attention_mask"].bool()
    store = WarmStartStore()
    with store.batch(model, [10, 11, 12, 13], batch["attention_mask"]):
        first = model(**batch).last_hidden_state
    assert store.stats()["cold"] == 8 and store.stats()["warm"] == 0 and len(store) == 4
    # what is stored: the increment of every layer over the real tokens (6 + 10 + 3 + 10 of them)
    shapes = [tuple(store.entries[i][0].shape) for i in (10, 11, 12, 13)]
    assert shapes == [(10, 32), (6, 32), (10, 32), (3, 32)]
    assert store.nbytes == 2 * 29 * 32 * 2  # 2 layers, 29 real tokens, hidden 32, float16
    _perturb(model)
    with store.batch(model, [10, 11, 12, 13], batch["attention_mask"]):
        warm = model(**batch).last_hidden_state
    warm_nfev = _nfev(model)
    assert store.stats()["warm"] == 8
    cold = model(**batch).last_hidden_state  # outside the context: a cold solve
    cold_nfev = _nfev(model)
    assert all(s.converged for s in ode_bert.solver_stats(model))
    scale = cold[real].abs().max()
    assert (warm - cold)[real].abs().max() <= 1e-8 * scale  # same fixed point (tol 1e-10 per layer)
    assert (first - cold)[real].abs().max() > 1e-3 * scale  # the perturbation did move it
    # each layer needs fewer evaluations: no predictor, and a start nearer the root
    assert all(w < c for w, c in zip(warm_nfev, cold_nfev)), (warm_nfev, cold_nfev)
    assert sum(cold_nfev) - sum(warm_nfev) >= 4, (warm_nfev, cold_nfev)


def test_mixed_known_rows_and_evaluation_mode() -> None:
    model, batch = _tiny_bert(), _padded_batch()
    store = WarmStartStore()
    first_two = {k: v[:2] for k, v in batch.items()}
    with store.batch(model, [0, 1], first_two["attention_mask"]):
        model(**first_two)
    _perturb(model)
    with store.batch(model, [0, 1, 2, 3], batch["attention_mask"]):
        mixed = model(**batch).last_hidden_state
    assert store.stats()["warm"] == 2 * 2 and store.stats()["cold"] == 2 * 2 + 2 * 2  # (ids, layers)
    cold = model(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (mixed - cold)[real].abs().max() <= 1e-8 * cold[real].abs().max()
    # evaluation mode: the store is neither read nor written (evaluation starts cold)
    model.eval()
    before = store.state_dict()
    with store.batch(model, [0, 1, 2, 3], batch["attention_mask"]):
        model(**batch)
    after = store.state_dict()
    assert store.stats()["warm"] == 4 and torch.equal(before["data"], after["data"])


@pytest.mark.parametrize("name", ["implicit_euler", "trapezoid", "implicit_midpoint"])
def test_solver_guess_on_some_rows_matches_the_analytic_step(name: str) -> None:
    """Linear ODE y' = A y: each implicit step is a known linear map of y. Rows with the exact result as a
    guess converge at once; the others start from the predictor, evaluated on those rows only."""
    torch.manual_seed(0)
    a = -torch.eye(3, dtype=F64) + 0.3 * torch.randn(3, 3, dtype=F64)
    y = torch.randn(4, 3, dtype=F64)
    dt = 0.4
    eye = torch.eye(3, dtype=F64)
    if name == "implicit_euler":
        step_map = torch.linalg.inv(eye - dt * a)
    else:  # trapezoid and implicit midpoint agree on linear problems
        step_map = torch.linalg.inv(eye - 0.5 * dt * a) @ (eye + 0.5 * dt * a)
    exact = y @ step_map.T
    rows_seen: list[int] = []

    def f(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        rows_seen.append(z.shape[0])
        return z @ a.T

    def restrict(index: torch.Tensor):  # row compaction: the field on some rows
        return lambda t, z: f(t, z)

    field = solvers.RowMap(f, restrict)
    method = solvers.get(name, tol=1e-12, max_iter=80)
    cold, cold_info = method.step(field, 0.0, y, dt)
    known = torch.tensor([True, False, True, False])
    rows_seen.clear()
    guess = torch.where(known[:, None], exact, torch.full_like(exact, float("nan")))  # unknown: ignored
    warm, warm_info = method.step(field, 0.0, y, dt, guess=guess, known=known)
    torch.testing.assert_close(cold, exact, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(warm, exact, rtol=1e-10, atol=1e-12)
    if name == "trapezoid":  # f(t, y) is part of its equation: evaluated on the whole batch anyway
        assert rows_seen[0] == 4
    else:  # the predictor ran on the two unknown rows only
        assert rows_seen[0] == 2
    all_known, all_info = method.step(field, 0.0, y, dt, guess=exact)
    torch.testing.assert_close(all_known, exact, rtol=1e-10, atol=1e-12)
    assert all_info.nfev < warm_info.nfev <= cold_info.nfev
    assert int(all_info.root.iterations.max()) <= 1


def test_solver_guess_is_validated() -> None:
    method = solvers.get("implicit_euler", tol=1e-8)
    y = torch.randn(3, 2, dtype=F64)

    def f(t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -z

    with pytest.raises(ValueError, match=r"shaped, typed and placed like the state: got \(3, 3\)"):
        method.step(f, 0.0, y, 0.1, guess=torch.zeros(3, 3, dtype=F64))
    with pytest.raises(ValueError, match="float32 on cpu, the state is"):
        method.step(f, 0.0, y, 0.1, guess=torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"bool tensor with one entry per sample, shape \(3,\)"):
        method.step(f, 0.0, y, 0.1, guess=y, known=torch.ones(3))
    with pytest.raises(ValueError, match="known was given without a guess"):
        method.step(f, 0.0, y, 0.1, known=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN or Inf on a sample marked known"):
        nan = torch.full_like(y, float("nan"))
        method.step(f, 0.0, y, 0.1, guess=nan, known=torch.tensor([False, True, False]))
    with pytest.raises(TypeError, match="guess must be a torch.Tensor"):
        method.step(f, 0.0, y, 0.1, guess=[0.0])


def test_lru_byte_bound_evicts_least_recently_used_ids() -> None:
    model = _tiny_bert(torch.float32, tol=1e-3, max_iter=8)
    batch = _padded_batch()
    one = {k: v[:1] for k, v in batch.items()}  # 10 real tokens: 2 layers x 10 x 32 x 2 bytes = 1,280
    store = WarmStartStore(max_bytes=2 * 1280)
    for example_id in (0, 1, 0, 2):  # reading id 0 again makes it more recent than id 1
        with store.batch(model, [example_id], one["attention_mask"]):
            model(**one)
        assert store.nbytes <= store.max_bytes
    assert list(store.entries) == [0, 2] and store.stats()["evicted"] == 1
    assert store.stats()["warm"] == 2 and store.stats()["cold"] == 6 and store.nbytes == 2 * 1280
    tiny = WarmStartStore(max_bytes=1000)  # one example does not fit: nothing is kept
    with tiny.batch(model, [5], one["attention_mask"]):
        model(**one)
    assert len(tiny) == 0 and tiny.nbytes == 0
    # the state round-trips in LRU order
    again = WarmStartStore(max_bytes=2 * 1280)
    again.load_state_dict(store.state_dict())
    assert list(again.entries) == [0, 2] and again.nbytes == store.nbytes
    pairs = [(i, layer) for i in (0, 2) for layer in (0, 1)]
    assert all(torch.equal(again.entries[i][layer], store.entries[i][layer]) for i, layer in pairs)
    with pytest.raises(ValueError, match="max_bytes 2560, dtype 'float16'; this one 100, float16"):
        WarmStartStore(max_bytes=100).load_state_dict(store.state_dict())


def test_implicit_gradient_with_a_warm_start_matches_finite_differences() -> None:
    model, batch = _tiny_bert(tol=1e-12, max_iter=100), _padded_batch()
    ids = [0, 1, 2, 3]
    real = batch["attention_mask"].bool()[..., None]
    weights = torch.randn(4, 10, 32, dtype=F64, generator=torch.Generator().manual_seed(5))
    store = WarmStartStore(dtype=torch.float32)

    def loss() -> torch.Tensor:
        return (model(**batch).last_hidden_state * weights * real).sum()

    with store.batch(model, ids, batch["attention_mask"]):
        loss()
    _perturb(model)
    params = dict(model.named_parameters())
    chosen = [("encoder.layer.0.attention.self.query.weight", (3, 5)),
              ("encoder.layer.1.intermediate.dense.weight", (7, 2)),
              ("encoder.layer.1.output.LayerNorm.weight", (4,))]  # fmt: skip
    model.zero_grad()
    with store.batch(model, ids, batch["attention_mask"]):
        value = loss()
    assert store.stats()["warm"] == 8
    value.backward()
    eps = 1e-6
    for name, index in chosen:
        param = params[name]
        with torch.no_grad():
            param[index] += eps
            plus = float(loss())
            param[index] -= 2 * eps
            minus = float(loss())
            param[index] += eps
        numeric = (plus - minus) / (2 * eps)
        assert float(param.grad[index]) == pytest.approx(numeric, rel=1e-5, abs=1e-7), name


def test_bad_input_is_refused() -> None:
    model, batch = _tiny_bert(), _padded_batch()
    mask = batch["attention_mask"]
    store = WarmStartStore()
    explicit = BertModel(model.config)
    ode_bert.ex_bert(explicit)
    for target, ids, bad_mask, message in (
        (model, [0, 1, 2], mask, "3 example ids for a batch of 4 rows"),
        (model, [0, 1, 1, 2], mask, r"repeat within the batch: \[1\]"),
        (model, [0, 1, 2, 3], mask[0], "attention_mask must be a"),
        (model, torch.zeros(4), mask, "must be a 1-D integer tensor, got 1-D torch.float32"),
        (explicit, [0, 1, 2, 3], mask, "no implicit layers"),
    ):
        with pytest.raises(ValueError, match=message), store.batch(target, ids, bad_mask):
            pass
    with store.batch(model, [0, 1, 2, 3], mask):
        model(**batch)
    shorter = dict(batch, attention_mask=mask.clone())
    shorter["attention_mask"][0, 8:] = 0  # id 0 now has 8 real tokens where 10 are stored
    with (pytest.raises(ValueError, match="example id 0 has 8 real tokens .* the ids are not stable"),
          store.batch(model, [0, 1, 2, 3], shorter["attention_mask"])):  # fmt: skip
        model(**shorter)
    for variant in ("bert", "ex"):
        with pytest.raises(ValueError, match=f"warm_start needs implicit layers, and variant '{variant}'"):
            TrainConfig(variant=variant, warm_start=True).validate()
    with pytest.raises(ValueError, match="with solver 'rk4' has none"):
        TrainConfig(variant="ode", solver="rk4", warm_start=True).validate()
    TrainConfig(variant="ode", solver="trapezoid", warm_start=True).validate()


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")
@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")
def test_resumed_warm_started_run_equals_the_uninterrupted_one(
    tiny_model: str, tmp_path: Path, train_until_first_checkpoint: Callable[[TrainConfig], None]
) -> None:
    def config(out: str, **changes: object) -> TrainConfig:
        settings: dict[str, object] = {
            "task": "sst2", "model": tiny_model, "variant": "im", "epochs": 2, "batch_size": 8,
            "train_samples": 16, "max_length": 32, "lr": 1e-3, "data_dir": str(DATA_DIR), "tol": 1e-3,
            "max_iter": 8, "output_dir": str(tmp_path / out), "warm_start": True, **changes,
        }  # fmt: skip
        return TrainConfig(**settings)  # type: ignore[arg-type]

    straight = train(config("straight"))
    history = json.loads((straight / "train_history.json").read_text())
    # epoch 1 starts every (example, layer) solve cold, epoch 2 every one warm: 16 examples x 2 layers
    assert [(h["warm_start"]["warm"], h["warm_start"]["cold"]) for h in history] == [(0, 32), (32, 0)]
    assert history[1]["warm_start"]["examples"] == 16 and history[1]["warm_start"]["bytes"] > 0

    train_until_first_checkpoint(config("resumed"))
    saved = train_module.load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")["warm_start"]
    assert saved["index"].shape == (32, 3) and saved["data"].dtype == torch.float16
    with pytest.raises(ValueError, match=r"settings differ .*\['warm_start'\]"):
        train(config("resumed", warm_start=False, resume=True))
    resumed = train(config("resumed", resume=True))

    weights_a = load_file(straight / "model" / "model.safetensors")
    weights_b = load_file(resumed / "model" / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert json.loads((resumed / "train_history.json").read_text()) == history

    # without the store the resumed epoch starts cold, and the weights differ: the store matters
    cold = train(config("cold", warm_start=False))
    weights_c = load_file(cold / "model" / "model.safetensors")
    assert not all(torch.equal(weights_a[k], weights_c[k]) for k in weights_a)


def test_compact_rows_in_training_with_warm_starts() -> None:
    """``compact_rows`` does not act in training (dropout masks), but the two combine: same fixed point."""
    model, batch = _tiny_bert(compact_rows=True), _padded_batch()
    reference = copy.deepcopy(model)
    ode_bert.im_bert(reference, tol=1e-10, max_iter=60)
    store = WarmStartStore()
    with store.batch(model, [0, 1, 2, 3], batch["attention_mask"]):
        model(**batch)
    _perturb(model)
    _perturb(reference)
    with store.batch(model, [0, 1, 2, 3], batch["attention_mask"]):
        warm = model(**batch).last_hidden_state
    cold = reference.train()(**batch).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (warm - cold)[real].abs().max() <= 1e-8 * cold[real].abs().max()


def test_train_flag_reaches_the_config(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ode_bert import cli

    out = tmp_path / "run"
    assert cli.main(["train", "--variant", "ex", "--warm-start", "--output-dir", str(out)]) == 2
    assert "warm_start needs implicit layers, and variant 'ex'" in capsys.readouterr().err
    assert not out.exists()  # refused before anything is written


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")
def test_bench_runs_both_starts_in_lockstep(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import warm_start as bench_warm_start

    monkeypatch.setenv(data.DATA_DIR_ENV, str(DATA_DIR))
    out = tmp_path / "warm_start.json"
    payload = bench_warm_start.main(["--quick", "--model", tiny_model, "--tols", "1e-2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    cold, warm = payload["results"]
    assert (cold["start"], warm["start"]) == ("cold", "warm")
    # same seed, same batches, same dropout draws: epoch 1 is the same work in both runs
    assert cold["epochs"][0]["evals"] == warm["epochs"][0]["evals"]
    assert cold["epochs"][0]["layer_solves"] == 2 * 2  # 32 examples in batches of 16, 2 implicit layers
    assert warm["epochs"][1]["store"]["warm"] == 32 * 2 and warm["epochs"][1]["store"]["cold"] == 0
    assert warm["store_bytes"] == warm["epochs"][1]["store"]["bytes"] > 0 and cold["store_bytes"] == 0


@pytest.mark.slow
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")
def test_adjoint_bench_pairs_every_solve_of_epoch_two(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import adjoint_warm_start

    monkeypatch.setenv(data.DATA_DIR_ENV, str(DATA_DIR))
    out = tmp_path / "adjoint.json"
    payload = adjoint_warm_start.main(["--quick", "--model", tiny_model, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    (result,) = payload["results"]
    first, second = result["epochs"]["epoch 1"], result["epochs"]["epoch 2"]
    assert first["solves"] == second["solves"] == second["paired_solves"] == 2 * 2  # 2 batches x 2 layers
    assert "warm_nfev" not in first and second["paired_cold_nfev"] == second["cold_nfev"]
    assert [row["layer"] for row in second["per_layer"]] == [0, 1]


def test_runs_saved_before_the_setting_existed_still_match() -> None:
    config = TrainConfig(variant="im")
    older = {k: v for k, v in json.loads(json.dumps(config.to_json())).items() if k != "warm_start"}
    assert train_module.settings_differ(older, config) == []
    assert train_module.settings_differ(older, TrainConfig(variant="im", warm_start=True)) == ["warm_start"]


def test_adjoint_probe_counts_without_changing_the_gradient() -> None:
    """``bench.adjoint_warm_start``'s probe: the gradient is the unprobed one, and on an unchanged equation
    the stored adjoint is the exact start (the same weights and batch twice: start error ~0, fewer
    evaluations)."""
    from bench.adjoint_warm_start import AdjointProbe

    batch = _padded_batch()
    model = _tiny_bert(tol=1e-8)
    reference = copy.deepcopy(model)
    reference(**batch).last_hidden_state.pow(2).sum().backward()
    probe = AdjointProbe(layers=2)
    with probe.installed():
        for _ in range(2):
            model.zero_grad()
            probe.batch(list(range(4)), batch["attention_mask"])
            model(**batch).last_hidden_state.pow(2).sum().backward()
            probe.epoch += 1
    pairs = zip(model.parameters(), reference.parameters())
    grads = [(p.grad, q.grad) for p, q in pairs if q.grad is not None]
    assert len(grads) > 10 and all(torch.equal(g, h) for g, h in grads)
    first, second = probe.solves[:2], probe.solves[2:]
    assert [s["layer"] for s in probe.solves] == [1, 0, 1, 0]  # backward visits the layers in reverse
    assert all("warm_nfev" not in s for s in first) and all(s["cold_start_error"] > 1e-3 for s in first)
    cold_first = {s["layer"]: s["cold_nfev"] for s in first}
    for solve in second:
        assert solve["warm_start_error"] < 1e-12 and min(solve["v_cosines"]) > 1 - 1e-12
        assert solve["warm_nfev"] < solve["cold_nfev"] == cold_first[solve["layer"]]
