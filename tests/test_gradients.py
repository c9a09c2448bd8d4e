"""Gradient modes of fixed-point solves: implicit (adjoint) vs unroll vs one_step, against references."""

from __future__ import annotations

import warnings

import pytest
import torch

import solvers
from solvers import ConvergenceWarning, solve_fixed_point

F64 = torch.float64


def contraction_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights of g(z) = tanh(z W^T + x) + b with ||W|| = 0.5 (a contraction); batch 2, size 3."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(3, 3, generator=gen, dtype=F64)
    w = 0.5 * w / torch.linalg.matrix_norm(w, ord=2)
    x = torch.randn(2, 3, generator=gen, dtype=F64)
    b = 0.1 * torch.randn(3, generator=gen, dtype=F64)
    return w.requires_grad_(), x.requires_grad_(), b.requires_grad_()


def solve(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor, root: str, grad: str) -> torch.Tensor:
    def g(z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ w.T + x) + b

    finder = solvers.get_root_finder(root, tol=1e-13, max_iter=300)
    z, info = solve_fixed_point(g, torch.zeros_like(x), finder, grad)
    assert info.all_converged
    return z


@pytest.mark.parametrize("root", ["picard", "anderson"])
def test_implicit_gradient_passes_gradcheck(root: str) -> None:
    w, x, b = contraction_problem()
    assert torch.autograd.gradcheck(lambda w_, x_, b_: solve(w_, x_, b_, root, "implicit"), (w, x, b),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("root", ["picard", "anderson", "broyden", "newton_krylov"])
def test_implicit_matches_unrolled_gradient(root: str) -> None:
    w, x, b = contraction_problem(1)
    weights = torch.linspace(-1.0, 1.0, 6, dtype=F64).reshape(2, 3)
    grads = {}
    for grad in ("unroll", "implicit"):
        loss = (weights * solve(w, x, b, "picard" if grad == "unroll" else root, grad)).sum()
        grads[grad] = torch.autograd.grad(loss, (w, x, b))
    for unrolled, implicit in zip(grads["unroll"], grads["implicit"]):
        torch.testing.assert_close(implicit, unrolled, atol=1e-6, rtol=1e-6)


def linear_problem(seed: int, norm: float) -> tuple[torch.Tensor, ...]:
    """A (4x4, spectral norm ``norm``), B (4x3), the loss weights c (4) and the input x (3, requires grad)
    of g(z) = A z + B x, whose fixed point, gradients and adjoint are known in closed form."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(4, 4, generator=gen, dtype=F64)
    a = norm * a / torch.linalg.matrix_norm(a, ord=2)
    bmat = torch.randn(4, 3, generator=gen, dtype=F64)
    c = torch.randn(4, generator=gen, dtype=F64)
    x = torch.randn(3, generator=gen, dtype=F64).requires_grad_()
    return a, bmat, c, x


def test_one_step_is_the_jacobian_free_gradient_on_a_linear_map() -> None:
    """g(z) = A z + B x: implicit gives B^T (I - A)^-T c, one_step gives B^T c."""
    a, bmat, c, x = linear_problem(seed=2, norm=0.4)
    finder = solvers.get_root_finder("anderson", tol=1e-13, max_iter=100)
    expected = {
        "one_step": bmat.T @ c,
        "implicit": bmat.T @ torch.linalg.solve((torch.eye(4, dtype=F64) - a).T, c),
    }
    for grad, reference in expected.items():
        z, _ = solve_fixed_point(lambda z: a @ z + bmat @ x, torch.zeros(4, dtype=F64), finder, grad)
        torch.testing.assert_close(z, torch.linalg.solve(torch.eye(4, dtype=F64) - a, bmat @ x))
        (gx,) = torch.autograd.grad(c @ z, x)
        assert torch.isfinite(gx).all()
        torch.testing.assert_close(gx, reference, atol=1e-9, rtol=1e-9)


def test_watched_adjoint_solve_is_the_analytic_adjoint() -> None:
    """g(z) = A z + B x: the adjoint solve reported is u = (I - A)^-T c for the loss c.z, the gradient is
    unchanged by watching, a solve from the exact u stops sooner, and nothing is reported after the
    context."""
    a, bmat, c, x = linear_problem(seed=4, norm=0.6)
    finder = solvers.get_root_finder("anderson", tol=1e-12, max_iter=100)
    u_exact = torch.linalg.solve((torch.eye(4, dtype=F64) - a).T, c)

    def gradient() -> torch.Tensor:
        z, _ = solve_fixed_point(lambda z: a @ z + bmat @ x, torch.zeros(4, dtype=F64), finder, "implicit")
        return torch.autograd.grad(c @ z, x)[0]

    seen: list[tuple[solvers.AdjointSolve, torch.Tensor, solvers.RootInfo]] = []

    def watch(solve: solvers.AdjointSolve) -> None:
        seen.append((solve, *solve.solve_from(u_exact)))

    with solvers.watch_adjoint_solves(watch):
        watched = gradient()
    unwatched = gradient()
    assert len(seen) == 1
    solve, u_again, info_again = seen[0]
    torch.testing.assert_close(solve.v, c)
    torch.testing.assert_close(solve.u, u_exact, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(u_again, u_exact, atol=1e-10, rtol=1e-10)
    assert solve.info.all_converged and info_again.nfev < solve.info.nfev
    torch.testing.assert_close(watched, bmat.T @ u_exact, atol=1e-10, rtol=1e-10)
    assert torch.equal(watched, unwatched)


def exact_start_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (4x4, spectral norm 0.9), x (requires grad) and the fixed point of z = A z + x, to start a solve at:
    the forward solve converges at once, so only the adjoint solve can fail."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(4, 4, generator=gen, dtype=F64)
    a = 0.9 * a / torch.linalg.matrix_norm(a, ord=2)
    x = torch.randn(4, dtype=F64, requires_grad=True)
    return a, x, torch.linalg.solve(torch.eye(4, dtype=F64) - a, x.detach())


def test_adjoint_finder_solves_the_backward_equation_to_its_own_tolerance() -> None:
    """A looser adjoint finder changes the backward solve only: the forward root is the same, the reported
    adjoint solve stops at its tolerance in fewer VJPs, the gradient is ``B^T u`` of the ``u`` it solved, and
    ``u`` is within the error its residual bounds (``||u - u*|| <= ||r|| / (1 - ||A||)``) but not exact."""
    a, bmat, c, x = linear_problem(seed=6, norm=0.8)
    u_exact = torch.linalg.solve((torch.eye(4, dtype=F64) - a).T, c)
    finder = solvers.get_root_finder("picard", tol=1e-12, max_iter=500)
    loose = solvers.get_root_finder("picard", tol=1e-1, max_iter=500)
    results = {}
    for name, adjoint in (("same", None), ("loose", loose)):
        seen: list[solvers.AdjointSolve] = []
        with solvers.watch_adjoint_solves(seen.append):
            z, _ = solve_fixed_point(lambda z: a @ z + bmat @ x, torch.zeros(4, dtype=F64), finder,
                                     "implicit", adjoint_finder=adjoint)
            (gx,) = torch.autograd.grad(c @ z, x)
        results[name] = (z.detach(), gx, seen[0])
    (z_same, g_same, same), (z_loose, g_loose, solve) = results["same"], results["loose"]
    assert torch.equal(z_loose, z_same)
    assert same.info.tol == 1e-12 and solve.info.tol == 1e-1 and solve.info.nfev < same.info.nfev
    torch.testing.assert_close(g_same, bmat.T @ u_exact, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g_loose, bmat.T @ solve.u)
    mapped = a.T @ solve.u + c
    residual = torch.linalg.vector_norm(mapped - solve.u)
    assert residual <= 1e-1 * torch.linalg.vector_norm(mapped)
    error = torch.linalg.vector_norm(solve.u - u_exact)
    assert 1e-6 < error <= residual / (1 - 0.8) * (1 + 1e-9)


def test_adjoint_failure_is_reported_by_the_adjoint_finder() -> None:
    """Unset, ``adjoint_on_failure`` is the adjoint finder's ``on_failure``, not the forward finder's."""
    a, x, z_exact = exact_start_problem()
    finder = solvers.get_root_finder("picard", tol=1e-10, max_iter=50, on_failure="ignore")
    capped = solvers.get_root_finder("picard", tol=1e-10, max_iter=1, on_failure="raise")
    z, _ = solve_fixed_point(lambda z: a @ z + x, z_exact, finder, "implicit", adjoint_finder=capped)
    with pytest.raises(solvers.ConvergenceError, match="adjoint"):
        z.sum().backward()
    with pytest.raises(TypeError, match="adjoint_finder must be a RootFinder"):
        solve_fixed_point(lambda z: a @ z + x, z_exact, finder, "implicit", adjoint_finder=1e-2)


def test_implicit_step_adjoint_tol_and_cap() -> None:
    """``adjoint_tol``/``adjoint_max_iter`` of an implicit step: the forward step is unchanged, the adjoint
    solve runs to that tolerance (and no further than the cap), and the gradient stays near the exact one;
    bad values are refused naming the option."""
    gen = torch.Generator().manual_seed(7)
    m = torch.randn(5, 5, generator=gen, dtype=F64)
    m = -(m @ m.T) / torch.linalg.matrix_norm(m, ord=2) - torch.eye(5, dtype=F64)  # y' = M y, stable
    y0 = torch.randn(3, 5, generator=gen, dtype=F64, requires_grad=True)
    c = torch.randn(3, 5, generator=gen, dtype=F64)
    dt = 0.5
    # y1 = (I - dt M)^-1 y0, so d(c . y1)/d y0 = c (I - dt M)^-1
    exact = torch.linalg.solve(torch.eye(5, dtype=F64) - dt * m, c.T).T

    def step(**options: float) -> tuple[torch.Tensor, torch.Tensor, solvers.AdjointSolve]:
        method = solvers.get("implicit_euler", root="anderson", tol=1e-12, max_iter=100, **options)
        seen: list[solvers.AdjointSolve] = []
        with solvers.watch_adjoint_solves(seen.append):
            y1, _ = method.step(lambda t, y: y @ m.T, 0.0, y0, dt)
            (gy,) = torch.autograd.grad((c * y1).sum(), y0)
        return y1.detach(), gy, seen[0]

    y_exact, g_exact, solve_exact = step()
    y_loose, g_loose, solve_loose = step(adjoint_tol=0.1)
    with pytest.warns(ConvergenceWarning, match="adjoint"):
        _, g_capped, solve_capped = step(adjoint_max_iter=1)
    torch.testing.assert_close(g_exact, exact, atol=1e-9, rtol=1e-9)
    assert torch.equal(y_loose, y_exact)
    assert solve_loose.info.tol == 0.1 and solve_loose.info.all_converged
    assert solve_loose.info.nfev < solve_exact.info.nfev
    relative_error = torch.linalg.vector_norm(g_loose - exact) / torch.linalg.vector_norm(exact)
    assert 1e-9 < relative_error < 0.2
    assert int(solve_capped.info.iterations.max()) <= 1 and not torch.allclose(g_capped, exact)
    for option, value in (("adjoint_tol", 0.0), ("adjoint_tol", 1.5), ("adjoint_tol", "1e-2"),
                          ("adjoint_max_iter", 0), ("adjoint_max_iter", True), ("adjoint_max_iter", 2.0)):
        with pytest.raises(ValueError, match=option):
            solvers.get("implicit_euler", **{option: value})


def test_watching_with_a_non_callable_is_refused_before_any_solve() -> None:
    watching = solvers.watch_adjoint_solves("print")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callback must be callable"), watching:
        pytest.fail("the context must not open")


def test_implicit_mode_keeps_one_application_in_the_graph() -> None:
    """Memory does not grow with iterations: the graph holds one application of g, however many iterations."""
    w, x, b = contraction_problem(3)
    calls = 0

    def g(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.tanh(z @ w.T + x) + b

    finder = solvers.get_root_finder("picard", tol=1e-13, max_iter=300)
    z, info = solve_fixed_point(g, torch.zeros_like(x), finder, "implicit")
    assert info.iterations.max() > 10 and calls == info.nfev

    def count_tanh(fn: object, seen: set) -> int:
        if fn is None or fn in seen:
            return 0
        seen.add(fn)
        own = int(type(fn).__name__.startswith("TanhBackward"))
        return own + sum(count_tanh(nxt, seen) for nxt, _ in fn.next_functions)

    assert count_tanh(z.grad_fn, set()) == 1


def test_backward_reuses_the_forward_application() -> None:
    """The adjoint's VJPs run on the graph of the forward's one application of g: backward evaluates g no
    more, and the gradient is still the analytic one (g(z) = A z + B x: B^T (I - A)^-T c)."""
    a, bmat, c, x = linear_problem(seed=8, norm=0.6)
    calls = 0

    def g(z: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return a @ z + bmat @ x

    finder = solvers.get_root_finder("anderson", tol=1e-12, max_iter=100)
    z, info = solve_fixed_point(g, torch.zeros(4, dtype=F64), finder, "implicit")
    assert calls == info.nfev
    (gx,) = torch.autograd.grad(c @ z, x)
    assert calls == info.nfev
    torch.testing.assert_close(gx, bmat.T @ torch.linalg.solve((torch.eye(4, dtype=F64) - a).T, c))


def test_no_graph_when_nothing_requires_grad() -> None:
    w, x, b = (p.detach() for p in contraction_problem(4))
    for grad in solvers.available_grad_modes():
        assert not solve(w, x, b, "anderson", grad).requires_grad


def test_implicit_step_gradient_through_implicit_euler() -> None:
    """d y1 / d a for y1 = y0 / (1 - a dt) (implicit Euler on y' = a y) matches the analytic derivative."""
    a = torch.tensor(-0.7, dtype=F64, requires_grad=True)
    y0 = torch.tensor([1.0, 2.0], dtype=F64)
    dt = 0.5
    for grad in solvers.available_grad_modes():
        step = solvers.get("implicit_euler", root="anderson", grad=grad, tol=1e-13, max_iter=100)
        y1, _ = step.step(lambda t, y: a * y, 0.0, y0, dt)
        torch.testing.assert_close(y1, y0 / (1 - a.detach() * dt))
        (ga,) = torch.autograd.grad(y1.sum(), a)
        exact = y0.sum() * dt / (1 - a.detach() * dt) ** 2
        if grad == "one_step":  # d/da [y0 + dt a z*] with z* fixed
            exact = dt * y1.detach().sum()
        torch.testing.assert_close(ga, exact, atol=1e-9, rtol=1e-9)


def test_adjoint_non_convergence_is_reported() -> None:
    """Forward solve converges at once (exact start); the adjoint solve gets one iteration and must warn."""
    a, x, z_exact = exact_start_problem()
    finder = solvers.get_root_finder("picard", tol=1e-10, max_iter=1)
    z, info = solve_fixed_point(lambda z: a @ z + x, z_exact, finder, "implicit")
    assert info.all_converged
    with pytest.warns(ConvergenceWarning, match="adjoint.*residual"):
        z.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_unknown_grad_mode() -> None:
    with pytest.raises(ValueError, match="implicit, one_step, unroll"):
        solve_fixed_point(lambda z: 0.5 * z, torch.ones(2), "picard", "backprop")
    with pytest.raises(ValueError, match="anderson"):
        solve_fixed_point(lambda z: 0.5 * z, torch.ones(2), "andersen")


def test_implicit_gradient_when_g_ignores_z() -> None:
    """y' = a (constant field): implicit Euler gives y0 + dt a, so d(sum y1)/da = dt per component."""
    a = torch.tensor([0.5, -1.0], dtype=F64, requires_grad=True)
    step = solvers.get("implicit_euler", root="anderson", grad="implicit")
    y1, _ = step.step(lambda t, y: a.expand_as(y), 0.0, torch.zeros(2, dtype=F64), 0.25)
    (ga,) = torch.autograd.grad(y1.sum(), a)
    torch.testing.assert_close(ga, torch.full((2,), 0.25, dtype=F64))


def test_step_reports_adjoint_failure_even_when_forward_reports_are_off() -> None:
    """y0 = 0 is the exact forward solution of y' = a y, so only the (one-iteration) adjoint solve fails."""
    a = torch.tensor(-3.0, dtype=F64, requires_grad=True)
    y0 = torch.zeros(3, dtype=F64)

    def backward(**options: str) -> None:
        step = solvers.get("implicit_euler", root="picard", max_iter=1, on_failure="ignore", init="previous",
                           **options)
        y1, info = step.step(lambda t, y: a * y, 0.0, y0, 0.1)
        assert info.root.all_converged
        y1.sum().backward()

    with pytest.warns(ConvergenceWarning, match="adjoint"):
        backward()
    with pytest.raises(solvers.ConvergenceError, match="adjoint"):
        backward(adjoint_on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        backward(adjoint_on_failure="ignore")
    with pytest.raises(ValueError, match="warn, raise, ignore"):
        solvers.get("implicit_euler", adjoint_on_failure="loud")
