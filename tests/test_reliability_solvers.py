"""Bad inputs and faults against the solvers layer (issue 15): each is answered with a clear error.

Divergence relative to the state's scale in every dtype, step budgets instead of hangs, the torchdiffeq
bridge's own names and option checking, and NaN/Inf from a vector field named as such.
"""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

import solvers
from solvers import ConvergenceWarning, DivergenceError, NonFiniteError, StepBudgetError
from solvers.torchdiffeq_bridge import BRIDGED_NAMES, install_torchdiffeq

F64 = torch.float64
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
IMPLICIT = ("implicit_euler", "trapezoid", "implicit_midpoint")


class Counted:
    """A vector field that counts its calls."""

    def __init__(self, f) -> None:
        self.f = f
        self.calls = 0

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.f(t, y)


def decay(rate: float):
    return lambda t, y: -rate * y


# --- divergence relative to the initial scale -------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_explicit_euler_on_stiff_problem_diverges_loudly_in_every_dtype(dtype: torch.dtype) -> None:
    """y' = -1000 y with h = 0.01: explicit Euler multiplies y by 1 + h lambda = -9 each step.

    Before the fix 25 steps returned (-9)^25 ~ 7e23 without a word in bfloat16/float32/float64 (limit 1e100).
    The growth limit 1e8 over the initial scale 1 is first exceeded after k = 9 steps (9^8 = 4.3e7,
    9^9 = 3.9e8); in float16 the field overflows (|y| = 81 -> f = -81000 > 65504) before that.
    """
    t = torch.tensor([0.0, 0.25])
    with pytest.raises(DivergenceError) as caught:
        solvers.odeint(decay(1000.0), torch.ones(1, dtype=dtype), t, "euler", step_size=0.01)
    message = str(caught.value)
    assert "'euler'" in message and "implicit method" in message and "t = " in message
    first_step_over = next(k for k in range(1, 30) if 9.0**k > 1e8)
    assert first_step_over == 9
    if dtype != torch.float16:
        assert f"step {first_step_over} " in message, message
        assert "max_growth" in message


def test_growth_limit_is_relative_to_the_initial_scale() -> None:
    """The limit is max_growth x max(max |y0|, 1): a large state gets a proportionally larger limit, a tiny
    one the floor 1. The step at which each run stops is counted independently from y_k = y0 (-9)^k."""
    t = torch.tensor([0.0, 1.0], dtype=F64)
    for y0, growth in ((1e-6, 1e8), (1.0, 1e8), (1e6, 1e8), (1.0, 1e3)):
        expected = next(k for k in range(1, 100) if y0 * 9.0**k > growth * max(y0, 1.0))
        with pytest.raises(DivergenceError) as caught:
            solvers.odeint(decay(1000.0), torch.full((1,), y0, dtype=F64), t, "euler", step_size=0.01,
                           max_growth=growth)
        assert f"step {expected} " in str(caught.value), (y0, growth, expected, str(caught.value))
    stops = [next(k for k in range(1, 100) if y0 * 9.0**k > 1e8 * max(y0, 1.0)) for y0 in (1e-6, 1e6)]
    assert stops == [15, 9]


