"""Numerical-stability analysis of encoders run as ODE solvers (the IM-BERT argument, measured).

* ``functions``: stability functions ``R(z)`` of Runge-Kutta methods (exact, via sympy) and their
  properties: real/imaginary stability intervals, A- and L-stability.
* ``regions``: plots of ``|R(z)| <= 1`` for several methods, with points ``h*lambda`` on top.
* ``perturbation``: layer-by-layer growth of input perturbations (noise, gradient worst case, AdvGLUE
  substitutions) per solver, and the linear-field check ``growth == |R(h*lambda)|``.
* ``spectra``: matrix-free spectral norm, log norm and leading eigenvalues of layer Jacobians.
* ``solves``: per-input iterations, residuals and convergence of a converted model's implicit solves.
* ``cli``: the ``ode-bert analyze`` subcommand, and ``demo`` the ``ode-bert demo`` tour (``ode-bert``
  finds both through the ``ode_bert.commands`` entry point, so ``ode_bert`` never imports this package).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Names load on first use, so that ``ode-bert --help`` (which imports ``stability_analysis.cli`` through
# the ``ode_bert.commands`` entry point) does not import torch, sympy or matplotlib.
_SOURCES = {
    "ExampleSolves": "solves",
    "GrowthCurve": "perturbation",
    "JacobianOperator": "spectra",
    "Spectrum": "spectra",
    "StabilityFunction": "functions",
    "example_solves": "solves",
    "jacobian_spectrum": "spectra",
    "layer_spectra": "spectra",
    "leading_eigenvalues": "spectra",
    "linear_field_growth": "perturbation",
    "log_norm": "spectra",
    "perturbation_growth": "perturbation",
    "plot_growth": "perturbation",
    "plot_stability_region": "regions",
    "properties_table": "functions",
    "region_overlay": "spectra",
    "spectral_abscissa": "spectra",
    "spectral_norm": "spectra",
    "stability_function": "functions",
    "step_growth": "perturbation",
}

if TYPE_CHECKING:
    from .functions import StabilityFunction, properties_table, stability_function
    from .perturbation import GrowthCurve, linear_field_growth, perturbation_growth, plot_growth, step_growth
    from .regions import plot_stability_region
    from .solves import ExampleSolves, example_solves
    from .spectra import (
        JacobianOperator,
        Spectrum,
        jacobian_spectrum,
        layer_spectra,
        leading_eigenvalues,
        log_norm,
        region_overlay,
        spectral_abscissa,
        spectral_norm,
    )


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])


__all__ = [
    "ExampleSolves",
    "GrowthCurve",
    "JacobianOperator",
    "Spectrum",
    "StabilityFunction",
    "example_solves",
    "jacobian_spectrum",
    "layer_spectra",
    "leading_eigenvalues",
    "linear_field_growth",
    "log_norm",
    "perturbation_growth",
    "plot_growth",
    "plot_stability_region",
    "properties_table",
    "region_overlay",
    "spectral_abscissa",
    "spectral_norm",
    "stability_function",
    "step_growth",
]
