"""Finding the encoder's transformer blocks in a model, and selecting some of them by index.

Imports no torch at module level (``parse_layers`` is used by ``ode_bert.settings``, which the command line
reads before torch is loaded); ``find_layers`` receives a torch model, so torch is loaded by then.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

SUPPORTED_ENCODERS = (
    "models whose transformer blocks form an nn.ModuleList of config.num_hidden_layers same-typed blocks "
    "that keep the hidden state's shape, e.g. BERT/MiniLM (encoder.layer), RoBERTa, DistilBERT "
    "(transformer.layer), DeBERTa, MPNet, ViT, decoders (GPT-2 h, Llama layers), the encoder of "
    "encoder-decoder models (T5 encoder.block, BART encoder.layers), and ALBERT's shared groups "
    "(encoder.albert_layer_groups); name another stack with layers_path='...'"
)
LAYERS_PATH_KEY = "ode_bert_layers_path"  # model.config attribute: the stack convert(layers_path=...) named


class LayerStack(Sequence):
    """The transformer blocks of a model in call order: ``stack[i]`` is the module called at step ``i``.

    ``blocks`` is the ``nn.ModuleList`` found at ``path``; ``schedule[i]`` is the index in ``blocks`` of the
    module called at step ``i``. Usually every block is called once, in order; ALBERT calls each of its
    ``num_hidden_groups`` groups several times (the same vector field at several times of the ODE), so
    ``len(stack)`` is the number of steps (``num_hidden_layers``), not of modules.
    """

    def __init__(self, path: str, blocks: nn.ModuleList, schedule: Sequence[int] | None = None) -> None:
        self.path = path
        self.blocks = blocks
        self.schedule = tuple(range(len(blocks)) if schedule is None else schedule)

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - int -> module, slice -> list (Sequence protocol)
        if isinstance(index, slice):
            return [self.blocks[i] for i in self.schedule[index]]
        return self.blocks[self.schedule[index]]

    @property
    def shared(self) -> bool:
        """Whether some block is called at more than one step (ALBERT)."""
        return len(set(self.schedule)) != len(self.schedule)

    def steps_of(self, block: int) -> list[int]:
        """The steps at which ``blocks[block]`` is called, in order."""
        return [step for step, b in enumerate(self.schedule) if b == block]

    def __repr__(self) -> str:
        kind = type(self.blocks[0]).__name__ if len(self.blocks) else "empty"
        shared = f", {len(self.blocks)} shared blocks" if self.shared else ""
        return f"LayerStack({self.path!r}, {len(self)} x {kind}{shared})"


def _is_block_list(module: nn.Module) -> bool:
    """A non-empty ModuleList of same-typed composite modules (transformer blocks, not plain Linears).

    Composite: at least two submodules below the block (a T5 block holds one ModuleList of two sub-layers).
    """
    from torch import nn

    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    first = module[0]
    if isinstance(first, (nn.ModuleList, nn.ModuleDict)):  # lists of lists (Funnel): never called as blocks
        return False
    return all(type(m) is type(first) for m in module) and sum(1 for _ in first.modules()) >= 3


def _schedule(module: nn.Module, config: object) -> tuple[int, ...] | None:
    """The call order of a block list, or ``None`` if its length does not match the config's depth.

    ``num_hidden_layers`` blocks: each once, in order. ALBERT (``num_hidden_groups`` blocks for
    ``num_hidden_layers`` steps): step ``i`` calls group ``int(i / (layers / groups))``, as
    ``AlbertTransformer`` does. A config without a depth accepts any list (in order).
    """
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int):
        return tuple(range(len(module)))
    if len(module) == depth:
        return tuple(range(depth))
    groups = getattr(config, "num_hidden_groups", None)
    if isinstance(groups, int) and groups == len(module) and 0 < groups < depth:
        return tuple(int(i / (depth / groups)) for i in range(depth))
    return None


def _stack_at(model: nn.Module, path: str) -> LayerStack:
    """The stack at ``path`` (named by the user); a ``TypeError`` naming what is there if not a block list."""
    try:
        module = model.get_submodule(path)
    except AttributeError as err:
        message = f"layers_path={path!r}: {type(model).__name__} has no submodule {path!r} ({err})"
        raise TypeError(message) from err
    if not _is_block_list(module):
        raise TypeError(
            f"layers_path={path!r} is a {type(module).__name__}, not an nn.ModuleList of same-typed "
            f"transformer blocks; ode_bert supports {SUPPORTED_ENCODERS}"
        )
    schedule = _schedule(module, getattr(model, "config", None))
    return LayerStack(path, module, schedule)


def _prefer_encoder(names: list[str]) -> list[str]:
    """Among equally shallow stacks, an encoder's (a path through ``encoder``, none through ``decoder``)."""
    encoders = [n for n in names if "encoder" in n.split(".") and "decoder" not in n.split(".")]
    return encoders or names


