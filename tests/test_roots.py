"""Root finders for ``z = g(z)``: accuracy vs scipy, per-sample independence, reporting, dtypes, gradients."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import solvers
from solvers import ConvergenceError, ConvergenceWarning

FINDERS = solvers.available_root_finders()
# Finders meant to handle maps that are not contractions (Picard and gradient descent are not).
NON_CONTRACTIVE = [name for name in ("anderson", "broyden", "newton_krylov") if name in FINDERS]
# Generous iteration budgets so that every finder reaches tight tolerances on the test problems.
MAX_ITER = {"gd": 400, "picard": 200}


def finder(name: str, **options):
    options.setdefault("max_iter", MAX_ITER.get(name, 100))
    return solvers.get_root_finder(name, **options)


def tanh_problem(batch: int, n: int, gain: float, seed: int = 0, dtype=torch.float64):
    """``g(z) = x + h tanh(W z)`` with per-sample ``W`` scaled so that ``h ||W_b||_2 = gain_b``."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
    gains = torch.as_tensor(gain, dtype=torch.float64).expand(batch)
    w = w * (gains / torch.linalg.matrix_norm(w, ord=2))[:, None, None]
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    h = 0.5
    w = w / h
    return x.to(dtype), w.to(dtype), h


def tanh_map(x: torch.Tensor, w: torch.Tensor, h: float):
    return lambda z: x + h * torch.tanh((w @ z.unsqueeze(-1)).squeeze(-1))


def scipy_reference(x: torch.Tensor, w: torch.Tensor, h: float) -> np.ndarray:
    """Each sample solved separately by scipy's hybrid Powell method with the analytic Jacobian."""
    out = []
    for xb, wb in zip(x.double().numpy(), w.double().numpy()):
        def residual(z, xb=xb, wb=wb):
            return xb + h * np.tanh(wb @ z) - z

        def jacobian(z, wb=wb):
            return h * (1 - np.tanh(wb @ z) ** 2)[:, None] * wb - np.eye(len(z))

        sol = scipy.optimize.root(residual, xb, jac=jacobian, tol=1e-13)
        assert sol.success, sol.message
        out.append(sol.x)
    return np.stack(out)


def relative_residual(g, z: torch.Tensor) -> torch.Tensor:
    """Recomputed per-sample ``||g(z) - z|| / ||g(z)||`` in float64."""
    gz = g(z).double().reshape(z.shape[0], -1)
    zf = z.double().reshape(z.shape[0], -1)
    return torch.linalg.vector_norm(gz - zf, dim=1) / torch.linalg.vector_norm(gz, dim=1)


