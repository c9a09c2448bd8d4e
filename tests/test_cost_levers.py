"""The cost levers of implicit layers keep their answers: row compaction (converged samples are no longer
evaluated) gives each sample the result of the whole-batch solve, the reworked finders (Anderson's ring
buffers, Broyden's full memory) still find scipy's fixed points, and the implicit gradient with row
compaction still matches finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch
from transformers import BertConfig, BertForSequenceClassification

import ode_bert
import solvers
from ode_bert.field import LayerField

GAINS = (0.1, 0.6, 0.95, 1.6)  # per-sample difficulty: converge after very different iteration counts


def per_sample_field(gains=GAINS, n: int = 5, seed: int = 1, dtype=torch.float64):
    """``f(t, z)_b = gain_b tanh(W_b z_b)`` with ``||W_b||_2 = 1``, as a ``RowMap``; each sample's product
    is its own matmul, so a sample's value does not depend on which other rows are evaluated."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(len(gains), n, n, generator=gen, dtype=torch.float64)
    w = (w / torch.linalg.matrix_norm(w, ord=2)[:, None, None]).to(dtype)
    gain = torch.tensor(gains, dtype=dtype)
    calls: list[int] = []

    def on(rows: torch.Tensor):
        def f(t, z):
            calls.append(z.shape[0])
            return torch.stack([gain[r] * torch.tanh(w[r] @ z_r) for r, z_r in zip(rows.tolist(), z)])

        return f

    y = torch.randn(len(gains), n, generator=gen, dtype=torch.float64).to(dtype)
    return solvers.RowMap(on(torch.arange(len(gains))), on), y, w, gain, calls


def scipy_fixed_points(y, w, gain, dt: float) -> np.ndarray:
    """Each sample of ``z = y + dt gain tanh(W z)`` solved alone by scipy's hybrid method."""
    out = []
    for yb, wb, gb in zip(y.double().numpy(), w.double().numpy(), gain.double().numpy()):
        def residual(z, yb=yb, wb=wb, gb=gb):
            return yb + dt * gb * np.tanh(wb @ z) - z

        def jacobian(z, wb=wb, gb=gb):
            return dt * gb * (1 - np.tanh(wb @ z) ** 2)[:, None] * wb - np.eye(len(z))

        sol = scipy.optimize.root(residual, yb, jac=jacobian, tol=1e-13)
        assert sol.success, sol.message
        out.append(sol.x)
    return np.stack(out)


@pytest.mark.parametrize("root", ["anderson", "broyden", "picard"])
def test_row_compaction_gives_each_sample_the_whole_batch_result(root):
    field, y, w, gain, calls = per_sample_field()
    results = {}
    for compact in (False, True):
        calls.clear()
        step = solvers.get("implicit_euler", root=root, tol=1e-10, max_iter=200, compact_rows=compact,
                           root_options={"damping": 0.5} if root == "picard" else None)
        z, info = step.step(field, 0.0, y, 1.0)
        results[compact] = (z, info, list(calls))
    (z_full, info_full, calls_full), (z_comp, info_comp, calls_comp) = results[False], results[True]
    assert info_full.root.all_converged and info_comp.root.all_converged
    assert torch.equal(z_comp, z_full)  # bit-identical: same per-sample arithmetic, fewer rows evaluated
    assert torch.equal(info_comp.root.iterations, info_full.root.iterations)
    assert info_comp.root.nfev == info_full.root.nfev
    batch = len(GAINS)
    assert info_full.root.rows == info_full.root.nfev * batch and all(c == batch for c in calls_full)
    # compacted: the first evaluation, one row per sample and iteration, and the one attaching the graph
    assert info_comp.root.rows == 2 * batch + int(info_comp.root.iterations.sum()) == sum(calls_comp) - batch
    assert info_comp.root.rows < info_full.root.rows
    # and the fixed point is the right one
    np.testing.assert_allclose(z_comp.numpy(), scipy_fixed_points(y, w, gain, 1.0), rtol=0, atol=1e-8)


def test_row_compaction_falls_back_to_the_whole_batch_without_rows():
    field, y, _, _, calls = per_sample_field()
    plain = field.fn  # the same field without the row protocol
    step = solvers.get("implicit_euler", tol=1e-10, max_iter=200, compact_rows=True)
    z_plain, info = step.step(plain, 0.0, y, 1.0)
    assert info.root.rows == info.root.nfev * len(GAINS)
    z_rows, _ = step.step(field, 0.0, y, 1.0)
    assert torch.equal(z_plain, z_rows)


