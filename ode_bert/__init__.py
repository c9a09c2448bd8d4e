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

import importlib
import sys
import types
from typing import Any

# public name -> the submodule that defines it
_EXPORTS: dict[str, str] = {
    "CONFIG_VERSION": "settings",
    "FRAMINGS": "settings",
    "ODESettings": "settings",
    "PRESETS": "settings",
    "LayerStats": "convert",
    "NonFiniteError": "convert",
    "ODEConnection": "convert",
    "convert": "convert",
    "ex_bert": "convert",
    "im_bert": "convert",
    "ode_config": "convert",
    "solver_stats": "convert",
    "unconvert": "convert",
    "find_layers": "layers",
    "parse_layers": "layers",
    "LayerField": "field",
    "DEFAULT_MODEL": "pretrained",
    "from_pretrained": "pretrained",
    "load_model": "pretrained",
    "resolve_model_path": "pretrained",
    "save_pretrained": "pretrained",
    "write_model_card": "pretrained",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *(name for name in globals() if name.startswith("__"))})


class _Package(types.ModuleType):
    """The package's ``convert`` is the function: importing the submodule ``ode_bert.convert`` (which binds
    it as an attribute of the package) binds the function instead, as the eager imports used to."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "convert" and isinstance(value, types.ModuleType):
            value = value.convert
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
