"""How much a solver amplifies a perturbation of the initial value, layer by layer.

For a perturbed input the hidden states of a converted encoder follow a second trajectory ``h'_l``;
the growth curve ``||h'_l - h_l|| / ||h'_0 - h_0||`` (norms over one sequence's real tokens) is the
discrete analogue of ``|R(h lambda)|^l``. Three kinds of perturbation of the input embedding are
supported: random noise (``"noise"``), the direction that gradient ascent finds to change the last hidden
state most (``"worst"``, a PGD attack on the embedding sphere), and real word substitutions from AdvGLUE
(``"advglue"``, clean/adversarial pairs of ``dev_ann.json``).

``linear_field_growth`` checks the same measurement on ``f(h) = M h`` with known eigenvalues, where the
per-step growth along an eigenvector must equal ``|R(dt * lambda)|``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from torch import Tensor, nn

import solvers
from solvers import Method, VectorField

PERTURBATIONS = ("noise", "worst", "advglue")
# A relative root residual above this marks an implicit solve that did not converge: its growth curve then
# measures the root finder's stopping point as much as the solver's stability, and the plot says so.
UNCONVERGED_RESIDUAL = 1e-3


# --------------------------------------------------------------------------------------------------
# Any vector field: growth of a perturbation under repeated steps
# --------------------------------------------------------------------------------------------------


def _method(method: str | Method) -> Method:
    return solvers.get(method) if isinstance(method, str) else method


def step_growth(
    method: str | Method, field: VectorField, y: Tensor, perturbation: Tensor, dt: float = 1.0, steps: int = 1
) -> np.ndarray:
    """``||y'_n - y_n|| / ||y'_0 - y_0||`` for ``n = 0..steps`` with ``y'_0 = y_0 + perturbation``."""
    method = _method(method)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    clean, perturbed = y, y + perturbation
    initial = float(torch.linalg.vector_norm(perturbation))
    if initial == 0.0:
        raise ValueError("the perturbation must be non-zero")
    ratios = [1.0]
    for n in range(steps):
        clean = method.step(field, n * dt, clean, dt)[0]
        perturbed = method.step(field, n * dt, perturbed, dt)[0]
        ratios.append(float(torch.linalg.vector_norm(perturbed - clean)) / initial)
    return np.array(ratios)


def block_matrix(eigenvalues: Sequence[complex], seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """A real matrix ``M = U B U^T`` with the given eigenvalues and, per eigenvalue, its invariant subspace.

    ``B`` is block diagonal: a 1x1 block ``[lambda]`` for a real eigenvalue and a 2x2 block
    ``[[a, -b], [b, a]]`` (eigenvalues ``a +- ib``) for a complex one; ``U`` is a random orthogonal matrix.
    On each block ``M`` acts as a scaled rotation, so every vector of that block's subspace (the returned
    ``n x d`` orthonormal bases) grows by exactly ``|R(dt * lambda)|`` per step of a Runge-Kutta method.
    """
    blocks: list[Tensor] = []
    for value in eigenvalues:
        value = complex(value)
        if value.imag == 0:
            blocks.append(torch.tensor([[value.real]], dtype=torch.float64))
        else:
            a, b = value.real, abs(value.imag)
            blocks.append(torch.tensor([[a, -b], [b, a]], dtype=torch.float64))
    B = torch.block_diag(*blocks)
    generator = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(B.shape[0], B.shape[0], generator=generator, dtype=torch.float64))
    bases, start = [], 0
    for block in blocks:
        bases.append(U[:, start : start + block.shape[0]])
        start += block.shape[0]
    return U @ B @ U.T, bases


def linear_field_growth(
    method: str | Method, eigenvalues: Sequence[complex], dt: float = 1.0, steps: int = 3, seed: int = 0
) -> np.ndarray:
    """Measured per-step growth (geometric mean over ``steps``) of a perturbation along each eigenvalue's
    invariant subspace of ``f(h) = M h``; equals ``|R(dt * lambda)|`` for a Runge-Kutta method."""
    M, bases = block_matrix(eigenvalues, seed)

    def field(t: Tensor | float, y: Tensor) -> Tensor:
        return y @ M.T

    generator = torch.Generator().manual_seed(seed + 1)
    y = torch.randn(1, M.shape[0], generator=generator, dtype=torch.float64)
    growth = []
    for basis in bases:
        direction = basis @ torch.randn(basis.shape[1], generator=generator, dtype=torch.float64)
        ratios = step_growth(method, field, y, 1e-3 * direction[None], dt=dt, steps=steps)
        growth.append(ratios[-1] ** (1.0 / steps))
    return np.array(growth)


