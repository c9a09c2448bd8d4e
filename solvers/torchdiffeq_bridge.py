"""Make the implicit steps usable as torchdiffeq methods (``odeint`` and ``odeint_adjoint``).

``install_torchdiffeq()`` adds ``implicit_euler``, ``trapezoid`` and ``implicit_midpoint`` to torchdiffeq's
solver table as fixed-grid solvers; our step options go in ``options`` next to torchdiffeq's own::

    torchdiffeq.odeint(func, y0, t, method="implicit_euler",
                       options={"step_size": 0.1, "root": "newton_krylov", "tol": 1e-8})

The table is torchdiffeq's private ``torchdiffeq._impl.odeint.SOLVERS`` (also used by ``odeint_adjoint``);
names torchdiffeq already defines are never replaced.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torchdiffeq._impl.odeint import SOLVERS
from torchdiffeq._impl.solvers import FixedGridODESolver

from ._base import Method
from ._registry import option_names
from .registry import METHODS, get

BRIDGED_METHODS = ("implicit_euler", "trapezoid", "implicit_midpoint")


class SolversFixedGrid(FixedGridODESolver):
    """A torchdiffeq fixed-grid solver whose step is a method of this package (``method_name``)."""

    method_name: str = ""

    def __init__(self, func: Any, y0: Tensor, **options: Any) -> None:
        ours = set(option_names(METHODS.lookup(self.method_name)))
        step_options = {key: options.pop(key) for key in list(options) if key in ours}
        super().__init__(func, y0, **options)
        self.method: Method = get(self.method_name, **step_options)

    def _step_func(self, func: Any, t0: Tensor, dt: Tensor, t1: Tensor, y0: Tensor) -> tuple[Tensor, Any]:
        y1, _ = self.method.step(func, t0, y0, dt)
        f0 = func(t0, y0) if self.interp == "cubic" else None  # only the cubic interpolant needs f(t0, y0)
        return y1 - y0, f0


def install_torchdiffeq() -> list[str]:
    """Register the bridged methods in torchdiffeq's solver table (idempotent); return the names added."""
    added = []
    for name in BRIDGED_METHODS:
        if name in SOLVERS:
            continue
        cls = METHODS.lookup(name)
        solver = type(
            f"Torchdiffeq{cls.__name__}",
            (SolversFixedGrid,),
            {"method_name": name, "order": cls.order, "__module__": __name__, "__doc__": cls.__doc__},
        )
        SOLVERS[name] = solver
        added.append(name)
    return added
