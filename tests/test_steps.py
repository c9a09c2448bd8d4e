"""Step methods beyond explicit RK: convergence orders, stiffness, adaptive solvers, tableaux, bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch
import torchdiffeq

import solvers
from solvers import ButcherTableau, ConvergenceError, ConvergenceWarning, DivergenceError

F64 = torch.float64
# A contraction-friendly 2-D linear system with a rotation, solved exactly by the matrix exponential.
LINEAR = np.array([[-0.5, 1.0], [-1.0, -0.5]])


def scalar_field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -y + torch.sin(t)


def scalar_exact(t: float) -> np.ndarray:
    """Exact solution of y' = -y + sin t, y(0) = 1."""
    return np.array([1.5 * math.exp(-t) + 0.5 * (math.sin(t) - math.cos(t))])


def linear_field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y @ torch.as_tensor(LINEAR).T


def linear_exact(t: float) -> np.ndarray:
    return scipy.linalg.expm(LINEAR * t) @ np.array([1.0, 0.0])


PROBLEMS = {
    "scalar": (scalar_field, torch.tensor([1.0], dtype=F64), scalar_exact),
    "linear": (linear_field, torch.tensor([1.0, 0.0], dtype=F64), linear_exact),
}
IMPLICIT = ("implicit_euler", "trapezoid", "implicit_midpoint")
IMPLICIT_OPTIONS = {"root": "picard", "tol": 1e-13, "max_iter": 200}


def final_error(method: str, problem: str, steps: int, **options: object) -> float:
    field, y0, exact = PROBLEMS[problem]
    step = solvers.get(method, **options)
    y, dt = y0, 1.0 / steps
    for k in range(steps):
        y, _ = step.step(field, k * dt, y, dt)
    return float(np.abs(y.numpy() - exact(1.0)).max())


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize(
    ("method", "order"),
    [
        ("euler", 1),
        ("implicit_euler", 1),
        ("midpoint", 2),
        ("heun", 2),
        ("trapezoid", 2),
        ("implicit_midpoint", 2),
        ("rk4", 4),
    ],
)
def test_convergence_order(method: str, order: int, problem: str) -> None:
    options = IMPLICIT_OPTIONS if method in IMPLICIT else {}
    steps = np.array([8, 16, 32, 64])
    errors = np.array([final_error(method, problem, int(n), **options) for n in steps])
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - order) < 0.15, f"{method} on {problem}: observed order {slope:.3f}, errors {errors}"
    assert solvers.get(method, **options).order == order


def test_implicit_methods_with_default_root_finder_match_picard() -> None:
    """The default finder (DEFAULT_ROOT) solves the same equations as Picard iteration."""
    for method in ("implicit_euler", "trapezoid", "implicit_midpoint"):
        default = final_error(method, "linear", 16, tol=1e-13, max_iter=200)
        picard = final_error(method, "linear", 16, **IMPLICIT_OPTIONS)
        assert default == pytest.approx(picard, rel=1e-6), method


@pytest.mark.parametrize("root", ["picard", "anderson", "newton_krylov", "broyden", "gd"])
def test_step_info_counts_every_evaluation(root: str) -> None:
    calls = 0

    def counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return scalar_field(t, y)

    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    for method in IMPLICIT:
        for init in ("explicit", "previous"):
            for grad_enabled in (False, True):
                calls = 0
                step = solvers.get(method, init=init, root=root, tol=1e-12, max_iter=200)
                with torch.set_grad_enabled(grad_enabled):
                    _, info = step.step(counted, 0.0, y0, 0.1)
                assert info.nfev == calls, (method, init, grad_enabled)
                assert info.root is not None and info.root.all_converged
                if root == "picard":  # f(t, y) once if the predictor or the method needs it, + one per g call
                    before = int(init == "explicit" or method == "trapezoid")
                    assert calls == before + info.root.nfev, (method, init, grad_enabled)


def test_explicit_initial_guess_is_the_euler_predictor() -> None:
    """One Picard iteration from the Euler predictor gives y + dt f(t + dt, y + dt f(t, y))."""
    y0 = torch.tensor([0.3, -0.2], dtype=F64)
    dt = 0.1
    step = solvers.get("implicit_euler", root="picard", max_iter=1, on_failure="ignore")
    with torch.no_grad():
        y1, info = step.step(linear_field, 0.0, y0, dt)
    predictor = y0 + dt * linear_field(torch.tensor(0.0), y0)
    torch.testing.assert_close(y1, y0 + dt * linear_field(torch.tensor(dt), predictor))
    assert not info.root.all_converged


