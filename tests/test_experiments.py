"""The experiments layer (``ode_bert.experiments``): the settings of each planned run, reports of run records,
the executor options, and the Ray executor against a local Ray instance (a tiny random BERT, tiny data)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from scipy import stats

from ode_bert import cli, compare, data, experiments
from ode_bert.experiments import Experiment, Group, RayExecutor, plan_runs
from ode_bert.train import RunDirError

DATA_DIR = Path(os.environ.get(data.DATA_DIR_ENV) or Path(__file__).resolve().parents[1] / "../shared/data")
FAST_IM = {"tol": 1e-2, "max_iter": 8}  # loose solve: the tiny random model only has to run, not converge


def test_planned_runs_take_the_settings_that_apply_to_their_variant() -> None:
    """A run's settings: the plan's defaults, then the options less the solver settings its variant does not
    take, then the variant's own; named plans nest runs by group, a comparison keeps them flat."""
    options = {"lr": 1e-3, "epochs": 1, "layers": "0", **FAST_IM}
    runs = plan_runs([Group("rte", 100, ("bert", "ex", "im-upper"))], [3], "out", options)
    settings = {run.variant: dict(run.settings) for run in runs}
    assert settings["bert"] == {
        "epochs": 1, "batch_size": 32, "lr": 1e-3, "max_length": 128, "variant": "bert", "task": "rte",
        "train_samples": 100, "seed": 3, "output_dir": str(Path("out/rte-n100/bert-seed3")),
    }  # fmt: skip
    assert settings["ex"]["layers"] == "0" and "tol" not in settings["ex"]  # explicit Euler has no solve
    assert (settings["im-upper"]["layers"], settings["im-upper"]["max_iter"]) == ("3-5", 10)  # its own win
    assert settings["im-upper"]["tol"] == 1e-2
    assert [run.config().variant for run in runs] == ["bert", "ex", "im"]  # each one a valid TrainConfig

    (flat,) = plan_runs([Group("sst2", None, ("bert",))], [1], "cmp", defaults=None, flat=True)
    assert (flat.run_dir, flat.group.name, flat.label) == (Path("cmp/bert-seed1"), "sst2", "sst2 bert seed 1")
    assert "epochs" not in flat.settings  # no plan defaults: TrainConfig's
    (typo,) = plan_runs([Group("sst2", 8, ("bert",))], [1], "out", {"epoch": 1})
    with pytest.raises(ValueError, match="unknown training setting"):
        typo.config()
    with pytest.raises(ValueError, match="unknown plan"):
        experiments.named_groups(["nope"])


def _record(group: str, variant: str, seed: int, clean: float, advglue: float,
            seconds: float | None = 10.0) -> dict[str, object]:
    scores = {m: {"overall": s, "tasks": {}, "solver": None, "splits": {}, "constant": 0.5}
              for m, s in (("clean", clean), ("advglue", advglue))}  # fmt: skip
    return {"group": group, "task": "sst2", "variant": variant, "settings": {"variant": variant},
            "seed": seed, "train_samples": 8, "seconds": seconds, **scores}  # fmt: skip


def test_report_pairs_records_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``ode-bert experiment --report``: means, Δ to BERT with the t interval by hand, pairs, per-seed runs;
    a record with a wall time wins over the same run's record without one."""
    records = [_record("sst2-n8", "bert", 1, 0.80, 0.50), _record("sst2-n8", "bert", 2, 0.82, 0.40),
               _record("sst2-n8", "im", 1, 0.83, 0.55), _record("sst2-n8", "im", 2, 0.86, 0.47),
               _record("sst2-n8", "ex", 1, 0.81, 0.52)]  # fmt: skip
    path = tmp_path / "results.jsonl"
    untimed = _record("sst2-n8", "im", 1, 0, 0, None)  # the same run linked in elsewhere: loses
    path.write_text("".join(json.dumps(r) + "\n" for r in [untimed, *records]))
    assert cli.main(["experiment", "--report", str(path), "--pairs", "im:ex"]) == 0
    report = capsys.readouterr().out
    diffs = [3.0, 4.0]  # im - bert, clean, in points
    half = stats.t.ppf(0.975, 1) * statistics.stdev(diffs) / math.sqrt(2)
    mean = statistics.fmean(diffs)
    assert f"| im | 2 | 84.50 ± 2.12 | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] |" in report
    assert "| ex | 1 | 81.00 | +1.00 |" in report  # one seed shared with BERT: no interval
    assert "| sst2-n8 | im − ex | 1 | +2.00 | +3.00 |" in report
    assert "| 1 | 80.00 / 50.00 | 81.00 / 52.00 | 83.00 / 55.00 |" in report  # bert, ex, im: VARIANTS order
    assert "| 2 | 82.00 / 40.00 | - | 86.00 / 47.00 |" in report
    assert experiments.format_report(experiments.load_records([path]), [("im", "ex")]) + "\n" == report


