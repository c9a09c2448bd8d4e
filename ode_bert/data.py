"""GLUE and AdvGLUE data for the tasks AdvGLUE covers: SST-2, QQP, MNLI (m/mm), QNLI, RTE.

Everything is read from a data directory laid out as ``<data_dir>/glue/<TASK>/*.tsv`` and
``<data_dir>/advglue/dev.json`` (see ``shared/data/*/SOURCE.md``). Labels use the HF-GLUE ids, which are
also the AdvGLUE ids, so a model trained on GLUE is scored on AdvGLUE without any remapping.

Which file is training data and which is clean dev data, per task:

- sst2, rte: ``train.tsv`` / ``dev.tsv``.
- qnli: ``train_subset.tsv`` / ``dev.tsv``.
- mnli: ``train_subset.tsv`` / the TextFooler 1k samples of dev matched (``mnli``) and
  mismatched (``mnli-mm``).
- qqp: only ``train_subset.tsv`` exists: a fixed seeded part of it is held out as clean dev and never
  trained on.

With ``data_dir="hub"`` (or ``ODE_BERT_DATA_DIR=hub``) the same loaders download the full GLUE sets and
AdvGLUE with HF ``datasets`` instead (needs internet; QQP's clean dev is then its GLUE validation split).

Clean dev and AdvGLUE sets are returned as ``{split: examples}`` with the AdvGLUE split names
(``mnli`` and ``mnli-mm`` for MNLI), so per-split results line up with the official scoring.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "ODE_BERT_DATA_DIR"
HUB = "hub"  # the data_dir value that selects the download path
QQP_DEV_SIZE = 1000
QQP_DEV_SEED = 20240101


class DataError(ValueError):
    """A data file is missing or does not have the expected format."""


@dataclass(frozen=True)
class Example:
    """One classification example: a sentence or sentence pair and its integer label."""

    text_a: str
    text_b: str | None
    label: int


@dataclass(frozen=True)
class TsvFile:
    """How to read one GLUE TSV file: its name, text and label columns (names, or indices if headerless)."""

    name: str
    text_a: str | int
    text_b: str | int | None
    label: str | int
    rows: int

    @property
    def has_header(self) -> bool:
        return isinstance(self.label, str)


@dataclass(frozen=True)
class Task:
    """A GLUE/AdvGLUE task: label names (index = label id), its files and its AdvGLUE fields."""

    name: str
    glue_dir: str
    labels: tuple[str, ...]
    label_aliases: dict[str, int]
    train: TsvFile
    dev: dict[str, TsvFile]
    advglue_fields: tuple[str, str | None]

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def splits(self) -> tuple[str, ...]:
        """The AdvGLUE split names of this task (two for MNLI)."""
        return ("mnli", "mnli-mm") if self.name == "mnli" else (self.name,)


_BINARY = {"0": 0, "1": 1}
_NLI3 = {"entailment": 0, "neutral": 1, "contradiction": 2}
_NLI2 = {"entailment": 0, "not_entailment": 1}

TASKS: dict[str, Task] = {
    "sst2": Task(
        "sst2",
        "SST-2",
        ("negative", "positive"),
        _BINARY,
        train=TsvFile("train.tsv", "sentence", None, "label", 67349),
        dev={"sst2": TsvFile("dev.tsv", "sentence", None, "label", 872)},
        advglue_fields=("sentence", None),
    ),
    "qqp": Task(
        "qqp",
        "QQP",
        ("not_duplicate", "duplicate"),
        _BINARY,
        train=TsvFile("train_subset.tsv", "question1", "question2", "is_duplicate", 9999),
        dev={},  # held out from train_subset.tsv, see load_clean_dev
        advglue_fields=("question1", "question2"),
    ),
    "mnli": Task(
        "mnli",
        "MNLI",
        ("entailment", "neutral", "contradiction"),
        _NLI3,
        train=TsvFile("train_subset.tsv", "sentence1", "sentence2", "gold_label", 9999),
        dev={
            "mnli": TsvFile("textfooler_mnli_matched_1k.tsv", 1, 2, 0, 1000),
            "mnli-mm": TsvFile("textfooler_mnli_mismatched_1k.tsv", 1, 2, 0, 1000),
        },
        advglue_fields=("premise", "hypothesis"),
    ),
    "qnli": Task(
        "qnli",
        "QNLI",
        ("entailment", "not_entailment"),
        _NLI2,
        train=TsvFile("train_subset.tsv", "question", "sentence", "label", 9999),
        dev={"qnli": TsvFile("dev.tsv", "question", "sentence", "label", 5463)},
        advglue_fields=("question", "sentence"),
    ),
    "rte": Task(
        "rte",
        "RTE",
        ("entailment", "not_entailment"),
        _NLI2,
        train=TsvFile("train.tsv", "sentence1", "sentence2", "label", 2490),
        dev={"rte": TsvFile("dev.tsv", "sentence1", "sentence2", "label", 277)},
        advglue_fields=("sentence1", "sentence2"),
    ),
}


def get_task(name: str) -> Task:
    """The task called ``name`` (case and '-'/'_' ignored, so 'SST-2' works); error lists valid tasks."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$ODE_BERT_DATA_DIR``, else ``../shared/data``.

    ``../shared/data`` is tried relative to the current directory and to the repository root.
    """
    if data_dir is not None:
        candidates = [Path(data_dir)]
    elif os.environ.get(DATA_DIR_ENV):
        candidates = [Path(os.environ[DATA_DIR_ENV])]
    else:
        repo_root = Path(__file__).resolve().parents[1]
        candidates = [Path.cwd() / "../shared/data", repo_root / "../shared/data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(
        f"data directory not found (tried {tried}); pass --data-dir or set {DATA_DIR_ENV} to a directory "
        "containing glue/<TASK>/*.tsv and advglue/dev.json"
    )


def _parse_label(raw: str, task: Task, path: Path, line: int) -> int:
    label = task.label_aliases.get(raw.strip())
    if label is None:
        raise DataError(
            f"{path}:{line}: unknown label {raw!r} for task {task.name}; expected one of "
            f"{sorted(task.label_aliases)}"
        )
    return label


def read_tsv(path: Path, spec: TsvFile, task: Task) -> list[Example]:
    """Read a GLUE TSV file (tab-separated, no quoting) into examples, checking every row's shape."""
    if not path.is_file():
        raise DataError(
            f"missing data file {path} (expected {spec.rows} {task.name} rows in GLUE TSV format)"
        )
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise DataError(f"{path}: cannot be read as a UTF-8 GLUE TSV file ({err})") from err
    if spec.has_header:
        if not rows:
            raise DataError(f"{path}: empty file, expected a header line")
        header, body, first_line = rows[0], rows[1:], 2
        wanted = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path}: header {header} lacks column(s) {missing}; expected columns {wanted}")
        width = len(header)
        column = {name: header.index(name) for name in wanted}
    else:
        body, first_line = rows, 1
        width = 1 + max(c for c in (spec.text_a, spec.text_b, spec.label) if c is not None)
        column = {c: c for c in (spec.text_a, spec.text_b, spec.label) if c is not None}
    examples = []
    for line, row in enumerate(body, start=first_line):
        if len(row) != width:
            raise DataError(f"{path}:{line}: expected {width} tab-separated fields, found {len(row)}")
        text_b = row[column[spec.text_b]].strip() if spec.text_b is not None else None
        label = _parse_label(row[column[spec.label]], task, path, line)
        examples.append(Example(row[column[spec.text_a]].strip(), text_b, label))
    return examples


