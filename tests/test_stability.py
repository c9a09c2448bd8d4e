"""Stability analysis against independent references: analytic stability functions, published stability
intervals, exp(z) Taylor coefficients, dense Jacobians (torch.autograd.functional.jacobian) and
torch.linalg spectra, and the stock MiniLM forward pass."""

from __future__ import annotations

import argparse
import json
import math
from fractions import Fraction as F

import matplotlib.pyplot as plt
import numpy as np
import pytest
import sympy
import torch
from transformers import BertConfig, BertModel

import ode_bert
from ode_bert.cli import build_parser, main
from solvers import METHODS, ButcherTableau, Method
from stability_analysis import (
    JacobianOperator,
    example_solves,
    leading_eigenvalues,
    linear_field_growth,
    log_norm,
    perturbation_growth,
    plot_growth,
    plot_stability_region,
    spectral_norm,
    stability_function,
    step_growth,
)
from stability_analysis.cli import analyze_command
from stability_analysis.perturbation import PERTURBATIONS, tokenized_advglue_pairs

z = sympy.Symbol("z")

ANALYTIC = {
    "euler": 1 + z,
    "implicit_euler": 1 / (1 - z),
    "rk4": 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24,
    "trapezoid": (1 + z / 2) / (1 - z / 2),
}


# ------------------------------------------------------------------------------------------------
# Stability functions and their properties
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ANALYTIC))
def test_stability_function_matches_analytic(name: str) -> None:
    function = stability_function(name)
    assert sympy.simplify(function.expr - ANALYTIC[name]) == 0
    assert function.exact
    points = np.array([-0.7 + 0.2j, 0.3 - 1.1j, -2.5 + 0.0j, 1.5j])
    expected = sympy.lambdify(z, ANALYTIC[name], "numpy")(points)
    np.testing.assert_allclose(function(points), expected, rtol=1e-13)


@pytest.mark.parametrize("name", [n for n, cls in METHODS.items() if cls.tableau is not None])
def test_stability_function_agrees_with_exp_to_method_order(name: str) -> None:
    """A method of order p has R(z) = exp(z) + O(z^(p+1)): its first p+1 Taylor coefficients are 1/k!."""
    function = stability_function(name)
    order = METHODS.lookup(name).order
    series = sympy.series(function.expr, z, 0, order + 1).removeO()
    coefficients = [float(series.coeff(z, k)) for k in range(order + 1)]
    np.testing.assert_allclose(coefficients, [1 / math.factorial(k) for k in range(order + 1)], rtol=1e-9)


def test_float_tableau_of_short_fractions_is_recognised_exactly() -> None:
    exact = METHODS.lookup("rk4").tableau
    floats = ButcherTableau(
        A=tuple(tuple(float(a) for a in row) for row in exact.A),
        b=tuple(float(b) for b in exact.b),
        c=tuple(float(c) for c in exact.c),
    )
    function = stability_function(floats)
    assert function.exact
    assert sympy.simplify(function.expr - ANALYTIC["rk4"]) == 0


@pytest.mark.parametrize(
    ("name", "published"), [("euler", 2.0), ("rk4", 2.785), ("bosh3", 2.513), ("dopri5", 3.307)]
)
def test_real_stability_interval_matches_published_value(name: str, published: float) -> None:
    assert round(stability_function(name).real_interval(), 3) == published


@pytest.mark.parametrize("name", ["euler", "heun", "rk4", "bosh3", "dopri5", "dopri8"])
def test_real_interval_is_the_edge_of_the_sampled_region(name: str) -> None:
    """Dense sampling: |R| <= 1 on [-r, 0] and |R| > 1 just beyond -r."""
    function = stability_function(name)
    r = function.real_interval()
    assert np.all(function.abs(np.linspace(-r, 0.0, 20001)) <= 1 + 1e-9)
    assert function.abs(-r - 1e-4) > 1


def test_rk4_imaginary_interval_is_two_sqrt_two() -> None:
    assert stability_function("rk4").imaginary_interval() == pytest.approx(2 * math.sqrt(2), abs=1e-10)
    assert stability_function("euler").imaginary_interval() == 0.0


