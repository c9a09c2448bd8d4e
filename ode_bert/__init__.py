"""ode-bert: the layers of a pretrained transformer encoder as steps of an ODE solver (IM-BERT).

Quick start::

    import ode_bert
    model, tokenizer = ode_bert.load_model(num_labels=2)
    ode_bert.im_bert(model)                    # implicit Euler IM-connections on every layer
    ode_bert.convert(model, "euler", field="residual")   # back to the stock computation
    ode_bert.convert(model, ode_bert.ODESettings.preset("im"))   # the same settings as one object
    ode_bert.solver_stats(model)               # per-layer cost and residual of the last forward

The public names are loaded on first use (PEP 562), so ``import ode_bert`` (and the ``ode-bert`` command
line's ``--help``) does not import torch or transformers.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from ._lazy import lazy_exports

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "CONFIG_VERSION": "settings",
    "FRAMINGS": "settings",
    "ODESettings": "settings",
    "PRESETS": "settings",
    "EvaluationBudgetWarning": "convert",
    "LayerStats": "convert",
    "NonFiniteError": "convert",
    "ODEConnection": "convert",
    "convert": "convert",
    "ex_bert": "convert",
    "im_bert": "convert",
    "ode_config": "convert",
    "solver_stats": "convert",
    "unconvert": "convert",
    "LayerStack": "layers",
    "find_layers": "layers",
    "parse_layers": "layers",
    "LayerField": "field",
    "DEFAULT_MODEL": "pretrained",
    "MPNET_MODEL": "pretrained",
    "PackagedModelError": "pretrained",
    "from_pretrained": "pretrained",
    "load_model": "pretrained",
    "resolve_model_path": "pretrained",
    "save_pretrained": "pretrained",
    "write_model_card": "pretrained",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


class _Package(types.ModuleType):
    """The package's ``convert`` is the function: importing the submodule ``ode_bert.convert`` (which binds
    it as an attribute of the package) binds the function instead, as the eager imports used to."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "convert" and isinstance(value, types.ModuleType):
            value = value.convert
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
