"""Bookkeeping shared by the root finders: flat per-sample state, residuals, masking, Jacobian products.

Every finder works on a flat view ``(batch, n)`` of the state in an accumulation dtype that is at
least float32 (so dot products, norms and small least-squares problems do not run in half precision)
while ``g`` always sees tensors of the caller's shape and dtype. ``IterationState`` holds the current
iterate, ``g`` of it and per-sample residuals, and applies a proposed update only to the samples
asked for, keeping the last finite iterate of a sample whose update gives a non-finite residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._base import FixedPointMap, RootInfo, restrict_rows

FlatMap = Callable[[Tensor], Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision states, the state's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def per_sample(mask: Tensor, like: Tensor) -> Tensor:
    """Broadcast a per-sample tensor of shape ``(batch,)`` against a flat ``(batch, ...)`` tensor."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def bdot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two flat ``(batch, n)`` tensors."""
    return (a * b).sum(dim=1)


def bnorm(a: Tensor) -> Tensor:
    """Per-sample Euclidean norm of a flat ``(batch, n)`` tensor, scaled where large entries would overflow.

    (A plain float32 norm of entries near 1e19 is ``inf``, which would make a relative residual 0.) The plain
    norm is taken when every sample's is finite and large enough that squares lost to underflow (each below
    the dtype's ``tiny``) cannot change it by an ``eps``; otherwise every sample is rescaled by its largest
    entry first (three more passes over ``a``, the price of the guard on the common path before).
    """
    plain = torch.linalg.vector_norm(a, dim=1)
    finfo = torch.finfo(a.dtype)
    floor = math.sqrt(a.shape[1] * finfo.tiny / finfo.eps)
    if bool(((plain >= floor) & torch.isfinite(plain)).all()):
        return plain
    scale = a.detach().abs().amax(dim=1).clamp_min(finfo.tiny)
    return scale * torch.linalg.vector_norm(a / scale[:, None], dim=1)


