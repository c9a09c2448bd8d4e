"""Limited-memory "good" Broyden method on ``F(z) = g(z) - z``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo
from ..registry import register_root_finder
from ._common import IterationState, backtrack, bdot, bnorm, check_int, per_sample


@register_root_finder("broyden")
class Broyden(RootFinder):
    """Good Broyden with a low-rank inverse Jacobian ``H = -I + sum_i u_i v_i^T`` kept per sample.

    The step is ``d = -H F(z)``; after it, the secant update ``H += (s - H y) s^T H / (s^T H y)``
    (``s`` the step, ``y`` the change of ``F``) adds one pair ``(u, v)``; only the last ``m`` pairs
    are kept. Starting from ``H = -I`` the first step is a Picard step. A backtracking line search on
    ``||F||`` (``max_backtracks`` halvings, 0 disables it) guards each step; a sample whose search
    finds no decrease has its memory reset to ``-I``.

    Choose it for non-contractive but not very stiff maps where Jacobian products are unavailable or
    too costly: it learns the Jacobian from evaluations only (one per iteration without backtracking).
    """

    def __init__(self, *, m: int = 20, max_backtracks: int = 4, tol: float | None = None, max_iter: int = 50,
                 on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        self.m = check_int("m", m, 1)
        self.max_backtracks = check_int("max_backtracks", max_backtracks, 0)

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        state = IterationState(g, z0, tol)
        us: list[Tensor] = []
        vs: list[Tensor] = []
        for _ in range(self.max_iter):
            if not bool(state.active.any()):
                break
            z_old, f_old = state.z, state.gz - state.z
            direction = -_apply(us, vs, f_old)
            if self.max_backtracks > 0:
                z_new, gz_new, decreased = backtrack(state, direction, state.active, self.max_backtracks)
            else:
                z_new, gz_new = state.evaluate(z_old + direction)
                decreased = torch.ones_like(state.active)
            state.accept(z_new, gz_new, state.active)
            keep = per_sample(decreased, z_old).to(z_old.dtype)
            us = [u * keep for u in us]  # reset the memory of samples whose line search failed
            vs = [v * keep for v in vs]
            s = state.z - z_old
            y = (state.gz - state.z) - f_old
            h_y = _apply(us, vs, y)
            h_t_s = _apply(vs, us, s)  # H^T s
            denom = bdot(s, h_y)
            usable = denom.abs() > torch.finfo(denom.dtype).eps * bnorm(s) * bnorm(h_y)
            # a vanishing s^T H y would blow the update up: skip it (u = 0) for those samples
            safe_denom = torch.where(usable, denom, torch.ones_like(denom))
            scale = torch.where(usable, 1 / safe_denom, torch.zeros_like(denom))
            us = (us + [(s - h_y) * scale[:, None]])[-self.m:]
            vs = (vs + [h_t_s])[-self.m:]
        return state.result()


def _apply(us: list[Tensor], vs: list[Tensor], x: Tensor) -> Tensor:
    """``(-I + sum_i u_i v_i^T) x`` per sample (swap ``us`` and ``vs`` for the transpose)."""
    out = -x
    for u, v in zip(us, vs):
        out = out + u * bdot(v, x)[:, None]
    return out
