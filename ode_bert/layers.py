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
    "BERT-style encoders with an nn.ModuleList of transformer blocks, e.g. BERT/MiniLM (encoder.layer), "
    "RoBERTa, ELECTRA, DistilBERT (transformer.layer)"
)


def _is_block_list(module: nn.Module) -> bool:
    """A non-empty ModuleList of same-typed composite modules (transformer blocks, not plain Linears)."""
    from torch import nn

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


def parse_layers(spec: str | Sequence[int], num_layers: int | None) -> list[int]:
    """Sorted layer indices from ``"all"``, ``"0-5"``, ``"0,2,4"``, ``"0-2,5"`` or a list of ints.

    ``num_layers=None`` checks the specification's form only (no upper bound; ``"all"`` gives ``[]``):
    what ``ODESettings`` can check before it meets a model.
    """
    if num_layers is None:
        valid = "valid layer specifications are e.g. 'all', '0-5', '0,2', [0, 2]"
    else:
        last = num_layers - 1
        valid = f"valid layer indices are 0..{last} (e.g. 'all', '0-{last}', '0,2', [0, 2])"
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(num_layers or 0))
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
    bad = [i for i in indices if i < 0 or (num_layers is not None and i >= num_layers)]
    if bad:
        raise ValueError(f"layer indices {bad} out of range in {spec!r}; {valid}")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"duplicate layer indices {duplicates} in {spec!r}; {valid}")
    return sorted(indices)
