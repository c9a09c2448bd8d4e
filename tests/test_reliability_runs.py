"""Bad inputs and faults against training, run folders and data (issue #15): each is refused with an error
that names the file or setting and says how to recover, nothing is silently wrong, nothing from a run file
is executed. A tiny random BERT (2 layers, 32 wide) keeps every run to seconds."""

from __future__ import annotations

import errno
import importlib.metadata
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import ode_bert
import solvers
from ode_bert import data, experiments
from ode_bert import train as train_module
from ode_bert.compare import compare
from ode_bert.data import DataError
from ode_bert.evaluate import evaluate
from ode_bert.io import write_json_atomic
from ode_bert.train import RunDirError, TrainConfig, train

DATA_DIR = Path(os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")
pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")


def _config(tiny_model: str, out: Path, **overrides: object) -> TrainConfig:
    settings: dict[str, object] = {
        "task": "sst2", "model": tiny_model, "variant": "bert", "epochs": 1, "batch_size": 8,
        "train_samples": 8, "max_length": 16, "lr": 1e-3, "data_dir": str(DATA_DIR), "output_dir": str(out),
    }  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)  # type: ignore[arg-type]


def _interrupted_run(
    tiny_model: str,
    out: Path,
    train_until_first_checkpoint: Callable[[TrainConfig], None],
    **overrides: object,
) -> Path:
    """A two-epoch run stopped right after its first checkpoint."""
    train_until_first_checkpoint(_config(tiny_model, out, epochs=2, **overrides))
    assert (out / "checkpoint.safetensors").is_file()
    return out