# --------------------------------------------------------------------------------------------------
# Encoders: growth curves over the layers
# --------------------------------------------------------------------------------------------------


@dataclass
class GrowthCurve:
    """Per-sequence ratios ``||h'_l - h_l|| / ||h'_0 - h_0||`` (shape ``batch x (layers + 1)``).

    The ratios of a few sequences can differ by orders of magnitude, so the mean is carried by the largest;
    ``median`` and ``quantile`` describe the typical sequence (the plot draws them, or every sequence).
    """

    solver: str
    perturbation: str
    ratios: np.ndarray
    # implicit solvers: worst relative root residual over every forward made for this curve (``forwards``)
    max_residual: float | None = None
    forwards: int = 0

    @property
    def mean(self) -> np.ndarray:
        return self.ratios.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        return self.ratios.std(axis=0)

    @property
    def median(self) -> np.ndarray:
        return np.median(self.ratios, axis=0)

    def quantile(self, q: float) -> np.ndarray:
        """The ``q`` quantile over sequences, per layer."""
        return np.quantile(self.ratios, q, axis=0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "solver": self.solver,
            "perturbation": self.perturbation,
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "median": self.median.tolist(),
            "per_sequence": self.ratios.tolist(),
            "max_residual": self.max_residual,
            "forwards": self.forwards,
        }


def hidden_trajectory(model: nn.Module, attention_mask: Tensor, **inputs: Tensor) -> Tensor:
    """All hidden states ``(layers + 1, batch, tokens, hidden)`` of one forward pass (embeddings first)."""
    outputs = model(attention_mask=attention_mask, output_hidden_states=True, **inputs)
    return torch.stack(tuple(outputs.hidden_states))


def masked_norms(difference: Tensor, attention_mask: Tensor) -> Tensor:
    """Norm over the real tokens (and hidden units) of each sequence, per layer: ``(layers + 1, batch)``."""
    mask = attention_mask.to(difference.dtype)[None, :, :, None]
    return torch.linalg.vector_norm((difference * mask).flatten(start_dim=2), dim=2)


def layer_ratios(clean: Tensor, perturbed: Tensor, attention_mask: Tensor) -> np.ndarray:
    """``||h'_l - h_l|| / ||h'_0 - h_0||`` per sequence and layer, shape ``(batch, layers + 1)``."""
    norms = masked_norms(perturbed - clean, attention_mask)
    if bool((norms[0] == 0).any()):
        raise ValueError("a perturbation leaves the embedding output h_0 of some sequence unchanged")
    return (norms / norms[:1]).T.detach().double().cpu().numpy()


def _sphere_radius(attention_mask: Tensor, eps: float) -> Tensor:
    """Per-sequence norm ``eps * sqrt(real tokens)``: an RMS per-token perturbation norm of ``eps``."""
    return eps * attention_mask.sum(dim=1).double().sqrt()


def _project(delta: Tensor, attention_mask: Tensor, radius: Tensor) -> Tensor:
    """Zero ``delta`` on padding and rescale each sequence's part to norm ``radius``."""
    delta = delta * attention_mask[:, :, None].to(delta.dtype)
    norms = torch.linalg.vector_norm(delta.flatten(start_dim=1), dim=1).clamp_min(1e-30)
    return delta * (radius.to(delta.dtype) / norms)[:, None, None]


