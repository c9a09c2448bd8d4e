"""Make the implicit steps usable as torchdiffeq methods (``odeint`` and ``odeint_adjoint``).

``install_torchdiffeq()`` adds ``solvers_implicit_euler``, ``solvers_trapezoid`` and
``solvers_implicit_midpoint`` to torchdiffeq's solver table as fixed-grid solvers; our step options go in
``options`` next to torchdiffeq's own::

    torchdiffeq.odeint(func, y0, t, method="solvers_implicit_euler",
                       options={"step_size": 0.1, "root": "newton_krylov", "tol": 1e-8})

The names carry the prefix ``BRIDGE_PREFIX`` (``"solvers_"``) so they cannot clash with torchdiffeq's own:
torchdiffeq's master branch defines ``implicit_euler``, ``implicit_midpoint`` and ``trapezoid`` itself, and
a bare name would silently switch to torchdiffeq's solver (ignoring ``root`` and the rest) after an
upgrade. A name of ours that torchdiffeq's table already holds for another solver is never replaced: that
clash is a ``RuntimeWarning`` (or an error with ``on_clash="raise"``). Options are validated: anything that
is neither one of the method's options nor one of torchdiffeq's fixed-grid options is a ``ValueError``.

The table is torchdiffeq's private ``torchdiffeq._impl.odeint.SOLVERS`` (also used by ``odeint_adjoint``),
hence the upper bound on the torchdiffeq version in ``pyproject.toml``.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from ._base import Method
from ._registry import option_names, suggest
from .registry import METHODS, get

BRIDGED_METHODS = ("implicit_euler", "trapezoid", "implicit_midpoint")  # our method names
BRIDGE_PREFIX = "solvers_"
# torchdiffeq name -> our method name
BRIDGED_NAMES = {BRIDGE_PREFIX + name: name for name in BRIDGED_METHODS}
# Options torchdiffeq's FixedGridODESolver takes (step_size, grid_constructor, interp, perturb, ...) and the
# ones odeint/odeint_adjoint pass to every solver (rtol, atol, norm), which a fixed-grid solver drops.
FIXED_GRID_OPTIONS = tuple(
    name for name, param in inspect.signature(FixedGridODESolver.__init__).parameters.items()
    if name not in ("self", "func", "y0") and param.kind is not param.VAR_KEYWORD
)
PASSED_BY_TORCHDIFFEQ = ("rtol", "atol", "norm")


def torchdiffeq_name(method: str) -> str:
    """The torchdiffeq method name of one of our bridged methods, e.g. ``"solvers_implicit_euler"``."""
    if method not in BRIDGED_METHODS:
        bridged = ", ".join(BRIDGED_METHODS)
        raise ValueError(f"{method!r} is not bridged to torchdiffeq. Bridged methods: {bridged}")
    return BRIDGE_PREFIX + method


class SolversFixedGrid(FixedGridODESolver):
    """A torchdiffeq fixed-grid solver whose step is a method of this package (``method_name``)."""

    method_name: str = ""

    def __init__(self, func: Any, y0: Tensor, **options: Any) -> None:
        ours = option_names(METHODS.lookup(self.method_name))
        valid = [*ours, *FIXED_GRID_OPTIONS]
        for key in options:
            if key not in valid and key not in PASSED_BY_TORCHDIFFEQ:
                raise ValueError(
                    f"Unknown option {key!r} for torchdiffeq method {BRIDGE_PREFIX + self.method_name!r}."
                    f"{suggest(key, valid)} Valid options: {', '.join(valid)}"
                )
        step_options = {key: options.pop(key) for key in list(options) if key in ours}
        super().__init__(func, y0, **options)
        self.method: Method = get(self.method_name, **step_options)

    def _step_func(self, func: Any, t0: Tensor, dt: Tensor, t1: Tensor, y0: Tensor) -> tuple[Tensor, Any]:
        y1, _ = self.method.step(func, t0, y0, dt)
        f0 = func(t0, y0) if self.interp == "cubic" else None  # only the cubic interpolant needs f(t0, y0)
        return y1 - y0, f0


def _is_bridge(solver: Any, method: str) -> bool:
    """Whether a solver-table entry is this bridge's solver for ``method`` (also after a module reload)."""
    return (
        isinstance(solver, type)
        and getattr(solver, "method_name", None) == method
        and getattr(solver, "__module__", None) == __name__
    )


def install_torchdiffeq(on_clash: str = "warn") -> list[str]:
    """Register the bridged methods in torchdiffeq's solver table (idempotent); return the names added.

    A name already taken in the table by a solver that is not this bridge's is left alone and reported:
    ``on_clash="warn"`` (a ``RuntimeWarning`` naming the clash) or ``"raise"`` (a ``RuntimeError``).
    """
    if on_clash not in ("warn", "raise"):
        raise ValueError(f"on_clash must be 'warn' or 'raise', got {on_clash!r}")
    added = []
    for name, method in BRIDGED_NAMES.items():
        existing = SOLVERS.get(name)
        if existing is not None:
            if not _is_bridge(existing, method):
                module = getattr(existing, "__module__", "?")
                where = f"{module}.{getattr(existing, '__qualname__', existing)}"
                message = (
                    f"torchdiffeq's solver table already defines {name!r} as {where}; the bridge to solvers' "
                    f"{method!r} is not installed under that name, so torchdiffeq.odeint(method={name!r}) "
                    f"runs that solver, not ours (use solvers.odeint(..., method={method!r}) instead)"
                )
                if on_clash == "raise":
                    raise RuntimeError(message)
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            continue
        cls = METHODS.lookup(method)
        solver = type(
            f"Torchdiffeq{cls.__name__}",
            (SolversFixedGrid,),
            {"method_name": method, "order": cls.order, "__module__": __name__, "__doc__": cls.__doc__},
        )
        SOLVERS[name] = solver
        added.append(name)
    return added