class Payload:
    """A pickle that runs code when loaded: it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_crafted_pickle_checkpoint_is_refused_and_never_runs(
    tiny_model: str, tmp_path: Path, train_until_first_checkpoint: Callable[[TrainConfig], None]
) -> None:
    marker = tmp_path / "payload-ran"
    buffer = io.BytesIO()
    torch.save({"model": Payload(marker), "epoch": 0}, buffer)  # a checkpoint as torch.save writes it
    crafted = buffer.getvalue()
    torch.load(io.BytesIO(crafted), weights_only=False)  # the payload is live: unpickling runs it
    assert marker.is_file()
    marker.unlink()

    run = _interrupted_run(tiny_model, tmp_path / "run", train_until_first_checkpoint)
    (run / "checkpoint.pt").write_bytes(crafted)  # as a checkpoint in the pickle format of earlier versions
    with pytest.raises(
        RunDirError, match=r"checkpoint\.pt is a checkpoint in the pickle format .* not loaded"
    ):
        train(_config(tiny_model, run, epochs=2, resume=True))
    assert not marker.exists()

    (run / "checkpoint.pt").unlink()  # as a checkpoint of the current format
    (run / "checkpoint.safetensors").write_bytes(crafted)
    with pytest.raises(
        RunDirError, match=r"checkpoint\.safetensors is damaged or not an ode-bert checkpoint"
    ):
        train(_config(tiny_model, run, epochs=2, resume=True))
    assert not marker.exists()


def test_checkpoint_is_safetensors_with_json_state(
    tiny_model: str, tmp_path: Path, train_until_first_checkpoint: Callable[[TrainConfig], None]
) -> None:
    """Tensors in safetensors, the rest JSON in its header; it round-trips the RNG states exactly."""
    from safetensors import safe_open

    run = _interrupted_run(tiny_model, tmp_path / "run", train_until_first_checkpoint)
    with safe_open(str(run / "checkpoint.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        keys = set(f.keys())
    assert metadata["format"] == "ode-bert-checkpoint-v1"
    json.loads(metadata["state"])  # plain JSON
    assert any(k.startswith("state/model/") for k in keys) and "state/rng/torch" in keys
    state = train_module.load_checkpoint(run / "checkpoint.safetensors")
    assert state["epoch"] == 0 and state["config"]["lr"] == 1e-3
    assert isinstance(state["rng"]["python"], tuple) and isinstance(state["rng"]["python"][1], tuple)
    assert all(isinstance(k, int) for k in state["optimizer"]["state"])  # the optimizer's int keys survive

    import random

    import numpy as np

    random.seed(5)
    np.random.seed(5)
    saved = train_module._rng_state()
    train_module.save_checkpoint(tmp_path / "rng.safetensors", {"rng": saved})
    expected = (random.random(), np.random.rand(), torch.rand(1))
    from safetensors.torch import load

    blob = (tmp_path / "rng.safetensors").read_bytes()
    with safe_open(str(tmp_path / "rng.safetensors"), framework="pt") as f:
        restored = train_module._decode(json.loads(f.metadata()["state"]), load(blob))
    train_module._set_rng_state(restored["rng"])
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(1), expected[2])


def test_damaged_checkpoint_is_named_with_a_way_out(
    tiny_model: str, tmp_path: Path, train_until_first_checkpoint: Callable[[TrainConfig], None]
) -> None:
    run = _interrupted_run(tiny_model, tmp_path / "run", train_until_first_checkpoint)
    checkpoint = run / "checkpoint.safetensors"
    config_before = (run / "train_config.json").read_bytes()
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])  # truncated
    with pytest.raises(RunDirError, match=r"checkpoint\.safetensors is damaged .* --resume .* new folder"):
        train(_config(tiny_model, run, epochs=2, resume=True))
    assert (run / "train_config.json").read_bytes() == config_before and not (run / "model").exists()

    # a checkpoint of another run (other settings) copied in is refused too
    other = _interrupted_run(tiny_model, tmp_path / "other", train_until_first_checkpoint, lr=5e-4)
    shutil.copy(other / "checkpoint.safetensors", checkpoint)
    with pytest.raises(RunDirError, match=r"belongs to a run with other settings \(differing: \['lr'\]\)"):
        train(_config(tiny_model, run, epochs=2, resume=True))

    checkpoint.unlink()  # the advice works: without the checkpoint the run starts again with its settings
    train(_config(tiny_model, run, epochs=2, resume=True))
    assert len(json.loads((run / "train_history.json").read_text())) == 2


def test_resume_without_saved_settings_is_refused(
    tiny_model: str, tmp_path: Path, train_until_first_checkpoint: Callable[[TrainConfig], None]
) -> None:
    run = _interrupted_run(tiny_model, tmp_path / "run", train_until_first_checkpoint)
    (run / "train_config.json").unlink()
    for resume in (True, False):
        with pytest.raises(
            RunDirError, match=r"checkpoint\.safetensors\) but no train_config\.json.* restore"
        ):
            train(_config(tiny_model, run, epochs=2, lr=1e-2, resume=resume))
    assert not (run / "train_config.json").exists()

    (run / "train_config.json").write_text("{ damaged")
    with pytest.raises(RunDirError, match=r"train_config\.json is damaged"):
        train(_config(tiny_model, run, epochs=2, resume=True))

    finished = tmp_path / "finished"  # model/ alone, without its settings
    (finished / "model").mkdir(parents=True)
    with pytest.raises(RunDirError, match=r"model/\) but no train_config\.json"):
        train(_config(tiny_model, finished, resume=True))


def _as_before_0_2(run: Path) -> None:
    """Rewrite a run's saved settings (and checkpoint) as ode-bert wrote them before 0.2.0 for a run that
    left the tolerance to im_bert's default of then, 1e-4: ``tol`` null, no recorded conversion."""
    path = run / "train_config.json"
    write_json_atomic(path, {**json.loads(path.read_text()), "tol": None})
    checkpoint = run / "checkpoint.safetensors"
    if checkpoint.is_file():
        state = train_module.load_checkpoint(checkpoint)
        assert state["conversion"]["tol"] == 1e-4  # recorded since 0.2.0
        del state["conversion"]
        state["config"]["tol"] = None
        train_module.save_checkpoint(checkpoint, state)


