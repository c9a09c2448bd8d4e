"""White-box PGD on the ODE's initial value: the hidden state the first encoder layer receives.

The paper's argument is about perturbations of ``h_0`` (the output of the embeddings module) and how the
layers grow them, so the attack adds ``delta`` to ``h_0`` through a forward pre-hook on the first encoder
layer (``InitialValueHook``), the same point for BERT, RoBERTa, DistilBERT and every encoder
``ode_bert.find_layers`` supports. Only real tokens are perturbed (the attention mask), [CLS] and [SEP]
included.

Radii are relative to the example's own embedding: an L2 ball of radius ``r * ||h_0||`` (Frobenius norm over
the real tokens), an L-infinity ball of ``r * rms(h_0)`` (the root mean square entry of ``h_0`` over the real
tokens), so the L2 ball of radius ``r`` is the largest ball inside the L-infinity box of radius ``r``.

``pgd`` minimises the margin ``z_y - max_{j != y} z_j`` (untargeted) with ``steps`` projected steps of size
``2.5 * eps / steps`` (Madry et al. 2018), normalised gradient steps for L2 and sign steps for L-infinity,
from a random start drawn from a per-example seed, so an example gets the same attack whatever batch it is in.
An example counts as flipped at the first step where the target's prediction is wrong, as the target evaluates
without autograd. ``GradientSource``
decouples where the gradient comes from (the model itself, the model with ``grad="unroll"``, or another
model: transfer) from the model that is judged, the guard against gradient masking.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..field import hidden_argument_name, split_hidden
from ..layers import find_layers

NORMS = ("l2", "linf")
# (delta (rows, tokens, hidden) or None, the batch rows it is for or None: all) -> logits (rows, classes)
LogitsFn = Callable[[Tensor | None, Tensor | None], Tensor]


def check_norm(norm: str) -> str:
    """``norm`` if it is one of ``NORMS``, else a ``ValueError`` listing them."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")
    return norm


class InitialValueHook:
    """Adds ``delta`` to the hidden-state input of the first encoder layer and records that input (``h0``).

    Use as a context manager around forwards; ``delta=None`` leaves the model unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layer = find_layers(model)[0]
        self.delta: Tensor | None = None
        self.h0: Tensor | None = None
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        h, _, _ = split_hidden(module, args, kwargs)
        self.h0 = h
        if self.delta is None:
            return args, kwargs
        if self.delta.shape != h.shape:
            raise ValueError(
                f"perturbation of shape {tuple(self.delta.shape)} does not fit the first hidden "
                f"state of shape {tuple(h.shape)}"
            )
        perturbed = h + self.delta.to(h.dtype)
        if args:
            return (perturbed, *args[1:]), kwargs
        return args, {**kwargs, hidden_argument_name(module): perturbed}

    def __enter__(self) -> InitialValueHook:
        self._handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self.delta = None


def model_logits_fn(
    model: nn.Module, inputs: dict[str, Tensor], after_forward: Callable[[nn.Module], None] | None = None
) -> tuple[LogitsFn, Tensor]:
    """``(logits_fn, h0)`` for a sequence classifier on one batch: ``logits_fn(delta, rows)`` runs the model
    on the batch's ``rows`` (``None``: all) with ``delta`` added to their ``h0`` (the clean first hidden
    state, detached, returned for the whole batch). ``after_forward(model)`` is called after every forward
    (e.g. to tally implicit solves)."""
    hook = InitialValueHook(model)

    def logits(delta: Tensor | None, rows: Tensor | None = None) -> Tensor:
        batch = inputs if rows is None else {k: v[rows] for k, v in inputs.items()}
        with hook:
            hook.delta = delta
            out = model(**batch).logits
        if after_forward is not None:
            after_forward(model)
        return out

    with torch.no_grad():
        logits(None)
    assert hook.h0 is not None, "the first encoder layer did not run"
    return logits, hook.h0.detach()


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``z_y - max_{j != y} z_j`` per example: negative exactly when the prediction is wrong (ties aside)."""
    true = logits.gather(1, labels[:, None])[:, 0]
    others = logits.scatter(1, labels[:, None], float("-inf"))
    return true - others.max(dim=1).values


def reference_scale(h0: Tensor, mask: Tensor, norm: str) -> Tensor:
    """Per example, the size a relative radius multiplies: ``||h0||_F`` over real tokens (L2) or the root
    mean square entry of ``h0`` over real tokens (L-infinity)."""
    check_norm(norm)
    m = mask[:, :, None].to(h0.dtype)
    squares = (h0 * m).pow(2).flatten(1).sum(1)
    if norm == "l2":
        return squares.sqrt()
    entries = m.flatten(1).sum(1) * h0.shape[-1]
    return (squares / entries).sqrt()


