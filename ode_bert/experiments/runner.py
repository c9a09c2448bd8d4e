"""Running a plan: check every run before any work, skip finished ones, execute the rest, keep the records.

``Experiment(out, runs, dev_samples, executor).run()`` works through ``runs`` (``plans.plan_runs``). A run
whose ``metrics.json`` exists is skipped (and recorded, with no wall time, if ``results.jsonl`` lacks it,
e.g. a run linked in from another folder), an interrupted one resumed: both only if its saved settings
(``train_config.json``, ``metrics.json``'s ``dev_samples``) are the ones asked for; every run is checked
before any starts, and a mismatch is refused with the differing keys (``reuse.check_reuse``). After every
finished run ``results.jsonl`` gets a line and ``summary.json`` and ``tables.md`` are rewritten atomically,
so stopping (a deadline, Ctrl-C, a kill) loses only the runs in flight.

``compare`` is one group of variants x seeds on one task, with its own report (``comparison.json``,
``comparison.md``, ``comparison.png``).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import check_data
from ..evaluate import METRICS_FILE
from ..io import atomic_open, write_json_atomic
from ..train import RunDirError
from .executors import Executor, InlineExecutor, Outcome, make_executor
from .plans import BASELINE, Group, Run, plan_runs
from .records import RESULTS_FILE, append_record, recorded, result_line
from .report import format_markdown, format_seeds, format_tables, plot_scores
from .reuse import check_reuse, reuse_problem
from .stats import METRICS, summarize, summarize_groups

SUMMARY_FILE = "summary.json"
TABLES_FILE = "tables.md"


class RunsFailed(ValueError):
    """Some runs of an experiment failed (each named; its ``log.txt`` says why). A ``ValueError``, so that the
    command line reports it as an error, not a traceback."""


def _check_dev_samples(dev_samples: int | None) -> None:
    if dev_samples is not None and (isinstance(dev_samples, bool) or not isinstance(dev_samples, int)
                                    or dev_samples < 1):  # fmt: skip
        raise ValueError(f"dev_samples must be a positive integer, got {dev_samples!r}")


class Experiment:
    """The runs of a plan in ``out``, executed by ``executor`` (default: one local worker process).

    Construction checks everything before any work: every run's settings, the reuse of every run already
    in ``out`` and the data of the runs to do; finished runs join ``results`` at once (``pending`` holds the
    others).
    """

    def __init__(self, out: str | Path, runs: Sequence[Run], dev_samples: int | None = None,
                 executor: Executor | None = None, baseline: str = BASELINE, verbose: bool = True) -> None:
        _check_dev_samples(dev_samples)
        self.out, self.dev_samples, self.baseline, self.verbose = Path(out), dev_samples, baseline, verbose
        if self.out.exists() and not self.out.is_dir():
            raise RunDirError(f"output dir {self.out} is a file, not a folder; choose another output folder")
        keys = [run.key for run in runs]
        if len(set(keys)) != len(keys):
            raise ValueError("a plan names a (group, variant, seed) run twice")
        self.executor = executor if executor is not None else make_executor()
        # before anything runs: every setting valid, and no run to reuse or resume made with other settings
        check_reuse([(run.run_dir, run.config()) for run in runs], dev_samples)
        to_do = [run for run in runs if not (run.run_dir / METRICS_FILE).is_file()]
        for task, data_dir in dict.fromkeys((run.group.task, run.settings.get("data_dir")) for run in to_do):
            check_data(task, None if data_dir is None else str(data_dir))
        self.out.mkdir(parents=True, exist_ok=True)
        self.total = len(runs)
        self.results: list[dict[str, Any]] = []
        self.failed: list[Outcome] = []
        self.pending: deque[Run] = deque(run for run in runs if not self._take_finished(run))

    def _print(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def _take_finished(self, run: Run) -> bool:
        """Whether ``run`` has finished already (its ``metrics.json`` exists: run earlier, linked in, or
        finished meanwhile by another experiment on the same folder); if so it joins the results, and is
        recorded without a wall time unless ``results.jsonl`` has it."""
        metrics_path = run.run_dir / METRICS_FILE
        if not metrics_path.is_file():
            return False
        problem = reuse_problem(run.run_dir, run.config(), self.dev_samples)
        if problem is not None:
            raise RunDirError(f"{run.run_dir} is not reused: {problem}")
        line = result_line(run, json.loads(metrics_path.read_text()), None)
        self.results.append(line)
        if run.key not in recorded(self.out):
            append_record(self.out, line)
        return True

    def _finish(self, outcome: Outcome) -> None:
        run = outcome.run
        if outcome.metrics is None:
            self.failed.append(outcome)
            self._print(f"FAILED {run.label} after {outcome.seconds:.0f} s: {outcome.error}")
            return
        line = result_line(run, outcome.metrics, outcome.seconds)
        self.results.append(line)
        append_record(self.out, line)
        self.write_summary()
        clean, adv = (100 * line[m]["overall"] for m in METRICS)
        self._print(f"[{len(self.results)}/{self.total}] {run.label}: {outcome.seconds:.0f} s, "
                    f"clean {clean:.2f}, AdvGLUE {adv:.2f}")

    def write_summary(self) -> None:
        """Rewrite ``summary.json`` and ``tables.md`` from the results so far."""
        summary = summarize_groups(self.results, self.baseline)
        write_json_atomic(self.out / SUMMARY_FILE, summary)
        with atomic_open(self.out / TABLES_FILE) as f:
            f.write(format_tables(summary) + "\n" + format_seeds(self.results))

    def run(self, deadline: float | None = None) -> list[dict[str, Any]]:
        """Work through the pending runs until all are done or ``deadline`` (``time.perf_counter`` seconds)
        passes; the records of the finished runs."""
        self._print(f"{self.total} runs, {len(self.pending)} to do, {self.executor.describe()}")
        executor = self.executor
        try:
            while self.pending or executor.in_flight:
                if deadline is not None and time.perf_counter() > deadline:
                    self._print("deadline reached")
                    break
                while self.pending and executor.in_flight < executor.capacity:
                    run = self.pending.popleft()
                    if not self._take_finished(run):
                        executor.submit(run, self.dev_samples)
                for outcome in executor.wait(0.5):
                    self._finish(outcome)
        finally:
            stopped = executor.stop()
            if stopped:
                self._print(f"stopped {stopped} run(s) in flight; rerun to resume them")
            self.write_summary()
        return self.results


def ensure_run(run: Run, dev_samples: int | None = None) -> dict[str, Any]:
    """The metrics of one run, trained and evaluated here unless it is finished already (then only if its
    settings are the ones asked for: a mismatch is a ``RunDirError`` naming the differing keys)."""
    _check_dev_samples(dev_samples)
    check_reuse([(run.run_dir, run.config())], dev_samples)
    metrics_path = run.run_dir / METRICS_FILE
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    executor = InlineExecutor()
    executor.submit(run, dev_samples)
    (outcome,) = executor.wait(0)
    return outcome.metrics


def compare(
    variants: Sequence[str] = ("bert", "ex", "im"),
    seeds: Sequence[int] = (1, 2, 3, 4, 5),
    task: str = "sst2",
    output_dir: str | Path = "runs/compare",
    baseline: str = "bert",
    dev_samples: int | None = None,
    data_dir: str | Path | None = None,
    executor: Executor | str | None = None,
    **train_options: Any,
) -> dict[str, Any]:
    """Train and evaluate every variant with every seed on ``task``, then summarize the paired comparison.

    Every (variant, seed) run trains on the same examples and starts from the same classifier initialisation
    as the other variants with that seed, so differences to ``baseline`` are paired by seed. Runs live in
    ``output_dir/<variant>-seed<seed>``; finished ones are reused and interrupted ones resumed, if their
    settings match (``Experiment``). ``variants`` are base variants or named ones (``plans.VARIANTS``);
    ``train_options`` are further ``TrainConfig`` fields (model, epochs, lr, train_samples, solver settings,
    ...) for every run, each variant taking the solver settings that apply to it. ``executor``: an
    ``Executor`` or its name (default ``"local"``, one worker process), closed at the end. Writes
    ``comparison.json``, ``comparison.md`` and ``comparison.png`` (and the experiment's ``results.jsonl``,
    ``summary.json``, ``tables.md``) into ``output_dir``; returns what ``comparison.json`` holds, with its
    ``markdown``.
    """
    variants, seeds = list(variants), list(seeds)
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} must be one of the compared variants {variants}")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ValueError(f"seeds must be distinct and non-empty, got {seeds}")
    if len(set(variants)) != len(variants):
        raise ValueError(f"variants must be distinct, got {variants}")
    _check_dev_samples(dev_samples)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output dir {output_dir} is a file, not a folder; choose another --output-dir")
    group = Group(task, train_options.get("train_samples"), tuple(variants))
    options = {**train_options, "data_dir": None if data_dir is None else str(data_dir)}
    runs = plan_runs([group], seeds, output_dir, options, defaults=None, flat=True)
    if isinstance(executor, str) or executor is None:
        executor = make_executor(executor or "local")
    try:  # the executor is closed whatever happens (a Ray instance started for it is shut down)
        experiment = Experiment(output_dir, runs, dev_samples, executor, baseline)
        experiment.run()
    finally:
        executor.close()
    if experiment.failed:
        raise RunsFailed(f"{len(experiment.failed)} run(s) failed (their log.txt says why): "
                         + ", ".join(o.run.label for o in experiment.failed))
    records = {(r["variant"], r["seed"]): r for r in experiment.results}
    scores = {v: {s: {m: records[v, s][m]["overall"] for m in METRICS} for s in seeds} for v in variants}
    summary = summarize(scores, baseline)
    constant = {metric: 100 * records[baseline, seeds[0]][metric]["constant"] for metric in METRICS}
    shown = {"task": task, "dev_samples": dev_samples, **train_options}
    result = {"baseline": baseline, "seeds": seeds, "options": shown, "summary": summary,
              "constant_baseline": constant}  # fmt: skip
    header = (
        f"## {task}: {', '.join(variants)} over seeds {', '.join(map(str, seeds))} (scores in %)\n\n"
        f"Settings: {json.dumps(shown, default=str)}. Δ is the mean paired (same seed) difference to "
        f"{baseline}, with a 95% t confidence interval.\n\nReference: always predicting the majority "
        f"training class scores {constant['clean']:.2f} on clean dev and {constant['advglue']:.2f} on "
        "AdvGLUE; a variant near these has learned nothing, whatever its AdvGLUE difference."
    )
    if len(seeds) < 5:
        header += f"\n\n**Only {len(seeds)} seed(s): too few for conclusions; use at least 5.**"
    write_json_atomic(output_dir / "comparison.json", result)
    markdown = format_markdown(summary, baseline, header)
    with atomic_open(output_dir / "comparison.md") as f:
        f.write(markdown)
    plot_scores(summary, output_dir / "comparison.png", f"{task}: mean ± std over {len(seeds)} seed(s)",
                constant)
    result["markdown"] = markdown
    return result


__all__ = ["RESULTS_FILE", "SUMMARY_FILE", "TABLES_FILE", "Experiment", "RunsFailed", "compare", "ensure_run"]
