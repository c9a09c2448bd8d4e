"""The probe ``convert`` runs before it changes a model: can this stack of blocks be ODE steps?

One forward of the model on tiny inputs, with every block's ``forward`` wrapped, shows whether each block
maps a hidden state to one of the same shape, whether its output holds that state where ode_bert takes it
from, in which order the blocks run, and whether the hidden states are sequence-first (XLNet).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .field import split_hidden, stock_forward
from .layers import LayerStack


class StackRefused(TypeError):
    """A layer stack that cannot be a sequence of ODE steps, found by ``probe_stack`` (the message: why)."""


def _probe_inputs(model: nn.Module) -> dict[str, object] | None:
    """Tiny inputs for one forward of ``model`` (batch 1), from its main input name and config; ``None`` when
    this module does not know how to make them."""
    config = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    name = getattr(model, "main_input_name", "input_ids")
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    vocab = getattr(config, "vocab_size", None)
    if name == "input_ids" and isinstance(vocab, int) and vocab > 8:
        ids = torch.tensor([[vocab - 2, vocab - 3, vocab - 4, vocab - 5]], device=device)
        inputs: dict[str, object] = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = ids[:, :2]
    elif name == "pixel_values" and isinstance(getattr(config, "num_channels", None), int):
        size = getattr(config, "image_size", None)
        height, width = (size, size) if isinstance(size, int) else tuple(size or (0, 0))
        if not height or not width:
            return None
        pixels = torch.zeros(1, config.num_channels, height, width, device=device, dtype=dtype)
        inputs = {"pixel_values": pixels}
    elif name == "input_values":
        inputs = {"input_values": torch.zeros(1, 1600, device=device, dtype=dtype)}
    elif name == "input_features" and isinstance(getattr(config, "max_source_positions", None), int):
        frames = 2 * config.max_source_positions
        inputs = {"input_features": torch.zeros(1, config.num_mel_bins, frames, device=device, dtype=dtype)}
    else:
        return None
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


@dataclass
class StackProbe:
    """What ``probe_stack`` saw: the order of the block calls and the hidden state's layout."""

    order: list[int] = field(default_factory=list)
    sequence_first: bool = False  # hidden states shaped (tokens, batch, ...), as XLNet's


def probe_stack(model: nn.Module, stack: LayerStack) -> StackProbe | None:
    """Run the model once on tiny inputs and check that ``stack`` can be a sequence of ODE steps.

    Each block call must return a tensor (or a tuple/list starting with one) shaped like its hidden-state
    input, and the blocks must be called in ``stack.schedule`` order; otherwise ``StackRefused`` names the
    block and the reason (Swin's stages change the shape, SqueezeBERT's blocks return a dict). The blocks'
    ``forward`` is wrapped for the probe (models that call ``block.forward`` directly are seen too). The
    model runs in eval mode without gradients and with the random state restored, so the probe changes
    nothing. Returns ``None`` when no probe ran (inputs of an unknown kind, or a forward that fails before
    the stack is judged): the layer connections then check every call instead.
    """
    inputs = _probe_inputs(model)
    if inputs is None:
        return None
    seen = StackProbe()
    tokens = next(v for v in inputs.values() if isinstance(v, torch.Tensor)).shape[1]

    def wrap(number: int, block: nn.Module) -> object:
        inner = block.__dict__.get("forward") or stock_forward(block)
        where = f"{type(block).__name__} at {stack.path}[{number}]"

        def probe(*args: object, **kwargs: object) -> object:
            out = inner(*args, **kwargs)
            seen.order.append(number)
            hidden = split_hidden(block, args, kwargs)[0]
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if not isinstance(first, torch.Tensor):
                raise StackRefused(
                    f"{where} returns {type(out).__name__}, not a hidden-state tensor or a tuple starting "
                    f"with one: ode_bert cannot take the hidden state out of it, so the stack cannot be ODE "
                    f"steps"
                )
            if isinstance(hidden, torch.Tensor) and first.shape != hidden.shape:
                raise StackRefused(
                    f"{where} changes the hidden state's shape from {tuple(hidden.shape)} to "
                    f"{tuple(first.shape)}: a vector field maps a state to one of the same shape, so a stack "
                    f"whose blocks change the shape (e.g. Swin's stages, which merge patches) cannot be ODE "
                    f"steps; name another stack with layers_path='...'"
                )
            if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and tokens > 1:
                seen.sequence_first = tuple(hidden.shape[:2]) == (tokens, 1)
            return out

        return probe

    modes = [(m, m.training) for m in model.modules()]
    saved = [(block, block.__dict__.get("forward")) for block in stack.blocks]
    for number, block in enumerate(stack.blocks):
        block.forward = wrap(number, block)
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(**inputs)
    except StackRefused:
        raise
    except Exception:  # noqa: BLE001 - the tiny inputs did not suit this model: no verdict
        return None
    finally:
        for block, forward in saved:
            if forward is None:
                del block.forward
            else:
                block.forward = forward
        for module, training in modes:
            module.training = training
    schedule = list(stack.schedule)
    if not seen.order:
        raise StackRefused(
            f"{type(model).__name__}'s forward never runs a block of {stack.path} "
            f"({type(stack.blocks[0]).__name__}); name the stack it runs with layers_path='...'"
        )
    if seen.order[: len(schedule)] != schedule:
        raise StackRefused(
            f"{type(model).__name__} calls the blocks of {stack.path} in the order {seen.order}, not "
            f"{schedule} as ode_bert expects; name the stack with layers_path='...'"
        )
    return seen