def test_report_tests_pairs_and_counts_failures_by_hand() -> None:
    """The pairs table's t and sign tests, and the failure counts with Fisher's exact test, against the
    formulas by hand: t = mean / (sd / sqrt n) with p = 2 P(T > |t|), the sign test's binomial tail with
    ties dropped, and the hypergeometric tail of the failure table."""
    clean_ex = [0.80, 0.52, 0.79, 0.52, 0.51, 0.78]  # seeds 2, 4, 5 within 5 points of the constant 0.5
    clean_im = [0.83, 0.84, 0.79, 0.81, 0.86, 0.77]
    records = [_record("sst2-n8", "ex", s, c, 0.5) for s, c in enumerate(clean_ex, 1)]
    records += [_record("sst2-n8", "im", s, c, 0.5) for s, c in enumerate(clean_im, 1)]
    text = experiments.format_pairs(records, [("im", "ex")])
    diffs = [100 * (a - b) for a, b in zip(clean_im, clean_ex)]  # +3, +32, 0, +29, +35, -1
    t = statistics.fmean(diffs) / (statistics.stdev(diffs) / math.sqrt(6))
    t_p = 2 * stats.t.sf(abs(t), 5)
    sign_p = 2 * (math.comb(5, 0) + math.comb(5, 1)) / 2**5  # 4 of 5 higher, the tie at seed 3 dropped
    assert f"| {t_p:.2g}; 4 of 5 higher, p = {sign_p:.2g} | n/a; 0 of 0 higher |" in text
    # 3 failures in 12 runs, all 3 in ex's 6: hypergeometric probability C(6,0) C(6,3) / C(12,3); its mirror
    # image (all in im's) is as likely and the split tables more likely, so the two-sided p sums the two
    fisher_p = 2 * math.comb(6, 0) * math.comb(6, 3) / math.comb(12, 3)
    assert f"- sst2-n8, im − ex: im 0 of 6, ex 3 of 6 (Fisher's exact test p = {fisher_p:.2g})" in text
    learned = [r for r in records if r["clean"]["overall"] > 0.6]
    assert "Fisher" not in experiments.format_pairs(learned, [("im", "ex")])
    from ode_bert.experiments.stats import fisher_exact

    with pytest.raises(ValueError, match="failures must lie between 0 and the runs, got 7 of 6"):
        fisher_exact(7, 6, 0, 6)


def test_executor_options_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, named in ((["--gpus-per-run", "1"], "options of --executor ray"),
                        (["--workers", "0"], "--workers must be >= 1"),
                        (["--executor", "inline", "--workers", "2"], "one run at a time")):  # fmt: skip
        assert cli.main(["experiment", "--plan", "core", "--out", str(tmp_path), *argv]) == 2
        assert named in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown executor 'slurm'"):
        experiments.make_executor("slurm")
    with pytest.raises(ValueError, match="twice"):
        runs = plan_runs([Group("sst2", 8, ("bert",))], [1], tmp_path)
        Experiment(tmp_path, runs + runs, executor=experiments.InlineExecutor())
    assert compare.compare is experiments.compare  # the old import path is the same implementation


