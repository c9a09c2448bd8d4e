"""The torchdiffeq route: implicit steps as torchdiffeq methods, in odeint and odeint_adjoint."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS

import solvers
from solvers.torchdiffeq_bridge import BRIDGED_METHODS, BRIDGED_NAMES, install_torchdiffeq

F64 = torch.float64


class Linear(torch.nn.Module):
    """y' = A y with a trainable A."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[-1.0, 0.5], [-0.3, -2.0]], dtype=F64))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.a.T


def test_install_is_idempotent_and_keeps_torchdiffeq_names() -> None:
    before = dict(SOLVERS)
    assert install_torchdiffeq() == []
    assert dict(SOLVERS) == before
    for name in BRIDGED_NAMES:
        assert name in SOLVERS
    for name in ("euler", "rk4", "dopri5", "implicit_adams"):
        assert SOLVERS[name].__module__.startswith("torchdiffeq")


@pytest.mark.parametrize("method", BRIDGED_METHODS)
def test_torchdiffeq_trajectory_equals_direct_steps(method: str) -> None:
    func = Linear()
    y0 = torch.tensor([[1.0, 0.5], [0.2, -0.4]], dtype=F64)
    t = torch.tensor([0.0, 0.3, 0.5], dtype=F64)
    options = {"root": "newton_krylov", "tol": 1e-12, "max_iter": 30}
    with torch.no_grad():
        ys = torchdiffeq.odeint(func, y0, t, method=f"solvers_{method}",
                                options={"step_size": 0.1, **options})
        step = solvers.get(method, **options)
        y, direct = y0, [y0]
        for k in range(5):
            y, _ = step.step(func, 0.1 * k, y, 0.1)
            if k in (2, 4):
                direct.append(y)
    torch.testing.assert_close(ys, torch.stack(direct), atol=1e-12, rtol=1e-12)


def exact_loss(a: torch.Tensor, y0: torch.Tensor, horizon: float) -> torch.Tensor:
    return (torch.linalg.matrix_exp(a * horizon) @ y0).pow(2).sum()


def test_odeint_adjoint_gradient_converges_to_the_exact_one() -> None:
    """Continuous adjoint, implicit Euler: dL/dA, dL/dy0 are O(h) from exact and close to direct backprop."""
    func = Linear()
    y0 = torch.tensor([1.0, 0.5], dtype=F64, requires_grad=True)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    exact = torch.autograd.grad(exact_loss(func.a, y0, 1.0), (func.a, y0))
    errors = []
    for h in (0.05, 0.025):
        options = {"step_size": h, "root": "anderson", "tol": 1e-12}
        adjoint_ys = torchdiffeq.odeint_adjoint(func, y0, t, method="solvers_implicit_euler", options=options)
        adjoint = torch.autograd.grad(adjoint_ys[-1].pow(2).sum(), (func.a, y0))
        direct_ys = torchdiffeq.odeint(func, y0, t, method="solvers_implicit_euler", options=options)
        direct = torch.autograd.grad(direct_ys[-1].pow(2).sum(), (func.a, y0))
        errors.append(max(float((g - e).abs().max()) for g, e in zip(adjoint, exact)))
        for g_adj, g_dir in zip(adjoint, direct):
            torch.testing.assert_close(g_adj, g_dir, atol=2 * h, rtol=0)
    assert errors[1] < 0.05, errors
    assert 1.6 < errors[0] / errors[1] < 2.4, f"not first order: {errors}"


def test_odeint_adjoint_trapezoid_matches_finite_differences() -> None:
    func = Linear()
    y0 = torch.tensor([1.0, 0.5], dtype=F64)
    t = torch.tensor([0.0, 0.5], dtype=F64)
    options = {"step_size": 0.01, "root": "anderson", "tol": 1e-12}

    def loss() -> torch.Tensor:
        ys = torchdiffeq.odeint_adjoint(func, y0, t, method="solvers_trapezoid", options=options)
        return ys[-1].pow(2).sum()

    (grad,) = torch.autograd.grad(loss(), func.a)
    eps = 1e-6
    finite = torch.zeros_like(grad)
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                func.a[i, j] += eps
                up = loss()
                func.a[i, j] -= 2 * eps
                down = loss()
                func.a[i, j] += eps
                finite[i, j] = (up - down) / (2 * eps)
    # The continuous adjoint differs from the derivative of the discrete solution by O(h^2) for trapezoid.
    torch.testing.assert_close(grad, finite, atol=1e-4, rtol=1e-4)


def test_bad_option_through_torchdiffeq() -> None:
    with pytest.raises(ValueError, match="newton_krylov"):
        torchdiffeq.odeint(Linear(), torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64),
                           method="solvers_implicit_euler", options={"step_size": 0.1, "root": "newton"})
