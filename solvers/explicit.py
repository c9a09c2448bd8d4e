"""Explicit Runge-Kutta steps defined by their Butcher tableaux: euler, midpoint, heun, rk4."""

from __future__ import annotations

from fractions import Fraction as F

from torch import Tensor

from ._base import ButcherTableau, Method, StepInfo, VectorField, as_time, check_step
from .registry import register


class ExplicitRK(Method):
    """Generic explicit Runge-Kutta step: stage ``i`` is ``f(t + c_i dt, y + dt sum_j A_ij k_j)``."""

    def __init__(self) -> None:
        pass

    def step(
        self, f: VectorField, t: Tensor | float, y: Tensor, dt: Tensor | float
    ) -> tuple[Tensor, StepInfo]:
        check_step(dt)
        tab = self.tableau
        assert tab is not None
        t = as_time(t, y)
        ks: list[Tensor] = []
        for i in range(tab.stages):
            yi = y
            for j, a in enumerate(tab.A[i][:i]):
                if a != 0:
                    yi = yi + (float(a) * dt) * ks[j]
            ks.append(f(t + float(tab.c[i]) * dt, yi))
        y_next = y
        for b, k in zip(tab.b, ks):
            if b != 0:
                y_next = y_next + (float(b) * dt) * k
        return y_next, StepInfo(nfev=tab.stages)


@register("euler")
class Euler(ExplicitRK):
    """Forward Euler, order 1: ``y + dt f(t, y)``. With step 1 it is a residual layer."""

    order = 1
    tableau = ButcherTableau(A=((F(0),),), b=(F(1),), c=(F(0),))


@register("midpoint")
class Midpoint(ExplicitRK):
    """Explicit midpoint, order 2."""

    order = 2
    tableau = ButcherTableau(A=((F(0), F(0)), (F(1, 2), F(0))), b=(F(0), F(1)), c=(F(0), F(1, 2)))


@register("heun")
class Heun(ExplicitRK):
    """Heun's method (explicit trapezoid), order 2."""

    order = 2
    tableau = ButcherTableau(A=((F(0), F(0)), (F(1), F(0))), b=(F(1, 2), F(1, 2)), c=(F(0), F(1)))


@register("rk4")
class RK4(ExplicitRK):
    """Classical fourth-order Runge-Kutta."""

    order = 4
    tableau = ButcherTableau(
        A=(
            (F(0), F(0), F(0), F(0)),
            (F(1, 2), F(0), F(0), F(0)),
            (F(0), F(1, 2), F(0), F(0)),
            (F(0), F(0), F(1), F(0)),
        ),
        b=(F(1, 6), F(1, 3), F(1, 3), F(1, 6)),
        c=(F(0), F(1, 2), F(1, 2), F(1)),
    )