def random_embedding_noise(embeds: Tensor, attention_mask: Tensor, eps: float, seed: int = 0) -> Tensor:
    """Gaussian noise on the real tokens' input embeddings with RMS per-token norm ``eps``."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(embeds.shape, generator=generator, dtype=torch.float64).to(embeds)
    return _project(noise, attention_mask, _sphere_radius(attention_mask, eps))


def worst_embedding_perturbation(
    model: nn.Module, embeds: Tensor, attention_mask: Tensor, eps: float, steps: int = 5,
    step_size: float = 0.5, seed: int = 0,
) -> Tensor:
    """Gradient ascent on the embedding sphere of RMS per-token norm ``eps`` (PGD with normalised
    steps) maximising ``||h'_L - h_L||``, the change of the last hidden state, for every sequence."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    radius = _sphere_radius(attention_mask, eps)
    with torch.no_grad():
        target = hidden_trajectory(model, attention_mask, inputs_embeds=embeds)[-1]
    delta = random_embedding_noise(embeds, attention_mask, eps, seed)
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        last = hidden_trajectory(model, attention_mask, inputs_embeds=embeds + delta)[-1]
        loss = masked_norms((last - target)[None], attention_mask).pow(2).sum()
        (gradient,) = torch.autograd.grad(loss, delta)
        gradient = _project(gradient, attention_mask, radius)
        delta = _project(delta.detach() + step_size * gradient, attention_mask, radius)
    return delta.detach()


def _convert(model: nn.Module, solver: str, step: float, field: str, options: Mapping[str, Any]) -> nn.Module:
    """A converted deep copy of ``model`` (the caller's model is left as it is)."""
    from ode_bert import convert

    return convert(copy.deepcopy(model), solver=solver, step=step, field=field, **dict(options))


