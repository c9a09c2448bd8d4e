"""Damped fixed-point (Picard) iteration ``z <- (1 - damping) z + damping g(z)``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo, batch_size, sample_norm
from ..registry import register_root_finder


def _per_sample(mask: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample mask to ``like``'s shape (dim 0 is the batch when ndim >= 2)."""
    return mask.reshape(-1, *([1] * (like.ndim - 1))) if like.ndim >= 2 else mask.reshape(())


@register_root_finder("picard")
class Picard(RootFinder):
    """Damped fixed-point iteration; converges when ``g`` is a contraction (e.g. small steps)."""

    def __init__(self, *, damping: float = 1.0, tol: float | None = None, max_iter: int = 50,
                 on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.damping = float(damping)

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        n = batch_size(z0)
        z = z0
        iterations = torch.zeros(n, dtype=torch.long, device=z0.device)
        active = torch.ones(n, dtype=torch.bool, device=z0.device)
        gz = g(z)
        nfev = 1
        abs_res = sample_norm(gz - z)
        rel_res = abs_res / sample_norm(gz).clamp_min(torch.finfo(abs_res.dtype).tiny)
        for _ in range(self.max_iter):
            active = active & (rel_res > tol) & torch.isfinite(rel_res)
            if not bool(active.any()):
                break
            step = z + self.damping * (gz - z)
            z = torch.where(_per_sample(active, z), step, z)
            iterations = iterations + active.long()
            gz_new = g(z)
            nfev += 1
            gz = torch.where(_per_sample(active, z), gz_new, gz)
            abs_res = sample_norm(gz - z)
            rel_res = abs_res / sample_norm(gz).clamp_min(torch.finfo(abs_res.dtype).tiny)
        converged = rel_res <= tol
        return z, RootInfo(iterations, nfev, abs_res, rel_res, converged)
