"""Core types shared by every solver family: tableaux, info records, base classes, errors.

Conventions (all solvers and root finders follow them):

* A state ``y`` is a tensor of any shape. If ``y.ndim >= 2`` its first dimension is a batch of
  independent samples (a batch of hidden states is ``(batch, tokens, hidden)``); statistics such as
  residuals are then reported per sample. A 0-d or 1-d state is a single sample.
* A vector field is ``f(t, y) -> dy/dt`` with ``t`` a 0-d tensor (or float) and the result shaped
  like ``y``.
* A step method maps ``(f, t, y, dt)`` to ``(y_next, StepInfo)``.
* A root finder solves the fixed-point equation ``z = g(z)`` (residual ``g(z) - z``) and returns
  ``(z, RootInfo)``.
* Optional row protocol (``RowMap``): a map or vector field with ``rows(index)`` can be evaluated on a
  subset of the batch; root finders then stop evaluating samples that have converged (row compaction).
"""

from __future__ import annotations

import abc
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import torch
from torch import Tensor

from ._registry import suggest

VectorField = Callable[[Tensor, Tensor], Tensor]
FixedPointMap = Callable[[Tensor], Tensor]


class ConvergenceWarning(RuntimeWarning):
    """A root finder stopped before reaching its tolerance."""


class ConvergenceError(RuntimeError):
    """A root finder stopped before reaching its tolerance and ``on_failure='raise'`` was set."""


ON_FAILURE: tuple[str, ...] = ("warn", "raise", "ignore")


def check_on_failure(value: object, name: str = "on_failure") -> str:
    """``value`` if it is a failure policy (``ON_FAILURE``), else a ``ValueError`` naming the choices."""
    if not isinstance(value, str) or value not in ON_FAILURE:
        hint = suggest(value, list(ON_FAILURE)) if isinstance(value, str) else ""
        raise ValueError(f"{name} must be one of {', '.join(ON_FAILURE)}, got {value!r}.{hint}".rstrip("."))
    return value


def report_failure(policy: str, message: str, stacklevel: int = 3) -> None:
    """Act on a solve that stopped short, as ``policy`` says: ``"raise"`` a ``ConvergenceError``, ``"warn"``
    with a ``ConvergenceWarning`` (``stacklevel`` as for ``warnings.warn``, counted from the caller), or
    ``"ignore"``. The one place that policy is written."""
    if policy == "raise":
        raise ConvergenceError(message)
    if policy == "warn":
        warnings.warn(message, ConvergenceWarning, stacklevel=stacklevel + 1)


class DivergenceError(FloatingPointError):
    """The numerical solution grew out of scale or became non-finite (typically an explicit method on a
    stiff problem), or an adaptive step size underflowed."""


class NonFiniteError(FloatingPointError):
    """The vector field returned NaN or Inf when evaluated at a finite state.

    The fault is the field's (or an iteration that drove it out of range), not the caller's input: a
    non-finite input state is a ``ValueError`` before the field is evaluated.
    """


class StepBudgetError(RuntimeError):
    """An integration needed more steps than its ``max_num_steps`` budget allows."""


@dataclass(frozen=True)
class ButcherTableau:
    """Runge-Kutta coefficients ``(A, b, c)``; exact rationals where the method has them.

    ``A`` is ``s x s`` (strictly lower triangular for explicit methods), ``b`` and ``c`` have length
    ``s``. Entries are ``Fraction`` (or ``float`` for tableaux only known in floating point).
    """

    A: tuple[tuple[Fraction | float, ...], ...]
    b: tuple[Fraction | float, ...]
    c: tuple[Fraction | float, ...]

    def __post_init__(self) -> None:
        s = len(self.b)
        if len(self.c) != s or len(self.A) != s or any(len(row) != s for row in self.A):
            raise ValueError(f"inconsistent Butcher tableau sizes: A {len(self.A)}x?, b {s}, c {len(self.c)}")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def explicit(self) -> bool:
        return all(self.A[i][j] == 0 for i in range(self.stages) for j in range(i, self.stages))


