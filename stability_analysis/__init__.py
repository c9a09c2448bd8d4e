"""Numerical-stability analysis of encoders run as ODE solvers (the IM-BERT argument, measured).

* ``functions``: stability functions ``R(z)`` of Runge-Kutta methods (exact, via sympy) and their
  properties: real/imaginary stability intervals, A- and L-stability.
* ``regions``: plots of ``|R(z)| <= 1`` for several methods, with points ``h*lambda`` on top.
* ``perturbation``: layer-by-layer growth of input perturbations (noise, gradient worst case, AdvGLUE
  substitutions) per solver, and the linear-field check ``growth == |R(h*lambda)|``.
* ``spectra``: matrix-free spectral norm, log norm and leading eigenvalues of layer Jacobians.
* ``solves``: per-input iterations, residuals and convergence of a converted model's implicit solves.
* ``cli``: the ``ode-bert analyze`` subcommand.
"""

from .functions import StabilityFunction, properties_table, stability_function
from .perturbation import (
    GrowthCurve,
    linear_field_growth,
    perturbation_growth,
    plot_growth,
    step_growth,
)
from .regions import plot_stability_region
from .solves import ExampleSolves, example_solves
from .spectra import (
    JacobianOperator,
    Spectrum,
    jacobian_spectrum,
    layer_spectra,
    leading_eigenvalues,
    log_norm,
    spectral_norm,
)

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
    "spectral_norm",
    "stability_function",
    "step_growth",
]