@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")
def test_runs_made_under_an_earlier_default_are_judged_by_what_they_computed(
    tiny_model: str, tmp_path: Path, train_until_first_checkpoint: Callable[[TrainConfig], None]
) -> None:
    """im_bert's tolerance was 1e-4 before 0.2.0 and is 1e-2 since: a finished run or a checkpoint made then
    with the default is not reused or resumed under today's default (the error names the change and the
    way out), and is when given the tolerance it was made with."""
    im = {"variant": "im", "max_iter": 30, "layers": "1"}  # one of two layers: "1" is resolved on the model
    finished = tmp_path / "finished"
    train(_config(tiny_model, finished, tol=1e-4, **im))
    _as_before_0_2(finished)
    with pytest.raises(RunDirError, match=r"tol: 0\.0001 -> 0\.01.*--tol 0\.0001"):
        train(_config(tiny_model, finished, resume=True, **im))
    assert train(_config(tiny_model, finished, tol=1e-4, resume=True, **im)) == finished  # reused as it is

    run = _interrupted_run(tiny_model, tmp_path / "run", train_until_first_checkpoint, tol=1e-4, **im)
    _as_before_0_2(run)
    # the checkpoint's settings are judged when it is loaded: a tolerance spelled otherwise is not refused
    # before, and the conversion it was made with then decides
    with pytest.raises(RunDirError, match=r"checkpoint\.safetensors was made with .*tol: 0\.0001 -> 0\.01"):
        train(_config(tiny_model, run, epochs=2, resume=True, **im))
    train(_config(tiny_model, run, epochs=2, tol=1e-4, resume=True, **im))
    assert len(json.loads((run / "train_history.json").read_text())) == 2
    with pytest.raises(RunDirError, match=r"settings differ from the saved run in \['lr'\]"):
        train(_config(tiny_model, run, epochs=2, tol=1e-4, lr=5e-4, resume=True, **im))


