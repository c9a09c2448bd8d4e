"""Damped fixed-point (Picard) iteration ``z <- (1 - damping) z + damping g(z)``."""

from __future__ import annotations

from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo
from ..registry import register_root_finder
from ._common import IterationState


@register_root_finder("picard")
class Picard(RootFinder):
    """Damped fixed-point iteration; converges when ``g`` is a contraction (e.g. small steps).

    Choose it when ``g`` is strongly contractive: one evaluation per iteration and no Jacobian
    products, so it is the cheapest finder per iteration; it converges linearly at the contraction
    rate and fails for stiff or non-contractive maps (use ``anderson`` or ``newton_krylov`` there).
    """

    def __init__(self, *, damping: float = 1.0, tol: float | None = None, max_iter: int = 50,
                 on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.damping = float(damping)

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        state = IterationState(g, z0, tol)
        for _ in range(self.max_iter):
            if not bool(state.active.any()):
                break
            z_new, gz_new = state.evaluate(state.z + self.damping * state.f, state.active)
            state.accept(z_new, gz_new, state.active)
        return state.result()