@pytest.mark.parametrize("grad", ["implicit", "unroll"])
def test_initial_guesses_of_each_method(grad: str) -> None:
    """One Picard iteration from each initial guess, against the formula written out by hand."""
    y0 = torch.tensor([0.3, -0.2], dtype=F64)
    dt, t = 0.1, 0.2

    def f(s: float, y: torch.Tensor) -> torch.Tensor:
        return scalar_field(torch.tensor(s, dtype=F64), y)

    guesses = {"explicit": lambda h: y0 + h * f(t, y0), "previous": lambda h: y0}
    for init, guess in guesses.items():
        expected = {
            "implicit_euler": y0 + dt * f(t + dt, guess(dt)),
            "trapezoid": y0 + dt / 2 * (f(t, y0) + f(t + dt, guess(dt))),
            "implicit_midpoint": y0 + dt * f(t + dt / 2, guess(dt / 2)),
        }
        for method, value in expected.items():
            step = solvers.get(method, root="picard", max_iter=1, on_failure="ignore", init=init, grad=grad)
            with torch.no_grad():
                y1, _ = step.step(scalar_field, t, y0, dt)
            torch.testing.assert_close(y1, value, msg=f"{method}, init={init}")


def stiff_field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -1000.0 * (y - torch.cos(t))


def test_stiff_explicit_euler_diverges_and_is_detected() -> None:
    t = torch.linspace(0.0, 2.0, 21, dtype=F64)
    with pytest.raises(DivergenceError, match="implicit method"):
        solvers.odeint(stiff_field, torch.tensor([1.0], dtype=F64), t, "euler", step_size=0.01)


def test_stiff_implicit_euler_tracks_radau() -> None:
    t = torch.linspace(0.0, 2.0, 21, dtype=F64)
    ys, stats = solvers.odeint(stiff_field, torch.tensor([1.0], dtype=F64), t, "implicit_euler",
                               step_size=0.01, root="anderson")
    ref = scipy.integrate.solve_ivp(lambda s, y: -1000.0 * (y - math.cos(s)), (0.0, 2.0), [1.0],
                                    method="Radau", t_eval=t.numpy(), rtol=1e-10, atol=1e-10)
    error = float(np.abs(ys[:, 0].numpy() - ref.y[0]).max())
    assert error < 1e-2, error
    assert stats.steps == 200 and stats.unconverged_steps == 0


def test_van_der_pol_stiff_first_order_with_newton_krylov() -> None:
    """mu = 1000 on the slow branch: implicit Euler error shrinks like O(h) against Radau."""
    mu = 1000.0

    def vdp(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.stack([y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]])

    horizon = 400.0
    t = torch.linspace(0.0, horizon, 5, dtype=F64)
    ref = scipy.integrate.solve_ivp(lambda s, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]], (0.0, horizon),
                                    [2.0, 0.0], method="Radau", t_eval=t.numpy(), rtol=1e-10, atol=1e-10)
    errors, counts = [], []
    for h in (4.0, 2.0):
        with torch.no_grad():
            ys, stats = solvers.odeint(vdp, torch.tensor([2.0, 0.0], dtype=F64), t, "implicit_euler",
                                       step_size=h, root="newton_krylov", tol=1e-10)
        errors.append(float(np.abs(ys[:, 0].numpy() - ref.y[0]).max()))
        counts.append(stats.nfev)
        assert stats.unconverged_steps == 0
    print(f"van der Pol mu=1000: errors {errors}, f evaluations {counts}")
    message = f"errors {errors} for h = 4, 2; f evaluations {counts}"
    assert errors[0] < 5e-4 * 4.0 and errors[1] < 5e-4 * 2.0, message
    assert 1.6 < errors[0] / errors[1] < 2.4, message


