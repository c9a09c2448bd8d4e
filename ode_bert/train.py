"""Fine-tuning a (converted) encoder on one GLUE task, resumably, through HF Accelerate.

``train(TrainConfig(...))`` writes a run directory::

    train_config.json        the configuration (``evaluate`` reads the task from it)
    checkpoint.safetensors   model + optimizer + scheduler + RNG states (+ the warm-start store), after each
                             epoch (removed at the end)
    model/                   the final model and tokenizer (``ode_bert.from_pretrained`` reloads it)
    train_history.json       per epoch: mean training loss, gradient norms before clipping, convergence of
                             the implicit solves and of the implicit gradient's adjoint solves, and at
                             every step the loss, norm and worst residuals; the machine it ran on. Written
                             last, it marks the run as complete

Every setting (including the conversion, by building the model) and the data files are checked before
anything is written, so a run that fails at start-up leaves nothing behind. The data order of epoch ``e`` is
a function of ``(seed, e)`` only, and the RNG states are restored from the checkpoint, so a resumed run ends
with the same weights as an uninterrupted one. Runs unchanged under ``accelerate launch -m ode_bert train
...``; on CUDA it trains with bf16 autocast.

The checkpoint is a safetensors file, so loading it runs no code (a pickle, as ``torch.save`` writes, can):
its tensors are the model's, the optimizer's and the torch RNG states; everything else (epoch, history,
settings, scheduler state, Python and NumPy RNG states, the optimizer's non-tensor state) is JSON in the
header's metadata, with tuples and non-string dictionary keys spelled out (see ``_encode``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import platform
import random
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup, set_seed

from solvers import AdjointSolve, ConvergenceWarning, RootInfo, watch_adjoint_solves

from .convert import CONFIG_KEY, convert, ode_config, solver_stats
from .data import Example, check_data, get_task, holdout_split, load_train, stratified_subset
from .encoding import Collator, EncodedDataset
from .io import atomic_open, write_json_atomic
from .layers import find_layers, parse_layers
from .pretrained import dropout_overrides, load_model
from .settings import (
    IM_BERT_TOL_BEFORE_0_2,
    SETTING_NAMES,
    VARIANT_PRESETS,
    ODESettings,
    OptionalSettings,
    settings_for_variant,
)
from .warm_start import WarmStartStore

CHECKPOINT = "checkpoint.safetensors"
LEGACY_CHECKPOINT = "checkpoint.pt"  # the pickle format of earlier versions: never loaded
CHECKPOINT_FORMAT = "ode-bert-checkpoint-v1"
CONFIG_FILE = "train_config.json"
HISTORY_FILE = "train_history.json"
MODEL_DIR = "model"
# files of a run; a folder holding any of them (or model/) holds a run
RUN_FILES = (CONFIG_FILE, CHECKPOINT, LEGACY_CHECKPOINT, HISTORY_FILE, "metrics.json", "predictions.json")
# settings that say where a run is, not what it is: moving a run folder keeps it the same run
LOCATION_SETTINGS = frozenset({"output_dir"})
# settings added after runs were recorded without them: a saved run lacking one had its value here
LATER_SETTINGS: dict[str, Any] = {"warm_start": False, "eval_tol": None, "dropout": None}


class RunDirError(OSError, ValueError):
    """A run directory or one of its files cannot be used: missing, damaged, from other settings, or not
    writable. The message names the file, what is wrong and how to recover. It is an ``OSError`` (it is
    about files; ``errno`` is set for storage failures such as a full disk) and a ``ValueError`` (the
    command line reports it as an error, not a traceback)."""


@dataclass
class _RunTask:
    """The first fields of ``TrainConfig`` (before the solver settings, as in train_config.json)."""

    task: str = "sst2"
    model: str | None = None  # hub name or local path; None = the offline all-MiniLM-L6-v2
    variant: str = "im"


@dataclass
class TrainConfig(OptionalSettings, _RunTask):
    """Everything that defines a fine-tuning run.

    ``variant``: ``bert`` (stock model), ``ex`` (EX-BERT), ``im`` (IM-BERT) or ``ode`` (``convert`` with
    ``solver``). The solver settings are the fields of ``ODESettings`` (``solver``, ``layers``, ``step``,
    ``field``, ``root``, ``grad``, ``tol``, ``max_iter``, ``solver_options``), inherited from
    ``OptionalSettings`` after ``task``, ``model``, ``variant``: set ones are passed on, so ``None`` (an
    empty ``solver_options``) means the variant's default (``ODESettings.preset("ex")``/``"im"``, the
    ``ODESettings`` defaults for ``ode``). ``settings()`` is the conversion; which settings a variant
    takes is ``ode_bert.settings.settings_taken_by``.

    ``warm_start``: start each example's implicit solves from its fixed points of the previous epoch
    (``ode_bert.warm_start``; training only, evaluation starts cold); the store is part of the checkpoint.
    Variants without implicit layers refuse it.

    ``dropout``: every dropout probability of the model's config set to this for fine-tuning
    (``pretrained.dropout_overrides``; ``None``: the pretrained model's own, 0.1 for MiniLM).
    """

    epochs: int = 3
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 1
    data_seed: int | None = None  # seed of the low-resource subset; None = seed
    max_length: int = 128
    train_samples: int | None = None  # low-resource: a stratified subset of this many training examples
    holdout: float | None = None  # fraction of the training examples held out for choosing hyperparameters
    output_dir: str = "runs/run"
    data_dir: str | None = None
    warm_start: bool = False
    dropout: float | None = None
    resume: bool = False

    def validate(self) -> None:
        """Reject bad settings early, naming the valid choices."""
        get_task(self.task)
        if not isinstance(self.solver_options, dict):
            raise ValueError(f"solver_options must be a dictionary, got {self.solver_options!r}")
        self.settings()  # the variant takes the solver settings given, and they are valid
        for name in ("seed", "epochs", "batch_size", "max_length", "train_samples", "data_seed", "max_iter"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"train_samples must be >= 1, got {self.train_samples}")
        if self.holdout is not None and not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name, low, inclusive in (("lr", 0.0, False), ("weight_decay", 0.0, True),
                                     ("max_grad_norm", 0.0, False)):  # fmt: skip
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < low or (value == low and not inclusive):
                bound = ">= 0" if inclusive else "> 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
        rate = self.dropout
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                                 or not 0 <= rate < 1):  # fmt: skip
            raise ValueError(f"dropout must be a probability in [0, 1) or None (the model's own), got "
                             f"{self.dropout!r}")  # fmt: skip
        if not isinstance(self.output_dir, (str, os.PathLike)) or not str(self.output_dir):
            raise ValueError(f"output_dir must be a path, got {self.output_dir!r}")
        if not isinstance(self.warm_start, bool):
            raise ValueError(f"warm_start must be True or False, got {self.warm_start!r}")
        if self.warm_start and not self.has_implicit_layers():
            raise ValueError(
                f"warm_start needs implicit layers, and variant {self.variant!r}"
                + (f" with solver {self.settings().solver!r}" if self.settings() is not None else "")
                + " has none: use variant 'im' (or 'ode' with implicit_euler, implicit_midpoint or trapezoid)"
            )

    def has_implicit_layers(self) -> bool:
        """Whether the conversion makes some layer an implicit step (the only ones warm starts act on)."""
        settings = self.settings()
        return settings is not None and settings.make_method(on_failure="ignore").implicit

    def settings(self) -> ODESettings | None:
        """The conversion of this run: the variant's settings with the ones set here (``None``: ``bert``).

        A setting the variant does not take, or one the solver rejects, is a ``ValueError`` naming it."""
        return settings_for_variant(self.variant, **{name: getattr(self, name) for name in SETTING_NAMES})

    def to_json(self) -> dict[str, Any]:
        """The settings saved in ``train_config.json``, without ``resume`` (how, not what, a run is)."""
        values = dataclasses.asdict(self)
        del values["resume"]
        return values


def apply_variant(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Convert ``model`` in place as ``config.variant`` says (``bert`` leaves it unchanged)."""
    settings = config.settings()
    return model if settings is None else convert(model, settings)


def split_training_data(config: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(train, held_out) examples of a run: the low-resource subset, minus the held-out part if any.

    Both draws are seeded by ``data_seed`` (default ``seed``), so ``evaluate`` can rebuild the held-out set.
    """
    examples = load_train(config.task, config.data_dir)
    data_seed = config.seed if config.data_seed is None else config.data_seed
    if config.train_samples is not None:
        examples = stratified_subset(examples, config.train_samples, data_seed)
    if config.holdout is None:
        return examples, []
    return holdout_split(examples, config.holdout, data_seed)


class EpochSampler(Sampler[int]):
    """A random order of the dataset that depends only on ``(seed, epoch)``: resuming replays it exactly."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    state = {
        "python": random.getstate(),
        "numpy": (name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under their path (``{"__tensor__": name}``).

    Dictionaries become ``{"__dict__": [[key, value], ...]}`` (keys keep their type: the optimizer's are
    ints), tuples ``{"__tuple__": [...]}``; anything but tensors, containers and JSON scalars is refused.
    """
    if isinstance(value, torch.Tensor):
        name = path
        while name in tensors:
            name += "_"
        tensor = value.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in storages:
            tensor = tensor.clone()  # shared (tied) storage: safetensors stores each tensor on its own
        if tensor.numel():
            storages.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
        return {"__tensor__": name}
    if isinstance(value, dict):
        for key in value:
            if not (key is None or isinstance(key, (str, int, float, bool))):
                raise TypeError(f"checkpoint: cannot store dictionary key {key!r} at {path}")
        return {"__dict__": [[k, _encode(v, f"{path}/{k}", tensors, storages)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors, storages) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"checkpoint: cannot store {type(value).__name__} at {path}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of ``_encode``."""
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in value["__tuple__"])
        if set(value) == {"__dict__"}:
            return {k: _decode(v, tensors) for k, v in value["__dict__"]}
        raise ValueError(f"unexpected object with keys {sorted(value)}")
    return value


def _recovery(run_dir: Path) -> str:
    return (
        f"to recover, delete it and run again with --resume in {run_dir} (the run restarts from its last "
        "intact checkpoint, or from epoch 1 if there is none, with the saved settings), or start again "
        "in a new folder (--output-dir)"
    )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` as a safetensors checkpoint (module docstring) atomically (``atomic_open``): an
    interrupted or failed save (e.g. a full disk) keeps the old checkpoint and leaves no temporary file."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "state", tensors, set())
    data = save(tensors, metadata={"format": CHECKPOINT_FORMAT, "state": json.dumps(encoded)})
    try:
        with atomic_open(path, "wb") as f:
            f.write(data)
    except OSError as err:
        kept = "the previous checkpoint is kept" if path.is_file() else "no earlier checkpoint exists"
        raise _write_failure(err, path, kept, "Free space (or fix the folder)", "the checkpoint ") from err


def _write_failure(err: OSError, path: Path, kept: str, fix: str, what: str = "") -> RunDirError:
    """The ``RunDirError`` for a failed write of ``path`` (``what`` names it, e.g. "the checkpoint "): the
    cause (a full disk named as such), what is ``kept``, and how to go on (``fix``, then ``--resume``)."""
    full = " (disk full)" if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return RunDirError(
        err.errno,
        f"could not write {what}{path}{full}: {err.strerror or err}; {kept} and no temporary file is left. "
        f"{fix} and run again with --resume in {path.parent}",
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``; no code in the file runs. A damaged or foreign
    file is refused with a ``RunDirError`` that names it and says how to recover."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        tensors = load(data)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise RunDirError(
            f"{path} is damaged or not an ode-bert checkpoint (not a complete safetensors file: {err}); "
            + _recovery(path.parent)
        ) from err
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise RunDirError(
            f"{path} is not an ode-bert checkpoint (format {metadata.get('format')!r}, expected "
            f"{CHECKPOINT_FORMAT!r}); " + _recovery(path.parent)
        )
    try:
        state = _decode(json.loads(metadata["state"]), tensors)
        required = {"model", "optimizer", "scheduler", "rng", "epoch", "history", "config"}
        if not isinstance(state, dict) or not required <= set(state):
            raise ValueError(f"entries {sorted(required - set(state or {}))} are missing")
    except (KeyError, ValueError, TypeError) as err:
        raise RunDirError(f"{path}: damaged checkpoint state ({err}); " + _recovery(path.parent)) from err
    return state


def machine_record() -> dict[str, Any]:
    """The machine and software a run ran on (CPU model, ode-bert and library versions, threads, accelerator):
    results of implicit solves can depend on them in the last digits, which a stopping decision can amplify,
    and a training run's random draws on ode-bert's version (README: 0.3.0)."""
    import transformers

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    record: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "ode_bert": _installed_version("ode-bert"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
    }
    if torch.cuda.is_available():
        record["device"] = f"cuda: {torch.cuda.get_device_name()}"
        record["cuda"] = torch.version.cuda
    return record


def _installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (``"not installed"`` when run from a source tree alone)."""
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and LayerNorm weights, as in BERT fine-tuning."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished training run."""
    return (run_dir / HISTORY_FILE).is_file() and (run_dir / MODEL_DIR / "config.json").is_file()


def read_train_config(run_dir: Path) -> dict[str, Any]:
    """The saved settings of the run in ``run_dir``; a missing or damaged file is a ``RunDirError``."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise RunDirError(f"{path} is missing, so the settings of the run in {run_dir} are unknown") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirError(
            f"{path} is damaged ({err}); the settings of the run are unknown. To recover, restore the file "
            "(the settings are also in the checkpoint while the run is unfinished) or start again in a new "
            "folder (--output-dir)"
        ) from err
    required = ("task", "variant", "seed", "max_length")
    missing = [k for k in required if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise RunDirError(
            f"{path} is damaged: it is not a dictionary of training settings (lacks {missing}). To recover, "
            "restore the file or start again in a new folder (--output-dir)"
        )
    return saved


def settings_differ(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """The settings (``train_config.json`` keys, location aside) in which ``saved`` and ``config`` differ; a
    setting added later (``LATER_SETTINGS``) that ``saved`` lacks counts as its value then."""
    saved = {**LATER_SETTINGS, **saved}
    current = json.loads(json.dumps(config.to_json()))
    keys = (set(saved) | set(current)) - LOCATION_SETTINGS
    return sorted(k for k in keys if saved.get(k) != current.get(k))


def _run_files(run_dir: Path) -> list[str]:
    """The run files present in ``run_dir`` (``RUN_FILES`` and ``model/``)."""
    names = [name for name in RUN_FILES if (run_dir / name).exists()]
    return names + ([f"{MODEL_DIR}/"] if (run_dir / MODEL_DIR).exists() else [])


def conversion_changes(
    made_with: dict[str, Any] | None,
    now: dict[str, Any] | None,
    num_layers: int,
    source: str = "model.config",
) -> list[str]:
    """``"setting: then -> now"`` for each conversion setting in which a run or checkpoint made earlier
    (``made_with``, its stored ``model.config.ode_bert``, read from ``source``) differs from what its training
    settings resolve to now (``now``, ``ODESettings.to_dict``): a default changed in between, as im_bert's
    tolerance did in 0.2.0. Layer strings (``"all"``) are resolved for a model of ``num_layers`` layers."""
    if made_with is None or now is None:
        names = [d["solver"] if d else "none (the stock model)" for d in (made_with, now)]
        return [] if made_with is now else [f"conversion: {names[0]} -> {names[1]}"]
    then = ODESettings.from_dict(made_with, source).to_dict()
    then["layers"] = parse_layers(then["layers"], num_layers)
    now = {**now, "layers": parse_layers(now["layers"], num_layers)}
    keys = sorted((set(then) | set(now)) - {"version"})
    return [f"{k}: {then.get(k)!r} -> {now.get(k)!r}" for k in keys if then.get(k) != now.get(k)]


def stored_conversion(run_dir: Path) -> dict[str, Any] | None:
    """The conversion a finished run's model was saved with (``model/config.json``'s ``ode_bert``; ``None``:
    the stock model), as stored; a file that cannot be read is a ``RunDirError`` naming it."""
    config_json = Path(run_dir) / MODEL_DIR / "config.json"
    try:
        return json.loads(config_json.read_text(encoding="utf-8")).get(CONFIG_KEY)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise RunDirError(f"{config_json} cannot be read ({err}); make the run again elsewhere") from err


def _model_layer_count(model_dir: Path, stored: dict[str, Any]) -> int:
    """The number of layers of a saved model (its config.json), for resolving ``"all"``."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(model_dir).num_hidden_layers)
    except (OSError, ValueError, AttributeError, TypeError):  # an unknown family: the stored indices' range
        return max(stored["layers"], default=-1) + 1


def _conversion_refusal(where: Path, changes: list[str]) -> str:
    return (
        f"{where} was made with other solver settings than this run's settings resolve to now "
        f"({'; '.join(changes)}); where a run left them to the defaults, those may have changed since "
        "(im_bert's tolerance: 1e-4 before ode-bert 0.2.0, 1e-2 since). To reuse or resume it, give the "
        "settings it was made with (e.g. --tol 0.0001; in an experiment --set '{\"tol\": 0.0001}'), or "
        "make it again in a new folder"
    )


def check_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to overwrite another run, or to resume (or reuse) a run whose saved settings are missing,
    damaged or differ from ``config``. The solver settings of a finished run are judged by the conversion its
    model was made with (``conversion_changes``): ``tol`` left to the default and ``tol=1e-4`` given now
    are the same for a run trained before 0.2.0, different for one trained since. A checkpoint's are judged
    when it is loaded (``_restore``). Writes nothing."""
    run_dir = Path(run_dir)
    _check_output_dir(run_dir)
    present = _run_files(run_dir) if run_dir.is_dir() else []
    if not present:
        return
    if CONFIG_FILE not in present:
        raise RunDirError(
            f"{run_dir} holds run files ({', '.join(present)}) but no {CONFIG_FILE}, so the settings they "
            f"were made with are unknown and cannot be checked; it is neither resumed nor overwritten. To "
            f"recover, restore {CONFIG_FILE} (a copy from where the run was made), or start again in a new "
            "folder (--output-dir)"
        )
    if not config.resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True (--resume) or another output dir"
        )
    differing = settings_differ(read_train_config(run_dir), config)
    if is_complete(run_dir) or CHECKPOINT in present:  # its solver settings: judged by the conversion it used
        differing = [k for k in differing if k not in SETTING_NAMES]
    if differing:
        raise RunDirError(f"cannot resume {run_dir}: settings differ from the saved run in {differing}")
    if is_complete(run_dir):
        stored = stored_conversion(run_dir)
        settings = config.settings()
        layers = _model_layer_count(run_dir / MODEL_DIR, stored) if stored else 0
        wanted = None if settings is None else settings.to_dict()
        changes = conversion_changes(stored, wanted, layers, str(run_dir / MODEL_DIR / "config.json"))
        if changes:
            raise RunDirError(_conversion_refusal(run_dir, changes))
    if LEGACY_CHECKPOINT in present:
        raise RunDirError(
            f"{run_dir / LEGACY_CHECKPOINT} is a checkpoint in the pickle format of earlier ode-bert "
            "versions; loading a pickle can run code, so it is not loaded. Delete it and run again with "
            "--resume to restart this run from epoch 1 with its saved settings, or start again elsewhere"
        )


def _check_output_dir(run_dir: Path) -> None:
    """Refuse an output dir that is a file or lies under one, or that cannot be written, before any write."""
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == run_dir else f"lies under {existing}, which is a file"
        raise RunDirError(f"output dir {run_dir} {what}, not a folder; choose another --output-dir")
    try:  # a real write: permission bits do not tell for root, read-only mounts or quotas
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".ode-bert-write-test.", suffix=".tmp")
        os.close(fd)
        Path(probe).unlink(missing_ok=True)
    except OSError as err:
        raise RunDirError(
            err.errno,
            f"output dir {run_dir} cannot be written ({existing}: {err.strerror or err}); choose a writable "
            "--output-dir",
        ) from err


_ORPHAN = re.compile(r"^\.(?:.+\.[a-z0-9_]{8}\.tmp|model\.[a-z0-9_]{8})$")


def remove_orphans(run_dir: Path) -> list[str]:
    """Remove what an interrupted save left in ``run_dir`` (``atomic_open``'s ``.NAME.XXXXXXXX.tmp`` files,
    ``_save_final``'s ``.model.XXXXXXXX`` folders); returns their names. Call it only while no other
    process writes to ``run_dir``."""
    removed = []
    for entry in sorted(run_dir.iterdir()) if run_dir.is_dir() else []:
        if not _ORPHAN.match(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


class SolveTally:
    """Convergence of implicit solves over many forwards or backward passes: (example, layer) solves,
    converged ones, worst relative residual, iterations. ``add`` takes a model's forward solves
    (``solver_stats``), ``add_solve`` one solve's record (an adjoint solve of the implicit gradient)."""

    def __init__(self) -> None:
        self.solves = self.converged = self.layer_solves = self.iterations = self.max_iterations = 0
        self.max_residual: float | None = None
        self.tol: float | None = None

    def add(self, model: torch.nn.Module) -> None:
        for stats in solver_stats(model):
            if stats.root is not None:
                self.add_solve(stats.root, stats.iterations, stats.residual, stats.tol)

    def add_solve(self, root: RootInfo, iterations: int, residual: float | None, tol: float | None) -> None:
        """One layer's solve: its per-sample record, iterations and worst relative residual (max over the
        batch) and the tolerance it stopped at."""
        self.layer_solves += 1
        self.solves += root.converged.numel()
        self.converged += int(root.converged.sum())
        self.iterations += iterations
        self.max_iterations = max(self.max_iterations, iterations)
        if residual is not None:
            self.max_residual = max(self.max_residual or 0.0, float(residual))
        if tol is not None:
            self.tol = max(self.tol or 0.0, float(tol))

    def add_adjoint(self, solve: AdjointSolve) -> None:
        """An adjoint solve of the implicit gradient (a ``watch_adjoint_solves`` callback)."""
        info = solve.info
        self.add_solve(info, int(info.iterations.max()), info.max_rel_residual, info.tol)

    def _row(self) -> list[float]:
        residual = -1.0 if self.max_residual is None else self.max_residual  # -1: none recorded
        tol = -1.0 if self.tol is None else self.tol
        counts = [self.solves, self.converged, self.layer_solves, self.iterations, self.max_iterations]
        return [*counts, residual, tol]

    @classmethod
    def _from_rows(cls, rows: list[list[float]]) -> SolveTally:
        total = cls()
        for solves, converged, layer_solves, iterations, max_iterations, residual, tol in rows:
            total.solves += int(solves)
            total.converged += int(converged)
            total.layer_solves += int(layer_solves)
            total.iterations += int(iterations)
            total.max_iterations = max(total.max_iterations, int(max_iterations))
            if residual >= 0:
                total.max_residual = max(total.max_residual or 0.0, residual)
            if tol >= 0:
                total.tol = max(total.tol or 0.0, tol)
        return total

    def __add__(self, other: SolveTally) -> SolveTally:
        return self._from_rows([self._row(), other._row()])

    def merge(self, accelerator: Any) -> SolveTally:
        """The tally over all processes of a data-parallel run (itself in a single process)."""
        if accelerator.num_processes == 1:
            return self
        values = torch.tensor([self._row()], dtype=torch.float64, device=accelerator.device)
        return self._from_rows(accelerator.gather(values).cpu().tolist())

    def postfix(self) -> dict[str, str]:
        if not self.solves:
            return {}
        return {"conv": f"{100 * self.converged / self.solves:.0f}%", "res": f"{self.max_residual or 0:.1e}"}

    def record(self) -> dict[str, Any] | None:
        """The figures for the run record (``None`` for a model without implicit solves)."""
        if not self.layer_solves:
            return None
        return {
            "example_solves": self.solves,
            "example_converged": self.converged,
            "example_converged_fraction": self.converged / self.solves if self.solves else None,
            "layer_solves": self.layer_solves,
            "mean_iterations": self.iterations / self.layer_solves,
            "max_iterations": self.max_iterations,
            "max_rel_residual": self.max_residual,
            "tol": self.tol,
        }


def grad_norm_summary(norms: list[float], max_norm: float) -> dict[str, float] | None:
    """Mean, median and largest gradient norm of an epoch's steps, before clipping, and the share of steps
    clipped to ``max_norm``: a run that stops learning shows here whether its updates were cut short.
    ``None`` where no norm was recorded."""
    if not norms:
        return None
    return {"mean": float(np.mean(norms)), "median": float(np.median(norms)), "max": max(norms),
            "clipped_fraction": sum(n > max_norm for n in norms) / len(norms), "max_norm": max_norm}


def train(config: TrainConfig) -> Path:
    """Fine-tune as ``config`` says; returns the run directory (see the module docstring for its files).

    Everything is checked before the first write: the settings (the conversion by building the model), the
    run directory (another run, missing or differing saved settings, a file, not writable), the data files
    and, on resume, the checkpoint. Leftovers of an interrupted save are removed when the run starts.
    """
    config.validate()
    run_dir = Path(config.output_dir)
    check_run_dir(run_dir, config)
    if config.resume and is_complete(run_dir):
        return run_dir
    try:
        from accelerate import Accelerator
    except ImportError as err:
        raise ImportError("training needs HF Accelerate: pip install 'ode-bert[train]'") from err
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    if config.warm_start and accelerator.num_processes > 1:
        raise ValueError(
            f"warm_start keeps each example's fixed points in its process, and this run has "
            f"{accelerator.num_processes} processes, which see different examples each epoch; train in one "
            f"process or without warm_start"
        )
    task = get_task(config.task)
    # the evaluation data (clean dev, AdvGLUE) too: a damaged file fails now, not after training
    check_data(config.task, config.data_dir, include_train=False)
    examples, _ = split_training_data(config)

    set_seed(config.seed)  # the classifier head's initialisation depends on the seed only
    overrides = {} if config.dropout is None else dropout_overrides(config.model, config.dropout)
    model, tokenizer = load_model(config.model, num_labels=task.num_labels, **overrides)
    apply_variant(model, config)
    dataset = WithExampleIds(EncodedDataset(examples, tokenizer, config.max_length))
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=EpochSampler(len(dataset), config.seed),
        collate_fn=CollatorWithExampleIds(Collator(tokenizer)),
    )
    store = WarmStartStore() if config.warm_start else None
    total_steps = len(loader) * config.epochs
    optimizer = torch.optim.AdamW(parameter_groups(model, config.weight_decay), lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    checkpoint_path = run_dir / CHECKPOINT
    start_epoch, history = 0, []
    if config.resume and checkpoint_path.is_file():
        state = load_checkpoint(checkpoint_path)
        _restore(state, checkpoint_path, config, accelerator.unwrap_model(model), optimizer, scheduler, store)
        start_epoch, history = state["epoch"] + 1, state["history"]

    # Everything checked: from here on the run directory is written.
    if accelerator.is_main_process:
        removed = remove_orphans(run_dir)
        if removed:
            accelerator.print(f"removed leftovers of an interrupted save in {run_dir}: {', '.join(removed)}")
        with _writing(run_dir / CONFIG_FILE):
            write_json_atomic(run_dir / CONFIG_FILE, config.to_json())
    accelerator.print(f"training on {accelerator.device} in {accelerator.num_processes} process(es)")
    machine = machine_record()

    for epoch in range(start_epoch, config.epochs):
        loader.set_epoch(epoch)  # Accelerate passes it on to EpochSampler (else it counts epochs from 0)
        model.train()
        steps: dict[str, list[Any]] = {"loss": [], "grad_norm": [], "max_rel_residual": [],
                                       "adjoint_max_rel_residual": []}  # fmt: skip
        tally, adjoint = SolveTally(), SolveTally()  # the epoch's forward and adjoint solves
        if store is not None:
            store.reset_counts()
        bar = tqdm(
            loader,
            desc=f"{config.variant} seed {config.seed} epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            disable=not accelerator.is_local_main_process,
        )
        # A solve that stops short warns once per forward; while training they are counted instead and
        # reported once per epoch (bar, summary line, train_history.json). Interactive use keeps the warnings.
        # The adjoint solves of the implicit gradient, in the backward pass, are counted the same way.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            for batch in bar:
                example_ids = batch.pop(EXAMPLE_IDS)
                step_forward, step_adjoint = SolveTally(), SolveTally()
                with (contextlib.nullcontext() if store is None else
                      store.batch(accelerator.unwrap_model(model), example_ids, batch["attention_mask"])):
                    loss = model(**batch).loss
                step_forward.add(accelerator.unwrap_model(model))
                with watch_adjoint_solves(step_adjoint.add_adjoint):
                    accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                tally, adjoint = tally + step_forward, adjoint + step_adjoint
                steps["loss"].append(loss.item())
                # DeepSpeed before its engine exists returns no norm
                steps["grad_norm"].append(None if grad_norm is None else float(grad_norm))
                steps["max_rel_residual"].append(step_forward.max_residual)
                steps["adjoint_max_rel_residual"].append(step_adjoint.max_residual)
                bar.set_postfix(
                    loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", **tally.postfix()
                )
        solves = tally.merge(accelerator).record()
        adjoint_solves = adjoint.merge(accelerator).record()
        norms = [n for n in steps["grad_norm"] if n is not None]
        recorded = {k: v for k, v in steps.items() if any(x is not None for x in v)}
        history.append({"epoch": epoch + 1, "mean_loss": float(np.mean(steps["loss"])),
                        "grad_norm": grad_norm_summary(norms, config.max_grad_norm), "solver": solves,
                        "adjoint": adjoint_solves, "machine": machine, "steps": recorded})  # fmt: skip
        if store is not None:  # (example, layer) solves started warm / cold, store size
            history[-1]["warm_start"] = store.stats()
        for what, record in (("implicit", solves), ("adjoint (backward)", adjoint_solves)):
            if record is not None and record["example_converged"] < record["example_solves"]:
                tol = "" if record["tol"] is None else f" to tol {record['tol']:.0e}"
                accelerator.print(
                    f"epoch {epoch + 1}: {record['example_converged']} of {record['example_solves']} "
                    f"(example, layer) {what} solves converged{tol} "
                    f"({100 * record['example_converged_fraction']:.1f}%), worst relative residual "
                    f"{record['max_rel_residual']:.2e}; per-batch warnings are off while training, "
                    f"{HISTORY_FILE} keeps these figures"
                )
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_checkpoint(
                checkpoint_path,
                {
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": _rng_state(),
                    "epoch": epoch,
                    "history": history,
                    "config": config.to_json(),
                    "conversion": ode_config(accelerator.unwrap_model(model)),
                    **({} if store is None else {"warm_start": store.state_dict()}),
                },
            )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _writing(run_dir / MODEL_DIR):
            _save_final(accelerator.unwrap_model(model), tokenizer, run_dir)
        with _writing(run_dir / HISTORY_FILE):
            write_json_atomic(run_dir / HISTORY_FILE, history)
        checkpoint_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()  # no process returns before the run directory is complete
    return run_dir


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failed write of ``path`` (disk full, permissions) into a ``RunDirError`` that says what is kept
    and how to go on."""
    try:
        yield
    except BaseException as err:
        remove_orphans(path.parent)  # the temporary file or folder of the failed save
        if isinstance(err, RunDirError) or not isinstance(err, OSError):
            raise
        raise _write_failure(err, path, "the files already there are kept", "Fix the cause") from err


def _restore(
    state: dict[str, Any], path: Path, config: TrainConfig, model: torch.nn.Module, optimizer: Any,
    scheduler: Any, store: WarmStartStore | None = None,
) -> None:
    """Load a checkpoint's state into the run (the warm-start ``store`` too, if the run has one); refuse one
    of other settings or of another model."""
    saved = state.get("config")
    differing = settings_differ(saved, config) if isinstance(saved, dict) else ["config (not recorded)"]
    differing = [k for k in differing if k not in SETTING_NAMES]  # judged by the conversion, below
    if differing:
        raise RunDirError(
            f"{path} belongs to a run with other settings (differing: {differing}); " + _recovery(path.parent)
        )
    now = ode_config(model)
    made_with = state["conversion"] if "conversion" in state else _conversion_before_0_2(saved)
    changes = conversion_changes(made_with, now, len(find_layers(model)) if now else 0, str(path))
    if changes:
        raise RunDirError(_conversion_refusal(path, changes))
    epoch = state["epoch"]
    if not isinstance(epoch, int) or not 0 <= epoch < config.epochs:
        raise RunDirError(f"{path}: epoch {epoch!r} is not one of this run's; " + _recovery(path.parent))
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        if store is not None:
            store.load_state_dict(state["warm_start"])
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        raise RunDirError(
            f"{path} does not fit this run's model or optimizer ({err}); " + _recovery(path.parent)
        ) from err


def _conversion_before_0_2(saved: dict[str, Any]) -> dict[str, Any] | None:
    """The conversion of a checkpoint written before ode-bert 0.2.0, which does not record it: its saved
    settings resolved with the defaults of then (im_bert's tolerance 1e-4 where they left it)."""
    given = {k: saved.get(k) for k in SETTING_NAMES}
    if VARIANT_PRESETS[saved["variant"]] == "im" and given["tol"] is None:
        given["tol"] = IM_BERT_TOL_BEFORE_0_2
    settings = settings_for_variant(saved["variant"], **given)
    return None if settings is None else settings.to_dict()


EXAMPLE_IDS = "example_ids"  # the batch entry holding each row's index in the training examples


class WithExampleIds(torch.utils.data.Dataset):
    """Items that also carry their index (``EXAMPLE_IDS``): the stable example id of warm starts."""

    def __init__(self, dataset: EncodedDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], EXAMPLE_IDS: i}


class CollatorWithExampleIds:
    """``collate`` of the items without their ids, plus the ids as a long tensor (``EXAMPLE_IDS``)."""

    def __init__(self, collate: Collator) -> None:
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = torch.tensor([item[EXAMPLE_IDS] for item in items], dtype=torch.long)
        batch = self.collate([{k: v for k, v in item.items() if k != EXAMPLE_IDS} for item in items])
        return {**batch, EXAMPLE_IDS: ids}


def _save_final(model: torch.nn.Module, tokenizer: Any, run_dir: Path) -> None:
    """Save model and tokenizer into ``run_dir/model`` via a temporary directory, replacing any old one."""
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".model."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    from .pretrained import write_model_card  # README.md: load with ode_bert.from_pretrained, not plain HF

    write_model_card(tmp, model)
    final = run_dir / MODEL_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
