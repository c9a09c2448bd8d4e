"""Turn the layers of a loaded Hugging Face encoder into steps of an ODE solver, in place.

``convert`` replaces the instance ``forward`` of each selected encoder layer by an ``ODEConnection``:
the layer's module hooks (e.g. transformers' ``output_hidden_states`` recording) then see the ODE step's
output, every extra argument the encoder passes (attention mask, cache, ...) reaches each evaluation of
the layer unchanged, and no parameter or buffer is added, so ``state_dict()`` and checkpoints stay stock.
The configuration is stored in ``model.config.ode_bert`` and survives ``save_pretrained``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import solvers
from solvers import (
    METHODS,
    ConvergenceError,
    ConvergenceWarning,
    Method,
    RootInfo,
    StepInfo,
    all_finite,
    option_names,
    suggest,
)

from .field import LayerField, cache_argument, check_framing, real_token_mask, split_hidden, stock_forward

CONFIG_KEY = "ode_bert"
# The stored configuration (``model.config.ode_bert``, saved in config.json) is versioned. Version 1 is every
# configuration saved before the "version" key existed: it has always had exactly ``CONFIG_KEYS_V1``, and
# loading requires all of them. Version 2 adds the "version" key. A key introduced in a later version goes
# into ``CONFIG_ADDED_KEYS`` with the version that introduced it and the default that reproduces what older
# versions did: a configuration older than that version loads with the default and a warning; a newer one
# must have the key. Unknown keys are an error (see ``check_stored_config``).
CONFIG_VERSION = 2
CONFIG_KEYS_V1: tuple[str, ...] = (
    "solver", "layers", "step", "field", "root", "grad", "tol", "max_iter", "solver_options"
)
CONFIG_ADDED_KEYS: dict[str, tuple[int, Any]] = {}  # key -> (version that added it, default for older ones)
IMPLICIT_ONLY_OPTIONS: tuple[str, ...] = ("root", "grad", "tol", "max_iter")
ON_FAILURE_CHOICES: tuple[str, ...] = ("warn", "raise", "ignore")
SUPPORTED_ENCODERS = (
    "BERT-style encoders with an nn.ModuleList of transformer blocks, e.g. BERT/MiniLM (encoder.layer), "
    "RoBERTa, ELECTRA, DistilBERT (transformer.layer)"
)

# IM-BERT / EX-BERT defaults, chosen on held-out training data (RESULTS.md, "Choosing the IM-connection"):
# among residual/step 1, residual/step 0.5 and layer/step 0.25, fine-tuned IM-MiniLM scored best on a
# held-out part of its SST-2 training subset with field="residual", step 0.5, where the implicit equation
# z = (h + 0.5 Layer(z)) / 1.5 is also cheap to solve (a median of 9 Anderson evaluations per MiniLM layer
# to relative residual 1e-4, BENCHMARKS.md); the tolerance and iteration cap match that. The later search over
# layers and iteration caps (upper half, max_iter 10) did not separate from these on held-out data, so they
# stay. EX-BERT uses the same field and step, so the two differ only in the explicit vs implicit connection.
IM_BERT_LAYERS: str = "all"
IM_BERT_STEP: float = 0.5
IM_BERT_FIELD: str = "residual"
IM_BERT_TOL: float = 1e-4
IM_BERT_MAX_ITER: int = 20
EX_BERT_LAYERS: str = "all"
EX_BERT_STEP: float = IM_BERT_STEP
EX_BERT_FIELD: str = IM_BERT_FIELD


# --------------------------------------------------------------------------------------------------
# Finding and selecting layers
# --------------------------------------------------------------------------------------------------


def _is_block_list(module: nn.Module) -> bool:
    """A non-empty ModuleList of same-typed composite modules (transformer blocks, not plain Linears)."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = module[0]
    return all(type(m) is type(first) for m in module) and len(list(first.children())) >= 2


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The ``ModuleList`` of the encoder's transformer blocks, found by searching the module tree.

    Candidates are ModuleLists of same-typed composite blocks whose length equals the config's
    ``num_hidden_layers`` (when the model has one); the shallowest wins. Encoder-decoder models and
    models without such a list raise ``TypeError`` naming what is supported.
    """
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise TypeError(
            f"{type(model).__name__} is an encoder-decoder model; ode_bert supports {SUPPORTED_ENCODERS}"
        )
    depth = getattr(config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if _is_block_list(module) and (depth is None or len(module) == depth)
    ]
    if not candidates:
        raise TypeError(
            f"no encoder layer list found in {type(model).__name__}; ode_bert supports {SUPPORTED_ENCODERS}"
        )
    shallowest = min(name.count(".") for name, _ in candidates)
    top = [(name, module) for name, module in candidates if name.count(".") == shallowest]
    if len(top) > 1:
        names = ", ".join(name for name, _ in top)
        raise TypeError(
            f"ambiguous encoder layer lists in {type(model).__name__} ({names}); "
            f"ode_bert supports {SUPPORTED_ENCODERS}"
        )
    return top[0][1]


def parse_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Sorted layer indices from ``"all"``, ``"0-5"``, ``"0,2,4"``, ``"0-2,5"`` or a list of ints."""
    valid = f"valid layer indices are 0..{num_layers - 1} (e.g. 'all', '0-{num_layers - 1}', '0,2', [0, 2])"
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(num_layers))
        indices: list[int] = []
        for part in spec.split(","):
            match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if match is None:
                raise ValueError(f"bad layer specification {spec!r}: cannot read {part!r}; {valid}")
            start = int(match.group(1))
            stop = int(match.group(2)) if match.group(2) is not None else start
            if stop < start:
                raise ValueError(f"bad layer range {part.strip()!r} in {spec!r} (start > end); {valid}")
            indices.extend(range(start, stop + 1))
    elif isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        indices = list(spec)
    else:
        raise ValueError(f"layers must be a string or a sequence of ints, got {spec!r}; {valid}")
    if not indices:
        raise ValueError(f"no layers selected by {spec!r}; {valid}")
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layer indices {bad} out of range in {spec!r}; {valid}")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate layer indices {duplicates} in {spec!r}; {valid}")
    return sorted(indices)