class ResidualTracker:
    """The worst relative root residual over every forward of a converted model while attached.

    ``solver_stats`` describes only the last forward; a growth curve takes several (clean and perturbed
    inputs, and the attack's steps for ``"worst"``), and a solve that stopped short in any of them bears on
    the curve. A forward hook reads ``solver_stats`` after each forward. ``max_residual`` is ``None`` when
    no converted layer reported a residual (explicit solvers).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.max_residual: float | None = None
        self.forwards = 0
        self._handle = model.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        from ode_bert import solver_stats

        self.forwards += 1
        residuals = [s.residual for s in solver_stats(self.model) if s.residual is not None]
        if residuals:
            self.max_residual = max(residuals + [self.max_residual or 0.0])

    def detach(self) -> None:
        """Stop recording (remove the hook)."""
        self._handle.remove()


Text = str | tuple[str, str]


def _model_inputs(tokenizer: Any, texts: Sequence[Text], max_length: int) -> dict[str, Tensor]:
    """Padded, truncated model inputs of single sentences or sentence pairs."""
    pairs = [t if isinstance(t, tuple) else (t,) for t in texts]
    columns = list(zip(*pairs))
    return tokenizer(*columns, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def perturbation_growth(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[Text] | None = None,
    solver_names: Sequence[str] = ("euler", "implicit_euler"),
    perturbation: str = "noise",
    eps: float = 0.01,
    max_length: int = 32,
    attack_steps: int = 5,
    seed: int = 0,
    step: float = 1.0,
    field: str = "residual",
    convert_options: Mapping[str, Mapping[str, Any]] | None = None,
    advglue_task: str = "sst2",
    max_pairs: int = 8,
    data_dir: str | os.PathLike[str] | None = None,
) -> dict[str, GrowthCurve]:
    """Growth curves per solver for one kind of perturbation (``"noise"``, ``"worst"``, ``"advglue"``).

    Each solver converts a deep copy of ``model``: ``ode_bert.convert(copy, solver, step=step,
    field=field, **convert_options[solver])`` (``euler`` with step 1 and the residual field is the stock
    model). ``texts`` are the clean sentences (or pairs) for noise/worst; ``advglue`` instead reads up to
    ``max_pairs`` clean/adversarial pairs of ``advglue_task``. ``eps`` is the RMS per-token norm of the
    embedding perturbation.
    """
    if perturbation not in PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {', '.join(PERTURBATIONS)}, got {perturbation!r}")
    if not solver_names:
        raise ValueError("give at least one solver name")
    unknown = [name for name in solver_names if name not in solvers.available()]
    if unknown:
        valid = ", ".join(solvers.available())
        raise ValueError(f"unknown solver(s) {', '.join(unknown)}; available: {valid}")
    convert_options = dict(convert_options or {})
    if perturbation == "advglue":
        clean, adversarial = tokenized_advglue_pairs(tokenizer, advglue_task, max_pairs, max_length, data_dir)
    elif not texts:
        raise ValueError(f"perturbation {perturbation!r} needs clean input texts")
    else:
        clean = _model_inputs(tokenizer, texts, max_length)
    mask = clean["attention_mask"]
    curves: dict[str, GrowthCurve] = {}
    for name in solver_names:
        converted = _convert(model, name, step, field, convert_options.get(name, {})).eval()
        tracker = ResidualTracker(converted)
        if perturbation == "advglue":
            with torch.no_grad():
                reference = hidden_trajectory(converted, mask, input_ids=clean["input_ids"])
                perturbed = hidden_trajectory(converted, mask, input_ids=adversarial["input_ids"])
        else:
            embeds = converted.get_input_embeddings()(clean["input_ids"]).detach()
            if perturbation == "noise":
                delta = random_embedding_noise(embeds, mask, eps, seed)
            else:
                delta = worst_embedding_perturbation(converted, embeds, mask, eps, attack_steps, seed=seed)
            with torch.no_grad():
                reference = hidden_trajectory(converted, mask, inputs_embeds=embeds)
                perturbed = hidden_trajectory(converted, mask, inputs_embeds=embeds + delta)
        tracker.detach()
        ratios = layer_ratios(reference, perturbed, mask)
        curves[name] = GrowthCurve(name, perturbation, ratios, tracker.max_residual, tracker.forwards)
    return curves


# --------------------------------------------------------------------------------------------------
# A fine-tuned model as it is: worst-direction growth from the initial value h_0 to the last layer
# --------------------------------------------------------------------------------------------------


# A relative difference above this between the measured forward (``unroll``, math attention) and the
# model's own evaluation means the measurement differentiates another map than the one evaluated: warned.
FORWARD_MISMATCH = 1e-4


@dataclass
class InitialValueGrowth:
    """Per sequence: the worst-direction growth ``max ||dh_L|| / ||dh_0||`` of an infinitesimal perturbation
    ``dh_0`` of the first encoder layer's input (the largest singular value of ``J = dh_L / dh_0`` over the
    real tokens), the norms of ``h_0`` and ``h_L`` over the real tokens, and whether the power iteration met
    its tolerance; for the batch, the iterations, the worst relative root residual of the implicit solves
    (``None``: explicit or stock) and the largest relative difference between the measured forward and the
    model's own evaluation (``forward_mismatch``)."""

    growth: np.ndarray
    h0_norm: np.ndarray
    hL_norm: np.ndarray
    converged: np.ndarray
    iterations: int
    max_residual: float | None
    forward_mismatch: float

    @property
    def relative_growth(self) -> np.ndarray:
        """``(||dh_L|| / ||h_L||) / (||dh_0|| / ||h_0||)``: growth relative to the states."""
        return self.growth * self.h0_norm / self.hL_norm


def _sequence_norms(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.flatten(start_dim=1), dim=1)


