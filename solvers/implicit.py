"""Implicit Runge-Kutta steps solved as fixed points: implicit_euler, trapezoid, implicit_midpoint.

Each step writes its equation as ``z = g(z)`` and hands it to a root finder from the registry through
``solve_fixed_point`` (so the gradient mode is a choice too). Implicit Euler with step 1 is the IM-BERT
layer ``h[l+1] = h[l] + f_l(h[l+1])``.

Warm starts: ``step(f, t, y, dt, guess=..., known=...)`` starts the iteration of the samples marked
``known`` from an estimate of the step's result (e.g. the result of the same step at an earlier visit with
slightly different weights) instead of the explicit predictor, whose evaluation is skipped when every
sample has a guess. Only where the iteration starts changes: the fixed point, and the ``implicit`` and
``one_step`` gradients (functions of the fixed point alone), are those of a cold start up to the tolerance.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from fractions import Fraction as F
from typing import Any

import torch
from torch import Tensor

from ._base import (
    ButcherTableau,
    ConvergenceError,
    CountedField,
    FixedPointMap,
    Method,
    RowMap,
    StepInfo,
    VectorField,
    all_finite,
    as_time,
    batch_size,
    check_on_failure,
    check_state,
    check_step,
    restrict_rows,
)
from .gradients import check_grad_mode, solve_fixed_point
from .registry import get_root_finder, register

DEFAULT_ROOT = "anderson"
DEFAULT_GRAD = "implicit"
INITIAL_GUESSES = ("explicit", "previous")

# (g, initial guess, map from the fixed point z to y_next)
FixedPointProblem = tuple[FixedPointMap, Tensor, Callable[[Tensor], Tensor]]
# a warm start in the fixed-point variable: (z guess, bool per sample: whether that sample has one)
WarmStart = tuple[Tensor, Tensor]


def check_guess(guess: Tensor | None, known: Tensor | None, y: Tensor) -> Tensor | None:
    """Validate a warm start for a step from ``y``; returns ``known`` (all true when not given) or ``None``
    when there is no guess. ``guess`` must be a tensor shaped, typed and placed like ``y`` and finite on the
    samples it is known for; ``known`` a bool tensor with one entry per sample (``batch_size(y)``)."""
    if guess is None:
        if known is not None:
            raise ValueError("known was given without a guess: pass a guess shaped like y too, or neither")
        return None
    if not isinstance(guess, Tensor):
        raise TypeError(f"guess must be a torch.Tensor shaped like the state, got {type(guess).__name__}")
    if guess.shape != y.shape or guess.dtype != y.dtype or guess.device != y.device:
        raise ValueError(
            f"guess must be shaped, typed and placed like the state: got {tuple(guess.shape)} {guess.dtype} "
            f"on {guess.device}, the state is {tuple(y.shape)} {y.dtype} on {y.device}"
        )
    rows = batch_size(y)
    if known is None:
        known = torch.ones(rows, dtype=torch.bool, device=y.device)
    elif not isinstance(known, Tensor) or known.dtype != torch.bool or known.shape != (rows,):
        got = f"{tuple(known.shape)} {known.dtype}" if isinstance(known, Tensor) else type(known).__name__
        raise ValueError(f"known must be a bool tensor with one entry per sample, shape ({rows},); got {got}")
    elif known.device != y.device:
        raise ValueError(f"known is on {known.device}, the state on {y.device}")
    if bool(known.any()):
        chosen = guess.detach() if y.ndim < 2 else guess.detach()[known]
        if not all_finite(chosen):
            raise ValueError("guess contains NaN or Inf on a sample marked known")
    return known


def _merged(warm: WarmStart, cold: Tensor) -> Tensor:
    """The warm guess on the known samples, ``cold`` on the others."""
    z_warm, known = warm
    if z_warm.ndim < 2:  # a single sample
        return z_warm if bool(known.all()) else cold
    return torch.where(known.view(-1, *(1,) * (z_warm.ndim - 1)), z_warm, cold)


class ImplicitRK(Method):
    """Shared options and bookkeeping of the implicit steps.

    Options: ``root`` (root-finder name), ``root_options`` (extra keyword options for that finder, e.g.
    ``{"m": 5}``), ``grad`` (gradient mode), ``tol``/``max_iter``/``on_failure`` (passed to the finder;
    ``tol=None`` is dtype-aware), ``adjoint_tol``/``adjoint_max_iter`` (the adjoint solve of the
    ``implicit`` gradient, in backward; ``None``: ``tol``/``max_iter``; no effect in the other gradient
    modes, which have no adjoint solve), ``adjoint_on_failure`` (non-converged adjoint solve, found during
    backward; separate so that a caller silencing forward reports still hears about it), ``init``
    (``"explicit"``: start from an explicit Euler predictor as IM-BERT does; ``"previous"``: start from
    ``y``), ``compact_rows`` (row compaction: when the vector field can be evaluated on a subset of the
    batch rows, ``solvers.RowMap``, samples that have converged are no longer evaluated; each sample's
    result is the one the whole-batch solve gives it, up to the rounding of the field on fewer rows).

    ``step(..., guess=y_next_estimate, known=rows)`` warm-starts the samples ``known`` (all, if not given)
    from ``guess``, an estimate of the step's result ``y_next`` that each method maps to its fixed-point
    variable; the other samples start as ``init`` says. ``guess`` is used without its autograd graph. With
    ``grad="unroll"`` the gradient is that of the iterations that ran: from a guess they start at a constant,
    so no gradient flows through the start point (from the predictor it does), and the unrolled gradient
    differs from a cold start's by as much as the iterations are from converged.

    A non-finite input state is a ``ValueError``. A vector field that returns NaN/Inf at a finite state
    (in the predictor, or in a root solve that then fails) is a ``NonFiniteError`` naming the field and
    ``t``, whatever ``on_failure`` says.
    """

    implicit = True

    def __init__(
        self,
        *,
        root: str = DEFAULT_ROOT,
        root_options: dict[str, Any] | None = None,
        grad: str = DEFAULT_GRAD,
        tol: float | None = None,
        max_iter: int = 50,
        on_failure: str = "warn",
        adjoint_tol: float | None = None,
        adjoint_max_iter: int | None = None,
        adjoint_on_failure: str = "warn",
        init: str = "explicit",
        compact_rows: bool = False,
    ) -> None:
        if root_options is None:
            root_options = {}
        if not isinstance(root_options, dict):
            raise TypeError(f"root_options must be a dict or None, got {type(root_options).__name__}")
        clash = sorted({"tol", "max_iter", "on_failure"} & set(root_options))
        if clash:
            raise ValueError(f"pass {', '.join(clash)} as step options, not inside root_options")
        check_on_failure(adjoint_on_failure, "adjoint_on_failure")
        if init not in INITIAL_GUESSES:
            raise ValueError(f"init must be one of {', '.join(map(repr, INITIAL_GUESSES))}, got {init!r}")
        self.root = root
        self.root_options = dict(root_options)
        self.grad = check_grad_mode(grad)
        self.tol = tol
        self.max_iter = max_iter
        self.on_failure = on_failure
        self.adjoint_on_failure = adjoint_on_failure
        if not isinstance(compact_rows, bool):
            raise TypeError(f"compact_rows must be True or False, got {compact_rows!r}")
        self.init = init
        self.compact_rows = compact_rows
        self._finder = get_root_finder(
            root, tol=tol, max_iter=max_iter, on_failure=on_failure, **self.root_options
        )
        if adjoint_tol is not None and not (isinstance(adjoint_tol, (int, float)) and 0 < adjoint_tol < 1):
            raise ValueError(f"adjoint_tol must be a number in (0, 1) or None, got {adjoint_tol!r}")
        positive_int = isinstance(adjoint_max_iter, int) and not isinstance(adjoint_max_iter, bool)
        if adjoint_max_iter is not None and not (positive_int and adjoint_max_iter >= 1):
            raise ValueError(f"adjoint_max_iter must be a positive integer or None, got {adjoint_max_iter!r}")
        self.adjoint_tol = adjoint_tol
        self.adjoint_max_iter = adjoint_max_iter
        self._adjoint_finder = self._finder
        if adjoint_tol is not None or adjoint_max_iter is not None:
            self._adjoint_finder = get_root_finder(
                root, tol=tol if adjoint_tol is None else adjoint_tol,
                max_iter=max_iter if adjoint_max_iter is None else adjoint_max_iter,
                on_failure=on_failure, **self.root_options,
            )  # fmt: skip

    def step(
        self, f: VectorField, t: Tensor | float, y: Tensor, dt: Tensor | float, *,
        guess: Tensor | None = None, known: Tensor | None = None,
    ) -> tuple[Tensor, StepInfo]:
        """Advance ``y`` by ``dt``; ``guess``/``known``: a warm start (class docstring, ``check_guess``)."""
        check_step(dt)
        check_state(y)
        known = check_guess(guess, known, y)
        warm = None
        if guess is not None and known is not None:
            warm = (self._stage_guess(y.detach(), guess.detach()), known)
        counted = CountedField(f, y)
        t0 = as_time(t, y)
        g, z0, finish = self._fixed_point(counted, t0, y, dt, warm)
        where = f"in a step of {self.name!r} from t = {float(t0):.6g} (dt = {float(dt):.3g})"
        counted.raise_nonfinite(where, y)  # f(t, y) of the predictor: not "a bad initial guess"
        try:
            z, root_info = solve_fixed_point(
                g, z0, self._finder, self.grad,
                adjoint_finder=self._adjoint_finder, adjoint_on_failure=self.adjoint_on_failure,
            )  # fmt: skip
        except ConvergenceError:  # on_failure="raise": name a NaN/Inf field as the cause
            counted.raise_nonfinite(where, y)
            raise
        if not root_info.all_converged:  # a field NaN/Inf that the solve could not step around
            counted.raise_nonfinite(where, y)
        return finish(z), StepInfo(nfev=counted.calls, root=root_info)

    def _predictor(self, f: VectorField, t: Tensor, y: Tensor, dt: Tensor | float) -> Tensor:
        """Explicit Euler guess ``y + dt f(t, y)``; without a graph unless gradients unroll through it."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.grad == "unroll"):
            return y + dt * f(t, y)

    def _start(
        self, cold: Callable[[VectorField, Tensor], Tensor], f: VectorField, y: Tensor, warm: WarmStart | None
    ) -> Tensor:
        """The initial guess: the warm one on the known samples, ``cold(f, y)`` (the ``init`` guess) on the
        others, evaluated on those rows only when ``f`` can be restricted to rows, not at all if none."""
        if warm is None:
            return cold(f, y)
        z_warm, known = warm
        if bool(known.all()):
            return z_warm
        if y.ndim < 2:  # a single sample, not known
            return cold(f, y)
        missing = (~known).nonzero().flatten()
        f_rows = restrict_rows(f, missing)
        if f_rows is not None:
            return z_warm.index_copy(0, missing, cold(f_rows, y.index_select(0, missing)))
        return _merged(warm, cold(f, y))

    def _affine_map(self, f: VectorField, t: Tensor, base: Tensor, scale: Tensor | float) -> FixedPointMap:
        """``z -> base + scale f(t, z)``, the fixed-point map of every implicit step here; with
        ``compact_rows`` a ``RowMap`` that evaluates ``f`` on some batch rows when ``f`` allows it."""

        def g(z: Tensor) -> Tensor:
            return base + scale * f(t, z)

        if not self.compact_rows:
            return g

        def rows(index: Tensor) -> FixedPointMap | None:
            f_rows = restrict_rows(f, index)
            if f_rows is None:
                return None
            base_rows = base.index_select(0, index)
            return lambda z: base_rows + scale * f_rows(t, z)

        return RowMap(g, rows)

    @abc.abstractmethod
    def _fixed_point(
        self, f: VectorField, t: Tensor, y: Tensor, dt: Tensor | float, warm: WarmStart | None
    ) -> FixedPointProblem:
        """The map ``g`` whose fixed point defines the step, the initial guess (``warm`` where known) and
        ``z -> y_next``."""

    def _stage_guess(self, y: Tensor, y_next: Tensor) -> Tensor:
        """The fixed-point variable ``z`` giving the step result ``y_next`` (the inverse of ``finish``)."""
        return y_next