# --------------------------------------------------------------------------------------------------
# The ODE connection
# --------------------------------------------------------------------------------------------------


class NonFiniteError(solvers.NonFiniteError, ValueError):
    """A converted layer met NaN or Inf: in its input state, or in its vector field's output.

    The message names the layer, the solver and the field framing. A ``solvers.NonFiniteError`` (so a
    ``FloatingPointError``) and a ``ValueError``, as the solvers' own NaN checks of states have always been.
    """


def _is_single_evaluation(method: Method) -> bool:
    """Whether one step of ``method`` evaluates the vector field exactly once (explicit Euler)."""
    tableau = method.tableau
    return not method.implicit and not method.adaptive and tableau is not None and len(tableau.b) == 1


def _cache_message(index: int, solver: str, where: str) -> str:
    return (
        f"layer {index} ({solver}) receives a key/value cache ({where}): every evaluation of the layer in "
        f"an ODE step would append its keys and values to the cache, so later tokens would attend to "
        f"the wrong positions. ode_bert does not support caches with solvers that evaluate a layer more "
        f"than once yet: call the model with use_cache=False (model(..., use_cache=False), "
        f"generate(..., use_cache=False)), set model.config.use_cache = False, or use solver='euler' "
        f"(one evaluation per layer)"
    )


class _RecordTrimmer:
    """Snapshot transformers' active output collector so only the last evaluation's records are kept."""

    def __init__(self) -> None:
        self.collected: dict[str, list] | None = None
        try:
            from transformers.utils.output_capturing import _active_collector
        except ImportError:  # older transformers return attentions in tuples, nothing to trim
            return
        collected = _active_collector.get()
        if collected:
            self.collected = {
                k: v for k, v in collected.items() if k != "hidden_states" and isinstance(v, list)
            }
        self.start = {k: len(v) for k, v in (self.collected or {}).items()}
        self.last = dict(self.start)

    def mark(self) -> None:
        """Called before each layer evaluation."""
        if self.collected:
            self.last = {k: len(v) for k, v in self.collected.items()}

    def trim(self) -> None:
        """Drop the records of all evaluations but the last one."""
        for key, records in (self.collected or {}).items():
            records[self.start[key] : self.last[key]] = []


