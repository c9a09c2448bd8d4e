"""Gradient descent on the squared fixed-point residual, as in IM-BERT (Kim, Park, Kim, EMNLP 2023)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._base import FixedPointMap, RootFinder, RootInfo
from ..registry import register_root_finder
from ._common import IterationState, check_float, per_sample


@register_root_finder("gd")
class GradientDescent(RootFinder):
    """Minimise ``L(z) = 0.5 ||g(z) - z||^2`` per sample by (heavy-ball) gradient descent.

    ``dL/dz = (J_g - I)^T (g(z) - z)`` is one vector-Jacobian product through ``g`` (autograd); the
    update is ``v <- momentum v + dL/dz``, ``z <- z - lr v``. Start ``z0`` at the explicit Euler step,
    as the paper does.

    A fixed ``lr`` is stable only below ``2 / curvature``, with curvature up to ``||J_g - I||^2``:
    ``lr = 0.5`` is safe for every contraction (``||J_g|| < 1`` bounds it below 4) but diverges on
    maps that are not contractions, such as pretrained transformer layers (RESULTS.md). So by default
    (``backtrack=True``) a step that does not decrease a sample's residual is discarded and that
    sample's step size halved (and its momentum dropped); the step size never grows back. This costs
    nothing extra: the rejected evaluation counts as an iteration. ``backtrack=False`` is the paper's
    plain fixed-step descent.

    When autograd is on and ``z0`` or ``g`` carries a graph, the iterations are built with
    ``create_graph=True`` so they can be backpropagated ("unroll"); otherwise they run on detached
    tensors under ``torch.enable_grad()`` (so also under ``torch.no_grad()``). Backpropagating
    through ``create_graph`` iterations needs double backward of every op in ``g``: PyTorch's fused
    CPU/GPU attention kernels lack it, so use eager (math) attention for unrolled training.

    Choose it to reproduce IM-BERT. It converges only linearly (slowly when ``J_g - I`` is
    ill-conditioned) and costs an evaluation plus a VJP per iteration; ``anderson`` or
    ``newton_krylov`` reach the same root faster.
    """

    def __init__(self, *, lr: float = 0.5, momentum: float = 0.0, backtrack: bool = True,
                 tol: float | None = None, max_iter: int = 50, on_failure: str = "warn") -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure)
        self.lr = check_float("lr", lr, 0.0, float("inf"), high_open=True)
        self.momentum = check_float("momentum", momentum, 0.0, 1.0, low_open=False, high_open=True)
        if not isinstance(backtrack, bool):
            raise ValueError(f"backtrack must be True or False, got {backtrack!r}")
        self.backtrack = backtrack

    def _solve(self, g: FixedPointMap, z0: Tensor, tol: float) -> tuple[Tensor, RootInfo]:
        grad_on = torch.is_grad_enabled()
        with torch.enable_grad():
            z_in = z0 if (grad_on and z0.requires_grad) else z0.detach().requires_grad_(True)
            state = IterationState(g, z_in, tol)
            graph = grad_on and (z0.requires_grad or _depends_on_more_than(state.gz, z_in))
            gradient = torch.zeros_like(state.z)  # dL/dz at the accepted iterate
            if state.active.any():
                gradient = _loss_gradient(state.z, state.gz, graph)
                state.nvjp += 1
            if not graph:
                state.detach()
            lr = torch.full_like(state.abs_res, self.lr)
            velocity = torch.zeros_like(state.z)
            for iteration in range(self.max_iter):
                if not bool(state.active.any()):
                    break
                velocity = self.momentum * velocity + gradient
                candidate = state.z - per_sample(lr, velocity) * velocity
                if not (graph and candidate.requires_grad):
                    candidate = candidate.detach().requires_grad_(True)
                z_new, gz_new = state.evaluate(candidate, state.active)
                moving = state.active
                residuals = state.residuals(z_new, gz_new)
                if self.backtrack:
                    decreased = torch.isfinite(residuals[0]) & (residuals[0] < state.abs_res)
                    rejected = moving & ~decreased
                    moving = moving & decreased
                    state.iterations = state.iterations + rejected.long()
                    lr = torch.where(rejected, lr / 2, lr)
                    velocity = torch.where(per_sample(rejected, velocity), 0.0, velocity)
                moved = state.accept(z_new, gz_new, moving, residuals)
                if bool((moved & state.active).any()) and iteration + 1 < self.max_iter:
                    gradient_new = _loss_gradient(z_new, gz_new, graph)
                    state.nvjp += 1
                    gradient = torch.where(per_sample(moved, gradient), gradient_new, gradient)
                if not graph:
                    state.detach()
        return state.result()


def _loss_gradient(z: Tensor, gz: Tensor, graph: bool) -> Tensor:
    """``dL/dz = (J_g - I)^T r`` with ``r = g(z) - z``: one VJP through the evaluation ``gz = g(z)``."""
    residual = gz - z if graph else (gz - z).detach()
    return _vjp(gz, z, residual, graph) - residual


def _vjp(output: Tensor, inputs: Tensor, cotangent: Tensor, create_graph: bool) -> Tensor:
    """``cotangent^T d output / d inputs``; zero when ``output`` does not depend on ``inputs``."""
    if not output.requires_grad:
        return torch.zeros_like(inputs)
    (grad,) = torch.autograd.grad(output, inputs, cotangent, create_graph=create_graph,
                                  retain_graph=create_graph, allow_unused=True, materialize_grads=True)
    return grad


def _depends_on_more_than(output: Tensor, leaf: Tensor) -> bool:
    """Whether ``output``'s autograd graph reaches a leaf requiring grad other than ``leaf``.

    (Tells whether ``g`` closes over trainable tensors, i.e. whether the caller may backpropagate.)
    """
    if output.grad_fn is None:
        return output.requires_grad and output is not leaf
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)
        if variable is not None and variable is not leaf:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False
