"""``odeint``: integrate a general ODE over a time grid with any registered step method.

The convenience route for non-BERT problems (stiff systems, tests, notebooks). Fixed-step methods take
equal substeps no longer than ``step_size`` inside each grid interval; adaptive methods integrate each
interval with their own error control.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._base import CountedField, StepInfo, VectorField, as_time, check_state
from .registry import get


class DivergenceError(FloatingPointError):
    """The numerical solution became non-finite (typically an explicit method on a stiff problem)."""


@dataclass
class OdeintStats:
    """Totals over an ``odeint`` call; root statistics stay at zero for methods without a root solve."""

    nfev: int = 0
    steps: int = 0
    max_root_iterations: int = 0
    worst_rel_residual: float = 0.0
    unconverged_steps: int = 0

    def add(self, info: StepInfo) -> None:
        self.nfev += info.nfev
        self.steps += 1
        if info.root is not None:
            self.max_root_iterations = max(self.max_root_iterations, int(info.root.iterations.max()))
            residual = info.root.max_rel_residual
            if math.isnan(residual) or residual > self.worst_rel_residual:  # max() would drop a NaN
                self.worst_rel_residual = residual
            self.unconverged_steps += 0 if info.root.all_converged else 1


def _check_grid(t: Tensor) -> None:
    if not isinstance(t, Tensor) or t.ndim != 1 or t.numel() < 2:
        raise ValueError("t must be a 1-d tensor of at least two time points")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("t contains NaN or Inf")
    diffs = t[1:] - t[:-1]
    if not (bool((diffs > 0).all()) or bool((diffs < 0).all())):
        raise ValueError("t must be strictly increasing or strictly decreasing")


def odeint(
    f: VectorField,
    y0: Tensor,
    t: Tensor,
    method: str = "rk4",
    step_size: float | None = None,
    divergence_threshold: float = 1e100,
    **method_options: Any,
) -> tuple[Tensor, OdeintStats]:
    """Solve ``y' = f(t, y)``, ``y(t[0]) = y0`` and return ``(ys, stats)`` with ``ys[i] ~ y(t[i])``.

    ``method`` is any registered step method (``solvers.available()``) and ``method_options`` its
    options. ``step_size=None`` takes one step per grid interval; otherwise each interval is split into
    the fewest equal substeps of length at most ``step_size`` (not allowed for adaptive methods).
    Raises ``DivergenceError`` if the state becomes non-finite or larger in magnitude than
    ``divergence_threshold`` (an unstable explicit step on a stiff problem grows geometrically; in
    float64 it may take thousands of steps to reach Inf). Differentiable w.r.t. ``y0`` and
    whatever ``f`` closes over.
    """
    stepper = get(method, **method_options)
    check_state(y0, "y0")
    _check_grid(t)
    if step_size is not None:
        if stepper.adaptive:
            raise ValueError(f"step_size does not apply to the adaptive method {method!r}; use rtol/atol")
        valid = isinstance(step_size, (int, float)) and not isinstance(step_size, bool)
        if not (valid and math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be a positive finite number or None, got {step_size!r}")
    if not (isinstance(divergence_threshold, (int, float)) and divergence_threshold > 0):
        raise ValueError(f"divergence_threshold must be a positive number, got {divergence_threshold!r}")
    field = CountedField(f, y0)
    times = as_time(t, y0)
    stats = OdeintStats()
    y = y0
    ys = [y0]
    for t_start, t_end in zip(times[:-1], times[1:]):
        span = float(t_end - t_start)
        substeps = 1 if step_size is None else max(1, math.ceil(abs(span) / step_size - 1e-9))
        dt = (t_end - t_start) / substeps
        for k in range(substeps):
            t_now = t_start + k * dt
            y, info = stepper.step(field, t_now, y, dt)
            stats.add(info)
            largest = float(y.detach().abs().max())
            if not largest <= divergence_threshold:  # also catches NaN
                raise DivergenceError(
                    f"{method!r} diverged: state magnitude {largest:.3g} at t = {float(t_now + dt):.6g} "
                    f"(step {float(dt):.3g}); the problem may be stiff: use an implicit method "
                    f"(e.g. 'implicit_euler') or a smaller step_size"
                )
        ys.append(y)
    return torch.stack(ys), stats
