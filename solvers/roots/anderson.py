"""Anderson acceleration (type II) of the fixed-point iteration ``z <- g(z)``."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo
from ..registry import register_root_finder
from ._common import IterationState, check_float, check_int, wants_graph, write_slot


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

    # The dtype of the normal equations: float64 for reproducibility (``_solve_normal_equations``); a class
    # attribute so that bench/reproducibility.py can measure the float32 variant this replaced.
    gram_dtype: ClassVar[torch.dtype] = torch.float64

    def __init__(self, *, m: int = 5, beta: float = 1.0, lam: float = 1e-4, tol: float | None = None,
                 max_iter: int = 50, on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        self.m = check_int("m", m, 1)
        self.beta = check_float("beta", beta, 0.0, 1.0)
        self.lam = check_float("lam", lam, 0.0, float("inf"), low_open=False, high_open=True)

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        state = IterationState(g, z0, tol)
        batch, n = state.z.shape
        slots = min(self.m, self.max_iter)
        # Ring buffers of the history, written once per iteration and never re-stacked: ``mix`` holds
        # dZ + beta dF (what the step combines), ``d_f`` holds dF in ``gram_dtype`` for the normal
        # equations. One product per iteration, d_f @ [new dF, new F], gives both the new row of the Gram
        # matrix dF dF^T (kept, not re-formed) and the next right-hand side dF F.
        mix = state.z.new_empty(batch, slots, n)
        d_f = state.z.new_empty(batch, slots, n, dtype=self.gram_dtype)
        gram = state.z.new_zeros(batch, slots, slots, dtype=self.gram_dtype)
        rhs = gram[:, 0, :0]
        pair = state.z.new_empty(batch, 2, n, dtype=self.gram_dtype)  # used transposed: 3x faster on MKL
        filled = 0
        for iteration in range(self.max_iter):
            if not bool(state.active.any()):
                break
            z_old, gz_old, f_old = state.z, state.gz, state.f
            candidate = torch.add(z_old, f_old, alpha=self.beta)
            if filled:
                with torch.autocast(state.z.device.type, enabled=False):
                    gamma = self._solve_normal_equations(gram[:, :filled, :filled], rhs).to(f_old.dtype)
                candidate = torch.baddbmm(candidate.unsqueeze(1), gamma.unsqueeze(1), mix[:, :filled],
                                          alpha=-1).squeeze(1)
            z_new, gz_new = state.evaluate(candidate, state.active)
            state.accept(z_new, gz_new, state.active)
            slot = iteration % slots
            filled = min(filled + 1, slots)
            delta_f = state.f - f_old
            in_place = not wants_graph(state.z, state.gz)  # unroll: autograd needs every version
            step = (state.gz - gz_old if self.beta == 1
                    else torch.add(state.z - z_old, delta_f, alpha=self.beta))
            mix = write_slot(mix, (slot,), step, in_place)
            d_f = write_slot(d_f, (slot,), delta_f, in_place)
            pair = write_slot(pair, (0,), d_f[:, slot], in_place)
            pair = write_slot(pair, (1,), state.f, in_place)
            with torch.autocast(state.z.device.type, enabled=False):
                products = d_f[:, :filled] @ pair.transpose(1, 2)  # (batch, filled, 2): dF dF_new, dF F_new
            row, rhs = products[:, :, 0], products[:, :, 1]
            gram = write_slot(gram, (slot, slice(None, filled)), row, in_place)
            gram = write_slot(gram, (slice(None, filled), slot), row, in_place)
        return state.result()

    def _solve_normal_equations(self, gram: Tensor, rhs: Tensor) -> Tensor:
        """Per-sample regularised least squares ``(dF dF^T + lam s I) gamma = dF f`` (``dF`` rows: history).

        ``gram`` (``dF dF^T``) and ``rhs`` (``dF f``) come in ``gram_dtype``, float64, and are solved in it
        with autocast off; ``_solve`` casts ``gamma`` back. float64 is for reproducibility across machines,
        not accuracy: the Gram products reduce over every entry of the state, and MKL picks a CPU-specific
        kernel for that batched product, so in float32 its last bits (and through them every later iterate)
        differed between an AMD and an Intel CPU. In float64 those differences sit far below float32's
        rounding and vanish when ``gamma`` is cast back (RELIABILITY.md). ``lam`` times the mean diagonal
        is added to the diagonal so that a degenerate history cannot make the system singular.
        """
        k = gram.shape[-1]
        finfo = torch.finfo(gram.dtype)
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
        scale = torch.where(scale > finfo.tiny, scale, torch.ones_like(scale))  # an all-zero history
        reg = torch.maximum(self.lam * scale, finfo.eps * scale)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        gamma, status = torch.linalg.solve_ex(gram + reg[:, None, None] * eye, rhs)
        usable = (status == 0) & torch.isfinite(gamma).all(dim=1)
        return torch.where(usable[:, None], gamma, torch.zeros_like(gamma))  # else a plain mixing step
