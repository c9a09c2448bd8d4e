"""Linear stability functions ``R(z)`` of Runge-Kutta methods and their classical properties.

On the test equation ``y' = lambda y`` one step of a Runge-Kutta method with tableau ``(A, b, c)`` maps
``y`` to ``R(h lambda) y`` with

    R(z) = det(I - zA + z e b^T) / det(I - zA) = P(z) / Q(z).

A perturbation of the initial value is multiplied by ``|R(h lambda)|`` per step, which is why
``|R| <= 1`` (the stability region) decides whether a solver amplifies or damps input noise.
``R`` is derived symbolically (exact rationals for ``Fraction`` tableaux and for float tableaux whose
entries are short fractions); a numpy evaluator serves plots and large grids.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import sympy

from solvers import METHODS, ButcherTableau, Method

z = sympy.Symbol("z")
_y = sympy.Symbol("y", real=True)

MethodLike = str | Method | type[Method] | ButcherTableau

# Largest denominator tried when recognising a float tableau entry as a fraction (torchdiffeq stores
# dopri5/bosh3 coefficients such as 35/384 as floats; recognising them keeps R exact).
_MAX_DENOMINATOR = 10**6


def _to_sympy_number(value: Fraction | float | int) -> sympy.Expr:
    """An exact sympy Rational when ``value`` is (or rounds from) a short fraction, else a sympy Float."""
    if isinstance(value, (Fraction, int)):
        value = Fraction(value)
        return sympy.Rational(value.numerator, value.denominator)
    candidate = Fraction(float(value)).limit_denominator(_MAX_DENOMINATOR)
    if float(candidate) == float(value):
        return sympy.Rational(candidate.numerator, candidate.denominator)
    return sympy.Float(float(value), 17)


def _resolve(method: MethodLike) -> tuple[str, ButcherTableau]:
    """Name and tableau of a method given by registry name, Method class/instance or tableau."""
    if isinstance(method, ButcherTableau):
        return "tableau", method
    if isinstance(method, str):
        cls: type[Method] = METHODS.lookup(method)  # ValueError listing the valid names
        name = method
    elif isinstance(method, Method):
        cls, name = type(method), type(method).name or type(method).__name__
    elif isinstance(method, type) and issubclass(method, Method):
        cls, name = method, method.name or method.__name__
    else:
        raise TypeError(
            f"method must be a solver name, a solvers.Method or a ButcherTableau, got {type(method).__name__}"
        )
    if cls.tableau is None:
        with_tableau = [n for n, klass in METHODS.items() if klass.tableau is not None]
        raise ValueError(
            f"solver {name!r} has no Butcher tableau, so no Runge-Kutta stability function; "
            f"methods with one: {', '.join(with_tableau)}"
        )
    return name, cls.tableau


def _polynomials(tableau: ButcherTableau) -> tuple[sympy.Poly, sympy.Poly]:
    """Numerator ``P`` and denominator ``Q`` of ``R = P/Q`` as polynomials in ``z``."""
    s = tableau.stages
    A = sympy.Matrix(s, s, lambda i, j: _to_sympy_number(tableau.A[i][j]))
    b = sympy.Matrix(1, s, lambda _, j: _to_sympy_number(tableau.b[j]))
    e = sympy.ones(s, 1)
    if tableau.explicit:
        # A is nilpotent: R(z) = 1 + sum_k z^k b A^(k-1) e, no determinant of a polynomial matrix needed.
        coeffs = [sympy.Integer(1)]
        power = e
        for _ in range(s):
            coeffs.append((b * power)[0, 0])
            power = A * power
        return sympy.Poly(sum(c * z**k for k, c in enumerate(coeffs)), z), sympy.Poly(1, z)
    identity = sympy.eye(s)
    numerator = (identity - z * A + z * e * b).det(method="berkowitz")
    denominator = (identity - z * A).det(method="berkowitz")
    P, Q = sympy.Poly(sympy.expand(numerator), z), sympy.Poly(sympy.expand(denominator), z)
    common = sympy.gcd(P, Q)
    if common.degree() > 0:
        P, Q = sympy.div(P, common)[0], sympy.div(Q, common)[0]
    # Normalise Q(0) = 1 so the coefficients read like a Pade approximant of exp(z).
    q0 = Q.eval(0)
    return sympy.Poly(P.as_expr() / q0, z), sympy.Poly(Q.as_expr() / q0, z)


def _float_coeffs(poly: sympy.Poly) -> np.ndarray:
    """Coefficients in ascending order of degree, as float64."""
    return np.array([float(c) for c in reversed(poly.all_coeffs())], dtype=np.float64)


def _first_unstable(abs_r: Callable[[float], float], candidates: Iterable[float]) -> float:
    """Largest ``r`` with ``abs_r(x) <= 1`` on ``[0, r]`` given every point where ``abs_r`` may cross 1.

    Between two consecutive candidates ``abs_r - 1`` has a constant sign, so checking one interior point
    per interval decides it; spurious candidates only add intervals, they cannot change the answer.
    """
    previous = 0.0
    for point in sorted(c for c in candidates if c > 1e-12):
        if abs_r(0.5 * (previous + point)) > 1.0 + 1e-12:
            return previous
        previous = point
    return previous if abs_r(2.0 * previous + 1.0) > 1.0 + 1e-12 else math.inf


def _positive_real_roots(coeffs: np.ndarray) -> list[float]:
    """Positive real roots of a polynomial (ascending coefficients); near-real roots are kept as harmless
    extra candidates, since a double root computed in floating point may carry a tiny imaginary part."""
    coeffs = np.trim_zeros(coeffs, "b")
    if coeffs.size <= 1:
        return []
    roots = np.polynomial.polynomial.polyroots(coeffs)
    return [float(r.real) for r in roots if abs(r.imag) <= 1e-6 * max(1.0, abs(r)) and r.real > 0]


@dataclass(frozen=True)
class StabilityFunction:
    """``R(z) = P(z) / Q(z)`` of one Runge-Kutta method, with exact coefficients where possible."""

    name: str
    numerator: sympy.Poly
    denominator: sympy.Poly
    _p: np.ndarray = field(init=False, repr=False, compare=False)
    _q: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_p", _float_coeffs(self.numerator))
        object.__setattr__(self, "_q", _float_coeffs(self.denominator))

    @property
    def expr(self) -> sympy.Expr:
        """``R`` as a sympy rational expression in the symbol ``z``."""
        return self.numerator.as_expr() / self.denominator.as_expr()

    def formula(self) -> str:
        """``P(z)`` or ``(P(z)) / (Q(z))`` as text, coefficients in ascending powers of ``z``."""
        p, q = (sympy.sstr(poly.as_expr(), order="rev-lex") for poly in (self.numerator, self.denominator))
        return p if self.explicit else f"({p}) / ({q})"

    @property
    def exact(self) -> bool:
        """Whether every coefficient is an exact rational."""
        return all(c.is_Rational for poly in (self.numerator, self.denominator) for c in poly.all_coeffs())

    @property
    def explicit(self) -> bool:
        """A polynomial ``R`` (explicit method)."""
        return self.denominator.degree() == 0

    def __call__(self, values: np.ndarray | complex | float) -> np.ndarray:
        """Evaluate ``R`` on real or complex numbers (numpy, vectorised); poles give ``inf``."""
        values = np.asarray(values, dtype=np.complex128)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            p = np.polynomial.polynomial.polyval(values, self._p)
            q = np.polynomial.polynomial.polyval(values, self._q)
            return np.where(q == 0, np.inf, p / np.where(q == 0, 1, q))

    def abs(self, values: np.ndarray | complex | float) -> np.ndarray:
        """``|R|``, the per-step amplification of a perturbation along an eigenvector."""
        return np.abs(self(values))

    def real_interval(self) -> float:
        """Largest ``r`` with ``|R(x)| <= 1`` for all ``x`` in ``[-r, 0]`` (``inf`` if unbounded)."""
        # |R(-x)| = 1 where P(-x) = +-Q(-x); poles of R also bound sign-constant intervals.
        p_neg = self._p * (-1.0) ** np.arange(self._p.size)
        q_neg = self._q * (-1.0) ** np.arange(self._q.size)
        size = max(p_neg.size, q_neg.size)
        p_neg, q_neg = np.pad(p_neg, (0, size - p_neg.size)), np.pad(q_neg, (0, size - q_neg.size))
        candidates = _positive_real_roots(p_neg - q_neg) + _positive_real_roots(p_neg + q_neg)
        candidates += _positive_real_roots(q_neg)
        return _first_unstable(lambda x: float(self.abs(-x)), candidates)

    def e_polynomial(self) -> sympy.Poly:
        """``E(y) = |Q(iy)|^2 - |P(iy)|^2``: ``|R(iy)| <= 1`` exactly where ``E(y) >= 0``."""
        p = self.numerator.as_expr().subs(z, sympy.I * _y)
        q = self.denominator.as_expr().subs(z, sympy.I * _y)
        e = sympy.expand(q * sympy.conjugate(q) - p * sympy.conjugate(p))
        return sympy.Poly(sympy.expand(sympy.re(e)), _y)

    def imaginary_interval(self) -> float:
        """Largest ``r`` with ``|R(iy)| <= 1`` for all ``y`` in ``[-r, r]`` (``inf`` if unbounded)."""
        e = _float_coeffs(self.e_polynomial())
        candidates = _positive_real_roots(e) + _positive_real_roots(
            np.polynomial.polynomial.polymul(self._q, self._q)
        )
        return _first_unstable(lambda y: float(self.abs(1j * y)), candidates)

    def poles(self) -> np.ndarray:
        """Roots of ``Q`` (complex); empty for explicit methods."""
        q = np.trim_zeros(self._q, "b")
        return np.polynomial.polynomial.polyroots(q) if q.size > 1 else np.array([], dtype=np.complex128)

    def value_at_infinity(self) -> float:
        """``|lim R(z)|`` as ``|z| -> inf``: 0 if deg P < deg Q, ``inf`` if deg P > deg Q."""
        dp, dq = self.numerator.degree(), self.denominator.degree()
        if dp < dq:
            return 0.0
        if dp > dq:
            return math.inf
        return abs(float(self.numerator.LC() / self.denominator.LC()))

    def is_a_stable(self) -> bool:
        """A-stability: no poles in the closed left half plane and ``|R(iy)| <= 1`` for every real ``y``."""
        if self.numerator.degree() > self.denominator.degree():
            return False
        if self.denominator.degree() > 0 and not _roots_in_open_right_half_plane(self.denominator):
            return False
        return _nonnegative_on_real_line(self.e_polynomial())

    def is_l_stable(self) -> bool:
        """L-stability: A-stable and ``R(z) -> 0`` as ``z -> inf``."""
        return self.is_a_stable() and self.numerator.degree() < self.denominator.degree()

    def properties(self) -> dict[str, object]:
        """The classical properties in one record (for tables and JSON)."""
        return {
            "method": self.name,
            "R(z)": self.formula(),
            "exact": self.exact,
            "real_interval": self.real_interval(),
            "imaginary_interval": self.imaginary_interval(),
            "A_stable": self.is_a_stable(),
            "L_stable": self.is_l_stable(),
            "R_infinity": self.value_at_infinity(),
        }


def _roots_in_open_right_half_plane(poly: sympy.Poly) -> bool:
    """Whether every root of ``poly`` has positive real part (roots to 30 digits when exact)."""
    if all(c.is_Rational for c in poly.all_coeffs()):
        roots = [complex(r.evalf(30)) for r in poly.all_roots()]
        return all(r.real > 0 for r in roots)
    return bool(np.all(np.polynomial.polynomial.polyroots(_float_coeffs(poly)).real > 1e-12))


def _nonnegative_on_real_line(poly: sympy.Poly) -> bool:
    """Whether a real polynomial is ``>= 0`` for every real argument (exact when its coefficients are)."""
    if poly.is_zero:
        return True
    if poly.LC() < 0 or poly.degree() % 2 == 1:
        return False
    if all(c.is_Rational for c in poly.all_coeffs()):
        # Non-negative iff no real root of odd multiplicity (the leading coefficient is positive).
        _, factors = sympy.sqf_list(poly)
        return all(mult % 2 == 0 or factor.count_roots() == 0 for factor, mult in factors)
    coeffs = _float_coeffs(poly)
    tol = 1e-10 * np.max(np.abs(coeffs))
    roots = sorted(r.real for r in np.polynomial.polynomial.polyroots(coeffs) if abs(r.imag) < 1e-6)
    probes = [0.0] + roots + [0.5 * (a + b) for a, b in zip(roots, roots[1:])]
    probes += [roots[0] - 1.0, roots[-1] + 1.0] if roots else []
    return all(np.polynomial.polynomial.polyval(x, coeffs) >= -tol for x in probes)


def stability_function(method: MethodLike, name: str | None = None) -> StabilityFunction:
    """``R(z)`` of a registered Runge-Kutta solver (by name), a ``solvers.Method`` or a ``ButcherTableau``."""
    resolved_name, tableau = _resolve(method)
    P, Q = _polynomials(tableau)
    return StabilityFunction(name or resolved_name, P, Q)


def properties_table(methods: Sequence[MethodLike]) -> str:
    """A plain-text table of interval lengths and A/L-stability for several methods."""
    header = f"{'method':<18}{'real interval':>15}{'imag interval':>15}" + "".join(
        f"{title:>10}" for title in ("A-stable", "L-stable", "|R(inf)|")
    )
    lines = [header, "-" * len(header)]
    for method in methods:
        props = stability_function(method).properties()
        lines.append(
            f"{props['method']:<18}{props['real_interval']:>15.4f}{props['imaginary_interval']:>15.4f}"
            f"{props['A_stable']!s:>10}{props['L_stable']!s:>10}{props['R_infinity']:>10.3g}"
        )
    return "\n".join(lines)