def sample_norm(x: Tensor) -> Tensor:
    """Euclidean norm per sample (dim 0 is the batch when ``x.ndim >= 2``), computed in >= float32."""
    x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    if x.ndim >= 2:
        return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
    return torch.linalg.vector_norm(x).reshape(1)


def batch_size(x: Tensor) -> int:
    return x.shape[0] if x.ndim >= 2 else 1


def default_tol(dtype: torch.dtype) -> float:
    """Relative tolerance suited to ``dtype``: about ``eps ** 0.6`` (1e-10 for float64, 1e-5 for float32)."""
    return {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}.get(
        dtype, 1e-5
    )


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype that operations on ``x`` compute in: the autocast dtype when autocast is on for its device
    and lower in precision than ``x``, else ``x.dtype``."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if torch.finfo(dtype).eps > torch.finfo(x.dtype).eps:
            return dtype
    return x.dtype


@dataclass
class RootInfo:
    """Outcome of one root solve, per sample (length ``batch``) where a tensor."""

    iterations: Tensor  # long, iterations taken by each sample
    nfev: int  # calls of the fixed-point map (each on the whole batch)
    abs_residual: Tensor  # ||g(z) - z|| per sample
    rel_residual: Tensor  # ||g(z) - z|| / ||g(z)|| per sample
    converged: Tensor  # bool per sample
    solver: str = ""
    nvjp: int = 0  # Jacobian-vector or vector-Jacobian products (each on the whole batch)
    diverged: Tensor | None = None  # bool per sample: stopped by a non-finite residual (None: not tracked)
    tol: float | None = None  # the relative tolerance the solve stopped at (see RootFinder.tolerance)
    rows: int | None = None  # batch rows evaluated, summed over calls (< nfev * batch with row compaction)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    @property
    def max_rel_residual(self) -> float:
        return float(self.rel_residual.max())

    def summary(self) -> str:
        products = f", {self.nvjp} Jacobian products" if self.nvjp else ""
        n_diverged = 0 if self.diverged is None else int(self.diverged.sum())
        diverged = f", diverged {n_diverged}" if n_diverged else ""
        return (
            f"{self.solver}: {int(self.iterations.max())} iterations, {self.nfev} evaluations{products}, "
            f"max relative residual {self.max_rel_residual:.3g}, "
            f"converged {int(self.converged.sum())}/{self.converged.numel()}{diverged}"
        )


@dataclass
class StepInfo:
    """Statistics of one step: vector-field evaluations and, for implicit steps, the root solve."""

    nfev: int = 0
    root: RootInfo | None = None


class RootFinder(abc.ABC):
    """Matrix-free solver of ``z = g(z)`` for batched tensors.

    Options common to every finder: ``tol`` (relative residual ``||g(z)-z|| / ||g(z)||``; ``None``
    picks a dtype-aware default), ``max_iter``, and ``on_failure`` (``"warn"``, ``"raise"``,
    ``"ignore"``) for samples that did not converge. Samples stop updating once they converge, so a
    sample's result does not depend on the rest of the batch.
    """

    name: ClassVar[str] = ""

    def __init__(self, *, tol: float | None = None, max_iter: int = 50, on_failure: str = "warn") -> None:
        if tol is not None and not (isinstance(tol, (int, float)) and 0 < tol < 1):
            raise ValueError(f"tol must be a number in (0, 1) or None, got {tol!r}")
        if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
        check_on_failure(on_failure)
        self.tol = tol
        self.max_iter = max_iter
        self.on_failure = on_failure

    def tolerance(self, z: Tensor) -> float:
        """The tolerance of a solve from ``z``: ``tol`` (``None``: the dtype's default), raised to the default
        tolerance of the dtype the map computes in under autocast. A bfloat16 layer evaluation is only good
        to about 1e-2, so a float32 tolerance could never be met there: every solve would run to
        ``max_iter`` and report failure."""
        tol = self.tol if self.tol is not None else default_tol(z.dtype)
        compute = compute_dtype(z)
        return tol if compute == z.dtype else max(tol, default_tol(compute))

    @abc.abstractmethod
    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        """Family-specific iteration; must return per-sample info and never raise on non-convergence."""

    def solve(self, g: FixedPointMap, z0: Tensor) -> tuple[Tensor, RootInfo]:
        """Solve ``z = g(z)`` from ``z0``; report (and, per ``on_failure``, warn/raise) non-convergence."""
        check_state(z0, "initial guess")
        tol = self.tolerance(z0)
        z, info = self._solve(g, z0, tol)
        info.solver, info.tol = self.name, tol
        self.report(info)
        return z, info

    def report(self, info: RootInfo) -> None:
        if info.all_converged or self.on_failure == "ignore":
            return
        finite = bool(torch.isfinite(info.rel_residual).all()) and not (
            info.diverged is not None and bool(info.diverged.any())
        )
        message = f"root finder {self.name!r} did not converge: {info.summary()}" + (
            "" if finite else " (non-finite residual: the iteration diverged; last finite iterate kept)"
        )
        report_failure(self.on_failure, message, stacklevel=3)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({opts})"