def _project(delta: Tensor, eps: Tensor, mask: Tensor, norm: str) -> Tensor:
    """``delta`` on the real tokens, projected onto the ball of radius ``eps`` (per example)."""
    delta = delta * mask[:, :, None].to(delta.dtype)
    if norm == "linf":
        bound = eps[:, None, None].to(delta.dtype)
        return torch.maximum(torch.minimum(delta, bound), -bound)
    norms = delta.flatten(1).norm(dim=1)
    scale = torch.where(norms > eps, eps / norms.clamp_min(1e-30), torch.ones_like(norms))
    return delta * scale[:, None, None].to(delta.dtype)


def _step_direction(gradient: Tensor, norm: str) -> Tensor:
    """The steepest-ascent unit step for the norm: the sign (L-infinity) or the normalised gradient (L2);
    zero where the gradient is zero."""
    if norm == "linf":
        return gradient.sign()
    norms = gradient.flatten(1).norm(dim=1).clamp_min(1e-30)
    return gradient / norms[:, None, None]


def random_start(
    shape: Sequence[int],
    eps: Tensor,
    mask: Tensor,
    norm: str,
    seeds: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """A random point in each example's ball from its own seed (uniform per entry for L-infinity; a
    Gaussian direction at a uniform fraction of the radius for L2), so it does not depend on the batch."""
    rows = []
    for seed, radius in zip(seeds, eps.tolist()):
        generator = torch.Generator().manual_seed(int(seed))
        if norm == "linf":
            row = (2 * torch.rand(tuple(shape[1:]), generator=generator, dtype=torch.float64) - 1) * radius
        else:
            row = torch.randn(tuple(shape[1:]), generator=generator, dtype=torch.float64)
            fraction = float(torch.rand((), generator=generator, dtype=torch.float64))
            row = row * (fraction * radius / float(row.norm().clamp_min(1e-30)))
        rows.append(row)
    return _project(torch.stack(rows).to(device=device, dtype=dtype), eps.to(device), mask, norm)


@dataclass
class GradientSource:
    """Where PGD takes its gradient from. ``logits(delta)`` must be differentiable in ``delta``;
    ``judges_target``: its logits are the attacked model's own (white-box, or the same model with another
    gradient mode), so success is read from them and each flip they show is confirmed by one forward of the
    target without autograd (with autograd on, ``one_step`` and ``implicit`` layers return ``g(z*)``, one
    application of the map past the ``z*`` an evaluation returns: the logits differ by up to the solve's
    residual); otherwise (transfer) the target is queried each step."""

    name: str
    logits: LogitsFn
    judges_target: bool


@dataclass
class PGDResult:
    """Per example: whether some step flipped the target's prediction, the perturbation that did (zero where
    none did); and the example forwards and example gradients spent (one per example and step)."""

    flipped: Tensor
    delta: Tensor
    forwards: int
    gradients: int


def pgd(
    target: LogitsFn,
    source: GradientSource,
    shape: Sequence[int],
    mask: Tensor,
    labels: Tensor,
    eps: Tensor,
    norm: str,
    steps: int,
    seeds: Sequence[int] | None = None,
    active: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> PGDResult:
    """Projected gradient descent on the margin of ``labels`` inside each example's ball of radius ``eps``,
    from zero, or from a random point drawn from each example's seed in ``seeds``.

    ``active`` (default: all) marks the examples to attack; the others are left alone and not flipped.
    Flipped examples stop moving (their perturbation is kept). ``eps == 0`` leaves an example unperturbed.
    """
    check_norm(norm)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    device = labels.device
    eps = eps.to(device=device, dtype=torch.float64)
    active = torch.ones_like(labels, dtype=torch.bool) if active is None else active.to(device)
    if seeds is None:
        delta = torch.zeros(tuple(shape), dtype=dtype, device=device)
    else:
        delta = random_start(shape, eps, mask, norm, seeds, dtype, device) * active[:, None, None].to(dtype)
    alpha = (2.5 * eps / steps).to(dtype)
    flipped = torch.zeros_like(active)
    best = torch.zeros_like(delta)
    forwards = gradients = 0
    for step in range(steps + 1):
        rows = torch.nonzero(active & ~flipped).flatten()  # only the examples still moving are run
        if not len(rows):
            break
        need_gradient = step < steps
        current = delta[rows].detach().requires_grad_(need_gradient)
        with torch.set_grad_enabled(need_gradient):
            source_margin = margin(source.logits(current, rows), labels[rows])
        forwards += len(rows)
        if source.judges_target:  # a flip it sees is confirmed on the target's evaluation (below)
            candidates = source_margin.detach() < 0
            newly = torch.zeros_like(candidates)
            if bool(candidates.any()):
                with torch.no_grad():
                    confirmed = target(current.detach()[candidates], rows[candidates])
                newly[candidates] = margin(confirmed, labels[rows[candidates]]) < 0
                forwards += int(candidates.sum())
        else:
            with torch.no_grad():
                newly = margin(target(current.detach(), rows), labels[rows]) < 0
        best[rows[newly]] = current.detach()[newly]
        flipped[rows[newly]] = True
        if not need_gradient or bool(newly.all()):
            break
        gradient = None
        if source_margin.requires_grad:
            (gradient,) = torch.autograd.grad(source_margin[~newly].sum(), current, allow_unused=True)
        gradients += len(rows)
        if gradient is None:  # the source's output does not depend on the perturbation through autograd
            gradient = torch.zeros_like(current)
        moved = current.detach() - alpha[rows, None, None] * _step_direction(gradient, norm)
        moved = _project(moved, eps[rows], mask[rows], norm)
        delta[rows[~newly]] = moved[~newly]
    return PGDResult(flipped, best, forwards, gradients)


def combined_attack(
    target: LogitsFn,
    sources: Sequence[GradientSource],
    shape: Sequence[int],
    mask: Tensor,
    labels: Tensor,
    eps: Tensor,
    norm: str,
    steps: int,
    seeds: Sequence[Sequence[int]] = (),
    active: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, list[str | None], int, int]:
    """The strongest of several gradient sources per example: each source attacks the examples no earlier
    one flipped, from zero and then from one random start per entry of ``seeds`` (per-example seeds).
    Returns (flipped, the name of the source that flipped each example or ``None``, target forwards,
    gradient evaluations)."""
    if not sources:
        raise ValueError("give at least one gradient source")
    remaining = torch.ones_like(labels, dtype=torch.bool) if active is None else active.clone()
    by = [None] * len(labels)
    forwards = gradients = 0
    for source in sources:
        for start in [None, *seeds]:
            if not bool(remaining.any()):
                break
            result = pgd(target, source, shape, mask, labels, eps, norm, steps, start, remaining, dtype)
            forwards += result.forwards
            gradients += result.gradients
            for i in torch.nonzero(result.flipped).flatten().tolist():
                by[i] = source.name
            remaining = remaining & ~result.flipped
    flipped = torch.tensor([name is not None for name in by], device=labels.device)
    return flipped, by, forwards, gradients


# (relative radius per example, examples to attack, salt of the seeds) -> per example: the name of the
# source that flipped it, or None
RadiusAttack = Callable[[Tensor, Tensor, int], list[str | None]]


@dataclass
class RadiusSearch:
    """Per example: who flipped it at each grid radius, and the bracket ``(low, high]`` of the smallest
    flipping radius after bisection (``high`` ``None``: not flipped at the largest grid radius)."""

    flipped_by: list[list[str | None]]
    low: list[float]
    high: list[float | None]


def radius_search(attack: RadiusAttack, grid: Sequence[float], active: Tensor, bisect: int) -> RadiusSearch:
    """``attack`` at every radius of ``grid``, then ``bisect`` bisection steps per example between the largest
    grid radius it resisted and the smallest that flipped it; ``high`` ends as the smallest radius found to
    flip it (an upper bound of the true minimal radius, tight as far as the attack is optimal)."""
    n = len(active)
    device = active.device
    by_radius = []
    for k, radius in enumerate(grid):
        by_radius.append(
            attack(torch.full((n,), float(radius), dtype=torch.float64, device=device), active.clone(), k)
        )
    low: list[float] = []
    high: list[float | None] = []
    for j in range(n):
        first = next((r for r, by in zip(grid, by_radius) if by[j] is not None), None)
        high.append(first if bool(active[j]) else None)
        low.append(max((r for r in grid if first is not None and r < first), default=0.0))
    bracketed = torch.tensor([h is not None for h in high], device=device)
    for step in range(bisect if bool(bracketed.any()) else 0):
        mid = [(lo + hi) / 2 if hi is not None else 0.0 for lo, hi in zip(low, high)]
        by = attack(torch.tensor(mid, dtype=torch.float64, device=device), bracketed, 1000 + step)
        for j in range(n):
            if bool(bracketed[j]):
                if by[j] is not None:
                    high[j] = mid[j]
                else:
                    low[j] = mid[j]
    per_example = [[by[j] for by in by_radius] for j in range(n)]
    return RadiusSearch(per_example, low, high)


@contextlib.contextmanager
def gradient_mode(model: nn.Module, grad: str) -> Iterator[nn.Module]:
    """``model`` with its implicit layers' gradient mode set to ``grad`` for the block, then restored."""
    from ..convert import convert, ode_config
    from ..settings import ODESettings

    stored = ode_config(model)
    if stored is None:
        raise ValueError("gradient_mode needs a converted model (ode_bert.convert); this one is stock")
    settings = ODESettings.from_dict(stored)
    convert(model, dataclasses.replace(settings, grad=grad))
    try:
        yield model
    finally:
        convert(model, settings)


def is_implicit(model: nn.Module) -> bool:
    """Whether ``model`` is converted with an implicit step method (one with a root solve and a grad mode)."""
    from ..convert import ode_config
    from ..settings import ODESettings

    stored = ode_config(model)
    return stored is not None and ODESettings.from_dict(stored).make_method().implicit


def grad_mode_of(model: nn.Module) -> str | None:
    """The gradient mode the implicit layers of ``model`` use (``None``: explicit or stock)."""
    from ..convert import ode_config
    from ..settings import ODESettings

    if not is_implicit(model):
        return None
    method = ODESettings.from_dict(ode_config(model)).make_method()
    return getattr(method, "grad", None)
