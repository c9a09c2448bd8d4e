"""Data loaders against the real files: row and label counts from shared/data/*/SOURCE.md."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

from ode_bert import data

DATA_DIR = Path(os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")

# (task, split) -> {label id: count}, transcribed from glue/SOURCE.md and advglue/SOURCE.md.
GLUE_TRAIN_COUNTS = {
    "sst2": {0: 29780, 1: 37569},
    "rte": {0: 1249, 1: 1241},
    "mnli": {0: 3408, 1: 3313, 2: 3278},
    "qnli": {0: 5027, 1: 4972},
}
GLUE_DEV_COUNTS = {
    "sst2": {"sst2": {0: 428, 1: 444}},
    "rte": {"rte": {0: 146, 1: 131}},
    "qnli": {"qnli": {0: 2702, 1: 2761}},
}
ADVGLUE_COUNTS = {
    "sst2": {1: 76, 0: 72},
    "qqp": {0: 46, 1: 32},
    "mnli": {2: 50, 1: 39, 0: 32},
    "mnli-mm": {0: 60, 2: 57, 1: 45},
    "qnli": {0: 74, 1: 74},
    "rte": {0: 35, 1: 46},
}


@pytest.mark.parametrize("task", sorted(GLUE_TRAIN_COUNTS))
def test_glue_train_label_counts(task: str) -> None:
    examples = data.load_train(task, DATA_DIR)
    assert dict(Counter(ex.label for ex in examples)) == GLUE_TRAIN_COUNTS[task]
    assert all(ex.text_a for ex in examples)
    assert all((ex.text_b is None) == (task == "sst2") for ex in examples)


@pytest.mark.parametrize("task", sorted(GLUE_DEV_COUNTS))
def test_glue_dev_label_counts(task: str) -> None:
    dev = data.load_clean_dev(task, DATA_DIR)
    counts = {split: dict(Counter(ex.label for ex in exs)) for split, exs in dev.items()}
    assert counts == GLUE_DEV_COUNTS[task]


def test_mnli_dev_samples_have_three_classes() -> None:
    dev = data.load_clean_dev("mnli", DATA_DIR)
    assert sorted(dev) == ["mnli", "mnli-mm"]
    for examples in dev.values():
        counts = Counter(ex.label for ex in examples)
        assert len(examples) == 1000 and set(counts) == {0, 1, 2}
        assert min(counts.values()) > 250  # roughly balanced, as MNLI dev is


def test_qqp_dev_is_a_fixed_disjoint_holdout_of_the_subset() -> None:
    train = data.load_train("qqp", DATA_DIR)
    dev = data.load_clean_dev("qqp", DATA_DIR)["qqp"]
    assert len(train) + len(dev) == 9999 and len(dev) == data.QQP_DEV_SIZE
    pairs = lambda exs: {(ex.text_a, ex.text_b) for ex in exs}  # noqa: E731
    assert not pairs(train) & pairs(dev)  # the file has no duplicate pairs, so the split is disjoint
    labels = Counter(ex.label for ex in train) + Counter(ex.label for ex in dev)
    assert dict(labels) == {0: 6370, 1: 3629}
    assert data.load_clean_dev("qqp", DATA_DIR)["qqp"] == dev  # same held-out rows every time


def test_advglue_counts_and_label_ids_match_glue() -> None:
    got = {}
    for task in data.TASKS:
        for split, examples in data.load_advglue(task, DATA_DIR).items():
            got[split] = dict(Counter(ex.label for ex in examples))
    assert got == ADVGLUE_COUNTS
    assert sum(sum(c.values()) for c in got.values()) == 738


def test_advglue_label_ids_agree_with_glue_dev_on_the_originals() -> None:
    """An AdvGLUE item built from a GLUE dev sentence must carry the same label id as that sentence."""
    ann = json.loads((DATA_DIR / "advglue" / "dev_ann.json").read_text())
    sst_dev = {ex.text_a: ex.label for ex in data.load_clean_dev("sst2", DATA_DIR)["sst2"]}
    matched = [
        (sst_dev[it["original_sentence"].strip()], it["label"])
        for it in ann["sst2"]
        if it.get("original_sentence", "").strip() in sst_dev
    ]
    assert len(matched) > 50
    assert all(glue == adv for glue, adv in matched)


def test_task_names_and_unknown_task() -> None:
    assert data.get_task("SST-2").name == "sst2"
    assert data.get_task("mnli").splits == ("mnli", "mnli-mm")
    with pytest.raises(ValueError, match="unknown task 'cola'.*sst2, qqp, mnli, qnli, rte"):
        data.get_task("cola")


def _write_rte(root: Path, text: str) -> Path:
    folder = root / "glue" / "RTE"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(text)
    return root


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "glue").mkdir()
    with pytest.raises(data.DataError, match=r"missing data file .*RTE/train\.tsv.*2490 rte rows"):
        data.load_train("rte", tmp_path)
    with pytest.raises(data.DataError, match=r"missing data file .*advglue/dev\.json"):
        data.load_advglue("rte", tmp_path)


def test_missing_data_dir(tmp_path: Path) -> None:
    with pytest.raises(data.DataError, match="data directory not found.*--data-dir"):
        data.resolve_data_dir(tmp_path / "nowhere")


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
    assert data.resolve_data_dir() == tmp_path.resolve()


def test_malformed_tsv_errors(tmp_path: Path) -> None:
    header = "index\tsentence1\tsentence2\tlabel\n"
    root = _write_rte(tmp_path / "a", header + "0\tA.\tB.\tentailment\n1\tA.\tnot_entailment\n")
    with pytest.raises(data.DataError, match=r"train\.tsv:3: expected 4 tab-separated fields, found 3"):
        data.load_train("rte", root)
    root = _write_rte(tmp_path / "b", header + "0\tA.\tB.\tmaybe\n")
    with pytest.raises(data.DataError, match=r"train\.tsv:2: unknown label 'maybe'.*entailment"):
        data.load_train("rte", root)
    root = _write_rte(tmp_path / "c", "index\tpremise\thypothesis\tlabel\n0\tA.\tB.\tentailment\n")
    with pytest.raises(data.DataError, match=r"lacks column\(s\) \['sentence1', 'sentence2'\]"):
        data.load_train("rte", root)
    root = _write_rte(tmp_path / "d", header + "0\tA.\tB.\tentailment\n")
    assert data.load_train("rte", root) == [data.Example("A.", "B.", 0)]


def test_malformed_advglue_errors(tmp_path: Path) -> None:
    (tmp_path / "advglue").mkdir()
    path = tmp_path / "advglue" / "dev.json"
    path.write_text(json.dumps({"rte": [{"sentence1": "a", "sentence2": "b", "label": 2}]}))
    with pytest.raises(data.DataError, match=r"rte\[0\] has label 2; expected 0\.\.1"):
        data.load_advglue("rte", tmp_path)
    path.write_text(json.dumps({"rte": [{"sentence1": "a", "label": 0}]}))
    with pytest.raises(data.DataError, match=r"rte\[0\] lacks field"):
        data.load_advglue("rte", tmp_path)
    with pytest.raises(data.DataError, match="no key 'sst2'"):
        data.load_advglue("sst2", tmp_path)
    path.write_text("{not json")
    with pytest.raises(data.DataError, match="not valid JSON"):
        data.load_advglue("rte", tmp_path)
    path.write_text(json.dumps({"rte": [{"sentence1": None, "sentence2": "b", "label": 0}]}))
    with pytest.raises(data.DataError, match=r"rte\[0\] field\(s\) \['sentence1'\] are not text"):
        data.load_advglue("rte", tmp_path)
    path.write_text(json.dumps({"rte": [{"sentence1": "a", "sentence2": "b", "label": True}]}))
    with pytest.raises(data.DataError, match=r"rte\[0\] has label True"):
        data.load_advglue("rte", tmp_path)
    path.write_text(json.dumps({"rte": []}))
    with pytest.raises(data.DataError, match="'rte' is not a non-empty list"):
        data.load_advglue("rte", tmp_path)
    path.write_bytes(b'{"rte": "\xff\xfe"}')
    with pytest.raises(data.DataError, match="not valid JSON"):
        data.load_advglue("rte", tmp_path)


def test_binary_tsv_is_named(tmp_path: Path) -> None:
    root = _write_rte(tmp_path, "index\tsentence1\tsentence2\tlabel\n")
    (root / "glue" / "RTE" / "train.tsv").write_bytes(b"index\tsentence1\xff\xfe\x00\n")
    with pytest.raises(data.DataError, match=r"train\.tsv: cannot be read as a UTF-8 GLUE TSV file"):
        data.load_train("rte", root)


def test_check_data_reads_every_file_a_run_uses(tmp_path: Path) -> None:
    assert data.check_data("mnli", DATA_DIR) == {
        "train": 9999, "clean/mnli": 1000, "clean/mnli-mm": 1000, "advglue/mnli": 121, "advglue/mnli-mm": 162,
    }  # fmt: skip
    assert "train" not in data.check_data("rte", DATA_DIR, include_train=False)
    broken = tmp_path / "data"
    (broken / "glue").mkdir(parents=True)
    (broken / "glue" / "MNLI").symlink_to(DATA_DIR / "glue" / "MNLI")
    with pytest.raises(data.DataError, match=r"missing data file .*advglue/dev\.json"):
        data.check_data("mnli", broken)


def _toy(counts: dict[int, int]) -> list[data.Example]:
    return [data.Example(f"{label}-{i}", None, label) for label, n in counts.items() for i in range(n)]


@pytest.mark.parametrize("n", [1, 7, 40, 99])
def test_stratified_subset(n: int) -> None:
    full = _toy({0: 63, 1: 30, 2: 7})
    subset = data.stratified_subset(full, n, seed=3)
    assert len(subset) == n and len(set(subset)) == n and set(subset) <= set(full)
    counts = Counter(ex.label for ex in subset)
    for label, k in Counter(ex.label for ex in full).items():
        assert abs(counts[label] - n * k / len(full)) < 1
    assert data.stratified_subset(full, n, seed=3) == subset
    if 1 < n < 99:  # single-item and near-complete subsets may coincide across seeds
        assert data.stratified_subset(full, n, seed=4) != subset


def test_stratified_subset_rejects_bad_size() -> None:
    with pytest.raises(ValueError, match=r"subset size must be in 1\.\.5"):
        data.stratified_subset(_toy({0: 5}), 6, seed=0)


def test_holdout_split_is_seeded_disjoint_and_complete() -> None:
    full = _toy({0: 60, 1: 20})
    train, held = data.holdout_split(full, fraction=0.25, seed=1)
    assert len(held) == 20 and Counter(ex.label for ex in held) == {0: 15, 1: 5}
    assert sorted(train + held, key=full.index) == full
    assert data.holdout_split(full, fraction=0.25, seed=1) == (train, held)
    assert data.holdout_split(full, fraction=0.25, seed=2)[1] != held


def test_hub_path_without_datasets_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        data.load_from_hub("sst2")


# Dataset configurations and splits on the hub (nyu-mll/glue and AI-secure/adv_glue dataset cards).
HUB_GLUE_SPLITS = {
    **{task: ("train", "validation") for task in ("sst2", "qqp", "rte", "qnli")},
    "mnli": ("train", "validation_matched", "validation_mismatched"),
}
HUB_ADV_CONFIGS = {"adv_sst2", "adv_qqp", "adv_mnli", "adv_mnli_mismatched", "adv_qnli", "adv_rte"}


@pytest.mark.parametrize("task", ["sst2", "mnli"])
def test_hub_path_reads_what_datasets_serves(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``data_dir="hub"``: a stand-in ``datasets`` serves the local files in the hub's row format (the field
    names of AdvGLUE's dev.json); the loaders must ask for valid configurations and return the same
    examples."""
    spec = data.get_task(task)
    field_a, field_b = spec.advglue_fields
    local_dev = data.load_clean_dev(task, DATA_DIR)
    local_adv = data.load_advglue(task, DATA_DIR)
    local_train = data.load_train(task, DATA_DIR)[:50]

    def rows(examples: list[data.Example]) -> list[dict]:
        return [{field_a: ex.text_a, **({field_b: ex.text_b} if field_b else {}), "label": ex.label, "idx": i}
                for i, ex in enumerate(examples)]

    calls = []

    def load_dataset(path: str, name: str) -> dict[str, list[dict]]:
        calls.append((path, name))
        if path == "nyu-mll/glue":
            splits = dict(zip(HUB_GLUE_SPLITS[name], [local_train, *local_dev.values()], strict=True))
            return {split: rows(examples) for split, examples in splits.items()}
        assert path == "AI-secure/adv_glue" and name in HUB_ADV_CONFIGS
        split = name.removeprefix("adv_").replace("_mismatched", "-mm")
        return {"validation": rows(local_adv[split])}

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.setenv(data.DATA_DIR_ENV, data.HUB)
    data._hub_sets.cache_clear()
    try:
        assert data.load_train(task) == local_train
        assert data.load_clean_dev(task) == local_dev
        assert data.load_advglue(task) == local_adv
    finally:
        data._hub_sets.cache_clear()
    assert len(calls) == 1 + len(spec.splits)  # downloaded once per task, not once per loader call