@register("implicit_euler")
class ImplicitEuler(ImplicitRK):
    """Backward Euler, order 1, L-stable: ``z = y + dt f(t + dt, z)``, ``y_next = z``."""

    order = 1
    tableau = ButcherTableau(A=((F(1),),), b=(F(1),), c=(F(1),))

    def _fixed_point(
        self, f: VectorField, t: Tensor, y: Tensor, dt: Tensor | float, warm: WarmStart | None
    ) -> FixedPointProblem:
        t1 = t + dt

        def cold(f_: VectorField, y_: Tensor) -> Tensor:
            return self._predictor(f_, t, y_, dt) if self.init == "explicit" else y_

        return self._affine_map(f, t1, y, dt), self._start(cold, f, y, warm), (lambda z: z)


@register("trapezoid")
class Trapezoid(ImplicitRK):
    """Trapezoidal rule (Crank-Nicolson), order 2, A-stable: ``z = y + dt/2 (f(t, y) + f(t + dt, z))``."""

    order = 2
    tableau = ButcherTableau(A=((F(0), F(0)), (F(1, 2), F(1, 2))), b=(F(1, 2), F(1, 2)), c=(F(0), F(1)))

    def _fixed_point(
        self, f: VectorField, t: Tensor, y: Tensor, dt: Tensor | float, warm: WarmStart | None
    ) -> FixedPointProblem:
        t1 = t + dt
        f0 = f(t, y)  # part of the equation, so evaluated whatever the start
        base = y + (0.5 * dt) * f0
        if self.init == "previous":
            z0 = y
        else:  # the predictor reuses f0; its graph matters only when unrolling
            z0 = y + dt * f0 if self.grad == "unroll" else (y + dt * f0).detach()
        if warm is not None:  # f0 is evaluated anyway, so the cold guess costs nothing here
            z0 = _merged(warm, z0)
        return self._affine_map(f, t1, base, 0.5 * dt), z0, (lambda z: z)


@register("implicit_midpoint")
class ImplicitMidpoint(ImplicitRK):
    """Implicit midpoint, order 2, symplectic: stage ``z = y + dt/2 f(t + dt/2, z)``, ``y_next = 2 z - y``.

    ``2 z - y`` equals ``y + dt f(t + dt/2, z)`` at the fixed point and saves an evaluation.
    """

    order = 2
    tableau = ButcherTableau(A=((F(1, 2),),), b=(F(1),), c=(F(1, 2),))

    def _fixed_point(
        self, f: VectorField, t: Tensor, y: Tensor, dt: Tensor | float, warm: WarmStart | None
    ) -> FixedPointProblem:
        t_mid = t + 0.5 * dt

        def cold(f_: VectorField, y_: Tensor) -> Tensor:
            return self._predictor(f_, t, y_, 0.5 * dt) if self.init == "explicit" else y_

        return self._affine_map(f, t_mid, y, 0.5 * dt), self._start(cold, f, y, warm), (lambda z: 2 * z - y)

    def _stage_guess(self, y: Tensor, y_next: Tensor) -> Tensor:
        """``y_next = 2 z - y``, so ``z = (y + y_next) / 2``."""
        return 0.5 * (y + y_next)
