"""Anderson acceleration (type II) of the fixed-point iteration ``z <- g(z)``."""

from __future__ import annotations

import torch
from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo
from ..registry import register_root_finder
from ._common import IterationState, check_float, check_int


@register_root_finder("anderson")
class Anderson(RootFinder):
    """Anderson acceleration, type II, with Tikhonov-regularised per-sample least squares.

    Each step combines the last ``m`` iterates so that the linearised residual is smallest:
    ``gamma = argmin ||f_k - dF gamma||`` (``f = g(z) - z``, ``dF`` the residual differences), then
    ``z <- z + beta f_k - (dZ + beta dF) gamma``. The small ``m x m`` normal equations get
    ``lam * mean(diag)`` added to their diagonal so a degenerate history cannot make them singular.

    Choose it as the default for moderately contractive or mildly non-contractive maps (e.g. a
    transformer layer as an implicit step): one evaluation per iteration, no Jacobian products, much
    faster than Picard. For stiff systems use ``newton_krylov``.
    """

    def __init__(self, *, m: int = 5, beta: float = 1.0, lam: float = 1e-4, tol: float | None = None,
                 max_iter: int = 50, on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        self.m = check_int("m", m, 1)
        self.beta = check_float("beta", beta, 0.0, 1.0)
        self.lam = check_float("lam", lam, 0.0, float("inf"), low_open=False, high_open=True)

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        state = IterationState(g, z0, tol)
        dz_hist: list[Tensor] = []
        df_hist: list[Tensor] = []
        for _ in range(self.max_iter):
            if not bool(state.active.any()):
                break
            z_old, f_old = state.z, state.gz - state.z
            step = self.beta * f_old
            if dz_hist:
                d_z = torch.stack(dz_hist, dim=2)  # (batch, n, k)
                d_f = torch.stack(df_hist, dim=2)
                gamma = self._coefficients(d_f, f_old)
                step = step - ((d_z + self.beta * d_f) @ gamma.unsqueeze(2)).squeeze(2)
            z_new, gz_new = state.evaluate(z_old + step)
            state.accept(z_new, gz_new, state.active)
            dz_hist = (dz_hist + [state.z - z_old])[-self.m:]
            df_hist = (df_hist + [(state.gz - state.z) - f_old])[-self.m:]
        return state.result()

    def _coefficients(self, d_f: Tensor, f: Tensor) -> Tensor:
        """Per-sample regularised least squares ``(dF^T dF + lam s I) gamma = dF^T f``.

        Formed and solved in float64 with autocast off, returned in ``d_f``'s dtype. float64 is for
        reproducibility across machines, not accuracy: the Gram products reduce over every entry of the
        state, and MKL picks a CPU-specific kernel for that batched product, so in float32 its last bits
        (and through them every later iterate) differed between an AMD and an Intel CPU. In float64 those
        differences sit far below float32's rounding and vanish when ``gamma`` is cast back (RELIABILITY.md).
        """
        with torch.autocast(d_f.device.type, enabled=False):
            gamma = self._solve_normal_equations(d_f.to(torch.float64), f.to(torch.float64))
        return gamma.to(d_f.dtype)

    def _solve_normal_equations(self, d_f: Tensor, f: Tensor) -> Tensor:
        gram = d_f.transpose(1, 2) @ d_f  # (batch, k, k)
        rhs = (d_f.transpose(1, 2) @ f.unsqueeze(2)).squeeze(2)
        k = gram.shape[-1]
        finfo = torch.finfo(gram.dtype)
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
        scale = torch.where(scale > finfo.tiny, scale, torch.ones_like(scale))  # an all-zero history
        reg = torch.maximum(self.lam * scale, finfo.eps * scale)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        gamma, status = torch.linalg.solve_ex(gram + reg[:, None, None] * eye, rhs)
        usable = (status == 0) & torch.isfinite(gamma).all(dim=1)
        return torch.where(usable[:, None], gamma, torch.zeros_like(gamma))  # else a plain mixing step