@pytest.mark.parametrize("name", FINDERS)
def test_contraction_matches_scipy(name):
    x, w, h = tanh_problem(batch=3, n=6, gain=0.5)
    g = tanh_map(x, w, h)
    z, info = finder(name, tol=1e-9).solve(g, x.clone())
    assert info.all_converged
    assert relative_residual(g, z).max() <= 1e-9 * 1.01
    np.testing.assert_allclose(z.numpy(), scipy_reference(x, w, h), rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", NON_CONTRACTIVE)
def test_non_contractive_matches_scipy(name):
    x, w, h = tanh_problem(batch=3, n=6, gain=torch.tensor([1.5, 2.0, 2.5]), seed=1)
    g = tanh_map(x, w, h)
    z, info = finder(name, tol=1e-9).solve(g, x.clone())
    assert info.all_converged, info.summary()
    assert relative_residual(g, z).max() <= 1e-9 * 1.01
    np.testing.assert_allclose(z.numpy(), scipy_reference(x, w, h), rtol=0, atol=1e-7)


def test_picard_fails_where_map_is_not_contractive():
    """Sanity check of the non-contractive problem above: plain fixed-point iteration does not converge."""
    x, w, h = tanh_problem(batch=3, n=6, gain=torch.tensor([1.5, 2.0, 2.5]), seed=1)
    _, info = finder("picard", tol=1e-9, on_failure="ignore").solve(tanh_map(x, w, h), x.clone())
    assert not info.all_converged


@pytest.mark.parametrize("name", FINDERS)
def test_batched_result_equals_each_sample_alone(name):
    gains = torch.tensor([0.2, 0.5, 0.8]) if name in ("picard", "gd") else torch.tensor([0.2, 0.9, 1.8])
    x, w, h = tanh_problem(batch=3, n=5, gain=gains, seed=2)
    # A loose tolerance: a converged sample that kept moving would drift by far more than 1e-8.
    z, info = finder(name, tol=1e-6).solve(tanh_map(x, w, h), x.clone())
    assert info.all_converged
    for b in range(3):
        zb, info_b = finder(name, tol=1e-6).solve(tanh_map(x[b:b + 1], w[b:b + 1], h), x[b:b + 1].clone())
        torch.testing.assert_close(z[b:b + 1], zb, rtol=0, atol=1e-8)
        assert int(info.iterations[b]) == int(info_b.iterations[0])
    assert len(set(info.iterations.tolist())) > 1, "unequal samples should stop at different steps"


@pytest.mark.parametrize("name", FINDERS)
def test_info_fields_are_consistent(name):
    x, w, h = tanh_problem(batch=4, n=5, gain=0.6, seed=3)
    g = tanh_map(x, w, h)
    tol = 1e-8
    solver = finder(name, tol=tol)
    z, info = solver.solve(g, x.clone())
    assert info.solver == name
    assert info.iterations.shape == info.converged.shape == info.rel_residual.shape == (4,)
    assert (info.iterations >= 1).all() and int(info.iterations.max()) <= solver.max_iter
    assert info.nfev >= int(info.iterations.max()) + 1  # the initial evaluation plus one per iteration
    gz = g(z)
    abs_res = torch.linalg.vector_norm(gz - z, dim=1)
    torch.testing.assert_close(info.abs_residual, abs_res, rtol=1e-6, atol=1e-15)
    torch.testing.assert_close(info.rel_residual, abs_res / torch.linalg.vector_norm(gz, dim=1), rtol=1e-6,
                               atol=1e-15)
    assert torch.equal(info.converged, info.rel_residual <= tol)
    assert info.diverged is not None and not info.diverged.any()
    if name == "picard":
        assert info.nfev == int(info.iterations.max()) + 1 and info.nvjp == 0
    if name == "gd":
        assert info.nvjp == int(info.iterations.max())  # one VJP per iteration
    if name == "newton_krylov":
        assert info.nvjp >= int(info.iterations.max())
    assert name in info.summary()


@pytest.mark.parametrize("name", FINDERS)
def test_non_convergence_warns_or_raises(name):
    x, w, h = tanh_problem(batch=2, n=5, gain=0.9, seed=4)
    g = tanh_map(x, w, h)
    with pytest.warns(ConvergenceWarning, match=r"(?s)iterations.*residual"):
        z, info = finder(name, tol=1e-12, max_iter=1).solve(g, x.clone())
    assert not info.converged.any() and (info.iterations == 1).all()
    assert torch.isfinite(z).all()
    with pytest.raises(ConvergenceError, match="did not converge"):
        finder(name, tol=1e-12, max_iter=1, on_failure="raise").solve(g, x.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        finder(name, tol=1e-12, max_iter=1, on_failure="ignore").solve(g, x.clone())


def test_picard_diverging_map_is_reported_without_nan():
    g = lambda z: 2 * z + 1  # noqa: E731  (fixed point -1 is repelling: iterates overflow float32)
    with pytest.warns(ConvergenceWarning, match="diverged"):
        z, info = finder("picard", max_iter=1000).solve(g, torch.zeros(2, 3))
    assert torch.isfinite(z).all() and (z > 1e30).all()
    assert info.diverged.all() and not info.converged.any()
    assert torch.isfinite(info.rel_residual).all()


@pytest.mark.parametrize("name", FINDERS)
def test_map_producing_nan_is_reported_without_nan(name):
    """``g(z) = 2 + sqrt(1 - z)`` has no fixed point and is NaN for ``z > 1``: a finder must stop cleanly."""
    g = lambda z: 2 + torch.sqrt(1 - z)  # noqa: E731
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        z, info = finder(name, max_iter=30).solve(g, torch.zeros(3, 2, dtype=torch.float64))
    assert torch.isfinite(z).all() and (z <= 1).all()
    assert not info.converged.any()
    assert torch.isfinite(info.rel_residual).all()


@pytest.mark.parametrize("name", FINDERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_states(name, dtype):
    x, w, h = tanh_problem(batch=3, n=6, gain=0.5, seed=5, dtype=dtype)
    g = tanh_map(x, w, h)
    z, info = finder(name).solve(g, x.clone())
    tol = solvers.RootFinder.tolerance(finder(name), z)
    assert z.dtype == dtype and info.all_converged
    assert info.rel_residual.dtype == torch.float32  # statistics accumulated in float32
    assert relative_residual(g, z).max() <= 1.01 * tol
    reference = scipy_reference(x, w, h)
    atol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
    np.testing.assert_allclose(z.double().numpy(), reference, rtol=0, atol=atol)


@pytest.mark.parametrize("name", FINDERS)
def test_tolerance_is_raised_to_the_autocast_dtype(name):
    """Under bfloat16 autocast a float32 state's map computes in bfloat16: a float32 tolerance would be out of
    reach, so the solve stops at bfloat16's (1e-2), which its recomputed residual meets; without autocast the
    requested tolerance stands."""
    x, w, h = tanh_problem(batch=3, n=6, gain=0.5, seed=5, dtype=torch.float32)
    g = tanh_map(x, w, h)
    solver = finder(name, tol=1e-6, max_iter=200)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, info = solver.solve(g, x.clone())
        residual = relative_residual(g, z)
    assert info.tol == solvers.default_tol(torch.bfloat16) == 1e-2
    assert info.all_converged and residual.max() <= 1.01 * info.tol
    z, info = solver.solve(g, x.clone())
    assert info.tol == 1e-6 and info.all_converged and relative_residual(g, z).max() <= 1.01e-6


@pytest.mark.parametrize("name", FINDERS)
def test_single_sample_shapes(name):
    """A 0-d or 1-d state is one sample; the result keeps the caller's shape."""
    g = lambda z: 0.5 * torch.cos(z)  # noqa: E731
    z, info = finder(name, tol=1e-10).solve(g, torch.tensor(0.0, dtype=torch.float64))
    assert z.shape == () and info.converged.shape == (1,)
    ref = scipy.optimize.brentq(lambda s: 0.5 * np.cos(s) - s, 0, 1, xtol=1e-14)
    assert abs(float(z) - ref) < 1e-9
    z1, _ = finder(name, tol=1e-10).solve(g, torch.zeros(4, dtype=torch.float64))
    assert z1.shape == (4,)
    np.testing.assert_allclose(z1.numpy(), ref, atol=1e-9)


BAD_OPTIONS = [
    ("anderson", {"m": 0}, "m"),
    ("anderson", {"m": -3}, "m"),
    ("anderson", {"beta": 0.0}, "beta"),
    ("anderson", {"lam": -1e-3}, "lam"),
    ("broyden", {"m": 0}, "m"),
    ("broyden", {"max_backtracks": -1}, "max_backtracks"),
    ("newton_krylov", {"krylov_dim": 0}, "krylov_dim"),
    ("newton_krylov", {"eta": 1.0}, "eta"),
    ("newton_krylov", {"restarts": -1}, "restarts"),
    ("newton_krylov", {"jvp": "reverse"}, "'auto', 'forward', 'double_vjp', 'finite_difference'"),
    ("gd", {"lr": 0.0}, "lr"),
    ("gd", {"lr": -0.1}, "lr"),
    ("gd", {"momentum": 1.0}, "momentum"),
    ("gd", {"backtrack": "yes"}, "backtrack"),
    ("picard", {"damping": 0}, "damping"),
]


@pytest.mark.parametrize(("name", "options", "mentions"), BAD_OPTIONS)
def test_bad_options_raise(name, options, mentions):
    with pytest.raises(ValueError, match=mentions):
        solvers.get_root_finder(name, **options)


@pytest.mark.parametrize("name", FINDERS)
def test_common_options_are_validated(name):
    for options in ({"tol": 0.0}, {"max_iter": 0}, {"on_failure": "crash"}, {"no_such_option": 1}):
        with pytest.raises(ValueError):
            solvers.get_root_finder(name, **options)


@pytest.mark.parametrize("start", ["x", "zeros"])
@pytest.mark.parametrize("name", FINDERS)
def test_unrolled_gradient_matches_finite_differences(name, start):
    """Backpropagating through the iterations of a converged solve gives d z* / d (x, W).

    Starting from ``x`` the initial guess carries the graph; starting from zeros only ``g`` does.
    """
    x, w, h = tanh_problem(batch=2, n=3, gain=0.5, seed=6)
    weights = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(2, 3)

    def loss(x_, w_):
        z0 = x_ if start == "x" else torch.zeros_like(x_.detach())
        z, info = finder(name, tol=1e-13, max_iter=2000, on_failure="raise").solve(tanh_map(x_, w_, h), z0)
        return (weights * z).sum()

    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(loss(xr, wr), (xr, wr))
    eps = 1e-6
    for tensor, grad in ((x, gx), (w, gw)):
        flat_grad = grad.reshape(-1)
        for i in range(0, tensor.numel(), 4):  # a subset of entries keeps the test fast
            plus, minus = tensor.clone(), tensor.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            with torch.no_grad():
                fd = (loss(*((plus, w) if tensor is x else (x, plus)))
                      - loss(*((minus, w) if tensor is x else (x, minus)))) / (2 * eps)
            assert abs(float(flat_grad[i]) - float(fd)) <= 1e-6 + 1e-5 * abs(float(fd)), (i, flat_grad[i], fd)


@pytest.mark.parametrize("name", FINDERS)
def test_works_under_no_grad_and_with_grad_free_inputs(name):
    x, w, h = tanh_problem(batch=2, n=4, gain=0.5, seed=7)
    g = tanh_map(x, w, h)
    with torch.no_grad():
        z, info = finder(name, tol=1e-10).solve(g, x.clone())
    assert info.all_converged and not z.requires_grad
    z2, _ = finder(name, tol=1e-10).solve(g, x.clone())
    assert not z2.requires_grad  # nothing required grad: no graph is built
    torch.testing.assert_close(z, z2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lam", [1e-4, 0.0])
def test_anderson_degenerate_history_is_regularised(lam):
    """With a 1-d state every history column is parallel: the unregularised normal equations are singular."""
    g = lambda z: torch.cos(z)  # noqa: E731
    z, info = finder("anderson", m=5, lam=lam, tol=1e-12).solve(g, torch.zeros(2, 1, dtype=torch.float64))
    ref = scipy.optimize.brentq(lambda s: np.cos(s) - s, 0, 1, xtol=1e-15)
    assert info.all_converged
    np.testing.assert_allclose(z.numpy(), ref, atol=1e-11)


# --- stiff implicit-Euler systems: Newton-Krylov ---------------------------------------------------------

ROBERTSON_STEP = 1e3


def robertson(y: torch.Tensor) -> torch.Tensor:
    y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
    rates = [-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2]
    return torch.stack(rates, dim=-1)


def robertson_reference(y0: np.ndarray) -> np.ndarray:
    """Implicit Euler step ``z = y0 + dt f(z)`` by scipy's fsolve with the analytic Jacobian."""
    dt = ROBERTSON_STEP

    def residual(z):
        y1, y2, y3 = z
        return y0 + dt * np.array([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2,
                                   3e7 * y2**2]) - z

    def jacobian(z):
        _, y2, y3 = z
        jf = np.array([[-0.04, 1e4 * y3, 1e4 * y2],
                       [0.04, -1e4 * y3 - 6e7 * y2, -1e4 * y2],
                       [0.0, 6e7 * y2, 0.0]])
        return dt * jf - np.eye(3)

    sol, _, ier, message = scipy.optimize.fsolve(residual, np.array([0.5, 1e-6, 0.5]), fprime=jacobian,
                                                 xtol=1e-13, full_output=True)
    assert ier == 1, message
    return sol


@pytest.mark.parametrize("jvp", ["auto", "double_vjp"])
def test_newton_krylov_solves_stiff_robertson_step(jvp):
    y0 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 1e-5, 0.1]], dtype=torch.float64)
    g = lambda z: y0 + ROBERTSON_STEP * robertson(z)  # noqa: E731
    z, info = finder("newton_krylov", tol=1e-12, jvp=jvp).solve(g, y0.clone())
    assert info.all_converged, info.summary()
    for b in range(2):
        ref = robertson_reference(y0[b].numpy())
        np.testing.assert_allclose(z[b].numpy(), ref, rtol=1e-8, atol=1e-14)  # incl. the tiny y2 ~ 4e-6


@pytest.mark.parametrize("name", [n for n in ("picard", "anderson") if n in FINDERS])
def test_robertson_step_defeats_fixed_point_methods(name):
    """Sanity check that the Robertson step above is stiff: fixed-point type iterations blow up."""
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
    g = lambda z: y0 + ROBERTSON_STEP * robertson(z)  # noqa: E731
    z, info = finder(name, on_failure="ignore").solve(g, y0.clone())
    assert not info.all_converged and torch.isfinite(z).all()


def test_newton_krylov_solves_van_der_pol_step_with_large_step():
    mu, dt = 1000.0, 1.0
    y0 = torch.tensor([[2.0, 0.0], [1.5, -0.5]], dtype=torch.float64)

    def vdp(y):
        return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], dim=-1)

    z, info = finder("newton_krylov", tol=1e-12).solve(lambda z: y0 + dt * vdp(z), y0.clone())
    assert info.all_converged
    for b in range(2):
        yb = y0[b].numpy()

        def residual(v, yb=yb):
            return yb + dt * np.array([v[1], mu * (1 - v[0] ** 2) * v[1] - v[0]]) - v

        def jacobian(v):
            return dt * np.array([[0.0, 1.0], [-2 * mu * v[0] * v[1] - 1, mu * (1 - v[0] ** 2)]]) - np.eye(2)

        ref, _, ier, message = scipy.optimize.fsolve(residual, yb, fprime=jacobian, xtol=1e-13,
                                                     full_output=True)
        assert ier == 1, message
        np.testing.assert_allclose(z[b].numpy(), ref, rtol=1e-9, atol=1e-12)


