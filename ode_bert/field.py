"""Vector fields over encoder layers: the ``f`` in ``dh/dt = f(t, h)`` that one layer defines.

A residual encoder layer computes ``h[l+1] = Layer_l(h[l])``. Two framings turn it into a vector field:

* ``"residual"``: ``f_l(h) = Layer_l(h) - h``. One explicit Euler step of size 1 gives back
  ``Layer_l(h)`` exactly, so the stock (post-LayerNorm) model is the Euler discretisation of this field.
* ``"layer"``: ``f_l(h) = Layer_l(h)``. The ODE connection wraps the whole layer, as drawn in the IM-BERT
  paper: EX-connection ``h + s * Layer(h)``, IM-connection ``h_next = h + s * Layer(h_next)``.

Layer ``l`` is active on the time interval ``[l, l + 1)``; within it the field does not depend on ``t``.
The framings' names are ``ode_bert.settings.FRAMINGS``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .layers import find_layers
from .settings import check_framing

LayerForward = Callable[..., Any]


def stock_forward(layer: nn.Module) -> LayerForward:
    """The layer's own ``forward`` (the class method applied to ``layer``), ignoring any ODE connection.

    A ``functools.partial`` rather than a bound method: ``torch.compile`` resolves a bound method made
    with ``__get__`` to the instance attribute, i.e. back to the ODE connection.
    """
    return functools.partial(type(layer).forward, layer)


def hidden_argument_name(layer: nn.Module) -> str:
    """Name of the first argument of the layer's stock ``forward`` (the hidden states)."""
    params = [p for p in inspect.signature(type(layer).forward).parameters.values() if p.name != "self"]
    if not params:
        raise TypeError(f"{type(layer).__name__}.forward takes no hidden-state argument")
    return params[0].name


def split_hidden(layer: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Tensor, tuple, dict]:
    """Separate the hidden-state argument of a layer call from the rest (mask, cache, extra kwargs)."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    name = hidden_argument_name(layer)
    if name not in kwargs:
        raise TypeError(f"{type(layer).__name__} was called without its hidden-state argument {name!r}")
    rest = dict(kwargs)
    return rest.pop(name), (), rest


MASK_ARGUMENT_NAMES: tuple[str, ...] = ("attention_mask", "attn_mask", "mask")
CACHE_ARGUMENT_NAMES: tuple[str, ...] = (
    "cache", "past_key_value", "past_key_values", "layer_past", "cache_params", "past"
)


def cache_argument(
    layer: nn.Module, hidden: Tensor, args: Sequence[Any], kwargs: dict[str, Any]
) -> tuple[str, Any] | None:
    """The name and value of a key/value cache the layer call receives (not ``None``), or ``None`` if none.

    ``args``/``kwargs`` are the layer call's arguments besides ``hidden`` (see ``split_hidden``). A cache is
    an argument named like one (``CACHE_ARGUMENT_NAMES``: ``cache``, ``past_key_value(s)``, ``layer_past``,
    ...) that is not ``None``, or any argument that is a transformers ``Cache``. A layer that receives a
    cache appends the keys and values of every evaluation to it.
    """
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers always has it in the supported versions
        Cache = ()  # noqa: N806
    for name, value in kwargs.items():
        if value is not None and (name in CACHE_ARGUMENT_NAMES or isinstance(value, Cache)):
            return name, value
    if not args:
        return None
    try:
        bound = inspect.signature(type(layer).forward).bind_partial(layer, hidden, *args).arguments
    except TypeError:
        bound = {}
    for name in CACHE_ARGUMENT_NAMES:
        if bound.get(name) is not None:
            return name, bound[name]
    for position, value in enumerate(args):
        if isinstance(value, Cache):
            return f"positional argument {position + 1}", value
    return None


def _longformer_padding(mask: Tensor, hidden: Tensor) -> Tensor | None:
    """Longformer's ``is_index_masked``: bool ``(batch, tokens)``, true at padding."""
    return ~mask.bool() if tuple(mask.shape) == tuple(hidden.shape[:2]) else None