def _glue_path(task: Task, spec: TsvFile, data_dir: str | os.PathLike[str] | None) -> Path:
    return resolve_data_dir(data_dir) / "glue" / task.glue_dir / spec.name


def _qqp_dev_indices(n_rows: int) -> set[int]:
    """Row indices of train_subset.tsv that QQP holds out as clean dev (fixed seed: same for every run)."""
    return set(random.Random(QQP_DEV_SEED).sample(range(n_rows), QQP_DEV_SIZE))


def _from_hub(data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether ``data_dir`` (or, unset, ``$ODE_BERT_DATA_DIR``) selects the ``datasets`` download path."""
    return str(data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)) == HUB


def load_train(task: str, data_dir: str | os.PathLike[str] | None = None) -> list[Example]:
    """All training examples of ``task`` (for QQP: train_subset.tsv minus the rows held out as dev)."""
    if _from_hub(data_dir):
        return _hub_sets(task)[0]
    spec = get_task(task)
    examples = read_tsv(_glue_path(spec, spec.train, data_dir), spec.train, spec)
    if spec.name == "qqp":
        held_out = _qqp_dev_indices(len(examples))
        examples = [ex for i, ex in enumerate(examples) if i not in held_out]
    return examples


def load_clean_dev(task: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, list[Example]]:
    """Clean dev examples of ``task`` per AdvGLUE split name (MNLI: 'mnli' matched and 'mnli-mm')."""
    if _from_hub(data_dir):
        return _hub_sets(task)[1]
    spec = get_task(task)
    if spec.name == "qqp":
        examples = read_tsv(_glue_path(spec, spec.train, data_dir), spec.train, spec)
        held_out = _qqp_dev_indices(len(examples))
        return {"qqp": [ex for i, ex in enumerate(examples) if i in held_out]}
    return {split: read_tsv(_glue_path(spec, f, data_dir), f, spec) for split, f in spec.dev.items()}


def load_advglue(task: str, data_dir: str | os.PathLike[str] | None = None) -> dict[str, list[Example]]:
    """AdvGLUE dev examples of ``task`` per split name (MNLI: 'mnli' and 'mnli-mm')."""
    if _from_hub(data_dir):
        return _hub_sets(task)[2]
    spec = get_task(task)
    path = resolve_data_dir(data_dir) / "advglue" / "dev.json"
    if not path.is_file():
        raise DataError(f"missing data file {path} (expected the AdvGLUE dev.json, keys sst2, qqp, ...)")
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    field_a, field_b = spec.advglue_fields
    result = {}
    for split in spec.splits:
        if not isinstance(data, dict) or split not in data:
            raise DataError(f"{path}: no key {split!r}; expected keys sst2, qqp, mnli, mnli-mm, qnli, rte")
        examples = []
        if not isinstance(data[split], list) or not data[split]:
            raise DataError(f"{path}: {split!r} is not a non-empty list of examples")
        for i, item in enumerate(data[split]):
            wanted = [field_a, "label"] + ([field_b] if field_b else [])
            if not isinstance(item, dict) or any(k not in item for k in wanted):
                raise DataError(f"{path}: {split}[{i}] lacks field(s); expected {wanted}")
            texts = [field_a] + ([field_b] if field_b else [])
            not_text = [k for k in texts if not isinstance(item[k], str)]
            if not_text:
                raise DataError(f"{path}: {split}[{i}] field(s) {not_text} are not text")
            label = item["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < spec.num_labels:
                raise DataError(
                    f"{path}: {split}[{i}] has label {label!r}; expected 0..{spec.num_labels - 1}"
                )
            text_b = item[field_b].strip() if field_b else None
            examples.append(Example(item[field_a].strip(), text_b, label))
        result[split] = examples
    return result


def check_data(
    task: str, data_dir: str | os.PathLike[str] | None = None, include_train: bool = True
) -> dict[str, int]:
    """Load and check every data file a run of ``task`` uses (training, clean dev, AdvGLUE), so a missing
    or damaged file fails in seconds, before training, with a ``DataError`` naming it. Returns the number of
    examples per set (``train`` unless ``include_train`` is false, each clean dev and AdvGLUE split)."""
    counts = {"train": len(load_train(task, data_dir))} if include_train else {}
    for kind, sets in (("clean", load_clean_dev(task, data_dir)), ("advglue", load_advglue(task, data_dir))):
        for split, examples in sets.items():
            if not examples:
                raise DataError(f"{kind} {split} of task {task} has no examples")
            counts[f"{kind}/{split}"] = len(examples)
    if include_train and not counts["train"]:
        raise DataError(f"the training data of task {task} has no examples")
    return counts


def _largest_remainder(counts: dict[int, int], n: int) -> dict[int, int]:
    """Split ``n`` over classes in proportion to ``counts``, each share within 1 of its exact value."""
    total = sum(counts.values())
    exact = {c: n * k / total for c, k in counts.items()}
    shares = {c: int(v) for c, v in exact.items()}
    by_remainder = sorted(counts, key=lambda c: (-(exact[c] - shares[c]), c))
    for c in by_remainder[: n - sum(shares.values())]:
        shares[c] += 1
    return shares


def _by_class(examples: Sequence[Example]) -> dict[int, list[int]]:
    indices: dict[int, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        indices[ex.label].append(i)
    return dict(sorted(indices.items()))


def _stratified_indices(examples: Sequence[Example], n: int, seed: int) -> list[int]:
    if not 0 < n <= len(examples):
        raise ValueError(f"subset size must be in 1..{len(examples)}, got {n}")
    rng = random.Random(seed)
    by_class = _by_class(examples)
    shares = _largest_remainder({c: len(idx) for c, idx in by_class.items()}, n)
    return sorted(i for c, idx in by_class.items() for i in rng.sample(idx, shares[c]))


def stratified_subset(examples: Sequence[Example], n: int, seed: int) -> list[Example]:
    """A seeded random subset of exactly ``n`` examples with the class proportions of ``examples``.

    Used for low-resource fine-tuning; the result keeps the input order.
    """
    return [examples[i] for i in _stratified_indices(examples, n, seed)]


def holdout_split(
    examples: Sequence[Example], fraction: float = 0.1, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Seeded, class-stratified split of training data into (train, held_out) for choosing hyperparameters.

    Model selection must use this split, never the clean dev or AdvGLUE sets.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    held = set(_stratified_indices(examples, max(1, round(fraction * len(examples))), seed))
    return (
        [ex for i, ex in enumerate(examples) if i not in held],
        [ex for i, ex in enumerate(examples) if i in held],
    )


_HUB_SPLITS = {"mnli": ("validation_matched", "validation_mismatched")}
_HUB_ADV_CONFIGS = {"mnli": "adv_mnli", "mnli-mm": "adv_mnli_mismatched"}


def load_from_hub(task: str) -> tuple[list[Example], dict[str, list[Example]], dict[str, list[Example]]]:
    """(train, clean dev, AdvGLUE) of ``task`` downloaded with HF ``datasets`` (needs internet).

    Uses the full GLUE train and validation splits (``nyu-mll/glue``) and ``AI-secure/adv_glue``;
    both use the same label ids as the local files.
    """
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "downloading GLUE/AdvGLUE needs the 'datasets' package: pip install datasets "
            "(or use the local files with --data-dir)"
        ) from err
    spec = get_task(task)
    glue = datasets.load_dataset("nyu-mll/glue", spec.name)

    def convert(rows: datasets.Dataset) -> list[Example]:
        a, b = spec.advglue_fields
        return [Example(r[a].strip(), r[b].strip() if b else None, int(r["label"])) for r in rows]

    dev_names = _HUB_SPLITS.get(spec.name, ("validation",))
    clean = {split: convert(glue[name]) for split, name in zip(spec.splits, dev_names)}
    adv = {}
    for split in spec.splits:
        config = _HUB_ADV_CONFIGS.get(split, f"adv_{split}")
        adv[split] = convert(datasets.load_dataset("AI-secure/adv_glue", config)["validation"])
    return convert(glue["train"]), clean, adv


_hub_sets = functools.lru_cache(maxsize=None)(load_from_hub)  # one download per task and process
