"""Inexact Newton method with batched restarted GMRES on Jacobian-vector products (Newton-Krylov)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as nnf
from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo
from ..registry import register_root_finder
from ._common import (
    FlatMap,
    IterationState,
    backtrack,
    bdot,
    bnorm,
    check_choice,
    check_float,
    check_int,
    jacobian_vector_product,
    wants_graph,
)

JVP_METHODS = ("auto", "forward", "double_vjp", "finite_difference")


@register_root_finder("newton_krylov")
class NewtonKrylov(RootFinder):
    """Newton's method on ``F(z) = g(z) - z``; each Newton system is solved by GMRES, matrix-free.

    The linear system ``(J_g - I) d = -F`` is solved per sample by restarted GMRES (``krylov_dim``
    vectors per cycle, ``restarts`` extra cycles) to the inexact-Newton accuracy
    ``||(J_g - I) d + F|| <= eta ||F||``. Products ``J_g v`` come from forward-mode AD
    (``torch.func.jvp``), from two reverse-mode products (``"double_vjp"``) or from a one-sided
    finite difference of ``g`` (``"finite_difference"``, the classic Jacobian-free Newton-Krylov
    product: always available, but only about ``sqrt(eps)`` accurate and unreliable for badly scaled
    stiff systems such as Robertson); ``"auto"`` tries them in that order,
    falling back when an op inside ``g`` lacks forward-mode AD or double backward (e.g. fused
    attention kernels). A backtracking line search on ``||F||`` (``max_backtracks``
    halvings; 0 takes full steps) makes it robust far from the root.

    Choose it for stiff systems (large implicit steps, strongly non-contractive maps) where Picard,
    Anderson and Broyden stall: it converges quadratically near the root, at the price of up to
    ``krylov_dim`` Jacobian-vector products per iteration (each costs about 1-3 evaluations; counted
    in ``nvjp``, not ``nfev``). Its unrolled gradient approximates the implicit-function gradient.
    """

    def __init__(self, *, krylov_dim: int = 20, restarts: int = 2, eta: float = 1e-3,
                 max_backtracks: int = 10, jvp: str = "auto", tol: float | None = None, max_iter: int = 50,
                 on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        self.krylov_dim = check_int("krylov_dim", krylov_dim, 1)
        self.restarts = check_int("restarts", restarts, 0)
        self.eta = check_float("eta", eta, 0.0, 1.0, high_open=True)
        self.max_backtracks = check_int("max_backtracks", max_backtracks, 0)
        self.jvp = check_choice("jvp", jvp, JVP_METHODS)

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        state = IterationState(g, z0, tol)
        graph = wants_graph(z0, state.gz)
        fn = state.flat_map()
        # Under "auto", a method that fails (forward AD or double backward not implemented for some op
        # inside g) is dropped for the rest of this solve.
        methods = list(JVP_METHODS[1:]) if self.jvp == "auto" else [self.jvp]
        fd_scale = torch.finfo(z0.dtype).eps ** 0.5

        for _ in range(self.max_iter):
            if not bool(state.active.any()):
                break
            z_lin = state.z if graph else state.z.detach()
            gz_lin = state.gz if graph else state.gz.detach()

            def matvec(v: Tensor, z_lin: Tensor = z_lin, gz_lin: Tensor = gz_lin) -> Tensor:
                state.nvjp += 1
                while True:
                    try:
                        if methods[0] == "finite_difference":
                            return _finite_difference_jvp(fn, z_lin, gz_lin, v, fd_scale) - v
                        return jacobian_vector_product(fn, z_lin, v, methods[0], graph) - v
                    except (RuntimeError, NotImplementedError):
                        if len(methods) == 1:
                            raise
                        methods.pop(0)

            residual = state.gz - state.z
            with torch.set_grad_enabled(graph):
                direction = gmres(matvec, -residual if graph else -residual.detach(), state.active,
                                  self.eta * state.abs_res.detach(), self.krylov_dim, self.restarts)
            if self.max_backtracks > 0:
                z_new, gz_new, _ = backtrack(state, direction, state.active, self.max_backtracks)
            else:
                z_new, gz_new = state.evaluate(state.z + direction, state.active)
            state.accept(z_new, gz_new, state.active)
        return state.result()


def _finite_difference_jvp(fn: FlatMap, z: Tensor, gz: Tensor, v: Tensor, rel_step: float) -> Tensor:
    """``(g(z + e v) - g(z)) / e`` per sample with ``e = rel_step (1 + ||z||) / ||v||``; one evaluation."""
    tiny = torch.finfo(v.dtype).tiny
    step = (rel_step * (1 + bnorm(z.detach())) / bnorm(v.detach()).clamp_min(tiny))[:, None]
    return (fn(z + step * v) - gz) / step


def gmres(matvec: Callable[[Tensor], Tensor], b: Tensor, todo: Tensor, atol: Tensor, krylov_dim: int,
          restarts: int) -> Tensor:
    """Solve ``A x = b`` per sample (flat ``(batch, n)``) by restarted GMRES from ``x = 0``.

    Samples outside ``todo`` get ``x = 0``; a sample stops once its least-squares residual is below its
    own ``atol`` (its solution is then frozen, so batching does not change it). The small Hessenberg
    least-squares problems are solved by a batched QR. Modified Gram-Schmidt with per-sample inner
    products builds the Arnoldi basis.
    """
    x = torch.zeros_like(b)
    eps = torch.finfo(b.dtype).eps
    for cycle in range(restarts + 1):
        r = b if cycle == 0 else b - matvec(x)
        beta = bnorm(r)
        todo = todo & (beta > atol)
        if not bool(todo.any()):
            break
        basis = [r / beta.clamp_min(torch.finfo(b.dtype).tiny)[:, None]]
        columns: list[Tensor] = []
        coeffs = torch.zeros(b.shape[0], krylov_dim, dtype=b.dtype, device=b.device)
        running = todo
        lsq_res = beta
        for j in range(krylov_dim):
            w = matvec(basis[j])
            h: list[Tensor] = []
            for v in basis:
                h_ij = bdot(v, w)
                w = w - h_ij[:, None] * v
                h.append(h_ij)
            h_next = bnorm(w)
            column_norm = torch.sqrt(sum(x * x for x in h) + h_next * h_next)
            breakdown = h_next <= 100 * eps * column_norm
            basis.append(torch.where(breakdown[:, None], torch.zeros_like(w),
                                     w / torch.where(breakdown, torch.ones_like(h_next), h_next)[:, None]))
            columns.append(torch.stack(h + [h_next], dim=1))
            # Hessenberg matrix (batch, j+2, j+1); least squares min ||beta e1 - hess y|| by QR.
            hess = torch.stack([nnf.pad(c, (0, j + 2 - c.shape[1])) for c in columns], dim=2)
            q, rr = torch.linalg.qr(hess)
            rhs = beta[:, None, None] * q[:, :1, :].transpose(1, 2)
            y = torch.linalg.solve_triangular(rr, rhs, upper=True).squeeze(2)
            e1 = nnf.pad(beta[:, None], (0, j + 1))
            res_j = bnorm(e1 - (hess @ y.unsqueeze(2)).squeeze(2))
            good = running & torch.isfinite(y).all(dim=1) & torch.isfinite(res_j)
            coeffs = torch.where(good[:, None], nnf.pad(y, (0, krylov_dim - j - 1)), coeffs)
            lsq_res = torch.where(good, res_j, lsq_res)
            running = good & (res_j > atol) & ~breakdown
            if not bool(running.any()):
                break
        for i in range(len(basis) - 1):
            x = x + coeffs[:, i, None] * basis[i]
        todo = todo & (lsq_res > atol)
        if not bool(todo.any()):
            break
    return x