class _RandomState:
    """The RNG state at the start of an ODE step, restored before every layer evaluation of that step.

    In training mode the layer applies dropout; restoring the state makes every evaluation draw the
    same dropout masks, so the step integrates one well-defined (if random) field and the implicit
    equation has a fixed point.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


class ODEConnection:
    """Replacement ``forward`` of one encoder layer: one ODE step over the layer's interval ``[l, l+1)``.

    Fixed-step methods advance ``dh/dt = f_l(h)`` by ``step`` from ``t = l``; adaptive methods integrate
    ``dh/dt = step * f_l(h)`` over ``[l, l+1]``. In training mode all evaluations of one step share the
    dropout masks (see ``_RandomState``). Picklable (holds the layer, the step method and plain
    settings; ``original`` is a previous instance ``forward`` of the layer, if any, to restore on unconvert).

    Padding positions are held fixed in implicit solves (``mask_padding``): positions that no query
    attends to (read from the layer's attention mask by ``real_token_mask``) pass through unchanged, so
    their outputs are not the layer's, and the root finder's residual and stopping test cover the real
    tokens only. Real tokens never attend to padding keys, so their results are those of solving each
    sentence alone (up to the solver tolerance). Explicit and adaptive methods step every position.

    NaN and Inf are errors (``NonFiniteError``) naming the layer, the solver and whether the input state or
    the vector field was non-finite: the input and the step's output are checked once each (a sum, ~0.1%
    of a MiniLM forward); inside implicit and adaptive solves every field value is checked, as those may
    otherwise hide it. ``check_finite = False`` on an instance switches the checks off. A layer call that
    receives a key/value cache (decoders) is refused unless the method evaluates the layer once (euler).
    """

    mask_padding: bool = True  # set False on an instance to solve padding positions too (for comparisons)
    check_finite: bool = True  # set False on an instance to skip the NaN/Inf checks (for benchmarks)

    def __init__(
        self,
        layer: nn.Module,
        index: int,
        solver: str,
        method: Method,
        step: float,
        framing: str,
        on_failure: str,
        report: bool,
        original: Callable[..., Any] | None,
    ) -> None:
        self.layer = layer
        self.index = index
        self.solver = solver
        self.method = method
        self.step = step
        self.framing = framing
        self.on_failure = on_failure
        self.report = report
        self.original = original
        self.last_info: StepInfo | None = None

    def _where(self) -> str:
        return f"layer {self.index} ({self.solver}, field={self.framing!r})"

    def _checked(self, f: Callable[[Any, Tensor], Tensor], field: LayerField) -> Callable[..., Tensor]:
        """``f`` with every value checked: NaN/Inf from a finite state is an error naming the layer.

        A non-finite value at a non-finite state is the solver's own iterate diverging (e.g. a Picard
        iteration that blows up): that is left to the solver, which reports it as non-convergence.
        """

        def checked(t: Any, y: Tensor) -> Tensor:
            out = f(t, y)
            if not all_finite(out) and all_finite(y):
                raise NonFiniteError(
                    f"{self._where()}: the vector field returned NaN or Inf at a finite state (evaluation "
                    f"{field.nfev} of this step, inside the {self.solver} solve); the layer's weights or "
                    f"activations overflow or are NaN"
                )
            return out

        return checked

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h, rest_args, rest_kwargs = split_hidden(self.layer, args, kwargs)
        if not _is_single_evaluation(self.method):
            cache = cache_argument(self.layer, h, rest_args, rest_kwargs)
            if cache is not None:
                raise ValueError(_cache_message(self.index, self.solver, cache))
        if self.check_finite and not all_finite(h):
            raise NonFiniteError(
                f"{self._where()}: the input hidden state contains NaN or Inf, before the ODE step (it comes "
                f"from the embeddings, the inputs or an earlier layer)"
            )
        base = self.original if self.original is not None else stock_forward(self.layer)
        trimmer = _RecordTrimmer()
        randomness = _RandomState(h.device) if self.layer.training else None

        def evaluate(*a: Any, **kw: Any) -> Any:
            trimmer.mark()
            if randomness is not None:
                randomness.restore()
            return base(*a, **kw)

        field = LayerField(self.layer, self.framing, rest_args, rest_kwargs, forward=evaluate)
        masked = self.mask_padding and self.method.implicit
        real = real_token_mask(self.layer, h, rest_args, rest_kwargs) if masked else None
        # Explicit steps propagate a NaN/Inf of any evaluation to their output, checked below; implicit and
        # adaptive solves may hide it (a root finder keeps its last finite iterate), so check every value.
        hidden_nan = self.check_finite and (self.method.implicit or self.method.adaptive)
        try:
            if self.method.adaptive:
                scale = self.step
                f = lambda t, y: scale * field(t, y)  # noqa: E731
                h_next, info = self.method.step(
                    self._checked(f, field) if hidden_nan else f, float(self.index), h, 1.0
                )
            elif real is None or bool(real.all()):
                f = self._checked(field, field) if hidden_nan else field
                h_next, info = self.method.step(f, float(self.index), h, self.step)
            else:
                h_next, info = self._step_real_tokens(field, h, real, hidden_nan)
        except solvers.NonFiniteError as err:
            if isinstance(err, NonFiniteError):
                raise
            raise NonFiniteError(f"{self._where()}: {err}") from err
        if self.check_finite and not all_finite(h_next):
            raise NonFiniteError(
                f"{self._where()}: the output of the ODE step contains NaN or Inf although its input was "
                f"finite: the vector field returned NaN or Inf (or the step overflowed)"
            )
        trimmer.trim()
        self.last_info = _detached(info)
        self._check_convergence(info)
        if field.last_extras is not None:
            return (h_next, *field.last_extras)
        return h_next

    def _step_real_tokens(
        self, field: LayerField, h: Tensor, real: Tensor, check: bool = False
    ) -> tuple[Tensor, StepInfo]:
        """Step only the real tokens; padding positions keep ``h``.

        The method integrates ``y = h - held`` (zero at padding) under ``keep * f(y + held)``, with
        ``held`` the padding part of ``h``: the field vanishes at padding, so ``y`` stays zero there and
        the solve's residual norms see the real tokens only. Exact for the (linear) Runge-Kutta methods.
        """
        keep = real[..., None].to(h.dtype)
        held = h * (1 - keep)

        def f(t: Any, y: Tensor) -> Tensor:
            return keep * field(t, y + held)

        h_next, info = self.method.step(
            self._checked(f, field) if check else f, float(self.index), h * keep, self.step
        )
        return h_next + held, info

    def _check_convergence(self, info: StepInfo) -> None:
        root = info.root
        if not self.report or root is None or self.on_failure == "ignore" or root.all_converged:
            return
        message = (
            f"ODE connection of layer {self.index} ({self.solver}) did not converge: max relative residual "
            f"{root.max_rel_residual:.3g} ({root.summary()})"
        )
        if self.on_failure == "raise":
            raise ConvergenceError(message)
        warnings.warn(message, ConvergenceWarning, stacklevel=3)

    def __repr__(self) -> str:
        return (
            f"ODEConnection(layer={self.index}, method={self.method!r}, step={self.step}, "
            f"field={self.framing!r})"
        )


def _detached(info: StepInfo) -> StepInfo:
    """A copy of ``info`` whose tensors do not keep the autograd graph alive."""
    if info.root is None:
        return info
    root = info.root
    fields = {f.name: getattr(root, f.name) for f in dataclasses.fields(root)}
    fields = {k: v.detach() if isinstance(v, Tensor) else v for k, v in fields.items()}
    return dataclasses.replace(info, root=type(root)(**fields))


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _connections(model: nn.Module) -> list[ODEConnection]:
    """The ODE connections currently installed on ``model``'s encoder layers, in layer order."""
    forwards = [layer.__dict__.get("forward") for layer in find_layers(model)]
    return [c for c in forwards if isinstance(c, ODEConnection)]