def initial_value_growth(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    tol: float = 1e-3,
    max_iterations: int = 100,
    seed: int = 0,
) -> InitialValueGrowth:
    """Worst-direction growth from ``h_0`` (the hidden state the first encoder layer receives, where
    ``ode_bert.attack``'s PGD perturbs) to the last layer's output, per sequence of ``inputs``.

    Unlike ``perturbation_growth``, which converts deep copies by solver name, this measures ``model``
    itself, e.g. a fine-tuned run loaded with ``ode_bert.from_pretrained``: its own connection and solver
    settings. Two things are set for the measurement only and restored: implicit layers backpropagate with
    ``grad="unroll"`` (the derivative of the map the model computes, root-finder iterations included;
    ``one_step`` approximates it and ``implicit`` takes it at the exact fixed point), and attention runs on
    PyTorch's math kernel (the fused CPU kernel has no second derivative). The measured forward is compared
    with the model's own evaluation (``forward_mismatch``; warned above ``FORWARD_MISMATCH``).

    Power iteration on ``J^T J``, batched (``J`` is block diagonal over sequences): ``J v`` by the
    double-backward trick (``J^T u`` is linear in ``u``; its derivative in ``u`` along ``v`` is ``J v``),
    ``J^T (J v)`` by one backward, from a random start drawn from ``seed``; it stops when every sequence's
    estimate ``||J v||`` (``||v|| = 1``) changed by at most ``tol`` relative in one iteration, or after
    ``max_iterations`` (``converged`` says which met the tolerance).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ode_bert.attack.embedding import InitialValueHook, gradient_mode, is_implicit

    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    hook = InitialValueHook(model)

    def last_hidden(delta: Tensor | None) -> Tensor:
        with hook:
            hook.delta = delta
            return model(**inputs, output_hidden_states=True).hidden_states[-1]

    tracker = ResidualTracker(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", solvers.ConvergenceWarning)  # reported as max_residual instead
            with torch.no_grad():
                evaluated = last_hidden(None)
            assert hook.h0 is not None, "the first encoder layer did not run"
            h0 = hook.h0.detach()
            real = inputs["attention_mask"][:, :, None].to(h0.dtype)
            exact = gradient_mode(model, "unroll") if is_implicit(model) else contextlib.nullcontext()
            with exact, sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
                delta = torch.zeros_like(h0, requires_grad=True)
                last = last_hidden(delta) * real
                reference = evaluated * real
                mismatch = _sequence_norms(last.detach() - reference) / _sequence_norms(reference)
                generator = torch.Generator().manual_seed(seed)
                v = torch.randn(h0.shape, generator=generator, dtype=torch.float64).to(h0) * real
                v = v / _sequence_norms(v)[:, None, None]
                previous = None
                iterations = 0
                while iterations < max_iterations:
                    iterations += 1
                    u = torch.zeros_like(last, requires_grad=True)
                    (transposed,) = torch.autograd.grad(last, delta, u, create_graph=True)
                    (jv,) = torch.autograd.grad(transposed, u, v)
                    sigma = _sequence_norms(jv).detach()
                    (back,) = torch.autograd.grad(last, delta, jv, retain_graph=True)
                    back = back * real
                    v = back / _sequence_norms(back).clamp_min(1e-30)[:, None, None]
                    converged = (
                        torch.zeros_like(sigma, dtype=torch.bool)
                        if previous is None
                        else (sigma - previous).abs() <= tol * sigma
                    )
                    if bool(converged.all()):
                        break
                    previous = sigma
    finally:
        tracker.detach()
    worst = float(mismatch.max())
    if worst > FORWARD_MISMATCH:
        warnings.warn(
            f"the measured forward differs from the model's own evaluation by up to {worst:.2g} relative "
            f"(> {FORWARD_MISMATCH:g}; e.g. an implicit solve stopping after another iteration count): the "
            "growth is that of a slightly different map",
            stacklevel=2,
        )
    return InitialValueGrowth(
        growth=sigma.double().cpu().numpy(),
        h0_norm=_sequence_norms(h0 * real).double().cpu().numpy(),
        hL_norm=_sequence_norms(evaluated * real).double().cpu().numpy(),
        converged=converged.cpu().numpy(),
        iterations=iterations,
        max_residual=tracker.max_residual,
        forward_mismatch=worst,
    )


# --------------------------------------------------------------------------------------------------
# AdvGLUE clean/adversarial pairs
# --------------------------------------------------------------------------------------------------


ADVGLUE_FIELDS = {
    "sst2": ("sentence",),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "mnli-mm": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
}


def advglue_pairs(task: str = "sst2", data_dir: str | os.PathLike[str] | None = None
                  ) -> list[tuple[Text, Text]]:
    """(clean, adversarial) texts of the AdvGLUE items that perturb a GLUE original (``dev_ann.json``).

    Human-written items have no ``original_<field>`` and are skipped. Pair tasks give tuples.
    """
    from ode_bert.data import DataError, resolve_data_dir

    if task not in ADVGLUE_FIELDS:
        raise ValueError(f"unknown AdvGLUE task {task!r}; valid tasks: {', '.join(ADVGLUE_FIELDS)}")
    path = resolve_data_dir(data_dir) / "advglue" / "dev_ann.json"
    if not path.is_file():
        raise DataError(f"missing data file {path} (the annotated AdvGLUE dev set with original_* fields)")
    with path.open(encoding="utf-8") as f:
        items = json.load(f)[task]
    fields = ADVGLUE_FIELDS[task]
    pairs = []
    for item in items:
        if not any(f"original_{name}" in item for name in fields):
            continue
        clean = tuple(item.get(f"original_{name}", item[name]).strip() for name in fields)
        adversarial = tuple(item[name].strip() for name in fields)
        pairs.append((clean[0], adversarial[0]) if len(fields) == 1 else (clean, adversarial))
    return pairs


def tokenized_advglue_pairs(
    tokenizer: Any, task: str = "sst2", max_pairs: int = 8, max_length: int = 32,
    data_dir: str | os.PathLike[str] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Clean and adversarial model inputs of up to ``max_pairs`` token-substitution pairs.

    Only pairs whose tokenisations have equal length (and differ within ``max_length`` tokens) are kept,
    so the two trajectories can be compared token by token under one attention mask.
    """
    kept_clean, kept_adversarial = [], []
    for clean, adversarial in advglue_pairs(task, data_dir):
        a, b = (_model_inputs(tokenizer, [text], max_length)["input_ids"][0] for text in (clean, adversarial))
        if a.shape == b.shape and bool((a != b).any()):
            kept_clean.append(clean)
            kept_adversarial.append(adversarial)
        if len(kept_clean) == max_pairs:
            break
    if not kept_clean:
        raise ValueError(f"no AdvGLUE {task} pair has equal-length tokenisations within {max_length} tokens")
    return (_model_inputs(tokenizer, kept_clean, max_length),
            _model_inputs(tokenizer, kept_adversarial, max_length))