@pytest.mark.slow  # 11 s, mostly starting Ray: the optional executor, run by `make test-all`
@pytest.mark.skipif(not DATA_DIR.is_dir(), reason="shared data directory not present")
@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")
def test_ray_executor_runs_each_run_as_a_ray_task(tiny_model: str, tmp_path: Path) -> None:
    """Each run a Ray task with its CPU request, on a local Ray instance the executor starts and shuts down;
    the records and skip-finished are the same as with the local executor."""
    options = {"model": tiny_model, "data_dir": str(DATA_DIR), "epochs": 1, "batch_size": 8, "max_length": 16,
               **FAST_IM}  # fmt: skip
    runs = plan_runs([Group("sst2", 8, ("bert", "im"))], [1], tmp_path, options)
    executor = RayExecutor(cpus_per_run=1, init_options={"num_cpus": 2})
    try:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
        assert executor.describe().startswith("Ray tasks of 1 CPU(s) and 0.0 GPU(s) each")
        records = Experiment(tmp_path, runs, 8, executor).run()
    finally:
        executor.close()
    assert not ray.is_initialized()  # the instance it started is shut down
    assert sorted((r["variant"], r["seed"]) for r in records) == [("bert", 1), ("im", 1)]
    for record, run in zip(sorted(records, key=lambda r: r["variant"]), runs):
        metrics = json.loads((run.run_dir / "metrics.json").read_text())
        assert record["advglue"]["overall"] == metrics["advglue"]["overall"] and record["seconds"] > 0
        assert metrics["dev_samples"] == 8 and metrics["clean"]["splits"]["sst2"]["n"] == 8
        assert metrics["machine"]["torch_threads"] == 1  # the task ran with the one CPU it requested
        assert (run.run_dir / "log.txt").is_file()
    assert records[[r["variant"] for r in records].index("im")]["advglue"]["solver"]["mean_iterations"] > 0
    # finished: planned again, nothing is pending and nothing is recorded twice
    assert not Experiment(tmp_path, runs, 8, experiments.InlineExecutor()).pending
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 2
    with pytest.raises(RunDirError, match=r"bert-seed1: settings differ .*\['epochs'\]"):
        other = plan_runs([Group("sst2", 8, ("bert",))], [1], tmp_path, {**options, "epochs": 2})
        Experiment(tmp_path, other, 8, experiments.InlineExecutor())


def test_local_workers_die_with_the_process_that_started_them() -> None:
    """A worker runs in its own session (so Ctrl-C reaches the runner first), yet must not train on alone
    when the runner is killed: it is started with ``io.die_with_parent``."""
    parent = (
        "import os, subprocess, sys\n"
        "from ode_bert.io import die_with_parent\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                         start_new_session=True, preexec_fn=die_with_parent)\n"
        "print(child.pid, flush=True)\n"
        "os._exit(0)  # as if killed: no clean-up code runs\n"
    )
    argv = [sys.executable, "-c", parent]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    pid = int(done.stdout)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), "the worker outlived the process that started it"


def test_every_named_plan_run_has_valid_settings_with_its_variant_s_own() -> None:
    """Every run of every named plan builds a checked ``TrainConfig`` before any work, and a named variant's
    own settings (``VARIANTS``, e.g. ``im-tol1e-1``'s tolerance) are the ones it trains with."""
    runs = plan_runs(experiments.named_groups(list(experiments.PLANS)), [1], "out")
    assert set(experiments.VARIANTS) - {r.variant for r in runs} == {"ode"}  # the continuous-depth base
    for run in runs:
        config = run.config()
        for name, value in experiments.VARIANTS.get(run.variant, {}).items():
            assert getattr(config, name) == value, (run.label, name)


def test_per_seed_table_marks_the_runs_that_did_not_learn() -> None:
    """A run within NOT_LEARNED_MARGIN (5) points of the constant prediction on clean dev is marked ‡ and the
    note says why; 5.5 points above it is not; a record without the constant level is never marked."""
    from ode_bert.experiments.report import format_seeds

    def record(seed: int, clean: float, constant: float | None) -> dict[str, object]:
        scores = {"overall": clean} if constant is None else {"overall": clean, "constant": constant}
        return {"group": "sst2-n1000", "variant": "im", "seed": seed, "clean": scores,
                "advglue": {"overall": 0.5}}  # fmt: skip

    table = format_seeds([record(1, 0.549, 0.50), record(2, 0.555, 0.50), record(3, 0.50, None)])
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["1"].endswith("| 54.90 / 50.00 ‡ |")
    assert rows["2"].endswith("| 55.50 / 50.00 |") and rows["3"].endswith("| 50.00 / 50.00 |")
    assert "‡ clean dev within 5 points of always answering the majority training class" in table
    assert "‡" not in format_seeds([record(2, 0.555, 0.50)])
