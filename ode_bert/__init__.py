"""ode-bert: the layers of a pretrained transformer encoder as steps of an ODE solver (IM-BERT).

Quick start::

    import ode_bert
    model, tokenizer = ode_bert.load_model(num_labels=2)
    ode_bert.im_bert(model)                    # implicit Euler IM-connections on every layer
    ode_bert.convert(model, "euler", field="residual")   # back to the stock computation
    ode_bert.solver_stats(model)               # per-layer cost and residual of the last forward
"""

from .convert import (
    CONFIG_VERSION,
    LayerStats,
    NonFiniteError,
    ODEConnection,
    convert,
    ex_bert,
    find_layers,
    im_bert,
    ode_config,
    parse_layers,
    solver_stats,
    unconvert,
)
from .field import FRAMINGS, LayerField
from .pretrained import (
    DEFAULT_MODEL,
    from_pretrained,
    load_model,
    resolve_model_path,
    save_pretrained,
    write_model_card,
)

__all__ = [
    "CONFIG_VERSION",
    "DEFAULT_MODEL",
    "FRAMINGS",
    "LayerField",
    "LayerStats",
    "NonFiniteError",
    "ODEConnection",
    "convert",
    "ex_bert",
    "find_layers",
    "from_pretrained",
    "im_bert",
    "load_model",
    "ode_config",
    "parse_layers",
    "resolve_model_path",
    "save_pretrained",
    "solver_stats",
    "unconvert",
    "write_model_card",
]