def _build_method(
    solver: str, implicit_options: dict[str, Any], solver_options: dict[str, Any]
) -> tuple[Method, str, bool]:
    """Instantiate the step method; returns it, the ``on_failure`` policy, and whether we report failures."""
    cls = METHODS.lookup(solver)
    given = {k: v for k, v in implicit_options.items() if v is not None}
    grad = given.get("grad")
    modes = solvers.available_grad_modes()
    if grad is not None and (not isinstance(grad, str) or grad not in modes):
        hint = suggest(grad, list(modes)) if isinstance(grad, str) else ""
        raise ValueError(f"Unknown gradient mode {grad!r}.{hint} Valid modes: {', '.join(modes)}")
    accepted = option_names(cls)
    misplaced = [k for k in given if k not in accepted]
    if misplaced:
        implicit = [name for name, klass in METHODS.items() if klass.implicit]
        raise ValueError(
            f"option(s) {', '.join(misplaced)} apply to implicit solvers only "
            f"({', '.join(implicit) or 'none registered'}); solver {solver!r} does not take them"
        )
    options = {**solver_options, **given}
    report = "on_failure" in accepted
    if not report:  # let the registry reject on_failure (and any other unknown option) by name
        return solvers.get(solver, **options), "ignore", False
    on_failure = options.pop("on_failure", "warn")
    if not isinstance(on_failure, str) or on_failure not in ON_FAILURE_CHOICES:
        hint = suggest(on_failure, list(ON_FAILURE_CHOICES)) if isinstance(on_failure, str) else ""
        choices = ", ".join(ON_FAILURE_CHOICES)
        raise ValueError(f"on_failure must be one of {choices}, got {on_failure!r}.{hint}".rstrip("."))
    options["on_failure"] = "ignore"  # the connection reports failures itself, naming the layer
    return solvers.get(solver, **options), on_failure, report