class Method(abc.ABC):
    """One step of an ODE solver: ``step(f, t, y, dt) -> (y_next, StepInfo)``.

    Class attributes describe the method: ``order`` (classical order of accuracy), ``implicit``,
    ``adaptive`` and ``tableau`` (a ``ButcherTableau`` for Runge-Kutta methods, else ``None``).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 0
    implicit: ClassVar[bool] = False
    adaptive: ClassVar[bool] = False
    tableau: ClassVar[ButcherTableau | None] = None

    @abc.abstractmethod
    def step(
        self, f: VectorField, t: Tensor | float, y: Tensor, dt: Tensor | float
    ) -> tuple[Tensor, StepInfo]:
        """Advance ``y`` from ``t`` to ``t + dt``."""

    def __call__(self, f: VectorField, t: Tensor | float, y: Tensor, dt: Tensor | float) -> Tensor:
        return self.step(f, t, y, dt)[0]

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({opts})"


class CountedField:
    """A vector field that checks each result is shaped like the state and counts its calls.

    Counting calls (rather than trusting a root finder's own ``nfev``) also covers the evaluations made
    inside Jacobian products.

    It also records (without raising, so a root finder can still back off from a bad trial point) the first
    evaluation that returned NaN or Inf at a finite input: ``nonfinite`` is then ``(t, "NaN" or "Inf",
    max |input|)``; ``raise_nonfinite`` turns it into a ``NonFiniteError``. ``last_t`` is the time of the
    latest evaluation.
    """

    def __init__(self, f: VectorField, y: Tensor) -> None:
        self.f = f
        self.shape = y.shape
        self.calls = 0
        self.nonfinite: tuple[float, str, float] | None = None
        self.last_t: Tensor | float | None = None

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        self.calls += 1
        self.last_t = t
        out = self.f(t, z)
        if not isinstance(out, Tensor) or out.shape != self.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            expected = tuple(self.shape)
            raise ValueError(
                f"the vector field returned {shape}, expected a tensor shaped like the state {expected}"
            )
        if self.nonfinite is None and not all_finite(out):
            z_abs = z.detach().abs()
            if all_finite(z_abs):  # a non-finite input is the iteration's, not the field's
                kind = "NaN" if bool(torch.isnan(out).any()) else "Inf"
                self.nonfinite = (float(t), kind, float(z_abs.max()) if z_abs.numel() else 0.0)
        return out

    def rows(self, index: Tensor) -> CountedField | None:
        """This field on the batch rows ``index`` (``None`` if the field cannot be restricted); its calls and
        NaN/Inf records count here too."""
        restricted = restrict_rows(self.f, index)
        if restricted is None:
            return None
        return _CountedRows(restricted, self.shape, len(index), self)

    def raise_nonfinite(self, where: str, y: Tensor | None = None) -> None:
        """Raise ``NonFiniteError`` naming the vector field if it returned NaN/Inf at a finite input.

        ``where`` says what was being computed (e.g. "during an 'implicit_euler' step from t = 0.5"), ``y``
        is the state the computation started from, whose scale is compared with the evaluation point's.
        """
        if self.nonfinite is None:
            return
        t, kind, size = self.nonfinite
        start = ""
        if y is not None and y.numel():
            y_size = float(y.detach().abs().max())
            start = f"; it started from a state with max |y| = {y_size:.3g}"
            if size > 1e3 * max(y_size, 1.0):
                start += (" (the evaluation point is far larger: the solution or a root iteration grew out "
                          "of range before the field overflowed; try a smaller step or another root finder)")
        raise NonFiniteError(
            f"the vector field returned {kind} at t = {t:.6g}, evaluated at a finite state "
            f"(max |state| = {size:.3g}) {where}{start}. The input state was finite, so the field (or "
            f"what it computes with) produced the {kind}"
        )


class RowMap:
    """A batched function that can also be evaluated on a subset of its batch rows (row compaction).

    ``fn`` is the function on the whole batch; ``restrict(index)`` returns the same function for the batch
    rows ``index`` (a sorted 1-D long tensor), called with and returning tensors of ``len(index)`` rows, or
    ``None`` when it cannot (e.g. a layer in training mode, whose dropout masks depend on the batch shape).
    Root finders evaluate only the samples still iterating when their map has ``rows`` (see
    ``restrict_rows``); a map without it is always evaluated on the whole batch. The restriction must give
    each row the value the whole-batch call gives it (up to rounding): rows are independent samples.
    """

    def __init__(
        self, fn: Callable[..., Tensor], restrict: Callable[[Tensor], Callable[..., Tensor] | None]
    ) -> None:
        self.fn = fn
        self.restrict = restrict

    def __call__(self, *args: Tensor) -> Tensor:
        return self.fn(*args)

    def rows(self, index: Tensor) -> Callable[..., Tensor] | None:
        """The function on the batch rows ``index``, or ``None`` when it cannot be restricted."""
        return self.restrict(index)


def restrict_rows(fn: Callable[..., Tensor], index: Tensor) -> Callable[..., Tensor] | None:
    """``fn`` on the batch rows ``index`` if it offers that (a ``rows`` method, see ``RowMap``), else None."""
    rows = getattr(fn, "rows", None)
    return rows(index) if callable(rows) else None


class _CountedRows(CountedField):
    """``CountedField.rows``: the field on some batch rows, counting its calls in the whole-batch field."""

    def __init__(self, f: VectorField, shape: torch.Size, count: int, parent: CountedField) -> None:
        self.f = f
        self.shape = torch.Size((count, *shape[1:]))
        self.calls = 0
        self.nonfinite = None
        self.last_t = None
        self.parent = parent

    def __call__(self, t: Tensor, z: Tensor) -> Tensor:
        out = super().__call__(t, z)
        self.parent.calls += 1
        self.parent.last_t = t
        if self.parent.nonfinite is None:
            self.parent.nonfinite = self.nonfinite
        return out


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` has no NaN or Inf. One sum on the fast path (any NaN or Inf makes it non-finite): on
    CPU ``torch.isfinite(x).all()`` costs about 35 sums on a 32 x 64 x 384 state. The exact test runs only
    when the sum is not finite, to tell a sum that overflowed over finite entries apart."""
    x = x.detach()
    total = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(x).all())


def check_state(y: Tensor, what: str = "state") -> None:
    """Reject non-tensors, non-floating dtypes and non-finite values with a clear message."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(
            f"{what} must have a floating dtype (float16/bfloat16/float32/float64), got {y.dtype}"
        )
    if not all_finite(y):
        raise ValueError(f"{what} contains NaN or Inf")


def check_step(dt: Tensor | float) -> float:
    """A step size must be a finite, non-zero real number."""
    value = float(dt)
    if not math.isfinite(value) or value == 0:
        raise ValueError(f"step size must be a finite non-zero number, got {dt!r}")
    return value


def as_time(t: Tensor | float, like: Tensor) -> Tensor:
    """``t`` as a 0-d tensor on ``like``'s device, in float64 for float64 states else float32."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.as_tensor(t, dtype=dtype, device=like.device)
