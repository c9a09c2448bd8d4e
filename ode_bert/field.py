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
) -> str | None:
    """The name of a key/value cache the layer call receives (not ``None``), or ``None`` if it gets none.

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
            return name
    if not args:
        return None
    try:
        bound = inspect.signature(type(layer).forward).bind_partial(layer, hidden, *args).arguments
    except TypeError:
        bound = {}
    for name in CACHE_ARGUMENT_NAMES:
        if bound.get(name) is not None:
            return name
    for position, value in enumerate(args):
        if isinstance(value, Cache):
            return f"positional argument {position + 1}"
    return None


def real_token_mask(
    layer: nn.Module, hidden: Tensor, args: Sequence[Any], kwargs: dict[str, Any]
) -> Tensor | None:
    """Bool ``(batch, tokens)``: the positions some query attends to, from the layer's attention mask.

    ``args``/``kwargs`` are the layer call's arguments besides ``hidden`` (see ``split_hidden``). Reads a
    bool or integer mask (true / non-zero: attended), an additive float mask (0 attended, large negative
    masked) or a 0/1 float mask, shaped ``(batch, tokens)`` or ``(batch, ..., queries, tokens)``; a key is
    real if any query attends to it. ``None`` when there is no mask or its format is not recognised
    (e.g. a flex-attention ``BlockMask``): callers then treat every position as real.
    """
    try:
        bound = inspect.signature(type(layer).forward).bind(layer, hidden, *args, **kwargs).arguments
    except TypeError:
        return None
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

    @classmethod
    def capture(
        cls, model: nn.Module, framing: str = "residual", **inputs: Any
    ) -> list[tuple[LayerField, Tensor]]:
        """Run ``model(**inputs)`` once and return, per encoder layer, its field and its input state.

        The fields are bound to exactly the arguments the encoder passed to each layer during that
        forward (processed attention mask included), so ``field(0, h)`` and ``field.jacobian(h)`` can be
        evaluated standalone, e.g. for stability analysis. The fields use the stock layers; the input
        states are those of the model as it is (on a converted model, the ODE solution at each layer).
        """
        layers = find_layers(model)
        captured: dict[int, tuple[Tensor, tuple, dict]] = {}

        def make_hook(index: int, layer: nn.Module) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                if index not in captured:
                    captured[index] = split_hidden(layer, args, kwargs)

            return hook

        handles = [
            layer.register_forward_pre_hook(make_hook(i, layer), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for handle in handles:
                handle.remove()
        return [
            (cls(layers[i], framing, captured[i][1], captured[i][2]), captured[i][0])
            for i in range(len(layers))
            if i in captured
        ]

    def __repr__(self) -> str:
        return f"LayerField({type(self.layer).__name__}, framing={self.framing!r})"