def convert(
    model: nn.Module,
    solver: str = "implicit_euler",
    layers: str | Sequence[int] = "all",
    step: float = 1.0,
    field: str = "residual",
    root: str | None = None,
    grad: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    **solver_options: Any,
) -> nn.Module:
    """Make the selected encoder layers ODE-solver steps, in place; returns ``model``.

    ``solver`` is a name from ``solvers.available()``; ``field`` is ``"residual"`` (``f = Layer(h) - h``;
    ``euler`` with ``step=1`` is the stock model) or ``"layer"`` (``f = Layer(h)``, the IM-BERT drawing).
    ``root``, ``grad``, ``tol``, ``max_iter`` go to implicit solvers only; other ``solver_options``
    (e.g. ``rtol``/``atol`` for adaptive solvers, ``on_failure``) go to the solver. Converting a converted
    model reconfigures it from scratch. Implicit solvers hold padding positions fixed: their outputs are
    not the layer's, and only real tokens enter the root finder's residual (see ``ODEConnection``).
    """
    check_framing(field)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a positive finite number, got {step!r}")
    layer_list = find_layers(model)
    indices = parse_layers(layers, len(layer_list))
    implicit_options = {"root": root, "grad": grad, "tol": tol, "max_iter": max_iter}
    method, on_failure, report = _build_method(solver, implicit_options, dict(solver_options))
    try:
        json.dumps(solver_options)
    except TypeError as err:
        raise TypeError(f"solver options must be JSON-serialisable (saved with the model): {err}") from None
    if not _is_single_evaluation(method) and _decoder_with_cache(model, layer_list):
        raise ValueError(
            f"{type(model).__name__} is a decoder configured with use_cache=True: its layers receive a "
            f"key/value cache, and solver {solver!r} evaluates each layer more than once per step, so every "
            f"evaluation would append to the cache. ode_bert does not support that yet: load the model "
            f"with use_cache=False (from_pretrained(..., use_cache=False)) or set "
            f"model.config.use_cache = False before convert, and call it with use_cache=False; or use "
            f"solver='euler' (one evaluation per layer)"
        )

    unconvert(model)
    for index in indices:
        layer = layer_list[index]
        original = layer.__dict__.get("forward")
        layer.forward = ODEConnection(
            layer, index, solver, method, float(step), field, on_failure, report, original
        )
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {
            "version": CONFIG_VERSION,
            "solver": solver,
            "layers": indices,
            "step": float(step),
            "field": field,
            "root": root,
            "grad": grad,
            "tol": tol,
            "max_iter": max_iter,
            "solver_options": dict(solver_options),
        })
    return model