@pytest.mark.parametrize(
    ("name", "a_stable", "l_stable"),
    [
        ("implicit_euler", True, True),
        ("trapezoid", True, False),
        ("implicit_midpoint", True, False),
        ("euler", False, False),
        ("rk4", False, False),
        ("dopri5", False, False),
    ],
)
def test_a_and_l_stability(name: str, a_stable: bool, l_stable: bool) -> None:
    function = stability_function(name)
    assert function.is_a_stable() is a_stable
    assert function.is_l_stable() is l_stable
    if a_stable:  # independent check on the imaginary axis and in the left half plane
        samples = np.concatenate([1j * np.linspace(-1e3, 1e3, 4001), -np.logspace(-3, 3, 500) + 7j])
        assert np.all(function.abs(samples) <= 1 + 1e-12)
        assert function.real_interval() == math.inf


def test_a_stability_is_rejected_for_a_pole_in_the_left_half_plane() -> None:
    """A one-stage 'method' with A = -1: R = (1 + 2z) / (1 + z) has a pole at -1."""
    tableau = ButcherTableau(A=((F(-1),),), b=(F(1),), c=(F(-1),))
    function = stability_function(tableau)
    assert sympy.simplify(function.expr - (1 + 2 * z) / (1 + z)) == 0
    assert not function.is_a_stable()


def test_unknown_method_and_method_without_tableau_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="Valid names: .*implicit_euler"):
        stability_function("no_such_solver")

    class NoTableau(Method):
        def step(self, f, t, y, dt):  # type: ignore[no-untyped-def]
            return y, None

    with pytest.raises(ValueError, match="no Butcher tableau.*rk4"):
        stability_function(NoTableau)
    with pytest.raises(TypeError, match="solver name"):
        stability_function(3.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# Region plots
# ------------------------------------------------------------------------------------------------


def test_region_plot_with_overlay_saves_png_and_svg(tmp_path) -> None:
    overlay = np.array([-1.0 + 0.5j, -3.0, 0.5 + 2j])
    ax = plot_stability_region(["euler", "rk4", "implicit_euler"], overlay=overlay, overlay_label="layer 0",
                               resolution=101)
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == ["euler", "rk4", "implicit_euler", "layer 0"]
    scatter = ax.collections[-1]
    np.testing.assert_allclose(scatter.get_offsets(), np.c_[overlay.real, overlay.imag])
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml")):
        path = tmp_path / f"regions{suffix}"
        ax.figure.savefig(path)
        assert path.read_bytes().startswith(magic)
    plt.close(ax.figure)
    with pytest.raises(ValueError, match="re_min < re_max"):
        plot_stability_region("euler", extent=(1, -1, -1, 1))


# ------------------------------------------------------------------------------------------------
# Jacobian spectra on a tiny random BERT layer, against dense torch.linalg
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_layer_jacobian():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, initializer_range=0.5)
    layer = BertModel(config).double().eval().encoder.layer[0]
    h = torch.randn(1, 6, 16, dtype=torch.float64)

    def field(x: torch.Tensor) -> torch.Tensor:
        return layer(x) - x

    dense = torch.autograd.functional.jacobian(field, h).reshape(h.numel(), h.numel()).detach()
    return JacobianOperator(field, h), dense