def test_legitimate_growth_passes_and_max_growth_can_be_raised() -> None:
    """y' = 2 y on [0, 10] grows by e^20 ~ 4.9e8: above the default limit, fine with max_growth=1e10, and the
    result matches the exact solution."""
    t = torch.tensor([0.0, 10.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    with pytest.raises(DivergenceError, match="max_growth"):
        solvers.odeint(lambda s, y: 2 * y, y0, t, "rk4", step_size=0.01)
    ys, _ = solvers.odeint(lambda s, y: 2 * y, y0, t, "rk4", step_size=0.01, max_growth=1e10)
    assert math.isclose(float(ys[-1]), math.exp(20.0), rel_tol=1e-6)
    # a zero initial state with forcing grows from the floor scale 1: y' = 1e3 gives 1e4 at t = 10
    ys, _ = solvers.odeint(lambda s, y: torch.full_like(y, 1e3), torch.zeros(2, dtype=F64), t, "euler",
                           step_size=0.5)
    assert torch.allclose(ys[-1], torch.full((2,), 1e4, dtype=F64))


def test_absolute_divergence_threshold_still_works() -> None:
    t = torch.tensor([0.0, 0.25], dtype=F64)
    ys, _ = solvers.odeint(decay(1000.0), torch.ones(1, dtype=F64), t, "euler", step_size=0.01,
                           divergence_threshold=1e30)  # the old absolute limit, as asked for
    assert math.isclose(float(ys[-1]), (-9.0) ** 25, rel_tol=1e-9)
    with pytest.raises(ValueError, match="not both"):
        solvers.odeint(decay(1.0), torch.ones(1, dtype=F64), t, divergence_threshold=1e30, max_growth=1e3)
    with pytest.raises(ValueError, match="max_growth"):
        solvers.odeint(decay(1.0), torch.ones(1, dtype=F64), t, max_growth=0.5)


# --- step budgets instead of hangs -------------------------------------------------------------------


def test_dopri5_on_stiff_problem_exhausts_its_budget_fast() -> None:
    """lambda = -1e7 needs ~3e6 dopri5 steps on [0, 1]; before the fix it ran for minutes (budget 2^31-1)."""
    field = Counted(decay(1e7))
    start = time.perf_counter()
    with pytest.raises(StepBudgetError) as caught:
        solvers.odeint(field, torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), "dopri5")
    elapsed = time.perf_counter() - start
    message = str(caught.value)
    assert "'dopri5'" in message and "max_num_steps=4096" in message and "implicit" in message
    assert "reached t = " in message
    assert elapsed < 60, elapsed
    # 4096 steps of 6 new evaluations each (FSAL), plus the initial ones
    assert 6 * 4096 <= field.calls <= 6 * 4096 + 10, field.calls
    with pytest.raises(StepBudgetError, match="max_num_steps=50 "):
        solvers.odeint(decay(1e7), torch.ones(1, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), "dopri5",
                       max_num_steps=50)


def test_adaptive_budget_large_enough_gives_the_exact_answer() -> None:
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ys, _ = solvers.odeint(decay(1.0), torch.ones(1, dtype=F64), t, "dopri5", max_num_steps=100)
    assert math.isclose(float(ys[-1]), math.exp(-1.0), rel_tol=1e-6)


def test_tiny_fixed_step_over_long_interval_fails_before_any_work() -> None:
    """Before the fix euler with step 1e-7 on [0, 1000] (1e10 steps) ran for hours without output."""
    field = Counted(decay(1.0))
    start = time.perf_counter()
    with pytest.raises(StepBudgetError) as caught:
        solvers.odeint(field, torch.ones(1, dtype=F64), torch.tensor([0.0, 1000.0], dtype=F64), "euler",
                       step_size=1e-7)
    assert time.perf_counter() - start < 5
    assert field.calls == 0  # checked up front
    message = str(caught.value)
    assert "'euler'" in message and "10,000,000,000 steps" in message and "max_num_steps=100,000" in message
    assert "larger" in message and "implicit" in message


def test_fixed_step_budget_counts_substeps_exactly() -> None:
    t = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    y0 = torch.ones(1, dtype=F64)
    _, stats = solvers.odeint(decay(1.0), y0, t, "rk4", step_size=0.1, max_num_steps=20)
    assert stats.steps == 20  # ceil(1 / 0.1) = 10 per interval
    with pytest.raises(StepBudgetError, match="needs 22 steps"):  # ceil(1 / 0.099) = 11 per interval
        solvers.odeint(decay(1.0), y0, t, "rk4", step_size=0.099, max_num_steps=20)
    with pytest.raises(ValueError, match="max_num_steps"):
        solvers.odeint(decay(1.0), y0, t, "rk4", max_num_steps=0)


# --- the torchdiffeq bridge ----------------------------------------------------------------------------


class FakeSolver(FixedGridODESolver):
    """Stands in for a solver that a future torchdiffeq defines under one of our names."""

    order = 1

    def _step_func(self, func, t0, dt, t1, y0):
        return torch.zeros_like(y0), None


def test_bridge_names_cannot_be_taken_over_by_torchdiffeq_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchdiffeq's master branch defines implicit_euler, implicit_midpoint and trapezoid. With those in its
    table, our bridged solver is still the one that runs under its own name."""
    for name in ("implicit_euler", "implicit_midpoint", "trapezoid"):
        monkeypatch.setitem(SOLVERS, name, FakeSolver)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert install_torchdiffeq() == []  # nothing clashes with our names, nothing to add again
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    options = {"step_size": 0.1, "root": "newton_krylov", "tol": 1e-12}
    ys = torchdiffeq.odeint(decay(2.0), y0, t, method="solvers_implicit_euler", options=options)
    assert torch.allclose(ys[-1], y0 / (1 + 2.0 * 0.1) ** 5, rtol=1e-10, atol=0)  # (1 - h lambda)^-n


def test_bridge_clash_is_loud_and_never_silently_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    name = "solvers_implicit_euler"
    assert name in BRIDGED_NAMES
    monkeypatch.setitem(SOLVERS, name, FakeSolver)
    with pytest.warns(RuntimeWarning, match=f"already defines '{name}'.*FakeSolver"):
        added = install_torchdiffeq()
    assert name not in added and SOLVERS[name] is FakeSolver
    with pytest.raises(RuntimeError, match="already defines"):
        install_torchdiffeq(on_clash="raise")


def test_bridge_rejects_a_misspelled_option() -> None:
    """Before the fix torchdiffeq only warned "Unexpected arguments" and the solve ran with defaults."""
    func = Counted(decay(1.0))
    with pytest.raises(ValueError, match="'rooot'.*Did you mean 'root'"):
        torchdiffeq.odeint(func, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                           method="solvers_implicit_euler", options={"step_size": 0.1, "rooot": "anderson"})
    assert func.calls == 0


def test_bridge_accepts_torchdiffeq_fixed_grid_options() -> None:
    """interp="cubic" (torchdiffeq's own option) passes validation and changes the in-between output only."""
    y0 = torch.ones(1, dtype=F64)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ys = torchdiffeq.odeint(decay(1.0), y0, t, method="solvers_trapezoid",
                                options={"step_size": 0.5, "interp": "cubic", "root": "anderson",
                                         "tol": 1e-12})
    exact_end = ((1 - 0.25) / (1 + 0.25)) ** 2  # two trapezoid steps of 0.5 on y' = -y
    assert math.isclose(float(ys[-1]), exact_end, rel_tol=1e-10)


# --- NaN/Inf from the vector field ------------------------------------------------------------------


def nan_after(t_bad: float):
    """-y, but NaN for t > t_bad (a layer that breaks at some point)."""
    return lambda t, y: torch.where(torch.as_tensor(t) > t_bad, torch.full_like(y, float("nan")), -y)


@pytest.mark.parametrize("root", ["anderson", "newton_krylov", "picard"])
@pytest.mark.parametrize("method", IMPLICIT)
def test_nan_field_inside_root_solve_names_the_field(method: str, root: str) -> None:
    """The predictor at t = 0.5 is finite, the field is NaN at the stage time inside the root solve.

    Before the fix: a ConvergenceWarning about the root finder and a NaN (or stale) state returned.
    """
    step = solvers.get(method, root=root)
    y = torch.ones(3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.raises(NonFiniteError) as caught:
            step.step(nan_after(0.5), 0.5, y, 0.1)
    message = str(caught.value)
    stage_time = 0.55 if method == "implicit_midpoint" else 0.6
    assert f"vector field returned NaN at t = {stage_time:g}" in message, message
    assert "finite state" in message and method in message and "initial guess" not in message


@pytest.mark.parametrize("on_failure", ["warn", "raise", "ignore"])
@pytest.mark.parametrize("method", IMPLICIT)
def test_nan_field_in_predictor_is_not_blamed_on_the_initial_guess(method: str, on_failure: str) -> None:
    """Before the fix: ValueError "initial guess contains NaN or Inf" (the explicit predictor is f's)."""
    step = solvers.get(method, on_failure=on_failure)
    with pytest.raises(NonFiniteError) as caught:
        step.step(nan_after(0.4), 0.5, torch.ones(2, 3, dtype=F64), 0.1)
    message = str(caught.value)
    assert "vector field returned NaN at t = 0.5" in message and "initial guess" not in message


def test_nonfinite_input_state_is_the_callers_problem() -> None:
    field = Counted(decay(1.0))
    with pytest.raises(ValueError, match="NaN") as caught:
        solvers.get("implicit_euler").step(field, 0.0, torch.tensor([1.0, float("inf")], dtype=F64), 0.1)
    assert not isinstance(caught.value, NonFiniteError)
    assert field.calls == 0


def test_field_overflow_while_an_iteration_diverges_is_reported() -> None:
    """Picard on a stiff step (|dt lambda| = 1e3) diverges geometrically until the field overflows: an error
    that says the evaluation point was far larger than the step's state, not a silent stale iterate."""
    step = solvers.get("implicit_euler", root="picard", max_iter=500, on_failure="ignore", init="previous")
    with pytest.raises(NonFiniteError, match="far larger"):
        step.step(decay(1e4), 0.0, torch.ones(2, dtype=torch.float32), 0.1)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun", "dopri8"])
def test_nan_field_in_adaptive_solver_is_named(method: str) -> None:
    """Before the fix: torchdiffeq's bare AssertionError "underflow in dt 0.0"."""
    with pytest.raises(NonFiniteError, match="vector field returned NaN at t = 0.5"):
        solvers.odeint(nan_after(0.5), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method)


def test_adaptive_blow_up_in_finite_time_is_a_divergence_error() -> None:
    """y' = y^2, y(0) = 1 blows up at t = 1. Before the fix: AssertionError "underflow in dt"."""
    with pytest.raises(DivergenceError, match="underflowed.*reached t = 1"):
        solvers.odeint(lambda t, y: y * y, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64),
                       "dopri5")


@pytest.mark.parametrize("method", ["euler", "rk4", "implicit_euler"])
def test_nan_field_in_odeint_is_not_called_stiffness(method: str) -> None:
    """Before the fix: DivergenceError "... the problem may be stiff" for a field that simply returns NaN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.raises(NonFiniteError, match="vector field returned NaN"):
            solvers.odeint(nan_after(0.5), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                           method, step_size=0.1)


def test_nonfinite_errors_are_floating_point_errors() -> None:
    """The ODE layer catches FloatingPointError (NonFiniteError, DivergenceError) to add the layer index."""
    assert issubclass(NonFiniteError, FloatingPointError) and issubclass(DivergenceError, FloatingPointError)
    assert {"NonFiniteError", "StepBudgetError", "DivergenceError"} <= set(solvers.__all__)
