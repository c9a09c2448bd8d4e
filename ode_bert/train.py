"""Fine-tuning a (converted) encoder on one GLUE task, resumably, through HF Accelerate.

``train(TrainConfig(...))`` writes a run directory::

    train_config.json     the configuration (written first; ``evaluate`` reads the task from it)
    checkpoint.pt         model + optimizer + scheduler + RNG states, after each epoch (removed at the end)
    model/                the final model and tokenizer (``ode_bert.from_pretrained`` reloads the ODE model)
    train_history.json    mean training loss per epoch; written last, it marks the run as complete

The data order of epoch ``e`` is a function of ``(seed, e)`` only, and the RNG states are restored from the
checkpoint, so a resumed run ends with the same weights as an uninterrupted one. Runs unchanged under
``accelerate launch -m ode_bert train ...``; on CUDA it trains with bf16 autocast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup, set_seed

from .convert import convert, ex_bert, im_bert
from .data import Example, get_task, holdout_split, load_train, stratified_subset
from .pretrained import load_model

VARIANTS = ("bert", "ex", "im", "ode")
CHECKPOINT = "checkpoint.pt"
CONFIG_FILE = "train_config.json"
HISTORY_FILE = "train_history.json"
MODEL_DIR = "model"


@dataclass
class TrainConfig:
    """Everything that defines a fine-tuning run.

    ``variant``: ``bert`` (stock model), ``ex`` (EX-BERT), ``im`` (IM-BERT) or ``ode`` (``convert`` with
    ``solver``). The solver options (``layers`` ... ``max_iter``, ``solver_options``) are passed on only when
    set, so ``None`` means the default of ``im_bert``/``ex_bert``/``convert``.
    """

    task: str = "sst2"
    model: str | None = None  # hub name or local path; None = the offline all-MiniLM-L6-v2
    variant: str = "im"
    solver: str | None = None
    layers: str | list[int] | None = None
    step: float | None = None
    field: str | None = None
    root: str | None = None
    grad: str | None = None
    tol: float | None = None
    max_iter: int | None = None
    solver_options: dict[str, Any] = dataclasses.field(default_factory=dict)
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
    resume: bool = False

    def validate(self) -> None:
        """Reject bad settings early, naming the valid choices."""
        get_task(self.task)
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; valid variants: {', '.join(VARIANTS)}")
        solver_settings = {k: getattr(self, k) for k in ("solver", "root", "grad", "tol", "max_iter")}
        if self.variant == "bert" and (
            any(v is not None for v in solver_settings.values()) or self.solver_options
        ):
            raise ValueError("variant 'bert' is the stock model and takes no solver options")
        if self.variant == "ex" and any(v is not None for v in solver_settings.values()):
            raise ValueError("variant 'ex' is explicit Euler; use variant 'ode' to choose a solver")
        if self.variant == "im" and self.solver not in (None, "implicit_euler"):
            raise ValueError("variant 'im' is implicit Euler; use variant 'ode' to choose another solver")
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_samples is not None and self.train_samples < 1:
            raise ValueError(f"train_samples must be >= 1, got {self.train_samples}")
        if self.holdout is not None and not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def conversion_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for the conversion function of ``variant``, unset ones left out."""
        names = ["layers", "step", "field"]
        if self.variant in ("im", "ode"):
            names += ["root", "grad", "tol", "max_iter"]
        kwargs = {k: getattr(self, k) for k in names if getattr(self, k) is not None}
        if self.variant in ("im", "ode"):
            kwargs.update(self.solver_options)
        return kwargs

    def to_json(self) -> dict[str, Any]:
        """The settings saved in ``train_config.json``, without ``resume`` (how, not what, a run is)."""
        values = dataclasses.asdict(self)
        del values["resume"]
        return values