def test_damaged_run_files_fail_evaluation_by_name(tiny_model: str, tmp_path: Path) -> None:
    run = train(_config(tiny_model, tmp_path / "run"))
    weights = run / "model" / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(
        RunDirError, match=r"model\.safetensors is damaged or truncated .* train the run again"
    ):
        evaluate(run, dev_samples=8)
    weights.write_bytes(intact)

    config = (run / "train_config.json").read_text()
    (run / "train_config.json").write_text(config[: len(config) // 2])
    with pytest.raises(RunDirError, match=r"train_config\.json is damaged"):
        evaluate(run, dev_samples=8)
    (run / "train_config.json").write_text(json.dumps({**json.loads(config), "lr": "fast"}))
    with pytest.raises(RunDirError, match=r"train_config\.json is damaged: its settings are not valid .*lr"):
        evaluate(run, dev_samples=8)
    (run / "train_config.json").write_text(config)
    with pytest.raises(ValueError, match="dev_samples must be a positive integer"):
        evaluate(run, dev_samples=0)
    assert not (run / "metrics.json").exists()


@pytest.mark.parametrize(
    "bad",
    [{"variant": "im", "layers": "0-99"}, {"variant": "im", "step": -1.0},
     {"variant": "im", "grad": "implict"}, {"lr": -1.0}, {"lr": float("nan")}, {"weight_decay": -0.1},
     {"max_grad_norm": 0.0}, {"train_samples": 10**6}],
)  # fmt: skip
def test_start_up_failure_writes_nothing(tiny_model: str, tmp_path: Path, bad: dict[str, object]) -> None:
    run = tmp_path / "run"
    with pytest.raises(ValueError):
        train(_config(tiny_model, run, **bad))
    assert not run.exists()


def test_retry_after_a_failed_start_is_not_blocked(tiny_model: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(ValueError, match="out of range in '0-99'"):
        train(_config(tiny_model, run, variant="im", layers="0-99"))
    train(
        _config(tiny_model, run, variant="im", layers="0-1", tol=1e-2, max_iter=4)
    )  # same folder, no --resume
    assert json.loads((run / "train_config.json").read_text())["layers"] == "0-1"


def test_bad_data_fails_before_training(tiny_model: str, tmp_path: Path) -> None:
    """A damaged AdvGLUE dev.json or clean dev.tsv is named before anything is trained or written."""
    broken = tmp_path / "data"
    (broken / "glue").mkdir(parents=True)
    (broken / "glue" / "SST-2").symlink_to(DATA_DIR / "glue" / "SST-2")
    (broken / "advglue").mkdir()
    (broken / "advglue" / "dev.json").write_text('{"sst2": [{"sentence": "fine", "label": 1}')  # truncated
    run = tmp_path / "run"
    with pytest.raises(DataError, match=r"advglue/dev\.json: not valid JSON"):
        train(_config(tiny_model, run, data_dir=str(broken)))
    assert not run.exists()

    (broken / "advglue" / "dev.json").unlink()
    with pytest.raises(DataError, match=r"missing data file .*advglue/dev\.json"):
        train(_config(tiny_model, run, data_dir=str(broken)))

    (broken / "glue" / "SST-2").unlink()  # clean dev with a bad label
    (broken / "glue" / "SST-2").mkdir()
    (broken / "glue" / "SST-2" / "train.tsv").symlink_to(DATA_DIR / "glue" / "SST-2" / "train.tsv")
    (broken / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\na fine film\t1\na dull one\tmaybe\n")
    shutil.copy(DATA_DIR / "advglue" / "dev.json", broken / "advglue" / "dev.json")
    with pytest.raises(DataError, match=r"SST-2/dev\.tsv:3: unknown label 'maybe'"):
        train(_config(tiny_model, run, data_dir=str(broken)))
    assert not run.exists()


def test_output_dir_that_is_a_file_or_not_writable(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    with pytest.raises(RunDirError, match="afile is a file, not a folder"):
        train(_config(tiny_model, afile))
    with pytest.raises(RunDirError, match="lies under .*afile, which is a file"):
        train(_config(tiny_model, afile / "run"))
    assert afile.read_text() == "not a folder"

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(train_module.tempfile, "mkstemp", denied)
    with pytest.raises(
        RunDirError, match="cannot be written .*Permission denied.* writable --output-dir"
    ) as info:
        train(_config(tiny_model, tmp_path / "run"))
    assert info.value.errno == errno.EACCES and not (tmp_path / "run").exists()


def test_disk_full_during_a_checkpoint_keeps_the_old_one(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    real_fsync = os.fsync
    checkpoint_writes = []

    def fsync_disk_full(fd: int) -> None:  # a full disk shows when the written data is flushed to it
        if ".checkpoint.safetensors." in os.readlink(f"/proc/self/fd/{fd}"):
            checkpoint_writes.append(fd)
            if len(checkpoint_writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(train_module.os, "fsync", fsync_disk_full)
    with pytest.raises(
        RunDirError, match=r"checkpoint\.safetensors \(disk full\).*previous checkpoint is kept"
    ) as info:
        train(_config(tiny_model, run, epochs=2))
    assert info.value.errno == errno.ENOSPC
    assert train_module.load_checkpoint(run / "checkpoint.safetensors")["epoch"] == 0  # the old one, intact
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.safetensors", "train_config.json"]  # no temp
    monkeypatch.setattr(train_module.os, "fsync", real_fsync)
    train(_config(tiny_model, run, epochs=2, resume=True))
    assert len(json.loads((run / "train_history.json").read_text())) == 2


def test_leftovers_of_a_killed_save_are_removed_on_the_next_start(tiny_model: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [".checkpoint.safetensors.k1ll9ed_.tmp", ".checkpoint.pt.abcd1234.tmp",
                 ".train_config.json.x_y_z_w1.tmp", ".train_history.json.12345678.tmp"]  # fmt: skip
    for name in leftovers:
        (run / name).write_bytes(b"half a file")
    (run / ".model.q9w8e7r6").mkdir()
    (run / ".model.q9w8e7r6" / "model.safetensors").write_bytes(b"half a model")
    (run / "notes.txt").write_text("mine")  # not a leftover: kept
    train(_config(tiny_model, run))
    names = sorted(p.name for p in run.iterdir())
    assert names == ["model", "notes.txt", "train_config.json", "train_history.json"]


def test_non_convergence_is_summarised_once_per_epoch(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = _config(tiny_model, tmp_path / "run", variant="im", train_samples=16, tol=1e-6, max_iter=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train(config)
    assert not [w for w in caught if issubclass(w.category, solvers.ConvergenceWarning)]
    (epoch,) = json.loads((run / "train_history.json").read_text())
    solver = epoch["solver"]
    assert solver["example_solves"] == 2 * 16 and solver["layer_solves"] == 2 * 2  # 2 batches x 2 layers
    assert solver["example_converged"] < solver["example_solves"]
    assert solver["example_converged_fraction"] == solver["example_converged"] / solver["example_solves"]
    assert solver["max_rel_residual"] > 1e-6 and solver["max_iterations"] <= 2 and solver["tol"] == 1e-6
    out = capsys.readouterr().out
    assert out.count("(example, layer) implicit solves converged to tol 1e-06") == 1
    # outside training, a forward that stops short still warns
    model = ode_bert.from_pretrained(run / "model", AutoModelForSequenceClassification)
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    with pytest.warns(solvers.ConvergenceWarning):
        model(**tokenizer(["a fine film"], return_tensors="pt"))

    stock = train(_config(tiny_model, tmp_path / "stock"))
    assert json.loads((stock / "train_history.json").read_text())[0]["solver"] is None  # no implicit solves


def test_run_records_name_the_machine_and_evaluation_shows_progress(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = train(_config(tiny_model, tmp_path / "run"))
    machine = json.loads((run / "train_history.json").read_text())[0]["machine"]
    assert machine["torch"] == torch.__version__ and machine["torch_threads"] == torch.get_num_threads()
    assert machine["cpu"] and machine["transformers"] and machine["device"].startswith(("cpu", "cuda"))
    assert machine["ode_bert"] == importlib.metadata.version("ode-bert")
    capsys.readouterr()
    metrics = evaluate(run, dev_samples=8)
    assert metrics["machine"]["cpu"] == machine["cpu"]
    progress = capsys.readouterr().err  # one bar per scored split, labelled with its set
    assert "clean sst2" in progress and "advglue sst2" in progress


def test_compare_refuses_runs_made_with_other_settings(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    options = {"model": tiny_model, "epochs": 1, "batch_size": 8, "train_samples": 8, "max_length": 16,
               "lr": 1e-3}  # fmt: skip
    compare(("bert",), (1,), "sst2", out, dev_samples=8, data_dir=DATA_DIR, executor="inline", **options)
    stamp = (out / "bert-seed1" / "model" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(
        RunDirError, match=r"bert-seed1: settings differ .* \['lr', 'train_samples'\]"
    ):
        compare(("bert",), (1,), "sst2", out, dev_samples=8, data_dir=DATA_DIR,
                **{**options, "train_samples": 16, "lr": 1e-4})  # fmt: skip
    with pytest.raises(
        RunDirError, match=r"metrics\.json was evaluated with other settings: \['dev_samples'\]"
    ):
        compare(("bert",), (1,), "sst2", out, dev_samples=16, data_dir=DATA_DIR, **options)
    # an interrupted run is checked as well, before any other run does work
    (out / "bert-seed2").mkdir()
    (out / "bert-seed2" / "train_config.json").write_text(
        json.dumps(
            {**TrainConfig(**options, variant="bert", seed=2, data_dir=str(DATA_DIR)).to_json(), "epochs": 3}
        )
    )
    with pytest.raises(RunDirError, match=r"(?s)1 run\(s\).*bert-seed2: settings differ .*\['epochs'\]"):
        compare(("bert",), (1, 2), "sst2", out, dev_samples=8, data_dir=DATA_DIR, **options)
    assert not (out / "bert-seed2" / "model").exists()
    assert (out / "bert-seed1" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    result = compare(
        ("bert",), (1,), "sst2", out, dev_samples=8, data_dir=DATA_DIR, **options
    )  # same: reused
    assert result["options"]["lr"] == 1e-3


def test_grid_refuses_runs_made_with_other_settings(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench" / "experiments"))
    import grid

    monkeypatch.setitem(experiments.PLANS, "tiny", [experiments.Group("sst2", 8, ("bert",))])
    options = {"model": tiny_model, "data_dir": str(DATA_DIR), "epochs": 1, "batch_size": 8, "max_length": 16}

    def plan(**changed: object) -> list[experiments.Run]:
        groups = experiments.named_groups(["tiny"])
        return experiments.plan_runs(groups, [1], tmp_path, {**options, **changed})

    (run,) = plan()
    evaluate(train(run.config()), dev_samples=8)  # the run, as a worker makes it
    inline = experiments.InlineExecutor()
    assert len(experiments.Experiment(tmp_path, plan(), 8, inline).pending) == 0  # same settings: reused
    with pytest.raises(RunDirError, match=r"bert-seed1: settings differ .* \['lr'\]"):
        experiments.Experiment(tmp_path, plan(lr=1e-3), 8, inline)
    with pytest.raises(RunDirError, match=r"evaluated with other settings: \['dev_samples'\]"):
        experiments.Experiment(tmp_path, plan(), None, inline)
    argv = ["--plan", "tiny", "--seeds", "1", "--out", str(tmp_path), "--model", tiny_model, "--data-dir",
            str(DATA_DIR), "--dev-samples", "8", "--set", json.dumps({"epochs": 2, "batch_size": 8,
                                                                       "max_length": 16})]  # fmt: skip
    with pytest.raises(SystemExit, match=r"(?s)grid: error: .*bert-seed1: settings differ .*\['epochs'\]"):
        grid.main(argv)
