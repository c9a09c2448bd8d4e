"""Turn the layers of a loaded Hugging Face encoder into steps of an ODE solver, in place.

``convert`` replaces the instance ``forward`` of each selected encoder layer by an ``ODEConnection``:
the layer's module hooks (e.g. transformers' ``output_hidden_states`` recording) then see the ODE step's
output, every extra argument the encoder passes (attention mask, cache, ...) reaches each evaluation of
the layer unchanged, and no parameter or buffer is added, so ``state_dict()`` and checkpoints stay stock.
The configuration is stored in ``model.config.ode_bert`` and survives ``save_pretrained``. A block the
model calls at several steps (ALBERT) gets a ``SharedConnection`` that passes each call to its step's
connection; a key/value cache is kept exact per stage by ``ode_bert.kvcache``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

import solvers
from solvers import Method, RootInfo, StepInfo, all_finite

from .field import LayerField, cache_argument, real_token_mask, split_hidden, stock_forward
from .layers import LAYERS_PATH_KEY, LayerStack, find_layers, parse_layers
from .probe import probe_stack
from .settings import ADAPTIVE_DEFAULTS, CONFIG_KEY, SETTING_NAMES, ODESettings, not_a_dict

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


class InitialGuesses(Protocol):
    """Warm starts of the implicit steps of one batch (``ode_bert.warm_start.WarmStartStore.batch``)."""

    def guess(self, layer: int, h: Tensor) -> tuple[Tensor, Tensor] | None:
        """For the step of layer ``layer`` from ``h`` (batch-first): an estimate of its result shaped like
        ``h`` and a bool per sample saying which samples it holds for, or ``None`` (no sample has one)."""

    def solved(self, layer: int, h: Tensor, h_next: Tensor) -> None:
        """The step of layer ``layer`` went from ``h`` to ``h_next`` (for the next visit's guess)."""


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
    otherwise hide it. ``check_finite = False`` on an instance switches the checks off.

    A layer call that receives a key/value cache (decoders) keeps one key/value history per stage of a
    method that evaluates the layer more than once, so that cached decoding equals decoding without a cache
    (``ode_bert.kvcache.CachePlan``; adaptive methods are refused there). ``sequence_first`` layers (XLNet)
    are solved in the batch-first view of their state, so norms and records are per sequence.

    ``eval_method``: the method of evaluation (``ODESettings.eval_tol``, no training-only options such as
    ``adjoint_tol``), used while the layer is not in training mode; ``None``: ``method`` always.

    Warm starts (``ode_bert.warm_start``): while ``warm_start`` holds an ``InitialGuesses`` (set for one batch
    by ``WarmStartStore.batch``) and the layer is in training mode, an implicit step starts the samples it
    has a guess for from that guess instead of the explicit predictor, and hands its result back; in
    evaluation, and for explicit and adaptive steps, it is not used.
    """

    mask_padding: bool = True  # set False on an instance to solve padding positions too (for comparisons)
    sequence_first: bool = False  # the layer's hidden states are (tokens, batch, ...) (XLNet; set by convert)
    check_finite: bool = True  # set False on an instance to skip the NaN/Inf checks (for benchmarks)
    warm_start: InitialGuesses | None = None  # set on an instance for one batch (ode_bert.warm_start)

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
        eval_method: Method | None = None,
    ) -> None:
        self.layer = layer
        self.index = index
        self.solver = solver
        self.method = method
        self.eval_method = eval_method
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

        def checked_rows(index: Tensor) -> Callable[..., Tensor] | None:  # row compaction (solvers.RowMap)
            f_rows = solvers.restrict_rows(f, index)
            return None if f_rows is None else self._checked(f_rows, field)

        return solvers.RowMap(checked, checked_rows)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h, rest_args, rest_kwargs = split_hidden(self.layer, args, kwargs)
        if self.sequence_first:  # solve in (batch, tokens, ...): per-sequence norms, records and padding
            return _first_transposed(self._step(h.transpose(0, 1), rest_args, rest_kwargs, transposed=True))
        return self._step(h, rest_args, rest_kwargs)

    def _step(
        self, h: Tensor, rest_args: tuple, rest_kwargs: dict[str, Any], transposed: bool = False
    ) -> Any:
        """One ODE step from ``h``, batch-first (``transposed``: the layer takes ``h.transpose(0, 1)``)."""
        method = self.method if self.layer.training or self.eval_method is None else self.eval_method
        single = _is_single_evaluation(method)
        cache = None if single else cache_argument(self.layer, h, rest_args, rest_kwargs)
        if self.check_finite and not all_finite(h):
            raise NonFiniteError(
                f"{self._where()}: the input hidden state contains NaN or Inf, before the ODE step (it comes "
                f"from the embeddings, the inputs or an earlier layer)"
            )
        base = self.original if self.original is not None else stock_forward(self.layer)
        cached = self._cache_plan(method, *cache) if cache is not None else None
        trimmer = _RecordTrimmer()
        randomness = _RandomState(h.device) if self.layer.training else None

        def evaluate(*a: Any, **kw: Any) -> Any:
            trimmer.mark()
            if randomness is not None:
                randomness.restore()
            if transposed:  # the layer's own layout in, batch-first out
                return cached_call(lambda: _first_transposed(base(a[0].transpose(0, 1), *a[1:], **kw)))
            return cached_call(lambda: base(*a, **kw))

        def cached_call(run: Callable[[], Any]) -> Any:
            return run() if cached is None else cached.evaluate(field.nfev, run)

        field = LayerField(self.layer, self.framing, rest_args, rest_kwargs, forward=evaluate)

        def field_rows(index: Tensor) -> LayerField | None:  # row compaction (solvers.RowMap, compact_rows)
            # not while transformers records each evaluation's outputs (attentions): they describe the batch;
            # not for sequence-first layers, whose arguments have the batch in another dimension
            return None if trimmer.collected or transposed else field.on_rows(index, h.shape[0])

        masked = self.mask_padding and method.implicit
        real = real_token_mask(self.layer, h, rest_args, rest_kwargs) if masked else None
        warm = self.warm_start if self.layer.training and method.implicit else None
        if warm is not None and cached is not None:
            raise ValueError(
                f"{self._where()}: warm starts do not combine with a key/value cache (the cache keeps one "
                f"history per evaluation, which a warm start skips); call the model with use_cache=False"
            )
        start = warm.guess(self.index, h.detach()) if warm is not None else None
        guess = {} if start is None else {"guess": start[0], "known": start[1]}
        # Explicit steps propagate a NaN/Inf of any evaluation to their output, checked below; implicit and
        # adaptive solves may hide it (a root finder keeps its last finite iterate), so check every value.
        hidden_nan = self.check_finite and (method.implicit or method.adaptive)
        try:
            if method.adaptive:
                scale = self.step
                f = _watch_budget(lambda t, y: scale * field(t, y), self)
                h_next, info = method.step(
                    self._checked(f, field) if hidden_nan else f, float(self.index), h, 1.0
                )
            elif real is None or bool(real.all()):
                rowwise = solvers.RowMap(field, field_rows)
                f = self._checked(rowwise, field) if hidden_nan else rowwise
                h_next, info = method.step(f, float(self.index), h, self.step, **guess)
            else:
                h_next, info = self._step_real_tokens(method, field, h, real, hidden_nan, field_rows, **guess)
        except BaseException as err:
            if cached is not None:  # the cache as it was before the step
                cached.abandon()
            if isinstance(err, solvers.NonFiniteError) and not isinstance(err, NonFiniteError):
                raise NonFiniteError(f"{self._where()}: {err}") from err
            raise
        if cached is not None:  # implicit methods: the stage's keys and values at the converged state
            info = dataclasses.replace(info, nfev=info.nfev + cached.finish(field.layer_output, h, h_next))
        if self.check_finite and not all_finite(h_next):
            raise NonFiniteError(
                f"{self._where()}: the output of the ODE step contains NaN or Inf although its input was "
                f"finite: the vector field returned NaN or Inf (or the step overflowed)"
            )
        trimmer.trim()
        if warm is not None:
            warm.solved(self.index, h.detach(), h_next.detach())
        self.last_info = _detached(info)
        self._check_convergence(info)
        if field.last_extras is not None:
            return (h_next, *field.last_extras)
        return h_next

    def _cache_plan(self, method: Method, name: str, cache: Any) -> Any:
        """The ``CachePlan`` that keeps this step's keys and values exact (see ``ode_bert.kvcache``)."""
        from .kvcache import CachePlan

        signature = f"{self.solver} (step {self.step:g}, field={self.framing!r})"
        where = f"layer {self.index} ({self.solver}; cache argument {name!r})"
        return CachePlan.prepare(self.layer, cache, method, signature, where)

    def _step_real_tokens(
        self, method: Method, field: LayerField, h: Tensor, real: Tensor, check: bool = False,
        rows: Callable[[Tensor], LayerField | None] | None = None,
        guess: Tensor | None = None, known: Tensor | None = None,
    ) -> tuple[Tensor, StepInfo]:
        """Step only the real tokens with ``method``; padding positions keep ``h``.

        The method integrates ``y = h - held`` (zero at padding) under ``keep * f(y + held)``, with
        ``held`` the padding part of ``h``: the field vanishes at padding, so ``y`` stays zero there and
        the solve's residual norms see the real tokens only. Exact for the (linear) Runge-Kutta methods.
        ``rows(index)``: the field on some batch rows (row compaction), or ``None`` where it cannot be.
        ``guess``/``known``: a warm start of the result (``ImplicitRK.step``), taken on the real tokens.
        """
        keep = real[..., None].to(h.dtype)
        held = h * (1 - keep)

        def f_all(t: Any, y: Tensor) -> Tensor:
            return keep * field(t, y + held)

        def f_rows(index: Tensor) -> Callable[..., Tensor] | None:
            field_rows = rows(index) if rows is not None else None
            if field_rows is None:
                return None
            keep_rows, held_rows = keep.index_select(0, index), held.index_select(0, index)
            return lambda t, y: keep_rows * field_rows(t, y + held_rows)

        f = solvers.RowMap(f_all, f_rows)
        warm = {} if guess is None else {"guess": guess * keep, "known": known}
        h_next, info = method.step(
            self._checked(f, field) if check else f, float(self.index), h * keep, self.step, **warm
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
        evaluation = "" if self.eval_method is None else f", eval_method={self.eval_method!r}"
        return (
            f"ODEConnection(layer={self.index}, method={self.method!r}{evaluation}, step={self.step}, "
            f"field={self.framing!r})"
        )


def _first_transposed(out: Any) -> Any:
    """A layer output (tensor, or tuple starting with one) with the first tensor's dims 0 and 1 swapped."""
    if isinstance(out, (tuple, list)):
        return (out[0].transpose(0, 1), *out[1:])
    return out.transpose(0, 1)


def _detached(info: StepInfo) -> StepInfo:
    """A copy of ``info`` whose tensors do not keep the autograd graph alive."""
    if info.root is None:
        return info
    root = info.root
    fields = {f.name: getattr(root, f.name) for f in dataclasses.fields(root)}
    fields = {k: v.detach() if isinstance(v, Tensor) else v for k, v in fields.items()}
    return dataclasses.replace(info, root=type(root)(**fields))


class SharedConnection:
    """Replacement ``forward`` of a block the model calls at several steps (ALBERT's shared groups).

    Each call is the next of the block's ``steps`` (counted from the start of the stack owner's forward,
    reset by a ``_ResetCalls`` pre-hook on it) and goes to that step's ``ODEConnection``, or to the block's
    own forward for a step that is not converted. A call beyond the schedule (e.g. a gradient-checkpointing
    recompute outside the owner's forward) is a ``RuntimeError``, never a silently wrong step.
    """

    def __init__(
        self, layer: nn.Module, steps: list[int], connections: dict[int, ODEConnection], original: Any
    ) -> None:
        self.layer = layer
        self.steps = steps
        self.connections = connections
        self.original = original
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.calls >= len(self.steps):
            raise RuntimeError(
                f"{type(self.layer).__name__} (shared by steps {self.steps}) was called {self.calls + 1} "
                f"times since its stack's forward began; ode_bert counts the calls of a shared block to know "
                f"its step, so it must be called only from that forward (no gradient-checkpointing recompute)"
            )
        step = self.steps[self.calls]
        self.calls += 1
        connection = self.connections.get(step)
        if connection is not None:
            return connection(*args, **kwargs)
        base = self.original if self.original is not None else stock_forward(self.layer)
        return base(*args, **kwargs)

    def __repr__(self) -> str:
        return f"SharedConnection(steps={self.steps}, converted={sorted(self.connections)})"


class _ResetCalls:
    """Forward pre-hook on a shared stack's owner: every forward of the stack starts counting at step 0."""

    def __init__(self, shared: list[SharedConnection]) -> None:
        self.shared = shared

    def __call__(self, module: nn.Module, args: Any) -> None:
        for connection in self.shared:
            connection.calls = 0


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _connections(model: nn.Module) -> list[ODEConnection]:
    """The ODE connections currently installed on ``model``'s encoder layers, in step order."""
    found: list[ODEConnection] = []
    for block in find_layers(model).blocks:
        installed = block.__dict__.get("forward")
        if isinstance(installed, ODEConnection):
            found.append(installed)
        elif isinstance(installed, SharedConnection):
            found.extend(installed.connections.values())
    return sorted(found, key=lambda c: c.index)


def _stack_owner(model: nn.Module, path: str) -> nn.Module:
    """The module whose forward runs the stack at ``path`` (its parent)."""
    parent = path.rpartition(".")[0]
    return model.get_submodule(parent) if parent else model


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
    layers_path: str | None = None,
    eval_tol: float | None = None,
    **solver_options: Any,
) -> nn.Module:
    """Make the selected encoder layers ODE-solver steps, in place; returns ``model``.

    ``solver`` is an ``ODESettings`` or a solver name from ``solvers.available()``. With a name, the other
    arguments make the settings: ``convert(model, "rk4", layers="0-2", step=0.5)`` is ``convert(model,
    ODESettings(solver="rk4", layers="0-2", step=0.5))``; unset (``None``) ones take the ``ODESettings``
    defaults (every layer, step 1, ``field="residual"``, the solver's own ``root``/``grad``/``tol``/
    ``max_iter``; ``eval_tol`` = ``tol``). With an ``ODESettings``, set arguments replace its fields and other
    keywords are added to its ``solver_options``. See ``ODESettings`` for what each setting means;
    ``field="residual"`` with ``euler`` and step 1 is the stock model.

    ``layers_path`` names the stack of blocks (``"encoder.block"``) where ``find_layers`` cannot decide; it is
    stored in ``model.config`` (``ode_bert_layers_path``) so that reloading finds the same stack. Before any
    change, a probe forward (``probe_stack``) refuses stacks whose blocks change the hidden state's shape or
    return something without a hidden-state tensor. A block called at several steps (ALBERT) is one vector
    field at several times: ``layers`` selects steps.

    Converting a converted model reconfigures it from scratch. Implicit solvers hold padding positions
    fixed: their outputs are not the layer's, and only real tokens enter the root finder's residual (see
    ``ODEConnection``). The settings are stored in ``model.config.ode_bert`` (``ODESettings.to_dict``, with
    the layers as indices).
    """
    given = {"layers": layers, "step": step, "field": field, "root": root, "grad": grad, "tol": tol,
             "eval_tol": eval_tol, "max_iter": max_iter}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if not isinstance(solver, ODESettings):
        settings = ODESettings(solver=solver, **given, solver_options=solver_options)
    elif given or solver_options:
        settings = dataclasses.replace(
            solver, **given, solver_options={**solver.solver_options, **solver_options}
        )
    else:
        settings = solver
    config = getattr(model, "config", None)
    if layers_path is None:  # reconverting keeps the stack named before
        layers_path = getattr(config, LAYERS_PATH_KEY, None)
    layer_list = find_layers(model, layers_path)
    indices = parse_layers(settings.layers, len(layer_list))
    method = settings.make_method(on_failure="ignore")  # the connections report failures, naming the layer
    eval_method = settings.make_method("ignore", evaluation=True) if settings.evaluates_apart else None
    if not _is_single_evaluation(method) and _decoder_with_cache(model, layer_list):
        from .kvcache import stage_plan

        if stage_plan(method) is None:
            raise ValueError(
                f"{type(model).__name__} is a decoder configured with use_cache=True, and solver "
                f"{settings.solver!r} cannot keep exact keys and values in a cache: its sub-steps depend "
                f"on the whole sequence, so incremental decoding cannot equal the model without a cache. "
                f"Load the model with use_cache=False (from_pretrained(..., use_cache=False)) or set "
                f"model.config.use_cache = False before convert, and call it with use_cache=False; or use a "
                f"fixed-step solver (euler, midpoint, heun, rk4) or implicit_euler, implicit_midpoint, "
                f"trapezoid"
            )

    unconvert(model)
    probe = probe_stack(model, layer_list)  # refuses blocks that change the shape or hide the hidden state
    sequence_first = probe is not None and probe.sequence_first

    def connection(layer: nn.Module, index: int, original: Any) -> ODEConnection:
        made = ODEConnection(
            layer, index, settings.solver, method, settings.step, settings.field, settings.on_failure,
            original, eval_method,
        )  # fmt: skip
        if sequence_first:
            made.sequence_first = True
        return made

    if layer_list.shared:
        shared = []
        for number, block in enumerate(layer_list.blocks):
            steps = layer_list.steps_of(number)
            original = block.__dict__.get("forward")
            chosen = {i: connection(block, i, original) for i in steps if i in indices}
            if chosen:
                block.forward = SharedConnection(block, steps, chosen, original)
                shared.append(block.forward)
        _stack_owner(model, layer_list.path).register_forward_pre_hook(_ResetCalls(shared))
    else:
        for index in indices:
            layer = layer_list[index]
            layer.forward = connection(layer, index, layer.__dict__.get("forward"))
    if config is not None:
        setattr(config, CONFIG_KEY, {**settings.to_dict(), "layers": indices})
        if layers_path is not None:
            setattr(config, LAYERS_PATH_KEY, layers_path)
    return model


def _decoder_with_cache(model: nn.Module, layer_list: LayerStack) -> bool:
    """Whether ``model`` is a decoder (``config.is_decoder`` or causal attention) set to use a KV cache."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        return False
    if getattr(config, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", False) is True for layer in layer_list for m in layer.modules())


def unconvert(model: nn.Module) -> nn.Module:
    """Restore the stock ``forward`` of every converted layer and drop the stored configuration."""
    try:
        stack = find_layers(model)  # the converted stack: the one named in model.config, or the one found
    except TypeError:  # no stack is found, so none was converted
        stack = None
    for layer in stack.blocks if stack is not None else ():
        connection = layer.__dict__.get("forward")
        if isinstance(connection, (ODEConnection, SharedConnection)):
            if connection.original is not None:
                layer.forward = connection.original
            else:
                del layer.forward
    hooks = _stack_owner(model, stack.path)._forward_pre_hooks if stack is not None else {}
    for key in [k for k, hook in hooks.items() if isinstance(hook, _ResetCalls)]:
        del hooks[key]
    config = getattr(model, "config", None)
    for key in (CONFIG_KEY, LAYERS_PATH_KEY):
        if config is not None and hasattr(config, key):
            delattr(config, key)
    return model


def _convert_preset(model: nn.Module, name: str, changes: dict[str, Any]) -> nn.Module:
    """``convert`` with ``ODESettings.preset(name)``; ``changes`` are settings, or else solver options."""
    changes = dict(changes)
    layers_path = changes.pop("layers_path", None)
    fields = {k: v for k, v in changes.items() if k in SETTING_NAMES}
    options = {k: v for k, v in changes.items() if k not in SETTING_NAMES}
    if options:
        fields["solver_options"] = {**fields.get("solver_options", {}), **options}
    return convert(model, ODESettings.preset(name, **fields), layers_path=layers_path)


def im_bert(model: nn.Module, **changes: Any) -> nn.Module:
    """IM-BERT: implicit Euler IM-connections, ``h_next = h + step * f(h_next)``, on the selected layers.

    ``convert(model, ODESettings.preset("im", **changes))``: by default ``f = Layer(h) - h`` with step 0.5 on
    every layer, solved to relative residual 1e-2 (1e-4 before ode-bert 0.2.0) in at most 20 iterations
    (``field="layer"``, ``f = Layer(h)``, is the connection as drawn in the paper); defaults chosen on
    held-out data and by cost, see ``ode_bert.settings.PRESETS``. ``changes`` are settings (``layers``,
    ``step``, ``root``, ``tol=None`` for the solver's default, ...) or solver options (e.g.
    ``on_failure="raise"``).
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


# Layer evaluations one converted layer may make in one adaptive step before the forward warns that it costs
# far more than the stock model (1 evaluation per layer). The default tolerances (settings.ADAPTIVE_DEFAULTS)
# take 21-44 on MiniLM; the solvers' own (rtol 1e-7) 81-981, or more (bench/adaptive_defaults.py).
EVALUATION_BUDGET = 100


class EvaluationBudgetWarning(UserWarning):
    """An adaptive step of one layer used more than ``EVALUATION_BUDGET`` evaluations and is still going."""


def _watch_budget(f: Callable[[Any, Tensor], Tensor], connection: ODEConnection) -> Callable[..., Tensor]:
    """``f`` counting its calls: the call past ``EVALUATION_BUDGET`` warns once, while the step still runs
    (an adaptive solve at a tight tolerance can take minutes per forward; the warning comes before)."""
    calls = 0

    def watched(t: Any, y: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        if calls == EVALUATION_BUDGET + 1:
            method = connection.method
            tolerances = ", ".join(f"{name}={getattr(method, name):g}" for name in ("rtol", "atol")
                                   if hasattr(method, name))  # fmt: skip
            defaults = ", ".join(f"{name} {value:g}" for name, value in ADAPTIVE_DEFAULTS.items())
            warnings.warn(
                f"layer {connection.index} ({connection.solver}, {tolerances}): more than "
                f"{EVALUATION_BUDGET} layer evaluations in one step and not done, where the stock model "
                f"makes 1; this forward may take minutes. Loosen rtol/atol (the defaults, {defaults}, cost "
                f"21-44 per MiniLM layer; docs/choosing-a-solver.md) or use a fixed-step method",
                EvaluationBudgetWarning,
                stacklevel=2,
            )
        return f(t, y)

    return watched


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
    budget: int | None = None  # adaptive steps: the evaluations per step past which the forward warned

    @property
    def converged_share(self) -> float:
        """The share of the batch's sequences whose equation converged (1 for explicit and adaptive steps)."""
        return 1.0 if self.root is None else float(self.root.converged.float().mean())

    @property
    def over_budget(self) -> bool:
        """Whether this layer's step used more evaluations than its budget (``EVALUATION_BUDGET``)."""
        return self.budget is not None and self.nfev > self.budget


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
        over = [s for s in self if s.over_budget]
        if over:
            rows.append(f"over budget: layer(s) {', '.join(str(s.layer) for s in over)} used more than "
                        f"{over[0].budget} evaluations in one step (the stock model: 1 per layer)")
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
                budget=EVALUATION_BUDGET if connection.method.adaptive else None,
                root=root,
            )
        )
    return stats