def test_jvp_and_vjp_match_dense_jacobian(tiny_layer_jacobian) -> None:
    operator, dense = tiny_layer_jacobian
    v = torch.randn(dense.shape[0], dtype=torch.float64)
    torch.testing.assert_close(operator.jvp(v), dense @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(operator.vjp(v), dense.T @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_spectral_norm_matches_dense(tiny_layer_jacobian, method: str) -> None:
    operator, dense = tiny_layer_jacobian
    expected = float(torch.linalg.matrix_norm(dense, 2))
    assert spectral_norm(operator, method=method) == pytest.approx(expected, rel=1e-8)


def test_log_norm_matches_dense(tiny_layer_jacobian) -> None:
    operator, dense = tiny_layer_jacobian
    expected = float(torch.linalg.eigvalsh(0.5 * (dense + dense.T)).max())
    assert log_norm(operator) == pytest.approx(expected, rel=1e-8)


def test_arnoldi_eigenvalues_match_dense(tiny_layer_jacobian) -> None:
    operator, dense = tiny_layer_jacobian
    k = 5
    estimated = leading_eigenvalues(operator, k)
    reference = torch.linalg.eigvals(dense).numpy()
    reference = reference[np.argsort(-np.abs(reference))]
    np.testing.assert_allclose(np.abs(estimated), np.abs(reference[:k]), rtol=1e-6)
    for value in estimated:
        assert np.min(np.abs(reference - value)) <= 1e-6 * abs(value)
    rightmost = leading_eigenvalues(operator, 3, which="LR")
    np.testing.assert_allclose(rightmost.real, np.sort(reference.real)[::-1][:3], rtol=1e-6)
    with pytest.raises(ValueError, match="k must be an integer"):
        leading_eigenvalues(operator, dense.shape[0])
    with pytest.raises(ValueError, match="LM, LR"):
        leading_eigenvalues(operator, 2, which="SM")


# ------------------------------------------------------------------------------------------------
# Perturbation growth
# ------------------------------------------------------------------------------------------------

ANALYTIC_ABS_R = {
    "euler": lambda x: np.abs(1 + x),
    "implicit_euler": lambda x: 1 / np.abs(1 - x),
    "rk4": lambda x: np.abs(1 + x + x**2 / 2 + x**3 / 6 + x**4 / 24),
}


@pytest.mark.parametrize(
    ("name", "eigenvalues"),
    [
        ("euler", [-0.5, -2.5, 0.3, -0.2 + 0.6j, -1.0 + 2.0j]),
        ("implicit_euler", [-0.5, -0.9, 0.3, -0.2 + 0.6j, -0.7 - 0.5j]),
        ("rk4", [-0.5, -2.5, -3.0, -0.2 + 0.6j, 2.5j]),
    ],
)
@pytest.mark.parametrize("dt", [1.0, 0.5])
def test_linear_field_growth_equals_abs_r(name: str, eigenvalues: list[complex], dt: float) -> None:
    measured = linear_field_growth(name, eigenvalues, dt=dt, steps=3)
    np.testing.assert_allclose(measured, ANALYTIC_ABS_R[name](dt * np.array(eigenvalues)), rtol=1e-7)


def test_step_growth_rejects_zero_perturbation() -> None:
    y = torch.ones(1, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="non-zero"):
        step_growth("euler", lambda t, x: -x, y, torch.zeros_like(y))


SENTENCES = [
    "the film is a quiet , moving portrait of a family .",
    "a dull and lifeless movie .",
    "the committee approved the budget after a long debate .",
]


@pytest.fixture(scope="module")
def minilm():
    from ode_bert.pretrained import load_model

    model, tokenizer = load_model(None)
    return model.eval(), tokenizer


# The last layer's implicit solve can stop at a ~1e-4 relative residual; the curve reports it instead.
@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")
def test_minilm_noise_growth_explicit_vs_implicit(minilm) -> None:
    model, tokenizer = minilm
    curves = perturbation_growth(model, tokenizer, SENTENCES, ["euler", "implicit_euler"], "noise",
                                 eps=0.01, max_length=16)
    layers = model.config.num_hidden_layers
    for name, curve in curves.items():
        print(name, "mean", np.round(curve.mean, 4), "std", np.round(curve.std, 4),
              "max root residual", curve.max_residual)
        assert curve.ratios.shape == (len(SENTENCES), layers + 1)
        assert np.all(np.isfinite(curve.ratios))
        np.testing.assert_allclose(curve.ratios[:, 0], 1.0, rtol=1e-6)
    assert curves["implicit_euler"].max_residual is not None and curves["euler"].max_residual is None

    # euler, step 1, residual field is the stock model: recompute its curve from the unconverted forward.
    encoded = tokenizer(SENTENCES, padding=True, truncation=True, max_length=16, return_tensors="pt")
    mask = encoded["attention_mask"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(encoded["input_ids"])
        noise = torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        noise = noise.to(embeds) * mask[:, :, None]
        per_sequence = torch.linalg.vector_norm(noise.flatten(1), dim=1) / mask.sum(1).double().sqrt()
        noise = noise * (0.01 / per_sequence.to(noise))[:, None, None]
        clean = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True).hidden_states
        noisy = model(inputs_embeds=embeds + noise, attention_mask=mask,
                      output_hidden_states=True).hidden_states
    norms = torch.stack([torch.linalg.vector_norm(((b - a) * mask[:, :, None]).flatten(1), dim=1)
                         for a, b in zip(clean, noisy)], dim=1)
    np.testing.assert_allclose(curves["euler"].ratios, (norms / norms[:, :1]).numpy(), rtol=1e-4)
    plt.close(plot_growth(curves).figure)


def test_minilm_worst_direction_beats_random_noise(minilm) -> None:
    model, tokenizer = minilm
    kwargs = dict(eps=0.01, max_length=16, seed=1)
    noise = perturbation_growth(model, tokenizer, SENTENCES[:2], ["euler"], "noise", **kwargs)["euler"]
    worst = perturbation_growth(model, tokenizer, SENTENCES[:2], ["euler"], "worst", attack_steps=3,
                                **kwargs)["euler"]
    print("final-layer growth noise", noise.ratios[:, -1], "worst", worst.ratios[:, -1])
    assert np.all(worst.ratios[:, -1] > noise.ratios[:, -1])


def test_minilm_advglue_pairs_growth(minilm) -> None:
    model, tokenizer = minilm
    clean, adversarial = tokenized_advglue_pairs(tokenizer, "sst2", max_pairs=3, max_length=24)
    assert clean["input_ids"].shape == adversarial["input_ids"].shape
    assert torch.all((clean["input_ids"] != adversarial["input_ids"]).any(dim=1))
    curve = perturbation_growth(model, tokenizer, None, ["euler"], "advglue", max_pairs=3,
                                max_length=24)["euler"]
    print("advglue euler", np.round(curve.mean, 4))
    assert curve.ratios.shape == (3, model.config.num_hidden_layers + 1)
    assert np.all(np.isfinite(curve.ratios)) and np.allclose(curve.ratios[:, 0], 1.0)
    with pytest.raises(ValueError, match="noise, worst, advglue"):
        perturbation_growth(model, tokenizer, SENTENCES, ["euler"], "gaussian")
    with pytest.raises(ValueError, match="available: .*rk4"):
        perturbation_growth(model, tokenizer, SENTENCES, ["eulr"], "noise")


def test_analyze_cli_writes_plots_and_json(tmp_path, minilm, capsys: pytest.CaptureFixture[str]) -> None:
    """``ode-bert analyze`` as installed: ode_bert finds the command through its entry point."""
    assert main(["analyze", "--solvers", "euler,rk4", "--perturbation", "noise", "--num-examples", "2",
                 "--max-length", "12", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "analysis.json").read_text())
    assert report["stability"]["rk4"]["real_interval"] == pytest.approx(2.7853, abs=1e-4)
    assert set(report["growth"]["noise"]) == {"euler", "rk4"}
    assert report["growth"]["noise"]["euler"]["mean"][0] == pytest.approx(1.0)
    for name in ("regions.png", "growth_noise.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert main(["analyze", "--solvers", "euler,nope", "--out", str(tmp_path)]) == 2
    assert "unknown solver(s) nope" in capsys.readouterr().err
    assert "analyze" in build_parser().format_help()


def test_analyze_options_name_what_the_analysis_accepts() -> None:
    """The command adds its options without importing torch, so it lists framings and kinds itself."""
    parser = argparse.ArgumentParser()
    analyze_command(parser)
    options = {action.dest: action for action in parser._actions}
    assert options["field"].choices == list(ode_bert.FRAMINGS)
    assert all(kind in options["perturbation"].help for kind in PERTURBATIONS)


def test_example_solves_match_each_input_solved_alone() -> None:
    """Rows follow the inputs across batches: batched records equal each input's record solved on its own."""
    from ode_bert import im_bert
    from ode_bert.pretrained import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(None, num_labels=2)
    # 3 iterations: most solves stop short of tol, so the residuals compared are well above float noise
    im_bert(model, layers="1-2", max_iter=3, on_failure="ignore")
    texts = [*SENTENCES, ("is the budget approved ?", "the committee approved the budget .")]
    batched = example_solves(model, tokenizer, texts, max_length=24, batch_size=3)
    alone = [example_solves(model, tokenizer, [text], max_length=24) for text in texts]
    assert batched.layers == [1, 2] and batched.iterations.shape == (len(texts), 2)
    for name in ("iterations", "converged"):
        assert torch.equal(getattr(batched, name), torch.cat([getattr(a, name) for a in alone]))
    residuals = torch.cat([a.rel_residual for a in alone])
    print("relative residuals per input and layer", residuals)
    assert len(set(residuals[:, 0].tolist())) == len(texts)  # distinct per input, so rows cannot be swapped
    torch.testing.assert_close(batched.rel_residual, residuals, rtol=1e-3, atol=0)
    assert torch.equal(batched.predictions, torch.cat([a.predictions for a in alone]))
    assert torch.equal(batched.total_iterations, batched.iterations.sum(1))
    assert torch.equal(batched.all_converged, batched.converged.all(1))
    picked = batched.select([3, 0, 3])  # rows in the order asked, repeats allowed
    for name in ("iterations", "rel_residual", "converged", "predictions"):
        assert torch.equal(getattr(picked, name), getattr(batched, name)[[3, 0, 3]])
    assert picked.layers == batched.layers
    stock, _ = load_model(None)
    with pytest.raises(ValueError, match="no implicit layer"):
        example_solves(stock, tokenizer, texts)


# ------------------------------------------------------------------------------------------------
# Issue 20: what the analyze plots show
# ------------------------------------------------------------------------------------------------


def test_region_overlay_holds_the_rightmost_eigenvalues_and_the_abscissa() -> None:
    """A matrix whose largest-magnitude eigenvalues are far left and whose rightmost ones are small: the
    overlay shows the rightmost (numpy.linalg.eigvals), and the abscissa is their largest real part."""
    from stability_analysis.perturbation import block_matrix
    from stability_analysis.spectra import jacobian_spectrum, region_overlay, spectral_abscissa

    M, _ = block_matrix([-6.0, -5.0 + 2.0j, -4.5, 1.1, 0.4 + 0.3j, -0.2, -1.0 + 0.5j], seed=3)
    h = torch.randn(1, M.shape[0], dtype=torch.float64)
    spectrum = jacobian_spectrum(lambda x: x @ M.T, h, k=3, layer=2, which="LR")
    reference = np.linalg.eigvals(M.numpy())
    rightmost = reference[np.argsort(-reference.real)][:3]
    np.testing.assert_allclose(np.sort_complex(spectrum.eigenvalues), np.sort_complex(rightmost), atol=1e-8)
    assert spectral_abscissa(spectrum) == pytest.approx(reference.real.max(), abs=1e-8)  # 1.1
    (label, points), = region_overlay([spectrum], step=0.5).items()
    assert label == "layer 2 (α = +1.10)"
    np.testing.assert_allclose(points, 0.5 * spectrum.eigenvalues)
    largest = jacobian_spectrum(lambda x: x @ M.T, h, k=3, which="LM")
    assert largest.eigenvalues.real.max() < 0  # what the old overlay drew: all left of the abscissa
    with pytest.raises(ValueError, match="rightmost eigenvalues"):
        spectral_abscissa(largest)


@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")
def test_residual_tracker_reports_the_worst_of_all_forwards(tiny_model: str) -> None:
    """The harder input first, then an easier one: the curve's residual is the worst, not the last one's."""
    from stability_analysis.perturbation import ResidualTracker

    model = ode_bert.convert(BertModel.from_pretrained(tiny_model).eval(), "implicit_euler", root="picard",
                             max_iter=3)

    def worst_residual(ids: list[int]) -> float:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        return max(s.residual for s in ode_bert.solver_stats(model))

    inputs = [[2, 10, 11, 12, 3], [2, 30, 5, 41, 20, 7, 3]]
    inputs.sort(key=worst_residual, reverse=True)
    tracker = ResidualTracker(model)
    seen = [worst_residual(ids) for ids in inputs]
    tracker.detach()
    worst_residual(inputs[0])  # after detach: not counted
    assert seen[0] > seen[1]  # the last forward alone would under-report
    assert tracker.max_residual == max(seen) and tracker.forwards == 2


def test_growth_plot_draws_medians_and_each_sequence_or_a_quantile_band() -> None:
    from stability_analysis.perturbation import GrowthCurve

    rng = np.random.default_rng(0)
    few = GrowthCurve("euler", "noise", np.exp(rng.normal(size=(4, 7)) * 3))
    ax = plot_growth([few])
    median, *sequences = ax.get_lines()[:5]
    np.testing.assert_allclose(median.get_ydata(), np.median(few.ratios, axis=0))
    np.testing.assert_allclose(np.array([line.get_ydata() for line in sequences]), few.ratios)
    assert ax.get_yscale() == "log" and not ax.collections  # no band below zero to clip
    plt.close(ax.figure)
    many = GrowthCurve("implicit_euler", "advglue", np.exp(rng.normal(size=(40, 7))), max_residual=0.12,
                       forwards=3)
    ax = plot_growth([many])
    (band,) = ax.collections
    low, high = np.quantile(many.ratios, 0.1, axis=0), np.quantile(many.ratios, 0.9, axis=0)
    vertices = band.get_paths()[0].vertices[:, 1]
    assert vertices.min() == pytest.approx(low.min()) and vertices.max() == pytest.approx(high.max())
    assert "root residual up to 0.12 over 3 forwards" in ax.get_legend().get_texts()[0].get_text()
    plt.close(ax.figure)


# ------------------------------------------------------------------------------------------------
# Issue 20: the demo's computations
# ------------------------------------------------------------------------------------------------


def test_demo_amplification_is_the_stability_function() -> None:
    from stability_analysis.demo import amplification

    z = np.array([0.62, 0.25 + 0.06j, -1.5 + 0.4j, 0.85 - 0.03j])
    factors = amplification(z)
    np.testing.assert_allclose(factors["stock (Euler, step 1)"], stability_function("euler").abs(z))
    np.testing.assert_allclose(factors["EX (Euler, step 0.5)"], stability_function("euler").abs(0.5 * z))
    np.testing.assert_allclose(factors["IM (implicit Euler, step 0.5)"],
                               stability_function("implicit_euler").abs(0.5 * z))


def test_demo_head_is_the_penalised_logistic_regression_optimum() -> None:
    """``fit_head`` (L-BFGS in torch) predicts as scipy's minimiser of the same objective does."""
    from scipy.optimize import minimize

    from stability_analysis.demo import fit_head

    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 5)) * [1, 3, 0.5, 2, 1] + 4
    score = x @ [1.0, -0.5, 2.0, 0.3, 0.0] + rng.normal(scale=1.5, size=120)
    y = (score > np.median(score)).astype(int)
    predict = fit_head(torch.from_numpy(x), torch.from_numpy(y), weight_decay=1e-2)
    mean, scale = x.mean(0), x.std(0, ddof=1)
    xs = (x - mean) / scale

    def objective(params: np.ndarray) -> float:
        w, b = params[:10].reshape(5, 2), params[10:]
        logits = xs @ w + b
        logits = logits - logits.max(1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        return -log_p[np.arange(len(y)), y].mean() + 1e-2 * (w**2).sum()

    best = minimize(objective, np.zeros(12), method="BFGS", options={"gtol": 1e-10}).x
    test = rng.normal(size=(400, 5)) * [1, 3, 0.5, 2, 1] + 4
    expected = (((test - mean) / scale) @ best[:10].reshape(5, 2) + best[10:]).argmax(1)
    assert np.array_equal(predict(torch.from_numpy(test)).numpy(), expected)


@pytest.mark.slow
def test_demo_quick_writes_its_outputs(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ode-bert demo --quick`` end to end (about a minute of CPU): the PNG, the summary and the numbers."""
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[3/3 heads]") == 3 and "What this shows" in printed
    assert (tmp_path / "demo.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((tmp_path / "demo.json").read_text())
    assert len(report["eigenvalues"]["spectral_abscissa"]) == 6
    assert all(len(s["clean"]) == 3 for s in report["heads"]["scores"])
    assert "| IM-BERT (implicit Euler, step 0.5) |" in (tmp_path / "demo.md").read_text()


def test_demo_features_come_back_in_the_order_of_the_texts(tiny_model: str) -> None:
    """Batches are sorted by length; each row must still be its own sentence's mean-pooled state."""
    from transformers import AutoTokenizer

    from stability_analysis.demo import sentence_features

    model, tokenizer = BertModel.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)
    texts = ["a much longer sentence than the others", "ok", "short one", "mid length text", "x"]
    features = sentence_features(model, tokenizer, texts, max_length=32, label="tiny", batch_size=2)
    with torch.no_grad():
        alone = [model(**tokenizer([t], return_tensors="pt")).last_hidden_state[0].mean(0) for t in texts]
    np.testing.assert_allclose(features.numpy(), torch.stack(alone).double().numpy(), atol=1e-5)