def _decoder_with_cache(model: nn.Module, layer_list: nn.ModuleList) -> bool:
    """Whether ``model`` is a decoder (``config.is_decoder`` or causal attention) set to use a KV cache."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for layer in layer_list for m in layer.modules())


def unconvert(model: nn.Module) -> nn.Module:
    """Restore the stock ``forward`` of every converted layer and drop the stored configuration."""
    for layer in find_layers(model):
        connection = layer.__dict__.get("forward")
        if isinstance(connection, ODEConnection):
            if connection.original is not None:
                layer.forward = connection.original
            else:
                del layer.forward
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)
    return model


def im_bert(
    model: nn.Module,
    layers: str | Sequence[int] = IM_BERT_LAYERS,
    step: float = IM_BERT_STEP,
    field: str = IM_BERT_FIELD,
    root: str | None = None,
    grad: str | None = None,
    tol: float | None = IM_BERT_TOL,
    max_iter: int | None = IM_BERT_MAX_ITER,
    **kw: Any,
) -> nn.Module:
    """IM-BERT: implicit Euler IM-connections, ``h_next = h + step * f(h_next)`` on the selected layers.

    By default ``f = Layer(h) - h`` with step 0.5 on every layer (``field="layer"``, ``f = Layer(h)``, is the
    connection as drawn in the paper); defaults chosen on held-out data, see the module constants.
    """
    return convert(model, "implicit_euler", layers, step, field, root, grad, tol, max_iter, **kw)


def ex_bert(
    model: nn.Module,
    layers: str | Sequence[int] = EX_BERT_LAYERS,
    step: float = EX_BERT_STEP,
    field: str = EX_BERT_FIELD,
) -> nn.Module:
    """EX-BERT, the explicit control: ``h + step * f(h)`` with IM-BERT's default field and step."""
    return convert(model, "euler", layers, step, field)


def ode_config(model: nn.Module) -> dict[str, Any] | None:
    """The stored conversion settings (``model.config.ode_bert``), or ``None`` for a stock model.

    A stored value that is not a dict (e.g. a hand-edited config.json) is a ``ValueError``.
    """
    config = getattr(model, "config", None)
    value = getattr(config, CONFIG_KEY, None) if config is not None else None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(_not_a_dict(value, "model.config"))
    return dict(value)


def _not_a_dict(value: Any, source: str) -> str:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return (
        f"{CONFIG_KEY} in {source} must be a JSON object of solver settings (as ode_bert.convert writes), "
        f"got {type(value).__name__} {shown}; re-save the model from ode_bert, or remove the key to load "
        f"the stock model"
    )


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_TYPE_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "version": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "solver": (lambda v: isinstance(v, str), "a solver name (string)"),
    "layers": (
        lambda v: isinstance(v, str)
        or (isinstance(v, list) and all(_is_int(i) for i in v)),
        "a list of layer indices or a layer string such as 'all' or '0-5'",
    ),
    "step": (_is_number, "a number"),
    "field": (lambda v: isinstance(v, str), "a field framing name (string)"),
    "root": (lambda v: v is None or isinstance(v, str), "null or a root finder name (string)"),
    "grad": (lambda v: v is None or isinstance(v, str), "null or a gradient mode name (string)"),
    "tol": (lambda v: v is None or _is_number(v), "null or a number"),
    "max_iter": (lambda v: v is None or _is_int(v), "null or an integer"),
    "solver_options": (lambda v: isinstance(v, dict), "a JSON object of solver options"),
}