def forced_linear(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y @ torch.as_tensor(LINEAR).T + torch.stack([torch.sin(3 * t), torch.cos(t)])


@pytest.mark.parametrize(("method", "tight"), [("dopri5", 1e-7), ("bosh3", 1e-7), ("adaptive_heun", 1e-5),
                                               ("dopri8", 1e-7)])
def test_adaptive_methods_match_scipy(method: str, tight: float) -> None:
    """Global error follows the tolerance: below (number of steps) x rtol and shrinking as rtol shrinks."""
    calls = 0

    def counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return forced_linear(t, y)

    t = torch.linspace(0.0, 3.0, 4, dtype=F64)
    ref = scipy.integrate.solve_ivp(lambda s, y: LINEAR @ y + np.array([math.sin(3 * s), math.cos(s)]),
                                    (0.0, 3.0), [1.0, 0.0], method="DOP853", t_eval=t.numpy(), rtol=1e-13,
                                    atol=1e-13)
    errors = []
    for rtol in (1000 * tight, tight):
        calls = 0
        ys, stats = solvers.odeint(counted, torch.tensor([1.0, 0.0], dtype=F64), t, method, rtol=rtol,
                                   atol=rtol / 100)
        errors.append(float(np.abs(ys.numpy().T - ref.y).max()))
        assert stats.nfev == calls and stats.steps == 3
    assert errors[1] < 300 * tight, f"{method}: errors {errors}"
    assert errors[1] < errors[0] / 10, f"{method}: errors {errors}"
    assert solvers.get(method).adaptive


def test_adaptive_step_is_torchdiffeq() -> None:
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    y1, _ = solvers.get("bosh3", rtol=1e-5, atol=1e-7).step(forced_linear, 0.5, y0, 1.5)
    expected = torchdiffeq.odeint(forced_linear, y0, torch.tensor([0.5, 2.0], dtype=F64), method="bosh3",
                                  rtol=1e-5, atol=1e-7)[1]
    torch.testing.assert_close(y1, expected, rtol=0, atol=0)


def _trees(max_order: int) -> list[tuple]:
    """All rooted trees with up to ``max_order`` nodes, a tree being the sorted tuple of its subtrees."""
    levels = [{()}]
    for _ in range(max_order - 1):
        grown = set()
        for tree in levels[-1]:
            grown |= _add_leaf(tree)
        levels.append(grown)
    return [tree for level in levels for tree in level]


def _add_leaf(tree: tuple) -> set[tuple]:
    out = {tuple(sorted((*tree, ())))}
    for i, child in enumerate(tree):
        for new_child in _add_leaf(child):
            out.add(tuple(sorted((*tree[:i], new_child, *tree[i + 1:]))))
    return out


def _size(tree: tuple) -> int:
    return 1 + sum(_size(child) for child in tree)


def _density(tree: tuple) -> int:
    return _size(tree) * math.prod(_density(child) for child in tree)


def _stage_weights(tab: ButcherTableau, tree: tuple) -> list:
    """Elementary weight vector Phi_i(tree) = prod over children of (A Phi(child))_i."""
    weights = [Fraction(1)] * tab.stages
    for child in tree:
        inner = _stage_weights(tab, child)
        weights = [w * sum(tab.A[i][j] * inner[j] for j in range(tab.stages)) for i, w in enumerate(weights)]
    return weights


def test_rooted_tree_enumeration_counts() -> None:
    counts = [sum(1 for tree in _trees(8) if _size(tree) == n) for n in range(1, 9)]
    assert counts == [1, 1, 2, 4, 9, 20, 48, 115]  # OEIS A000081


@pytest.mark.parametrize("method", [m for m in solvers.available() if solvers.get(m).tableau is not None])
def test_tableau_consistency_and_order_conditions(method: str) -> None:
    step = solvers.get(method)
    tab = step.tableau
    exact = all(isinstance(x, Fraction) for x in (*tab.b, *tab.c, *(a for row in tab.A for a in row)))
    tol = 0 if exact else 1e-9
    assert abs(sum(tab.b) - 1) <= tol
    for row, c in zip(tab.A, tab.c):
        assert abs(sum(row) - c) <= max(tol, 1e-15 if not exact else 0), (method, row, c)
    assert tab.explicit == (not step.implicit)
    for tree in _trees(step.order):
        weight = sum(b * w for b, w in zip(tab.b, _stage_weights(tab, tree)))
        assert abs(weight - Fraction(1, _density(tree))) <= tol, (method, tree, float(weight))
    if step.order < 8:  # the next order's conditions cannot all hold, else the order would be higher
        defects = [
            sum(b * w for b, w in zip(tab.b, _stage_weights(tab, tree))) - Fraction(1, _density(tree))
            for tree in _trees(step.order + 1) if _size(tree) == step.order + 1
        ]
        failures = [d for d in defects if abs(d) > 1e-9]
        assert failures, f"{method} satisfies order {step.order + 1} conditions"


def test_implicit_tableaux_are_exact_fractions() -> None:
    for method in IMPLICIT:
        tab = solvers.get(method).tableau
        assert all(isinstance(x, Fraction) for x in (*tab.b, *tab.c, *(a for row in tab.A for a in row)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_implicit_steps_keep_half_precision(dtype: torch.dtype) -> None:
    y0 = torch.tensor([[0.5, -0.25], [1.0, 0.75]], dtype=dtype)
    for method in IMPLICIT:
        y1, info = solvers.get(method, root="anderson").step(linear_field_half, 0.0, y0, 0.1)
        ref, _ = solvers.get(method, **IMPLICIT_OPTIONS).step(linear_field_half, 0.0, y0.double(), 0.1)
        assert y1.dtype == dtype and info.root.all_converged
        torch.testing.assert_close(y1.double(), ref, atol=2e-2, rtol=2e-2)


def linear_field_half(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y @ torch.as_tensor(LINEAR, dtype=y.dtype).T


def test_unknown_names_list_valid_choices() -> None:
    with pytest.raises(ValueError, match="implicit_euler"):
        solvers.get("implicit_eulr")
    with pytest.raises(ValueError, match="newton_krylov"):
        solvers.get("implicit_euler", root="newton")
    with pytest.raises(ValueError, match="one_step"):
        solvers.get("trapezoid", grad="backprop")
    with pytest.raises(ValueError, match="rk4"):
        solvers.odeint(scalar_field, torch.ones(1), torch.linspace(0, 1, 3), method="rk5")
    with pytest.raises(ValueError, match="previous"):
        solvers.get("implicit_midpoint", init="zero")


@pytest.mark.parametrize(
    "options",
    [{"tol": -1e-3}, {"max_iter": 0}, {"root_options": {"m": 0}}, {"root_options": {"tol": 1e-3}},
     {"on_failure": "ignore_all"}],
)
def test_bad_implicit_options(options: dict) -> None:
    with pytest.raises(ValueError):
        solvers.get("implicit_euler", root="anderson", **options)


@pytest.mark.parametrize(
    "options",
    [{"rtol": -1.0}, {"atol": 0.0}, {"rtol": float("nan")}, {"max_num_steps": 0}, {"first_step": -1}],
)
def test_bad_adaptive_options(options: dict) -> None:
    with pytest.raises(ValueError):
        solvers.get("dopri5", **options)


@pytest.mark.parametrize("method", ["implicit_euler", "trapezoid", "dopri5"])
def test_bad_step_input(method: str) -> None:
    step = solvers.get(method)
    y = torch.ones(3, dtype=F64)
    for dt in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="step size"):
            step.step(scalar_field, 0.0, y, dt)
    with pytest.raises(ValueError, match="NaN"):
        step.step(scalar_field, 0.0, torch.tensor([1.0, float("nan"), 0.0], dtype=F64), 0.1)
    with pytest.raises(ValueError, match="shaped like the state"):
        step.step(lambda t, z: z[:2], 0.0, y, 0.1)


def test_bad_odeint_input() -> None:
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    y0 = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match="NaN"):
        solvers.odeint(scalar_field, torch.tensor([float("nan")], dtype=F64), t)
    with pytest.raises(ValueError, match="shaped like the state"):
        solvers.odeint(lambda s, z: z.sum(), y0, t)
    with pytest.raises(ValueError, match="increasing"):
        solvers.odeint(scalar_field, y0, torch.tensor([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="1-d"):
        solvers.odeint(scalar_field, y0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="step_size"):
        solvers.odeint(scalar_field, y0, t, "rk4", step_size=-0.1)
    with pytest.raises(ValueError, match="adaptive"):
        solvers.odeint(scalar_field, y0, t, "dopri5", step_size=0.1)


def test_odeint_substeps_and_backward_time() -> None:
    """Substeps divide each interval; integrating backwards in time recovers the initial value."""
    t = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    ys, stats = solvers.odeint(linear_field, y0, t, "rk4", step_size=0.1)
    assert stats.steps == 3 + 8
    np.testing.assert_allclose(ys[1].numpy(), linear_exact(0.25), atol=1e-6)
    np.testing.assert_allclose(ys[2].numpy(), linear_exact(1.0), atol=1e-6)
    back, _ = solvers.odeint(linear_field, ys[2], t.flip(0), "implicit_midpoint", step_size=0.01,
                             root="anderson")
    np.testing.assert_allclose(back[-1].numpy(), y0.numpy(), atol=1e-4)


def test_root_non_convergence_is_reported_not_silent() -> None:
    t = torch.linspace(0.0, 1.0, 3, dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)
    with pytest.warns(ConvergenceWarning, match="residual"):
        ys, stats = solvers.odeint(linear_field, y0, t, "trapezoid", step_size=0.1, root="picard", max_iter=2)
    assert stats.unconverged_steps == stats.steps == 10
    assert stats.worst_rel_residual > 1e-10 and stats.max_root_iterations == 2
    assert torch.isfinite(ys).all()
    with pytest.raises(ConvergenceError, match="did not converge"):
        solvers.odeint(linear_field, y0, t, "trapezoid", step_size=0.1, root="picard", max_iter=2,
                       on_failure="raise")
