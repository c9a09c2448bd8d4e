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

from ._base import (
    CountedField,
    DivergenceError,
    StepBudgetError,
    StepInfo,
    VectorField,
    as_time,
    check_state,
)
from .registry import METHODS, get

__all__ = ["DEFAULT_MAX_GROWTH", "DEFAULT_MAX_NUM_STEPS", "DivergenceError", "OdeintStats", "odeint"]

# Fixed-step budget: total steps of one odeint call, checked before any work.
DEFAULT_MAX_NUM_STEPS = 100_000
# Divergence: the state may grow to DEFAULT_MAX_GROWTH x max(max |y0|, GROWTH_FLOOR) in magnitude.
DEFAULT_MAX_GROWTH = 1e8
GROWTH_FLOOR = 1.0


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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _substeps(t: Tensor, step_size: float | None) -> list[int]:
    """Number of equal substeps of each interval of the grid ``t`` (in the time dtype the steps use), each
    at most ``step_size`` long."""
    spans = (t[1:] - t[:-1]).abs().tolist()
    if step_size is None:
        return [1] * len(spans)
    return [max(1, math.ceil(span / step_size - 1e-9)) for span in spans]


def odeint(
    f: VectorField,
    y0: Tensor,
    t: Tensor,
    method: str = "rk4",
    step_size: float | None = None,
    divergence_threshold: float | None = None,
    *,
    max_growth: float | None = None,
    max_num_steps: int | None = None,
    **method_options: Any,
) -> tuple[Tensor, OdeintStats]:
    """Solve ``y' = f(t, y)``, ``y(t[0]) = y0`` and return ``(ys, stats)`` with ``ys[i] ~ y(t[i])``.

    ``method`` is any registered step method (``solvers.available()``) and ``method_options`` its
    options. ``step_size=None`` takes one step per grid interval; otherwise each interval is split into
    the fewest equal substeps of length at most ``step_size`` (not allowed for adaptive methods).

    Divergence: raises ``DivergenceError`` (naming the method, time and step) as soon as the state is
    non-finite or larger in magnitude than ``max_growth`` (default ``DEFAULT_MAX_GROWTH`` = 1e8) times the
    initial scale ``max(max |y0|, 1)``, in every dtype: an unstable explicit step on a stiff problem grows
    geometrically and in float64 would otherwise take thousands of steps to reach Inf. Raise
    ``max_growth`` for a solution that legitimately grows that much; ``divergence_threshold`` instead sets
    an absolute magnitude limit (give one or the other). A vector field that returns NaN/Inf at a finite
    state raises ``NonFiniteError`` instead.

    Step budget: ``max_num_steps`` bounds the work. For fixed-step methods it is the total number of steps
    of the call (default ``DEFAULT_MAX_NUM_STEPS`` = 100,000), checked before any work, so a tiny
    ``step_size`` over a long interval fails at once with ``StepBudgetError``. For adaptive methods it is
    passed on as the method's own budget of substeps per grid interval (default
    ``solvers.adaptive.DEFAULT_MAX_NUM_STEPS`` = 4096). Differentiable w.r.t. ``y0`` and whatever ``f``
    closes over.
    """
    if max_num_steps is not None:
        _positive_int("max_num_steps", max_num_steps)
    if max_num_steps is not None and METHODS.lookup(method).adaptive:
        method_options = {**method_options, "max_num_steps": max_num_steps}
    stepper = get(method, **method_options)
    check_state(y0, "y0")
    _check_grid(t)
    if step_size is not None:
        if stepper.adaptive:
            raise ValueError(f"step_size does not apply to the adaptive method {method!r}; use rtol/atol")
        valid = isinstance(step_size, (int, float)) and not isinstance(step_size, bool)
        if not (valid and math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be a positive finite number or None, got {step_size!r}")
    limit = _magnitude_limit(y0, divergence_threshold, max_growth)
    times = as_time(t, y0)
    substeps = _substeps(times, step_size)
    if not stepper.adaptive:
        budget = DEFAULT_MAX_NUM_STEPS if max_num_steps is None else max_num_steps
        total = sum(substeps)
        if total > budget:
            size = "one step per interval" if step_size is None else f"step_size {step_size:g}"
            raise StepBudgetError(
                f"{method!r} with {size} needs {total:,} steps over t in "
                f"[{float(t[0]):g}, {float(t[-1]):g}], more than max_num_steps={budget:,}. Use a larger "
                f"step_size (an implicit method such as 'implicit_euler' stays stable with large steps on "
                f"stiff problems), an adaptive method, or raise max_num_steps if you mean it"
            )
    field = CountedField(f, y0)
    stats = OdeintStats()
    y = y0
    ys = [y0]
    for t_start, t_end, n in zip(times[:-1], times[1:], substeps):
        dt = (t_end - t_start) / n
        for k in range(n):
            t_now = t_start + k * dt
            y, info = stepper.step(field, t_now, y, dt)
            stats.add(info)
            largest = float(y.detach().abs().max()) if y.numel() else 0.0
            if not largest <= limit:  # also catches NaN
                where = f"at t = {float(t_now + dt):.6g}, step {stats.steps} (dt = {float(dt):.3g})"
                bound = (
                    f"above divergence_threshold={limit:.3g}" if divergence_threshold is not None
                    else f"more than max_growth={limit / _scale(y0):.3g} times the initial scale "
                    f"{_scale(y0):.3g}"
                )
                _diverged(method, largest, bound, where, field, _scale(y0))
        ys.append(y)
    return torch.stack(ys), stats


def _diverged(method: str, largest: float, bound: str, where: str, field: CountedField, scale: float) -> None:
    """Raise for a state out of bounds: ``NonFiniteError`` when the vector field returned NaN/Inf near the
    initial scale (its own fault), else ``DivergenceError`` (the solution grew: typically stiffness)."""
    overflow = ""
    if not math.isfinite(largest) and field.nonfinite is not None:
        at, kind, size = field.nonfinite
        if size <= 10 * scale:
            field.raise_nonfinite(f"in a step of {method!r} ending {where}")
        overflow = f"; the vector field returned {kind} at t = {at:.6g} once |state| reached {size:.3g}"
    raise DivergenceError(
        f"{method!r} diverged: state magnitude {largest:.3g} ({bound}{overflow}) {where}; the problem may "
        f"be stiff: use an implicit method (e.g. 'implicit_euler') or a smaller step_size (or raise "
        f"max_growth if the solution really grows this much)"
    )


def _scale(y0: Tensor) -> float:
    """The initial scale the growth limit refers to: ``max(max |y0|, GROWTH_FLOOR)``."""
    largest = float(y0.detach().abs().max()) if y0.numel() else 0.0
    return max(largest, GROWTH_FLOOR)


def _magnitude_limit(y0: Tensor, divergence_threshold: float | None, max_growth: float | None) -> float:
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0

    if divergence_threshold is not None and max_growth is not None:
        raise ValueError("give max_growth (relative to the initial scale) or divergence_threshold "
                         "(absolute), not both")
    if divergence_threshold is not None:
        if not number(divergence_threshold):
            raise ValueError(f"divergence_threshold must be a positive number, got {divergence_threshold!r}")
        return float(divergence_threshold)
    growth = DEFAULT_MAX_GROWTH if max_growth is None else max_growth
    if not (number(growth) and growth > 1):
        raise ValueError(f"max_growth must be a number > 1, got {max_growth!r}")
    return float(growth) * _scale(y0)
