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