class _TanhWithoutForwardAD(torch.autograd.Function):
    """tanh with a hand-written (twice differentiable) backward and no forward-mode rule."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _TanhWithoutDoubleBackward(_TanhWithoutForwardAD):
    """As above, but its backward is opaque to autograd (like fused attention kernels)."""

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad.detach() * (1 - y * y)


@pytest.mark.parametrize(("function", "working"), [(_TanhWithoutForwardAD, "double_vjp"),
                                                   (_TanhWithoutDoubleBackward, "finite_difference")])
def test_newton_krylov_auto_falls_back_when_autodiff_modes_fail(function, working):
    x, w, h = tanh_problem(batch=2, n=5, gain=1.8, seed=8)
    g = lambda z: x + h * function.apply((w @ z.unsqueeze(-1)).squeeze(-1))  # noqa: E731
    with pytest.raises(RuntimeError):
        finder("newton_krylov", jvp="forward").solve(g, x.clone())
    z_working, _ = finder("newton_krylov", tol=1e-10, jvp=working).solve(g, x.clone())
    z, info = finder("newton_krylov", tol=1e-10).solve(g, x.clone())
    assert info.all_converged and info.nvjp > 0
    np.testing.assert_allclose(z.numpy(), scipy_reference(x, w, h), atol=1e-8)
    torch.testing.assert_close(z, z_working, rtol=0, atol=1e-12)  # "auto" settled on the working method


def test_gd_with_momentum_reaches_the_same_root():
    x, w, h = tanh_problem(batch=2, n=5, gain=0.7, seed=9)
    g = tanh_map(x, w, h)
    z_plain, info_plain = finder("gd", tol=1e-9).solve(g, x.clone())
    z_heavy, info_heavy = finder("gd", tol=1e-9, momentum=0.3).solve(g, x.clone())
    assert info_plain.all_converged and info_heavy.all_converged
    np.testing.assert_allclose(z_heavy.numpy(), scipy_reference(x, w, h), atol=1e-8)
    assert int(info_heavy.iterations.max()) < int(info_plain.iterations.max())


def test_gd_step_control_solves_where_fixed_step_diverges():
    """On maps that are not contractions gd's fixed ``lr=0.5`` overshoots; halving a sample's step when it
    does not decrease the residual reaches scipy's root, and the residual never grows."""
    x, w, h = tanh_problem(batch=3, n=6, gain=2.0, seed=2)
    g = tanh_map(x, w, h)
    _, fixed = finder("gd", tol=1e-9, backtrack=False, on_failure="ignore").solve(g, x.clone())
    assert not fixed.all_converged
    z, info = finder("gd", tol=1e-9).solve(g, x.clone())
    assert info.all_converged, info.summary()
    np.testing.assert_allclose(z.numpy(), scipy_reference(x, w, h), rtol=0, atol=1e-7)
    residuals = [finder("gd", max_iter=k, on_failure="ignore").solve(g, x.clone())[1].abs_residual
                 for k in range(1, 40)]
    assert all((later <= earlier).all() for earlier, later in zip(residuals, residuals[1:]))


def test_newton_krylov_double_vjp_unrolled_gradient():
    """The reverse-mode Jacobian products are differentiable too: unroll gradient vs finite differences."""
    x, w, h = tanh_problem(batch=1, n=3, gain=1.5, seed=10)
    solver = finder("newton_krylov", tol=1e-13, jvp="double_vjp", on_failure="raise")
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(solver.solve(tanh_map(xr, w, h), xr)[0].sum(), xr)
    eps = 1e-6
    for i in range(3):
        step = torch.zeros_like(x)
        step[0, i] = eps
        with torch.no_grad():
            fd = (solver.solve(tanh_map(x + step, w, h), x + step)[0].sum()
                  - solver.solve(tanh_map(x - step, w, h), x - step)[0].sum()) / (2 * eps)
        assert abs(float(grad[0, i]) - float(fd)) <= 1e-6 + 1e-5 * abs(float(fd))