# --------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------


# Up to this many sequences the plot draws each one; above it, the median and a quantile band.
MAX_LINES = 12
BAND = (0.1, 0.9)


def plot_growth(curves: Mapping[str, GrowthCurve] | Sequence[GrowthCurve], ax: Axes | None = None,
                log: bool = True, max_lines: int = MAX_LINES) -> Axes:
    """Growth vs depth per solver: the median over sequences (thick) with every sequence's curve (thin) when
    there are at most ``max_lines`` sequences, else the 10-90% quantile band.

    Not mean +- std: on a log axis the lower band would go negative (and be clipped), and one sequence can
    carry the mean. The legend gives, for implicit solvers that stopped short of convergence, the worst root
    residual over every forward the curve took.
    """
    curves = list(curves.values()) if isinstance(curves, Mapping) else list(curves)
    if not curves:
        raise ValueError("give at least one growth curve")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4))
    sequences = curves[0].ratios.shape[0]
    for curve in curves:
        layers = np.arange(curve.ratios.shape[1])
        label = curve.solver
        if curve.max_residual is not None and curve.max_residual > UNCONVERGED_RESIDUAL:
            label += f" (root residual up to {curve.max_residual:.2g} over {curve.forwards} forwards)"
        (line,) = ax.plot(layers, curve.median, marker="o", linewidth=2, label=label)
        if curve.ratios.shape[0] <= max_lines:
            for row in curve.ratios:
                ax.plot(layers, row, color=line.get_color(), linewidth=0.7, alpha=0.45)
        else:
            ax.fill_between(layers, curve.quantile(BAND[0]), curve.quantile(BAND[1]), color=line.get_color(),
                            alpha=0.2)
    if log:
        ax.set_yscale("log")
    ax.axhline(1.0, color="0.5", linewidth=0.6, linestyle="--")
    ax.set_xlabel("layer l")
    ax.set_ylabel("||h'_l - h_l|| / ||h'_0 - h_0||")
    spread = ("thin: each sequence" if sequences <= max_lines
              else f"band: {BAND[0]:.0%}-{BAND[1]:.0%} of sequences")
    ax.set_title(f"perturbation growth ({curves[0].perturbation}, {sequences} sequences)\n"
                 f"thick: median, {spread}", fontsize="medium")
    ax.legend(fontsize="small")
    return ax
