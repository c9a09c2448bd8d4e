"""ode-bert's numerical core: ODE step methods and matrix-free root finders, by name.

Public API::

    import solvers
    solvers.available()                      # step methods
    step = solvers.get("implicit_euler", root="anderson", grad="implicit")
    y_next, info = step.step(f, t, y, dt)
    solvers.available_root_finders()
    z, info = solvers.get_root_finder("anderson").solve(g, z0)   # solves z = g(z)

Imports torch and torchdiffeq only.
"""

from . import adaptive, explicit, implicit, roots  # noqa: F401  (register the built-in families)
from ._base import (
    ON_FAILURE,
    ButcherTableau,
    ConvergenceError,
    ConvergenceWarning,
    DivergenceError,
    Method,
    NonFiniteError,
    RootFinder,
    RootInfo,
    RowMap,
    StepBudgetError,
    StepInfo,
    VectorField,
    all_finite,
    check_on_failure,
    default_tol,
    report_failure,
    restrict_rows,
    sample_norm,
)
from ._registry import option_names, suggest
from .gradients import AdjointSolve, available_grad_modes, solve_fixed_point, watch_adjoint_solves
from .integrate import OdeintStats, odeint
from .registry import (
    METHODS,
    ROOT_FINDERS,
    available,
    available_root_finders,
    get,
    get_root_finder,
    register,
    register_root_finder,
)
from .torchdiffeq_bridge import install_torchdiffeq

install_torchdiffeq()

__all__ = [
    "METHODS",
    "ON_FAILURE",
    "ROOT_FINDERS",
    "AdjointSolve",
    "ButcherTableau",
    "ConvergenceError",
    "ConvergenceWarning",
    "DivergenceError",
    "Method",
    "NonFiniteError",
    "OdeintStats",
    "RootFinder",
    "RootInfo",
    "RowMap",
    "StepBudgetError",
    "StepInfo",
    "VectorField",
    "all_finite",
    "available",
    "available_grad_modes",
    "available_root_finders",
    "check_on_failure",
    "default_tol",
    "get",
    "get_root_finder",
    "install_torchdiffeq",
    "odeint",
    "option_names",
    "register",
    "register_root_finder",
    "restrict_rows",
    "report_failure",
    "sample_norm",
    "solve_fixed_point",
    "suggest",
    "watch_adjoint_solves",
]