def wants_graph(*tensors: Tensor) -> bool:
    """True when autograd is on and any tensor is part of a graph (so iterations must stay differentiable)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def write_slot(buffer: Tensor, index: tuple[int | slice, ...], value: Tensor, in_place: bool) -> Tensor:
    """``buffer`` with ``buffer[:, *index] = value``: in place, or (when autograd records the iterations,
    which in-place writes into a saved tensor would break) as a new tensor."""
    out = buffer if in_place else buffer.clone()
    out[(slice(None), *index)] = value
    return out


class IterationState:
    """Per-sample state of a fixed-point solve of ``z = g(z)`` on a flat ``(batch, n)`` view.

    Attributes: ``z``, ``gz`` and the residual ``f = gz - z`` (flat, accumulation dtype), ``abs_res``/
    ``rel_res`` (per sample), ``active`` (samples still iterating), ``diverged`` (samples stopped by a
    non-finite residual), ``iterations``, ``nfev`` and ``nvjp`` counters, and ``rows`` (batch rows evaluated).

    Row compaction: when ``g`` can be restricted to batch rows (``solvers.RowMap``), ``evaluate`` with a
    ``rows`` mask evaluates only those samples, so samples that have converged cost nothing more.
    """

    def __init__(self, g: FixedPointMap, z0: Tensor, tol: float) -> None:
        self.g = g
        self.shape = z0.shape
        self.dtype = z0.dtype
        self.work_dtype = accumulation_dtype(z0.dtype)
        self.tol = tol
        self.nfev = 0
        self.nvjp = 0
        self.rows = 0
        batch = z0.shape[0] if z0.ndim >= 2 else 1
        self.z, self.gz = self.evaluate(z0.reshape(batch, -1).to(self.work_dtype))
        self.f = self.gz - self.z
        self.abs_res, self.rel_res = self.residuals_of(self.f, self.gz)
        device = z0.device
        self.iterations = torch.zeros(batch, dtype=torch.long, device=device)
        self.diverged = ~torch.isfinite(self.rel_res)
        self.active = ~self.diverged & (self.rel_res > tol)

    def unflatten(self, flat: Tensor) -> Tensor:
        """A flat accumulation-dtype tensor in the caller's shape and dtype."""
        return flat.to(self.dtype).reshape(self.shape)

    def flatten(self, x: Tensor) -> Tensor:
        """A caller-shaped tensor as flat ``(batch, n)`` in the accumulation dtype."""
        if x.shape != self.shape:
            raise ValueError(
                f"the fixed-point map returned shape {tuple(x.shape)}, expected {tuple(self.shape)}"
            )
        return x.reshape(self.z_rows, -1).to(self.work_dtype)

    @property
    def z_rows(self) -> int:
        return self.shape[0] if len(self.shape) >= 2 else 1

    def round(self, z: Tensor) -> Tensor:
        """``z`` rounded to the state dtype, so residuals refer to the point ``g`` actually saw."""
        return z if self.dtype == self.work_dtype else z.to(self.dtype).to(self.work_dtype)

    def evaluate(self, z: Tensor, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z rounded to the state dtype, g(z))`` for a flat candidate; one evaluation of ``g``.

        ``rows`` (bool per sample): the samples whose value is needed. If some are not and ``g`` can be
        restricted to batch rows, only the needed rows are evaluated and the others get their current
        ``gz`` (a value only ``accept`` with a mask inside ``rows`` may consume: it does not move them).
        """
        z = self.round(z)
        self.nfev += 1
        if rows is not None and not bool(rows.all()):
            index = rows.nonzero().squeeze(1)
            restricted = restrict_rows(self.g, index) if index.numel() else None
            if restricted is not None:
                shape = (index.numel(), *self.shape[1:])
                out = restricted(z.index_select(0, index).to(self.dtype).reshape(shape))
                if out.shape != shape:
                    raise ValueError(
                        f"the fixed-point map restricted to {index.numel()} batch rows returned shape "
                        f"{tuple(out.shape)}, expected {shape}"
                    )
                self.rows += index.numel()
                return z, self.gz.index_copy(0, index, out.reshape(index.numel(), -1).to(self.work_dtype))
        self.rows += self.z_rows
        return z, self.flatten(self.g(self.unflatten(z)))

    def detach(self) -> None:
        """Drop the autograd history of the stored iterate and residuals."""
        self.z, self.gz, self.f = self.z.detach(), self.gz.detach(), self.f.detach()
        self.abs_res, self.rel_res = self.abs_res.detach(), self.rel_res.detach()

    def flat_map(self) -> FlatMap:
        """``g`` as a function of flat accumulation-dtype tensors (for Jacobian products)."""
        return lambda z: self.flatten(self.g(self.unflatten(z)))

    @staticmethod
    def residuals(z: Tensor, gz: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``||g(z) - z||`` and ``||g(z) - z|| / ||g(z)||``."""
        return IterationState.residuals_of(gz - z, gz)

    @staticmethod
    def residuals_of(f: Tensor, gz: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``||f||`` and ``||f|| / ||g(z)||`` for the residual ``f = g(z) - z``."""
        abs_res = bnorm(f)
        rel_res = abs_res / bnorm(gz).clamp_min(torch.finfo(abs_res.dtype).tiny)
        return abs_res, rel_res

    def accept(self, z_new: Tensor, gz_new: Tensor, mask: Tensor,
               residuals: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Move the samples in ``mask`` to ``(z_new, gz_new)``; returns the mask of samples moved.

        ``residuals`` are ``self.residuals(z_new, gz_new)`` if the caller has them already. A sample whose
        new residual is not finite keeps its previous iterate and is marked diverged.
        """
        f_new = gz_new - z_new
        abs_new, rel_new = residuals if residuals is not None else self.residuals_of(f_new, gz_new)
        finite = torch.isfinite(rel_new)
        moved = mask & finite
        self.diverged = self.diverged | (mask & ~finite)
        self.iterations = self.iterations + mask.long()
        if bool(moved.all()):  # every sample moves: no per-sample selection (three passes fewer)
            self.z, self.gz, self.f = z_new, gz_new, f_new
            self.abs_res, self.rel_res = abs_new, rel_new
        else:
            sel = per_sample(moved, z_new)
            self.z = torch.where(sel, z_new, self.z)
            self.gz = torch.where(sel, gz_new, self.gz)
            self.f = torch.where(sel, f_new, self.f)
            self.abs_res = torch.where(moved, abs_new, self.abs_res)
            self.rel_res = torch.where(moved, rel_new, self.rel_res)
        self.active = self.active & ~self.diverged & (self.rel_res > self.tol)
        return moved

    def result(self) -> tuple[Tensor, RootInfo]:
        """The solution in the caller's shape and dtype, with per-sample statistics."""
        converged = (self.rel_res <= self.tol) & ~self.diverged
        info = RootInfo(
            iterations=self.iterations,
            nfev=self.nfev,
            abs_residual=self.abs_res.detach(),
            rel_residual=self.rel_res.detach(),
            converged=converged,
            nvjp=self.nvjp,
            diverged=self.diverged,
            rows=self.rows,
        )
        return self.unflatten(self.z), info


def backtrack(
    state: IterationState,
    direction: Tensor,
    mask: Tensor,
    max_backtracks: int,
    sufficient_decrease: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backtracking line search on ``||g(z) - z||`` along ``direction`` for the samples in ``mask``.

    Tries step lengths ``1, 1/2, 1/4, ...`` (``max_backtracks`` halvings) and takes, per sample, the
    first one with ``||F(z + a d)|| <= (1 - c a) ||F(z)||``; a sample with no such step gets the last
    trial. Each trial is one batched evaluation of ``g``. Returns ``(z_new, gz_new, decreased)``.
    """
    z_best, gz_best = state.z, state.gz
    pending = mask
    step = torch.ones_like(state.abs_res)
    decreased = torch.zeros_like(mask)
    for trial in range(max_backtracks + 1):
        z_try, gz_try = state.evaluate(state.z + per_sample(step, direction) * direction, pending)
        abs_try, _ = state.residuals(z_try, gz_try)
        ok = pending & torch.isfinite(abs_try) & (abs_try <= (1 - sufficient_decrease * step) * state.abs_res)
        take = ok | (pending & (trial == max_backtracks))
        z_best = torch.where(per_sample(take, z_try), z_try, z_best)
        gz_best = torch.where(per_sample(take, gz_try), gz_try, gz_best)
        decreased = decreased | ok
        pending = pending & ~take
        if not bool(pending.any()):
            break
        step = torch.where(pending, step / 2, step)
    return z_best, gz_best, decreased


def jacobian_vector_product(fn: FlatMap, z: Tensor, v: Tensor, method: str, create_graph: bool) -> Tensor:
    """``J_fn(z) v`` without forming ``J``: forward mode (``torch.func.jvp``) or the double-VJP trick.

    The double-VJP trick differentiates ``u -> J^T u`` (linear in ``u``) along ``v``; it needs only
    reverse mode, so it also works for maps that forward-mode AD does not support.
    """
    if method == "forward":
        return torch.func.jvp(fn, (z,), (v,))[1]
    with torch.enable_grad():
        z_in = z if (create_graph and z.requires_grad) else z.detach().requires_grad_(True)
        out = fn(z_in)
        u = torch.zeros_like(out, requires_grad=True)
        (jtu,) = torch.autograd.grad(out, z_in, u, create_graph=True)
        (jv,) = torch.autograd.grad(jtu, u, v, create_graph=create_graph)
    return jv


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; ``ValueError`` naming the option otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(name: str, value: object, low: float, high: float, *, low_open: bool = True,
                high_open: bool = False) -> float:
    """``value`` as a float in ``low..high`` (ends open or closed as given); ``ValueError`` otherwise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        x = float(value)
        ok = (x > low if low_open else x >= low) and (x < high if high_open else x <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; ``ValueError`` listing them otherwise."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)
