"""How gradients flow through a fixed-point solve ``z* = g(z*)``, chosen by name.

* ``unroll``: backpropagate through every iteration of the root finder (memory grows with iterations).
* ``implicit``: implicit-function theorem. The forward solve runs without autograd; one application
  ``z = g(z*)`` re-attaches the graph, and a backward hook on ``z`` replaces the incoming gradient ``v``
  by the solution of the adjoint fixed point ``u = J_g(z*)^T u + v``, solved matrix-free (VJPs on that
  same application's graph) with the same root finder or a separate adjoint finder (its own tolerance and
  cap, as torchdeq's ``b_tol``). Memory is that of one application of ``g``.
* ``one_step``: Jacobian-free backprop (Fung et al., 2022): return ``g(z*)`` with ``z*`` detached, i.e.
  approximate ``(I - J)^{-1}`` by ``I``. Cheap, common in deep-equilibrium practice.

The adjoint solves of ``implicit`` run in the backward pass, where a caller cannot see them;
``watch_adjoint_solves`` reports each one (its evaluations, its solution, and the same equation to solve
again from another start) to a callback while it is open.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ._base import FixedPointMap, RootFinder, RootInfo, batch_size, check_on_failure, report_failure
from .registry import get_root_finder

# (g, z0, finder, adjoint finder, what to do if the adjoint solve fails) -> (z, info)
GradMode = Callable[[FixedPointMap, Tensor, RootFinder, RootFinder, str], tuple[Tensor, RootInfo]]
GRAD_MODES: dict[str, GradMode] = {}


@dataclasses.dataclass(frozen=True)
class AdjointSolve:
    """One adjoint solve ``u = J_g(z*)^T u + v`` of the ``implicit`` gradient (``watch_adjoint_solves``).

    ``v``: the incoming gradient (the equation's right-hand side, and the start the solve used); ``u``: the
    solution it returned; ``info``: its root-finder record (``nfev`` counts vector-Jacobian products).
    ``solve_from(start)`` solves the same equation again from ``start`` with the same finder, without a graph
    and without reporting non-convergence; valid during the callback only (it holds the backward's graph).
    """

    v: Tensor
    u: Tensor
    info: RootInfo
    solve_from: Callable[[Tensor], tuple[Tensor, RootInfo]]


_ADJOINT_WATCHERS: list[Callable[[AdjointSolve], None]] = []


@contextlib.contextmanager
def watch_adjoint_solves(callback: Callable[[AdjointSolve], None]) -> Iterator[None]:
    """Call ``callback(AdjointSolve)`` after every adjoint solve of the ``implicit`` gradient while open.

    For measurements: the evaluations a backward pass spends, or what another start would cost
    (``bench/adjoint_warm_start.py``). The gradient is unchanged: ``u`` is returned as solved. Solves run in
    the order the backward pass reaches them (the last implicit layer first). A ``callback`` that is not
    callable is a ``TypeError`` here, not in the backward pass.
    """
    if not callable(callback):
        kind = type(callback).__name__
        raise TypeError(f"callback must be callable (it receives an AdjointSolve), got {kind}")
    _ADJOINT_WATCHERS.append(callback)
    try:
        yield
    finally:
        _ADJOINT_WATCHERS.remove(callback)


def _grad_mode(name: str) -> Callable[[GradMode], GradMode]:
    def add(fn: GradMode) -> GradMode:
        GRAD_MODES[name] = fn
        return fn

    return add


def available_grad_modes() -> list[str]:
    """Names of the gradient modes accepted by ``solve_fixed_point`` and the implicit step methods."""
    return sorted(GRAD_MODES)


def check_grad_mode(grad: str) -> str:
    """Return ``grad`` if it names a gradient mode, else raise ``ValueError`` listing the valid modes."""
    if not isinstance(grad, str) or grad not in GRAD_MODES:
        raise ValueError(f"Unknown gradient mode {grad!r}. Valid modes: {', '.join(available_grad_modes())}")
    return grad


def solve_fixed_point(
    g: FixedPointMap,
    z0: Tensor,
    finder: RootFinder | str,
    grad: str = "implicit",
    *,
    adjoint_finder: RootFinder | str | None = None,
    adjoint_on_failure: str | None = None,
) -> tuple[Tensor, RootInfo]:
    """Solve ``z = g(z)`` from ``z0`` with ``finder`` (instance or registered name); gradients per ``grad``.

    ``RootInfo.nfev`` includes the extra application of ``g`` that ``implicit``/``one_step`` use to attach
    the graph (made only when autograd is enabled). ``adjoint_finder`` solves the adjoint equation of the
    ``implicit`` mode (``None``: ``finder``), e.g. the same method with a looser tolerance: the adjoint solve
    is about 40% of an implicit layer's training step. ``adjoint_on_failure`` (``"warn"``, ``"raise"``,
    ``"ignore"``; ``None``: the adjoint finder's ``on_failure``) handles a non-converged adjoint solve, which
    happens during backward, where a caller cannot inspect it.
    """
    mode = GRAD_MODES[check_grad_mode(grad)]
    finder = _as_finder(finder, "finder")
    adjoint_finder = finder if adjoint_finder is None else _as_finder(adjoint_finder, "adjoint_finder")
    if adjoint_on_failure is None:
        adjoint_on_failure = adjoint_finder.on_failure
    check_on_failure(adjoint_on_failure, "adjoint_on_failure")
    return mode(g, z0, finder, adjoint_finder, adjoint_on_failure)


def _as_finder(finder: RootFinder | str, what: str) -> RootFinder:
    """``finder`` as an instance (a registered name is made with its defaults); ``TypeError`` otherwise."""
    if isinstance(finder, str):
        finder = get_root_finder(finder)
    if not isinstance(finder, RootFinder):
        raise TypeError(f"{what} must be a RootFinder or a root-finder name, got {type(finder).__name__}")
    return finder


@_grad_mode("unroll")
def _unroll(
    g: FixedPointMap, z0: Tensor, finder: RootFinder, adjoint_finder: RootFinder, adjoint_on_failure: str
) -> tuple[Tensor, RootInfo]:
    return finder.solve(g, z0)


def _solve_without_graph(g: FixedPointMap, z0: Tensor, finder: RootFinder) -> tuple[Tensor, RootInfo]:
    """The forward solve of ``one_step`` and ``implicit``: no autograd graph, a detached root."""
    with torch.no_grad():
        z_star, info = finder.solve(g, z0)
    return z_star.detach(), info


def _count_evaluation(info: RootInfo, z: Tensor) -> None:
    """Count the whole-batch application of ``g`` that attaches the graph in ``info``."""
    info.nfev += 1
    if info.rows is not None:
        info.rows += batch_size(z)


@_grad_mode("one_step")
def _one_step(
    g: FixedPointMap, z0: Tensor, finder: RootFinder, adjoint_finder: RootFinder, adjoint_on_failure: str
) -> tuple[Tensor, RootInfo]:
    z_star, info = _solve_without_graph(g, z0, finder)
    if not torch.is_grad_enabled():
        return z_star, info
    _count_evaluation(info, z_star)
    return g(z_star), info


@_grad_mode("implicit")
def _implicit(
    g: FixedPointMap, z0: Tensor, finder: RootFinder, adjoint_finder: RootFinder, adjoint_on_failure: str
) -> tuple[Tensor, RootInfo]:
    z_star, info = _solve_without_graph(g, z0, finder)
    if not torch.is_grad_enabled():
        return z_star, info
    z_leaf = z_star.detach().requires_grad_()
    applied = g(z_leaf)
    _count_evaluation(info, z_star)
    if not _needs_graph(applied, z_leaf):  # nothing but the leaf requires grad: no graph, as for a plain call
        return applied.detach(), info
    z = applied.view_as(applied)  # the hook sits on this view and holds `applied`, so no reference cycle
    z.register_hook(_AdjointHook(applied, z_leaf, adjoint_finder, adjoint_on_failure))
    return z, info


def _needs_graph(z: Tensor, leaf: Tensor) -> bool:
    """Whether ``z`` depends on a tensor other than ``leaf`` that requires grad (a parameter, an input)."""
    pending, seen = [z.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # set on the node that accumulates a leaf's gradient
        if variable is not None:
            if variable is not leaf:
                return True
            continue
        pending.extend(fn for fn, _ in node.next_functions)
    return False


class _AdjointHook:
    """Backward hook mapping the incoming gradient ``v`` to ``u`` solving ``u = J_g(z*)^T u + v``.

    The VJPs reuse the graph of the forward's application ``applied = g(z_leaf)``, ``z_leaf`` a copy of
    ``z*`` that requires grad (``retain_graph``, so the backward pass then continues through it to the
    parameters): no second application of ``g`` in backward, which would also rewind a random-number state
    that ``g`` restores before each evaluation (the dropout masks of ``ode_bert``'s layers).
    """

    def __init__(self, applied: Tensor, z_leaf: Tensor, finder: RootFinder, on_failure: str) -> None:
        self.applied = applied
        self.z_leaf = z_leaf
        self.finder = copy.copy(finder)
        self.finder.on_failure = "ignore"  # reported below, naming the adjoint solve
        self.on_failure = on_failure

    def __call__(self, v: Tensor | None) -> Tensor | None:
        if v is None:  # undefined incoming gradient: nothing to solve
            return None

        def adjoint_map(u: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(self.applied, self.z_leaf, u, retain_graph=True, allow_unused=True)
            return v if vjp is None else vjp + v  # None: g does not depend on z, so J = 0

        with torch.no_grad():
            u, info = self.finder.solve(adjoint_map, v.detach())
        info.solver = self.finder.name
        if _ADJOINT_WATCHERS:
            solve = AdjointSolve(v.detach(), u.detach(), info, self._solver_from(adjoint_map))
            for watcher in list(_ADJOINT_WATCHERS):
                watcher(solve)
        if not info.all_converged:
            message = f"adjoint solve of the implicit gradient did not converge: {info.summary()}"
            report_failure(self.on_failure, message, stacklevel=2)
        return u

    def _solver_from(self, adjoint_map: FixedPointMap) -> Callable[[Tensor], tuple[Tensor, RootInfo]]:
        def solve_from(start: Tensor) -> tuple[Tensor, RootInfo]:
            with torch.no_grad():
                return self.finder.solve(adjoint_map, start.detach())

        return solve_from
