"""Adaptive embedded Runge-Kutta steps delegated to torchdiffeq: dopri5, bosh3, adaptive_heun, dopri8.

One "step" integrates from ``t`` to ``t + dt`` with torchdiffeq's error-controlled substeps; ``StepInfo.nfev``
counts every evaluation torchdiffeq made. The Butcher tableaux are read from torchdiffeq's own tables, so
they describe exactly the integrators that run.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torchdiffeq
from torch import Tensor
from torchdiffeq._impl import adaptive_heun, bosh3, dopri5, dopri8
from torchdiffeq._impl.rk_common import _ButcherTableau

from ._base import (
    ButcherTableau,
    CountedField,
    DivergenceError,
    Method,
    StepBudgetError,
    StepInfo,
    VectorField,
    as_time,
    check_state,
    check_step,
)
from .registry import register

# Substeps one call may take (torchdiffeq's own default, 2**31 - 1, lets a stiff problem run for hours).
# diffrax's default is 4096 too; an explicit adaptive method on a stiff problem reaches it in seconds.
DEFAULT_MAX_NUM_STEPS = 4096


def _exact(x: float) -> Fraction | float:
    """``x`` as a small-denominator fraction when it is exactly that fraction in float64, else ``x``."""
    frac = Fraction(x).limit_denominator(10**6)
    return frac if float(frac) == x else x


def tableau_from_torchdiffeq(tab: _ButcherTableau) -> ButcherTableau:
    """Full ``(A, b, c)`` of a torchdiffeq ``_ButcherTableau(alpha, beta, c_sol, c_error)``.

    torchdiffeq stores the nodes after the first (``alpha``) and the non-zero part of each row of ``A``
    (``beta``); ``c_sol`` are the weights of the propagated solution.
    """
    stages = len(tab.c_sol)
    c = (Fraction(0), *(_exact(float(a)) for a in tab.alpha))
    rows: list[tuple[Fraction | float, ...]] = [(Fraction(0),) * stages]
    for beta in tab.beta:
        known = [_exact(float(x)) for x in beta]
        rows.append((*known, *(Fraction(0),) * (stages - len(known))))
    b = tuple(_exact(float(x)) for x in tab.c_sol)
    return ButcherTableau(A=tuple(rows), b=b, c=c)


def _positive(name: str, value: Any) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (is_number and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


class TorchdiffeqAdaptive(Method):
    """A torchdiffeq adaptive solver run over one interval.

    Options: ``rtol``, ``atol`` (error tolerances; torchdiffeq's defaults), ``first_step`` (initial
    substep, ``None`` lets torchdiffeq choose), ``max_num_steps`` (substep budget per call, accepted and
    rejected substeps alike; default ``DEFAULT_MAX_NUM_STEPS``).

    Failures are this package's errors, not torchdiffeq's bare assertions: an exhausted budget is a
    ``StepBudgetError``, a vector field returning NaN/Inf at a finite state a ``NonFiniteError``, and a step
    size that underflows (a solution blowing up in finite time) a ``DivergenceError``.
    """

    adaptive = True
    torchdiffeq_name: ClassVar[str] = ""

    def __init__(
        self,
        *,
        rtol: float = 1e-7,
        atol: float = 1e-9,
        first_step: float | None = None,
        max_num_steps: int = DEFAULT_MAX_NUM_STEPS,
    ) -> None:
        self.rtol = _positive("rtol", rtol)
        self.atol = _positive("atol", atol)
        self.first_step = None if first_step is None else _positive("first_step", first_step)
        if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
            raise ValueError(f"max_num_steps must be a positive integer, got {max_num_steps!r}")
        self.max_num_steps = max_num_steps

    def step(
        self, f: VectorField, t: Tensor | float, y: Tensor, dt: Tensor | float
    ) -> tuple[Tensor, StepInfo]:
        check_step(dt)
        check_state(y)
        counted = CountedField(f, y)
        t0 = as_time(t, y)
        times = torch.stack([t0, as_time(t0 + dt, y)])
        options: dict[str, Any] = {"max_num_steps": self.max_num_steps}
        if self.first_step is not None:
            options["first_step"] = self.first_step
        try:
            ys = torchdiffeq.odeint(
                counted, y, times, rtol=self.rtol, atol=self.atol, method=self.torchdiffeq_name,
                options=options,
            )
        except AssertionError as err:  # torchdiffeq reports failures with bare assertions
            self._raise_clear(err, counted, y, times)
            raise
        if not bool(torch.isfinite(ys[1]).all()):
            counted.raise_nonfinite(self._where(times), y)
            raise DivergenceError(f"the state became non-finite {self._where(times)}")
        return ys[1], StepInfo(nfev=counted.calls)

    def _where(self, times: Tensor) -> str:
        return f"during {self.name!r} from t = {float(times[0]):.6g} to {float(times[1]):.6g}"

    def _raise_clear(self, err: AssertionError, counted: CountedField, y: Tensor, times: Tensor) -> None:
        """Re-raise one of torchdiffeq's assertions as a clear error of ours (returns for any other)."""
        counted.raise_nonfinite(self._where(times), y)  # a NaN field first: it also underflows dt
        text = str(err)
        reached = "" if counted.last_t is None else f", having reached t = {float(counted.last_t):.6g}"
        if "max_num_steps" in text:
            raise StepBudgetError(
                f"{self.name!r} used its whole budget of max_num_steps={self.max_num_steps} substeps between "
                f"t = {float(times[0]):.6g} and {float(times[1]):.6g}{reached} (rtol={self.rtol:g}, "
                f"atol={self.atol:g}). The problem is probably stiff: use an implicit method (e.g. "
                f"'implicit_euler' or 'trapezoid' with a fixed step), loosen rtol/atol, or raise "
                f"max_num_steps"
            ) from err
        if "underflow in dt" in text:
            raise DivergenceError(
                f"{self.name!r}: the step size underflowed between t = {float(times[0]):.6g} and "
                f"{float(times[1]):.6g}{reached}. The solution probably blows up in finite time there, or "
                f"the vector field is not smooth or not finite; check the field, or use an implicit method "
                f"if the problem is stiff"
            ) from err


@register("dopri5")
class Dopri5(TorchdiffeqAdaptive):
    """Dormand-Prince 5(4) with FSAL (7 stages), torchdiffeq's default solver."""

    order = dopri5.Dopri5Solver.order
    torchdiffeq_name = "dopri5"
    tableau = tableau_from_torchdiffeq(dopri5.Dopri5Solver.tableau)


@register("bosh3")
class Bosh3(TorchdiffeqAdaptive):
    """Bogacki-Shampine 3(2) with FSAL (4 stages)."""

    order = bosh3.Bosh3Solver.order
    torchdiffeq_name = "bosh3"
    tableau = tableau_from_torchdiffeq(bosh3.Bosh3Solver.tableau)


@register("adaptive_heun")
class AdaptiveHeun(TorchdiffeqAdaptive):
    """Heun's method with an embedded Euler error estimate, 2(1)."""

    order = adaptive_heun.AdaptiveHeunSolver.order
    torchdiffeq_name = "adaptive_heun"
    tableau = tableau_from_torchdiffeq(adaptive_heun.AdaptiveHeunSolver.tableau)


@register("dopri8")
class Dopri8(TorchdiffeqAdaptive):
    """Dormand-Prince 8(7) (14 stages; coefficients are float64 approximations in torchdiffeq)."""

    order = dopri8.Dopri8Solver.order
    torchdiffeq_name = "dopri8"
    tableau = tableau_from_torchdiffeq(dopri8.Dopri8Solver.tableau)