def apply_variant(model: torch.nn.Module, config: TrainConfig) -> torch.nn.Module:
    """Convert ``model`` in place as ``config.variant`` says (``bert`` leaves it unchanged)."""
    kwargs = config.conversion_kwargs()
    if config.variant == "ex":
        return ex_bert(model, **kwargs)
    if config.variant == "im":
        return im_bert(model, **kwargs)
    if config.variant == "ode":
        return convert(model, config.solver or "implicit_euler", **kwargs)
    return model


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


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing (``mode`` "w": text, "wb": binary); it replaces
    ``path`` only when the block completes, so readers never see a half-written file and a failed write
    keeps the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path) as f:
        json.dump(value, f, indent=2)
        f.write("\n")


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized examples (no padding; ``Collator`` pads each batch to its longest member)."""

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> None:
        texts_a = [ex.text_a for ex in examples]
        texts_b = [ex.text_b for ex in examples]
        pairs = any(b is not None for b in texts_b)
        self.encodings = tokenizer(
            texts_a, texts_b if pairs else None, truncation=True, max_length=max_length
        )
        self.labels = [ex.label for ex in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


class Collator:
    """Pads a list of ``EncodedDataset`` items into a batch of tensors."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.tokenizer.pad(items, return_tensors="pt")


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically (``atomic_open``), so an interrupted save keeps the old checkpoint."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and LayerNorm weights, as in BERT fine-tuning."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def is_complete(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished training run."""
    return (run_dir / HISTORY_FILE).is_file() and (run_dir / MODEL_DIR / "config.json").is_file()


def _check_run_dir(run_dir: Path, config: TrainConfig) -> None:
    """Refuse to overwrite another run, or to resume a run that was started with other settings."""
    saved_path = run_dir / CONFIG_FILE
    if not saved_path.is_file():
        return
    if not config.resume:
        raise FileExistsError(
            f"{run_dir} already holds a run; pass resume=True (--resume) or another output dir"
        )
    saved = json.loads(saved_path.read_text())
    current = json.loads(json.dumps(config.to_json()))
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    if differing:
        raise ValueError(f"cannot resume {run_dir}: settings differ from the saved run in {differing}")


def train(config: TrainConfig) -> Path:
    """Fine-tune as ``config`` says; returns the run directory (see the module docstring for its files)."""
    config.validate()
    run_dir = Path(config.output_dir)
    _check_run_dir(run_dir, config)
    if config.resume and is_complete(run_dir):
        return run_dir
    try:
        from accelerate import Accelerator
    except ImportError as err:
        raise ImportError("training needs HF Accelerate: pip install 'ode-bert[train]'") from err
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
    task = get_task(config.task)
    examples, _ = split_training_data(config)
    if accelerator.is_main_process:
        write_json_atomic(run_dir / CONFIG_FILE, config.to_json())

    set_seed(config.seed)  # the classifier head's initialisation depends on the seed only
    model, tokenizer = load_model(config.model, num_labels=task.num_labels)
    apply_variant(model, config)
    dataset = EncodedDataset(examples, tokenizer, config.max_length)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        sampler=EpochSampler(len(dataset), config.seed),
        collate_fn=Collator(tokenizer),
    )
    total_steps = len(loader) * config.epochs
    optimizer = torch.optim.AdamW(_parameter_groups(model, config.weight_decay), lr=config.lr)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.print(f"training on {accelerator.device} in {accelerator.num_processes} process(es)")

    checkpoint_path = run_dir / CHECKPOINT
    start_epoch, history = 0, []
    if config.resume and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start_epoch, history = state["epoch"] + 1, state["history"]

    for epoch in range(start_epoch, config.epochs):
        loader.set_epoch(epoch)  # Accelerate passes it on to EpochSampler (else it counts epochs from 0)
        model.train()
        losses = []
        bar = tqdm(
            loader,
            desc=f"{config.variant} seed {config.seed} epoch {epoch + 1}/{config.epochs}",
            unit="batch",
            disable=not accelerator.is_local_main_process,
        )
        for batch in bar:
            loss = model(**batch).loss
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        history.append({"epoch": epoch + 1, "mean_loss": float(np.mean(losses))})
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
                },
            )

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_final(accelerator.unwrap_model(model), tokenizer, run_dir)
        write_json_atomic(run_dir / HISTORY_FILE, history)
        checkpoint_path.unlink(missing_ok=True)
    accelerator.wait_for_everyone()  # no process returns before the run directory is complete
    return run_dir


def _save_final(model: torch.nn.Module, tokenizer: Any, run_dir: Path) -> None:
    """Save model and tokenizer into ``run_dir/model`` via a temporary directory, replacing any old one."""
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".model."))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    final = run_dir / MODEL_DIR
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