def find_layers(model: nn.Module, path: str | None = None) -> LayerStack:
    """The model's stack of transformer blocks, in call order (a ``LayerStack``; index, iterate, ``len``).

    ``path`` names the stack (e.g. ``"encoder.block"``); without it, the one ``convert(layers_path=...)``
    stored in ``model.config`` is used, else the module tree is searched: ``nn.ModuleList``s of same-typed
    composite blocks whose length is the config's ``num_hidden_layers`` (or ALBERT's ``num_hidden_groups``);
    the shallowest wins, an encoder's before a decoder's at equal depth (the encoder of an encoder-decoder
    model; its decoder stays stock). No match, or several, is a ``TypeError`` naming the lists found and
    ``layers_path``.
    """
    config = getattr(model, "config", None)
    path = path if path is not None else getattr(config, LAYERS_PATH_KEY, None)
    if path is not None:
        return _stack_at(model, path)
    lists = [(name, module) for name, module in model.named_modules() if _is_block_list(module)]
    candidates = [(name, module, s) for name, module in lists if (s := _schedule(module, config)) is not None]
    if not candidates:
        found = ", ".join(f"{name or '(model)'} ({len(m)} x {type(m[0]).__name__})" for name, m in lists)
        depth = getattr(config, "num_hidden_layers", None)
        raise TypeError(
            f"no layer stack of {depth} blocks found in {type(model).__name__} (block lists: "
            f"{found or 'none'}); name one with layers_path='...'; ode_bert supports {SUPPORTED_ENCODERS}"
        )
    shallowest = min(name.count(".") for name, _, _ in candidates)
    top = _prefer_encoder([name for name, _, _ in candidates if name.count(".") == shallowest])
    if len(top) > 1 and len({name.rpartition(".")[0] for name in top}) == 1:
        raise TypeError(
            f"{type(model).__name__} keeps each layer split across parallel lists ({', '.join(top)}; e.g. "
            f"XLM's and FlauBERT's attentions and ffns, with the residual connections and norms in the "
            f"model's own loop): no module computes a whole layer, so there is no layer to make an ODE "
            f"step of. ode_bert supports {SUPPORTED_ENCODERS}"
        )
    if len(top) > 1:
        raise TypeError(
            f"ambiguous layer stacks in {type(model).__name__} ({', '.join(top)}); name one with "
            f"layers_path='...'; ode_bert supports {SUPPORTED_ENCODERS}"
        )
    name, module, schedule = next(c for c in candidates if c[0] == top[0])
    return LayerStack(name, module, schedule)


_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?")  # "3" or "0-4", both ends included
_SLICE = re.compile(r"\s*(-?\d+)?\s*:\s*(-?\d+)?\s*")  # Python's "start:stop", stop excluded


def parse_layers(spec: str | Sequence[int], num_layers: int | None) -> list[int]:
    """Sorted layer indices from ``"all"``, ``"0-5"``, ``"0,2,4"``, ``"0-2,5"``, a slice or a list of ints.

    A slice part reads as in Python (stop excluded, negative bounds count from the end), so one
    specification fits models of any depth: ``":-1"`` is every layer but the last, ``"1:"`` every layer
    but the first, ``"-3:"`` the last three. ``num_layers=None`` checks the specification's form only (no
    upper bound; ``"all"`` and slices give no indices): what ``ODESettings`` can check before it meets a
    model.
    """
    forms = "e.g. 'all', '0-5', '0,2', ':-1' (all but the last), [0, 2]"
    if num_layers is None:
        valid = f"valid layer specifications are {forms}"
    else:
        bounds = f"slice bounds -{num_layers}..{num_layers}"
        valid = f"valid layer indices are 0..{num_layers - 1}, {bounds} ({forms})"
    resolved = True  # False where a slice awaits the model's depth
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(num_layers or 0))
        indices: list[int] = []
        for part in spec.split(","):
            if (match := _RANGE.fullmatch(part)) is not None:
                start = int(match.group(1))
                stop = int(match.group(2)) if match.group(2) is not None else start
                if stop < start:
                    raise ValueError(f"bad layer range {part.strip()!r} in {spec!r} (start > end); {valid}")
                indices.extend(range(start, stop + 1))
            elif (match := _SLICE.fullmatch(part)) is not None:
                if num_layers is None:
                    resolved = False
                    continue
                start, stop = (None if b is None else int(b) for b in match.groups())
                if any(b is not None and not -num_layers <= b <= num_layers for b in (start, stop)):
                    raise ValueError(f"slice bound out of range in {part.strip()!r} of {spec!r}; {valid}")
                selected = list(range(num_layers)[start:stop])
                if not selected:
                    raise ValueError(f"slice {part.strip()!r} in {spec!r} selects no layers; {valid}")
                indices.extend(selected)
            else:
                raise ValueError(f"bad layer specification {spec!r}: cannot read {part!r}; {valid}")
    elif isinstance(spec, Sequence) and all(isinstance(i, int) and not isinstance(i, bool) for i in spec):
        indices = list(spec)
    else:
        raise ValueError(f"layers must be a string or a sequence of ints, got {spec!r}; {valid}")
    if not indices and resolved:
        raise ValueError(f"no layers selected by {spec!r}; {valid}")
    bad = [i for i in indices if i < 0 or (num_layers is not None and i >= num_layers)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range in {spec!r}; {valid}")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate layer indices {duplicates} in {spec!r}; {valid}")
    return sorted(indices)