def _xlnet_padding(mask: Tensor, hidden: Tensor) -> Tensor | None:
    """XLNet's ``attn_mask_g``: ``(queries or 1, tokens, batch, 1)``, positive where no attention goes."""
    batch, tokens = hidden.shape[:2]
    if mask.dim() != 4 or mask.shape[1] != tokens or mask.shape[2] not in (1, batch):
        return None
    return (mask <= 0).any(dim=0).any(dim=-1).transpose(0, 1).expand(batch, -1)


FAMILY_MASKS: dict[str, Callable[[Tensor, Tensor], Tensor | None]] = {
    "is_index_masked": _longformer_padding,
    "attn_mask_g": _xlnet_padding,
}


def real_token_mask(
    layer: nn.Module, hidden: Tensor, args: Sequence[Any], kwargs: dict[str, Any]
) -> Tensor | None:
    """Bool ``(batch, tokens)``: the positions some query attends to, from the layer's attention mask.

    ``args``/``kwargs`` are the layer call's arguments besides ``hidden`` (see ``split_hidden``). Reads a
    bool or integer mask (true / non-zero: attended), an additive float mask (0 attended, large negative
    masked) or a 0/1 float mask, shaped ``(batch, tokens)`` or ``(batch, ..., queries, tokens)``; a key is
    real if any query attends to it. ``None`` when there is no mask or its format is not recognised
    (e.g. a flex-attention ``BlockMask``): callers then treat every position as real.

    Family-specific masks come first (``FAMILY_MASKS``): Longformer's ``is_index_masked`` (true: padding)
    and XLNet's ``attn_mask_g`` (``(queries, tokens, batch, 1)``, positive: masked; ``hidden`` is then the
    batch-first view of XLNet's sequence-first state, see ``ODEConnection.sequence_first``).
    """
    try:
        bound = inspect.signature(type(layer).forward).bind(layer, hidden, *args, **kwargs).arguments
    except TypeError:
        return None
    if hidden.dim() == 3:
        for name, read in FAMILY_MASKS.items():
            value = bound.get(name)
            real = read(value, hidden) if isinstance(value, Tensor) else None
            if real is not None:
                return real
    found = [bound[name] for name in MASK_ARGUMENT_NAMES if name in bound]
    mask = found[0] if found else None
    if not isinstance(mask, Tensor) or hidden.dim() != 3 or mask.dim() < 2:
        return None
    if mask.shape[0] not in (1, hidden.shape[0]) or mask.shape[-1] != hidden.shape[1]:
        return None
    if mask.dtype == torch.bool:
        attended = mask
    elif not mask.is_floating_point():
        attended = mask != 0
    elif bool((mask > 0).any()):
        if not bool(((mask == 0) | (mask == 1)).all()):
            return None
        attended = mask == 1
    else:  # additive; a value above half the dtype's minimum counts as attended (errs towards "real")
        attended = mask > torch.finfo(mask.dtype).min / 2
    keys = attended.flatten(1, -2).any(dim=1) if attended.dim() > 2 else attended
    return keys.expand(hidden.shape[0], -1)


