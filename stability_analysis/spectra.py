"""Matrix-free spectra of a layer vector field's Jacobian ``J = df/dh`` at one hidden state.

The local linearisation ``dh/dt ~ J h`` decides how one solver step treats a perturbation: along an
eigenvector of ``J`` it is multiplied by ``R(step * lambda)``. Three numbers summarise ``J``:

* spectral norm ``||J||_2`` (power iteration or Lanczos on ``J^T J``): the worst-case growth rate;
* logarithmic 2-norm ``mu(J) = lambda_max((J + J^T) / 2)`` (Lanczos): the exact ODE contracts
  perturbations when ``mu < 0``;
* leading eigenvalues (Arnoldi): the points ``step * lambda`` to place on a stability-region plot.

Every product uses only JVPs (forward-mode AD) and VJPs (reverse mode) of the field, so a state of
``tokens x hidden`` entries never needs its dense Jacobian.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigs, eigsh
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

StateMap = Callable[[Tensor], Tensor]


@contextmanager
def _forward_ad_friendly_attention() -> Any:
    """Route scaled-dot-product attention to the math kernel, the one with forward-mode AD formulas."""
    with sdpa_kernel(SDPBackend.MATH):
        yield


def _default_tol(dtype: torch.dtype) -> float:
    """ARPACK tolerance matching the precision of the products (0 = machine precision in float64)."""
    return 0.0 if dtype == torch.float64 else 1e-5


class JacobianOperator:
    """``J = d field / dh`` at ``h`` as a matrix-free operator on flattened states.

    ``field`` maps a tensor shaped like ``h`` to one of the same shape (e.g. one sequence's hidden
    states ``(1, tokens, hidden)``). ``matvec`` is a JVP, ``rmatvec`` a VJP.
    """

    def __init__(self, field: StateMap, h: Tensor) -> None:
        if not isinstance(h, Tensor) or not h.is_floating_point():
            raise TypeError("h must be a floating-point torch.Tensor")
        self.field = field
        self.h = h.detach()
        self.shape = (h.numel(), h.numel())
        with _forward_ad_friendly_attention():
            out, self._vjp = torch.func.vjp(field, self.h)
        if out.shape != h.shape:
            raise ValueError(
                f"the field must return the state's shape {tuple(h.shape)}, got {tuple(out.shape)}"
            )

    def _as_state(self, v: Tensor) -> Tensor:
        return v.to(dtype=self.h.dtype, device=self.h.device).reshape(self.h.shape)

    def jvp(self, v: Tensor) -> Tensor:
        """``J v`` for a state-shaped or flat tensor ``v``; returns the flat product."""
        with _forward_ad_friendly_attention():
            return torch.func.jvp(self.field, (self.h,), (self._as_state(v),))[1].detach().reshape(-1)

    def vjp(self, v: Tensor) -> Tensor:
        """``J^T v`` for a state-shaped or flat tensor ``v``; returns the flat product."""
        return self._vjp(self._as_state(v))[0].detach().reshape(-1)

    @staticmethod
    def _numpy(product: Callable[[Tensor], Tensor]) -> Callable[[np.ndarray], np.ndarray]:
        """Wrap a real tensor product for scipy (float64 arrays; complex input: real and imaginary parts)."""

        def real_product(v: np.ndarray) -> np.ndarray:
            return product(torch.from_numpy(np.ascontiguousarray(v.ravel()))).double().cpu().numpy()

        def apply(v: np.ndarray) -> np.ndarray:
            if np.iscomplexobj(v):
                return real_product(v.real) + 1j * real_product(v.imag)
            return real_product(np.asarray(v, dtype=np.float64))

        return apply

    def linear_operator(self) -> LinearOperator:
        """``J`` as a scipy ``LinearOperator`` (float64)."""
        return LinearOperator(self.shape, matvec=self._numpy(self.jvp), rmatvec=self._numpy(self.vjp),
                              dtype=np.float64)

    def gram_operator(self) -> LinearOperator:
        """``J^T J`` (symmetric positive semi-definite)."""
        gram = self._numpy(lambda v: self.vjp(self.jvp(v)))
        return LinearOperator(self.shape, matvec=gram, rmatvec=gram, dtype=np.float64)

    def symmetric_part(self) -> LinearOperator:
        """``(J + J^T) / 2``."""
        return LinearOperator(self.shape, matvec=self._numpy(lambda v: 0.5 * (self.jvp(v) + self.vjp(v))),
                              dtype=np.float64)


SPECTRAL_NORM_METHODS = ("power", "lanczos")


def spectral_norm(
    operator: JacobianOperator,
    method: str = "power",
    tol: float | None = None,
    max_iter: int = 2000,
    seed: int = 0,
) -> float:
    """``||J||_2``: power iteration on ``J^T J`` (``"power"``) or Lanczos via ``eigsh`` (``"lanczos"``).

    Power iteration stops when the estimate changes by less than ``tol`` (relative) between iterations;
    its error then is about ``tol`` times the gap factor, so the default ``tol`` is tight.
    """
    if method not in SPECTRAL_NORM_METHODS:
        raise ValueError(f"method must be one of {', '.join(SPECTRAL_NORM_METHODS)}, got {method!r}")
    dtype = operator.h.dtype
    if method == "lanczos":
        value = eigsh(operator.gram_operator(), k=1, which="LA", tol=_default_tol(dtype),
                      return_eigenvectors=False)[0]
        return float(np.sqrt(max(value, 0.0)))
    tol = tol if tol is not None else (1e-13 if dtype == torch.float64 else 1e-6)
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(operator.shape[0], generator=generator, dtype=torch.float64).to(dtype)
    v = v / torch.linalg.vector_norm(v)
    estimate = 0.0
    for _ in range(max_iter):
        w = operator.vjp(operator.jvp(v))
        norm = float(torch.linalg.vector_norm(w))
        if norm == 0.0:
            return 0.0
        v = w / norm
        previous, estimate = estimate, float(np.sqrt(norm))
        if abs(estimate - previous) <= tol * estimate:
            break
    return float(torch.linalg.vector_norm(operator.jvp(v)))


def log_norm(operator: JacobianOperator) -> float:
    """Logarithmic 2-norm ``mu_2(J)``: the largest eigenvalue of ``(J + J^T) / 2`` (Lanczos)."""
    value = eigsh(operator.symmetric_part(), k=1, which="LA", tol=_default_tol(operator.h.dtype),
                  return_eigenvectors=False)
    return float(value[0])


EIGENVALUE_ORDERS = {"LM": "largest magnitude", "LR": "largest real part"}


def leading_eigenvalues(operator: JacobianOperator, k: int = 6, which: str = "LM") -> np.ndarray:
    """``k`` eigenvalues of ``J`` by Arnoldi (``eigs``): largest magnitude (``"LM"``, the stiff modes that
    bound explicit steps) or largest real part (``"LR"``, the modes the exact flow amplifies most).
    Sorted in that order."""
    n = operator.shape[0]
    if not isinstance(k, int) or not 1 <= k <= n - 2:
        raise ValueError(f"k must be an integer in [1, {n - 2}] (state size {n} minus 2), got {k!r}")
    if which not in EIGENVALUE_ORDERS:
        raise ValueError(f"which must be one of {', '.join(EIGENVALUE_ORDERS)}, got {which!r}")
    start = np.random.default_rng(0).standard_normal(n)  # ARPACK's own start is random: results would vary
    values = eigs(operator.linear_operator(), k=k, which=which, tol=_default_tol(operator.h.dtype), v0=start,
                  return_eigenvectors=False)
    key = -np.abs(values) if which == "LM" else -values.real
    return values[np.argsort(key, kind="stable")]


@dataclass
class Spectrum:
    """Spectral summary of one layer's Jacobian at one sequence's hidden state."""

    layer: int
    sequence: int
    tokens: int
    spectral_norm: float
    log_norm: float
    eigenvalues: np.ndarray  # complex, in the order of ``which``
    which: str = "LM"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "sequence": self.sequence,
            "tokens": self.tokens,
            "spectral_norm": self.spectral_norm,
            "log_norm": self.log_norm,
            "eigenvalues": [[float(v.real), float(v.imag)] for v in self.eigenvalues],
            "which": self.which,
        }


def jacobian_spectrum(field: StateMap, h: Tensor, k: int = 6, layer: int = 0, sequence: int = 0,
                      norm_method: str = "power", which: str = "LM") -> Spectrum:
    """Spectral norm, log norm and ``k`` leading eigenvalues (``which``) of ``d field / dh`` at ``h``."""
    operator = JacobianOperator(field, h)
    return Spectrum(
        layer=layer,
        sequence=sequence,
        tokens=h.shape[-2] if h.ndim >= 2 else 1,
        spectral_norm=spectral_norm(operator, method=norm_method),
        log_norm=log_norm(operator),
        eigenvalues=leading_eigenvalues(operator, k, which) if k > 0 else np.array([], dtype=np.complex128),
        which=which,
    )


def layer_spectra(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    layers: Sequence[int] | None = None,
    k: int = 6,
    framing: str = "residual",
    norm_method: str = "power",
    which: str = "LM",
) -> list[Spectrum]:
    """Spectra of every (or the selected) encoder layer's field, per sequence of ``input_ids``.

    Each sequence is trimmed to its real tokens (``attention_mask``) and run alone, so the Jacobian is
    that of one unpadded sequence (tokens x hidden). The linearisation point of layer ``l`` is its input
    on the model's own forward pass; the field is the stock layer's (``framing`` as in ``ode_bert``).
    """
    from ode_bert import LayerField

    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    results: list[Spectrum] = []
    for index in range(input_ids.shape[0]):
        ids = input_ids[index][mask[index].bool()][None]
        captured = LayerField.capture(model, framing, input_ids=ids, attention_mask=torch.ones_like(ids))
        selected = range(len(captured)) if layers is None else layers
        for layer in selected:
            if not 0 <= layer < len(captured):
                raise ValueError(f"layer {layer} out of range: the model has {len(captured)} layers")
            field, h = captured[layer]
            results.append(jacobian_spectrum(lambda x, f=field: f(0.0, x), h, k=k, layer=layer,
                                             sequence=index, norm_method=norm_method, which=which))
    return results


def spectral_abscissa(spectrum: Spectrum) -> float:
    """``max Re(lambda)`` of the Jacobian: the growth rate of the fastest-growing mode of the linearised flow.

    Needs the rightmost eigenvalues (``which="LR"``): the largest-magnitude ones can all lie to the left of
    it (a ``ValueError`` says so rather than returning a wrong abscissa).
    """
    if spectrum.which != "LR":
        raise ValueError(
            f"the spectral abscissa needs the rightmost eigenvalues (which='LR'); layer {spectrum.layer}'s "
            f"spectrum holds which={spectrum.which!r} ({EIGENVALUE_ORDERS.get(spectrum.which, '?')})"
        )
    if spectrum.eigenvalues.size == 0:
        raise ValueError(f"layer {spectrum.layer}'s spectrum has no eigenvalues (k=0)")
    return float(spectrum.eigenvalues.real.max())


def region_overlay(spectra: Sequence[Spectrum], step: float) -> dict[str, np.ndarray]:
    """The points ``step * lambda`` per layer for ``plot_stability_region(overlay=...)``, labelled with the
    layer and its spectral abscissa; the spectra must hold the rightmost eigenvalues (``which="LR"``)."""
    return {
        f"layer {s.layer} (α = {spectral_abscissa(s):+.2f})": step * s.eigenvalues for s in spectra
    }