def check_stored_config(value: Any, source: str = "model.config") -> dict[str, Any]:
    """Validate a stored ``config.ode_bert`` value and return the full settings of the current version.

    ``source`` names where it came from (e.g. the config.json path), for the messages. A configuration
    without a "version" key was saved before versioning and is read as version 1, which always had every
    key of ``CONFIG_KEYS_V1``. Missing keys, keys of the wrong type, unknown keys and versions newer than
    ``CONFIG_VERSION`` are ``ValueError`` naming the key and ``source``: a stored setting is never replaced
    by a default silently. Only a key added after the configuration's version (``CONFIG_ADDED_KEYS``) takes
    its documented default, with a ``UserWarning``.

    Unknown keys are errors rather than warnings: every ode-bert that writes a key also writes a version
    that names it, so an unknown key at a known version is a typo or a hand edit, and ignoring it would
    load a model that computes something other than what was saved.
    """
    if not isinstance(value, dict):
        raise ValueError(_not_a_dict(value, source))
    where = f"{CONFIG_KEY} in {source}"
    version = value.get("version", 1)
    check, expected = _TYPE_CHECKS["version"]
    if not check(version):
        raise ValueError(f"{where}: key 'version' must be {expected}, got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"{where} has version {version}, written by a newer ode-bert; this ode-bert reads versions "
            f"1..{CONFIG_VERSION}: upgrade ode-bert to load this model"
        )
    known = set(CONFIG_KEYS_V1) | set(CONFIG_ADDED_KEYS) | ({"version"} if version >= 2 else set())
    unknown = [k for k in value if k not in known]
    if unknown:
        hints = "".join(suggest(str(k), sorted(known)) for k in unknown)
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))} for config version {version}.{hints} "
            f"Valid keys: {', '.join(sorted(known))}"
        )
    required = list(CONFIG_KEYS_V1) + [k for k, (added, _) in CONFIG_ADDED_KEYS.items() if added <= version]
    missing = [k for k in required if k not in value]
    if missing:
        raise ValueError(
            f"{where}: missing key(s) {', '.join(map(repr, missing))}; config version {version} requires "
            f"{', '.join(required)}. The file is incomplete or was edited: re-save the model from ode_bert"
        )
    settings = dict(value)
    for key, (added, default) in CONFIG_ADDED_KEYS.items():
        if key not in settings:
            warnings.warn(
                f"{where} (config version {version}) has no {key!r}, added in version {added}: using "
                f"the default {default!r}, which is what older versions did",
                UserWarning,
                stacklevel=3,
            )
            settings[key] = copy.deepcopy(default)
    for key, setting in settings.items():
        if key in _TYPE_CHECKS:
            check, expected = _TYPE_CHECKS[key]
            if not check(setting):
                raise ValueError(f"{where}: key {key!r} must be {expected}, got {setting!r}")
    settings["version"] = CONFIG_VERSION
    return settings


def reapply(model: nn.Module, source: str = "model.config") -> nn.Module:
    """Re-apply the conversion stored in ``model.config.ode_bert`` (e.g. after loading a checkpoint).

    The stored value is validated by ``check_stored_config``; ``source`` names where it came from (the
    config.json path) in the messages. Settings a solver rejects are a ``ValueError`` naming ``source`` too.
    """
    config = getattr(model, "config", None)
    value = getattr(config, CONFIG_KEY, None) if config is not None else None
    if value is None:
        return model
    settings = check_stored_config(value, source)
    settings.pop("version")
    stored_options = settings.pop("solver_options")
    clash = sorted(set(stored_options) & set(settings))
    if clash:
        raise ValueError(f"{CONFIG_KEY} in {source}: solver_options repeat the key(s) {', '.join(clash)}")
    try:
        return convert(model, **settings, **stored_options)
    except (ValueError, TypeError) as err:
        raise type(err)(f"{CONFIG_KEY} in {source} cannot be applied: {err}") from err


@dataclass(frozen=True)
class LayerStats:
    """Solver statistics of one converted layer in the last forward (iterations/residual: max over batch).

    ``root`` keeps the implicit solve's per-sample record (iterations, residuals, converged; one entry per
    sequence of the batch), e.g. to find the inputs whose equation did not converge.
    """

    layer: int
    solver: str
    nfev: int
    iterations: int
    residual: float | None
    converged: bool
    tol: float | None = None  # the tolerance the solve used (raised under autocast; RootFinder.tolerance)
    root: RootInfo | None = None  # per-sample record of the implicit solve; None for explicit/adaptive


def solver_stats(model: nn.Module) -> list[LayerStats]:
    """Per converted layer, what its last forward cost and how well its implicit equation was solved."""
    stats = []
    for connection in _connections(model):
        info = connection.last_info
        if info is None:
            continue
        root = info.root
        stats.append(
            LayerStats(
                layer=connection.index,
                solver=connection.solver,
                nfev=info.nfev,
                iterations=int(root.iterations.max()) if root is not None else 0,
                residual=root.max_rel_residual if root is not None else None,
                converged=root.all_converged if root is not None else True,
                tol=root.tol if root is not None else None,
                root=root,
            )
        )
    return stats
