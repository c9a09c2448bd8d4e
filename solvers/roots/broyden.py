"""Limited-memory "good" Broyden method on ``F(z) = g(z) - z``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo
from ..registry import register_root_finder
from ._common import IterationState, backtrack, bdot, bnorm, check_int, wants_graph, write_slot


@register_root_finder("broyden")
class Broyden(RootFinder):
    """Good Broyden with a low-rank inverse Jacobian ``H = -I + sum_i u_i v_i^T`` kept per sample.

    The step is ``d = -H F(z)``; after it, the secant update ``H += (s - H y) s^T H / (s^T H y)``
    (``s`` the step, ``y`` the change of ``F``) adds one pair ``(u, v)``. ``m`` pairs are kept (``None``:
    every pair, i.e. up to ``max_iter``; the memory is ``2 m`` states per sample, allocated once); with a
    smaller ``m`` the oldest pair is dropped. Starting from ``H = -I`` the first step is a Picard step.
    ``max_backtracks > 0`` turns on a backtracking line search on ``||F||`` (that many halvings, each an
    evaluation); a sample whose search finds no decrease has its memory reset to ``-I``.

    Choose it for non-contractive but not very stiff maps where Jacobian products are unavailable or
    too costly: it learns the Jacobian from evaluations only (one per iteration without line search).
    On pretrained MiniLM layers full memory without line search (the defaults) solves the most layers
    at steps 1 and 2 (BENCHMARKS.md, section 5).
    """

    def __init__(self, *, m: int | None = None, max_backtracks: int = 0, tol: float | None = None,
                 max_iter: int = 50, on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        self.m = None if m is None else check_int("m", m, 1)
        self.max_backtracks = check_int("max_backtracks", max_backtracks, 0)

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        state = IterationState(g, z0, tol)
        batch, n = state.z.shape
        slots = self.max_iter if self.m is None else min(self.m, self.max_iter)
        us = state.z.new_zeros(batch, slots, n)  # rows u_i
        vs = state.z.new_zeros(batch, slots, n)  # rows v_i
        filled = 0
        for iteration in range(self.max_iter):
            if not bool(state.active.any()):
                break
            z_old, f_old = state.z, state.f
            direction = -_apply(us[:, :filled], vs[:, :filled], f_old)
            if self.max_backtracks > 0:
                z_new, gz_new, decreased = backtrack(state, direction, state.active, self.max_backtracks)
            else:
                z_new, gz_new = state.evaluate(z_old + direction, state.active)
                decreased = None
            state.accept(z_new, gz_new, state.active)
            in_place = not wants_graph(state.z, state.gz)  # unroll: autograd needs every version
            if decreased is not None and not bool(decreased.all()):
                keep = decreased.to(us.dtype)[:, None, None]  # reset the memory of samples with no decrease
                us, vs = us * keep, vs * keep
            s = state.z - z_old
            y = state.f - f_old
            h_y = _apply(us[:, :filled], vs[:, :filled], y)
            h_t_s = _apply(vs[:, :filled], us[:, :filled], s)  # H^T s
            denom = bdot(s, h_y)
            usable = denom.abs() > torch.finfo(denom.dtype).eps * bnorm(s) * bnorm(h_y)
            # a vanishing s^T H y would blow the update up: skip it (u = 0) for those samples
            safe_denom = torch.where(usable, denom, torch.ones_like(denom))
            scale = torch.where(usable, 1 / safe_denom, torch.zeros_like(denom))
            slot = iteration % slots
            us = write_slot(us, (slot,), (s - h_y) * scale[:, None], in_place)
            vs = write_slot(vs, (slot,), h_t_s, in_place)
            filled = min(filled + 1, slots)
        return state.result()


def _apply(us: Tensor, vs: Tensor, x: Tensor) -> Tensor:
    """``(-I + sum_i u_i v_i^T) x`` per sample, ``us``/``vs`` shaped ``(batch, k, n)`` (swap: transpose)."""
    if us.shape[1] == 0:
        return -x
    coefficients = vs @ x.unsqueeze(2)  # (batch, k, 1): v_i . x
    return (coefficients.transpose(1, 2) @ us).squeeze(1) - x
