"""Turn the layers of a loaded Hugging Face encoder into steps of an ODE solver, in place.

``convert`` replaces the instance ``forward`` of each selected encoder layer by an ``ODEConnection``:
the layer's module hooks (e.g. transformers' ``output_hidden_states`` recording) then see the ODE step's
output, every extra argument the encoder passes (attention mask, cache, ...) reaches each evaluation of
the layer unchanged, and no parameter or buffer is added, so ``state_dict()`` and checkpoints stay stock.
The configuration is stored in ``model.config.ode_bert`` and survives ``save_pretrained``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import solvers
from solvers import Method, RootInfo, StepInfo, all_finite

from .field import LayerField, cache_argument, real_token_mask, split_hidden, stock_forward
from .layers import find_layers, parse_layers
from .settings import CONFIG_KEY, SETTING_NAMES, ODESettings, not_a_dict

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
        original: Callable[..., Any] | None,
    ) -> None:
        self.layer = layer
        self.index = index
        self.solver = solver
        self.method = method
        self.step = step
        self.framing = framing
        self.on_failure = on_failure
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
        if root is None or self.on_failure == "ignore" or root.all_converged:
            return
        message = (
            f"ODE connection of layer {self.index} ({self.solver}) did not converge: max relative residual "
            f"{root.max_rel_residual:.3g} ({root.summary()})"
        )
        solvers.report_failure(self.on_failure, message, stacklevel=3)

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


def convert(
    model: nn.Module,
    solver: str | ODESettings = "implicit_euler",
    layers: str | Sequence[int] | None = None,
    step: float | None = None,
    field: str | None = None,
    root: str | None = None,
    grad: str | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    **solver_options: Any,
) -> nn.Module:
    """Make the selected encoder layers ODE-solver steps, in place; returns ``model``.

    ``solver`` is an ``ODESettings`` or a solver name from ``solvers.available()``. With a name, the other
    arguments make the settings: ``convert(model, "rk4", layers="0-2", step=0.5)`` is ``convert(model,
    ODESettings(solver="rk4", layers="0-2", step=0.5))``; unset (``None``) ones take the ``ODESettings``
    defaults (every layer, step 1, ``field="residual"``, the solver's own ``root``/``grad``/``tol``/
    ``max_iter``). With an ``ODESettings``, set arguments replace its fields and other keywords are added to
    its ``solver_options``. See ``ODESettings`` for what each setting means; ``field="residual"`` with
    ``euler`` and step 1 is the stock model.

    Converting a converted model reconfigures it from scratch. Implicit solvers hold padding positions
    fixed: their outputs are not the layer's, and only real tokens enter the root finder's residual (see
    ``ODEConnection``). The settings are stored in ``model.config.ode_bert`` (``ODESettings.to_dict``, with
    the layers as indices).
    """
    given = {"layers": layers, "step": step, "field": field, "root": root, "grad": grad, "tol": tol,
             "max_iter": max_iter}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if not isinstance(solver, ODESettings):
        settings = ODESettings(solver=solver, **given, solver_options=solver_options)
    elif given or solver_options:
        settings = dataclasses.replace(
            solver, **given, solver_options={**solver.solver_options, **solver_options}
        )
    else:
        settings = solver
    layer_list = find_layers(model)
    indices = parse_layers(settings.layers, len(layer_list))
    method = settings.make_method(on_failure="ignore")  # the connections report failures, naming the layer
    if not _is_single_evaluation(method) and _decoder_with_cache(model, layer_list):
        raise ValueError(
            f"{type(model).__name__} is a decoder configured with use_cache=True: its layers receive a "
            f"key/value cache, and solver {settings.solver!r} evaluates each layer more than once per step, "
            f"so every evaluation would append to the cache. ode_bert does not support that yet: load the "
            f"model with use_cache=False (from_pretrained(..., use_cache=False)) or set "
            f"model.config.use_cache = False before convert, and call it with use_cache=False; or use "
            f"solver='euler' (one evaluation per layer)"
        )

    unconvert(model)
    for index in indices:
        layer = layer_list[index]
        original = layer.__dict__.get("forward")
        layer.forward = ODEConnection(
            layer, index, settings.solver, method, settings.step, settings.field, settings.on_failure,
            original,
        )  # fmt: skip
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, CONFIG_KEY, {**settings.to_dict(), "layers": indices})
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


def _convert_preset(model: nn.Module, name: str, changes: dict[str, Any]) -> nn.Module:
    """``convert`` with ``ODESettings.preset(name)``; ``changes`` are settings, or else solver options."""
    fields = {k: v for k, v in changes.items() if k in SETTING_NAMES}
    options = {k: v for k, v in changes.items() if k not in SETTING_NAMES}
    if options:
        fields["solver_options"] = {**fields.get("solver_options", {}), **options}
    return convert(model, ODESettings.preset(name, **fields))


def im_bert(model: nn.Module, **changes: Any) -> nn.Module:
    """IM-BERT: implicit Euler IM-connections, ``h_next = h + step * f(h_next)``, on the selected layers.

    ``convert(model, ODESettings.preset("im", **changes))``: by default ``f = Layer(h) - h`` with step 0.5 on
    every layer, solved to relative residual 1e-4 in at most 20 iterations (``field="layer"``, ``f =
    Layer(h)``, is the connection as drawn in the paper); defaults chosen on held-out data, see
    ``ode_bert.settings.PRESETS``. ``changes`` are settings (``layers``, ``step``, ``root``, ``tol=None``
    for the solver's default, ...) or solver options (e.g. ``on_failure="raise"``).
    """
    return _convert_preset(model, "im", changes)


def ex_bert(model: nn.Module, **changes: Any) -> nn.Module:
    """EX-BERT, the explicit control: ``h + step * f(h)`` with IM-BERT's default field and step.

    ``convert(model, ODESettings.preset("ex", **changes))``; ``changes`` are settings (``layers``,
    ``step``, ``field``).
    """
    return _convert_preset(model, "ex", changes)


def ode_config(model: nn.Module) -> dict[str, Any] | None:
    """The stored conversion settings (``model.config.ode_bert``), or ``None`` for a stock model.

    A stored value that is not a dict (e.g. a hand-edited config.json) is a ``ValueError``. The settings
    object: ``ODESettings.from_dict(ode_config(model))``.
    """
    config = getattr(model, "config", None)
    value = getattr(config, CONFIG_KEY, None) if config is not None else None
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(not_a_dict(value, "model.config"))
    return dict(value)


def reapply(model: nn.Module, source: str = "model.config") -> nn.Module:
    """Re-apply the conversion stored in ``model.config.ode_bert`` (e.g. after loading a checkpoint).

    The stored value is read by ``ODESettings.from_dict``; ``source`` names where it came from (the
    config.json path) in the messages. Settings that do not fit the model are a ``ValueError`` naming
    ``source`` too.
    """
    config = getattr(model, "config", None)
    value = getattr(config, CONFIG_KEY, None) if config is not None else None
    if value is None:
        return model
    settings = ODESettings.from_dict(value, source)
    try:
        return convert(model, settings)
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
    root: RootInfo | None = dataclasses.field(default=None, repr=False)  # per-sample record, implicit solves

    @property
    def converged_share(self) -> float:
        """The share of the batch's sequences whose equation converged (1 for explicit and adaptive steps)."""
        return 1.0 if self.root is None else float(self.root.converged.float().mean())


class SolverStats(list):
    """``solver_stats``' list of ``LayerStats``, printed as a table (one row per layer)."""

    def __str__(self) -> str:
        if not self:
            return "no converted layer has run a forward yet"
        rows = [f"{'layer':>5} {'solver':<16} {'evals':>6} {'iters':>6} {'residual':>9} {'tol':>7} converged"]
        for s in self:
            residual = "-" if s.residual is None else f"{s.residual:.1e}"
            tol = "-" if s.tol is None else f"{s.tol:.0e}"
            rows.append(f"{s.layer:>5} {s.solver:<16} {s.nfev:>6} {s.iterations:>6} {residual:>9} {tol:>7} "
                        f"{100 * s.converged_share:.0f}%")
        return "\n".join(rows)


def solver_stats(model: nn.Module) -> SolverStats:
    """Per converted layer, what its last forward cost and how well its implicit equation was solved; a list
    of ``LayerStats`` that prints as a table."""
    stats = SolverStats()
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