@pytest.mark.parametrize("spec", [
    ("anderson", {"m": 2}),  # the ring buffer wraps around many times
    ("anderson", {"m": 5, "beta": 0.5}),
    ("broyden", {}),  # full memory, no line search (the defaults)
    ("broyden", {"m": 3, "max_backtracks": 4}),  # limited memory (oldest pairs overwritten), line search
    ("broyden", {"max_backtracks": 4}),
])
def test_reworked_finders_reach_scipys_fixed_points(spec):
    name, options = spec
    field, y, w, gain, _ = per_sample_field(gains=(0.5, 1.2, 1.8, 2.4), seed=1)
    g = lambda z: y + field(0.0, z)  # noqa: E731  (non-contractive for the last three samples)
    finder = solvers.get_root_finder(name, tol=1e-11, max_iter=300, **options)
    z, info = finder.solve(g, y.clone())
    assert info.all_converged, info.summary()
    np.testing.assert_allclose(z.numpy(), scipy_fixed_points(y, w, gain, 1.0), rtol=0, atol=1e-8)


def test_anderson_is_unchanged_by_the_rows_protocol_in_float32():
    """float32 state (float64 normal equations), the map with and without rows: the same iterates."""
    field, y, _, _, _ = per_sample_field(dtype=torch.float32)
    finder = solvers.get_root_finder("anderson", tol=1e-6, max_iter=100)
    z_rows, info_rows = finder.solve(solvers.RowMap(lambda z: y + field(0.0, z), lambda i: None), y.clone())
    z_plain, info_plain = finder.solve(lambda z: y + field(0.0, z), y.clone())
    assert info_rows.all_converged
    assert torch.equal(z_rows, z_plain) and z_rows.dtype == torch.float32


def test_implicit_gradient_with_row_compaction_matches_finite_differences():
    field, y, _, _, _ = per_sample_field(gains=(0.2, 0.7, 0.9), n=3)
    step = solvers.get("implicit_euler", grad="implicit", tol=1e-12, max_iter=300, compact_rows=True)
    y = y.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: step(field, 0.0, y, 1.0), (y,), eps=1e-6, atol=1e-6)


def test_large_entries_do_not_overflow_the_residual_norm():
    """The plain-norm fast path falls back to the scaled norm where float32 squares would overflow."""
    from solvers.roots._common import bnorm

    a = torch.full((2, 8), 3e19, dtype=torch.float32)
    a[1] = 1.0
    expected = torch.tensor([3e19 * 8**0.5, 8**0.5], dtype=torch.float64)
    torch.testing.assert_close(bnorm(a).double(), expected, rtol=1e-6, atol=0)


def tiny_classifier() -> BertForSequenceClassification:
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, num_labels=2)
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def padded_batch(batch: int = 6, length: int = 16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b, n in enumerate(torch.linspace(2, length, batch).long().tolist()):  # lengths 2 ... 16
        mask[b, n:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_im_bert_with_row_compaction_gives_the_same_logits():
    model = tiny_classifier()
    inputs = padded_batch()
    out, rows, nfev = {}, {}, {}
    for compact in (False, True):
        ode_bert.im_bert(model, tol=1e-6, max_iter=60, compact_rows=compact)
        with torch.no_grad():
            out[compact] = model(**inputs).logits
        stats = ode_bert.solver_stats(model)
        rows[compact] = sum(s.root.rows for s in stats)
        nfev[compact] = [s.nfev for s in stats]
        assert all(s.converged for s in stats)
    assert nfev[True] == nfev[False]
    assert rows[True] < rows[False]
    # each sentence's layer rows are evaluated in a smaller batch: equal up to the rounding of the layer
    torch.testing.assert_close(out[True], out[False], rtol=1e-5, atol=1e-6)


def test_layer_field_on_rows_slices_every_batch_argument():
    model = tiny_classifier()
    inputs = padded_batch()
    captured = LayerField.capture(model.bert, "residual", **inputs)
    field, h = captured[1]
    index = torch.tensor([1, 4])
    sub = field.on_rows(index, h.shape[0])
    assert sub is not None
    with torch.no_grad():
        torch.testing.assert_close(sub(0.0, h[index]), field(0.0, h)[index], rtol=1e-5, atol=1e-6)
    # where slicing could be wrong, it refuses (the caller evaluates the whole batch)
    ambiguous = LayerField(field.layer, "residual", field.args, {**field.kwargs, "extra": torch.zeros(6)})
    assert ambiguous.on_rows(index, 6) is None
    model.train()
    assert field.on_rows(index, h.shape[0]) is None