class LayerField:
    """The vector field ``f(t, h)`` of one encoder layer, with the layer's extra arguments bound.

    ``layer`` is the encoder block (e.g. a ``BertLayer``); ``args``/``kwargs`` are everything the
    encoder passes to it besides the hidden states (attention mask, cache, ...), forwarded unchanged
    to every evaluation. ``forward`` overrides the function that computes the layer output (default:
    the layer's stock ``forward``, which bypasses module hooks so that one ODE step is recorded once).
    Evaluations are counted in ``nfev``; the non-hidden outputs of the last evaluation (e.g. attention
    weights of older transformers, which return tuples) are kept in ``last_extras``.
    """

    def __init__(
        self,
        layer: nn.Module,
        framing: str = "residual",
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
        forward: LayerForward | None = None,
    ) -> None:
        self.layer = layer
        self.framing = check_framing(framing)
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.forward = forward if forward is not None else stock_forward(layer)
        self.nfev = 0
        self.last_extras: tuple[Any, ...] | None = None

    def layer_output(self, h: Tensor) -> Tensor:
        """``Layer(h)``: the hidden-state output of the layer (first element if it returns a tuple)."""
        out = self.forward(h, *self.args, **self.kwargs)
        self.nfev += 1
        if isinstance(out, (tuple, list)):
            self.last_extras = tuple(out[1:])
            out = out[0]
        else:
            self.last_extras = None
        if not isinstance(out, Tensor):
            raise TypeError(f"{type(self.layer).__name__} returned {type(out).__name__}, expected a tensor")
        return out

    def __call__(self, t: Tensor | float, h: Tensor) -> Tensor:
        """``f(t, h)``; autonomous within the layer's interval, so ``t`` is not used."""
        out = self.layer_output(h)
        return out - h if self.framing == "residual" else out

    def jvp(self, h: Tensor, v: Tensor) -> Tensor:
        """Jacobian-vector product ``(df/dh) v`` at ``h`` (double backward: use eager attention on CPU)."""
        return torch.autograd.functional.jvp(lambda x: self(0.0, x), h, v)[1]

    def jacobian(self, h: Tensor) -> Tensor:
        """Dense Jacobian ``df/dh`` at ``h``, shaped ``h.shape + h.shape`` (only for small states)."""
        return torch.autograd.functional.jacobian(lambda x: self(0.0, x), h)

    def on_rows(self, index: Tensor, batch_size: int) -> LayerField | None:
        """This field for the batch rows ``index`` (sorted 1-D long tensor) of hidden states of ``batch_size``
        rows, every batch-dimension argument (attention mask, position tensors, ...) sliced alike; for row
        compaction in root finders (``solvers.RowMap``), where converged samples stop being evaluated.

        A tensor argument is batch-dimensioned when it has at least 2 dimensions and ``batch_size`` rows;
        one with a single leading row broadcasts and is kept. ``None`` (evaluate the whole batch instead)
        where slicing could be wrong: the layer is in training mode (its dropout masks are drawn per batch
        shape, so a subset would get other masks), the layer returns extra outputs (they would describe the
        subset), an argument is not a tensor, number, string or ``None`` (a cache, a block mask), or a tensor
        argument's batch dimension is ambiguous (1-D with ``batch_size`` entries, or 2-D when it could be a
        ``(tokens, tokens)`` matrix: ``batch_size`` rows and as many columns).
        """
        if self.layer.training or self.last_extras is not None:
            return None
        ambiguous = False

        def sliced(value: Any) -> Any:
            nonlocal ambiguous
            if isinstance(value, Tensor):
                leading = value.shape[0] if value.dim() else None
                if leading != batch_size or batch_size == 1:
                    return value
                if value.dim() == 1 or (value.dim() == 2 and value.shape[1] == batch_size):
                    ambiguous = True
                    return value
                return value.index_select(0, index.to(value.device))
            if type(value) in (tuple, list):
                return type(value)(sliced(v) for v in value)
            if type(value) is dict:
                return {k: sliced(v) for k, v in value.items()}
            if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
                return value
            ambiguous = True
            return value

        args = tuple(sliced(a) for a in self.args)
        kwargs = {k: sliced(v) for k, v in self.kwargs.items()}
        if ambiguous:
            return None
        return LayerField(self.layer, self.framing, args, kwargs, forward=self.forward)

    @classmethod
    def capture(
        cls, model: nn.Module, framing: str = "residual", **inputs: Any
    ) -> list[tuple[LayerField, Tensor]]:
        """Run ``model(**inputs)`` once and return, per encoder layer (per step of ``find_layers``), its field
        and its input state.

        The fields are bound to exactly the arguments the encoder passed to each layer during that
        forward (processed attention mask included), so ``field(0, h)`` and ``field.jacobian(h)`` can be
        evaluated standalone, e.g. for stability analysis. The fields use the stock layers; the input
        states are those of the model as it is (on a converted model, the ODE solution at each layer).
        """
        stack = find_layers(model)
        calls: list[tuple[nn.Module, tuple[Tensor, tuple, dict]]] = []  # every block call, in order

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.append((module, split_hidden(module, args, kwargs)))

        handles = [block.register_forward_pre_hook(hook, with_kwargs=True) for block in stack.blocks]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        # the model calls the stack's blocks in step order (a shared ALBERT group once per step)
        return [
            (cls(layer, framing, rest_args, rest_kwargs), hidden)
            for layer, (hidden, rest_args, rest_kwargs) in calls[: len(stack)]
        ]

    def __repr__(self) -> str:
        return f"LayerField({type(self.layer).__name__}, framing={self.framing!r})"
