"""Executors: where and how many runs train at a time.

- ``LocalExecutor`` (the default): each run in its own child process, up to ``workers`` at a time, each
  with ``threads`` CPU threads; several workers pay off on a GPU, where one small model's run is bound by
  kernel launches, not arithmetic (they share it). A run's output goes to ``RUN_DIR/log.txt``.
- ``RayExecutor``: each run a Ray task with its CPU/GPU request (``ray.remote(num_cpus=..., num_gpus=...)``)
  on a Ray cluster (``address``) or a Ray instance started here; needs the ``ray`` extra, and an output
  folder that every node sees at the same path.
- ``InlineExecutor``: in this process, one run at a time; an error propagates as it is (for debugging, and
  for tests).

Every executor takes runs with ``submit`` and hands back ``Outcome``s from ``wait``; ``stop`` ends the runs
in flight (their checkpoints let a later call resume them).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..io import die_with_parent, end_process_groups
from .plans import Run

LOG_FILE = "log.txt"
EXECUTORS = ("local", "ray", "inline")


@dataclass
class Outcome:
    """A run that ended: its metrics (``None`` if it failed, with ``error`` saying why) and wall time."""

    run: Run
    seconds: float
    metrics: dict[str, Any] | None = None
    error: str | None = None


def train_and_evaluate(settings: dict[str, Any], dev_samples: int | None) -> dict[str, Any]:
    """Train (or resume) and evaluate one run in this process; its metrics (what every executor runs)."""
    from ..evaluate import evaluate
    from ..train import CONFIG_FILE, TrainConfig, train

    settings = {**settings, "resume": (Path(settings["output_dir"]) / CONFIG_FILE).is_file()}
    return evaluate(train(TrainConfig(**settings)), dev_samples=dev_samples)


class Executor:
    """Runs submitted runs; ``capacity`` of them at a time."""

    name = "executor"

    def __init__(self, workers: int | None = None) -> None:
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        self.workers = workers

    @property
    def capacity(self) -> int:
        return self.workers or 1

    @property
    def in_flight(self) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.capacity} at a time"

    def submit(self, run: Run, dev_samples: int | None) -> None:
        raise NotImplementedError

    def wait(self, timeout: float) -> list[Outcome]:
        """The runs that ended, waiting up to ``timeout`` seconds for one."""
        raise NotImplementedError

    def stop(self) -> int:
        """End the runs in flight; how many there were."""
        return 0

    def close(self) -> None:
        """Release what the executor holds (``stop`` first)."""


class InlineExecutor(Executor):
    """In this process, one run at a time; an error in a run propagates."""

    name = "inline"

    def __init__(self) -> None:
        super().__init__(1)
        self._queue: list[tuple[Run, int | None]] = []

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def describe(self) -> str:
        return "one at a time in this process"

    def submit(self, run: Run, dev_samples: int | None) -> None:
        self._queue.append((run, dev_samples))

    def wait(self, timeout: float) -> list[Outcome]:
        outcomes = []
        while self._queue:
            run, dev_samples = self._queue.pop(0)
            start = time.perf_counter()
            metrics = train_and_evaluate(dict(run.settings), dev_samples)
            outcomes.append(Outcome(run, time.perf_counter() - start, metrics))
        return outcomes

    def stop(self) -> int:
        stopped = len(self._queue)
        self._queue.clear()
        return stopped


class LocalExecutor(Executor):
    """Each run in a child process (``python -m ode_bert.experiments.worker``), ``workers`` at a time, with
    ``threads`` CPU threads each (default: the cores shared out); output to ``RUN_DIR/log.txt``."""

    name = "local"

    def __init__(self, workers: int | None = None, threads: int | None = None) -> None:
        super().__init__(workers)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.capacity)
        self._running: dict[Run, tuple[subprocess.Popen[bytes], float]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def describe(self) -> str:
        return f"{self.capacity} at a time, {self.threads} thread(s) each"

    def submit(self, run: Run, dev_samples: int | None) -> None:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"settings": dict(run.settings), "dev_samples": dev_samples})
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        with open(run.run_dir / LOG_FILE, "ab") as log:
            process = subprocess.Popen([sys.executable, "-m", "ode_bert.experiments.worker", payload],
                                       stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                       preexec_fn=die_with_parent)
        self._running[run] = (process, time.perf_counter())

    def wait(self, timeout: float) -> list[Outcome]:
        end = time.perf_counter() + timeout
        while True:
            outcomes = []
            for run, (process, started) in list(self._running.items()):
                if process.poll() is None:
                    continue
                del self._running[run]
                seconds = time.perf_counter() - started
                if process.returncode == 0 and (run.run_dir / "metrics.json").is_file():
                    metrics = json.loads((run.run_dir / "metrics.json").read_text())
                    outcomes.append(Outcome(run, seconds, metrics))
                else:
                    log = (run.run_dir / LOG_FILE).read_text(errors="replace")[-2000:]
                    error = f"exit {process.returncode}; log tail:\n{log}"
                    outcomes.append(Outcome(run, seconds, None, error))
            if outcomes or not self._running or time.perf_counter() >= end:
                return outcomes
            time.sleep(min(0.5, max(0.0, end - time.perf_counter())))

    def stop(self) -> int:
        end_process_groups(process for process, _ in self._running.values())
        stopped = len(self._running)
        self._running.clear()
        return stopped


def _ray_run(settings: dict[str, Any], dev_samples: int | None, cwd: str, threads: int) -> dict[str, Any]:
    """A Ray task: one run, its output appended to ``RUN_DIR/log.txt``; its metrics."""
    import torch

    if Path(cwd).is_dir():  # relative paths (model, data) mean what they meant where the plan was made
        os.chdir(cwd)
    torch.set_num_threads(threads)
    run_dir = Path(settings["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):  # fmt: skip
        return train_and_evaluate(settings, dev_samples)


class RayExecutor(Executor):
    """Each run a Ray task requesting ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (a fraction shares a
    GPU), on the cluster at ``address`` (``"auto"``: the one this machine belongs to) or, without one, a Ray
    instance started here (``init_options`` go to ``ray.init``). If Ray is already initialised in this
    process, that connection is used. ``workers`` caps the runs in flight (default: all; Ray queues them
    until the cluster has the resources)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, cpus_per_run: int = 1,
                 gpus_per_run: float = 0.0, init_options: dict[str, Any] | None = None) -> None:
        super().__init__(workers)
        try:
            import ray
        except ImportError as err:
            raise ValueError("the Ray executor needs ray: pip install 'ode-bert[ray]'") from err
        if cpus_per_run < 1 or gpus_per_run < 0:
            raise ValueError(f"a run needs >= 1 CPU and >= 0 GPUs, got {cpus_per_run} and {gpus_per_run}")
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            options = dict(init_options or {})
            if address is None:
                options.setdefault("include_dashboard", False)
            ray.init(address=address, **options)
        self.cpus_per_run, self.gpus_per_run = cpus_per_run, gpus_per_run
        self._task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run)(_ray_run)
        self._refs: dict[Any, tuple[Run, float]] = {}

    @property
    def capacity(self) -> int:
        return self.workers or sys.maxsize

    @property
    def in_flight(self) -> int:
        return len(self._refs)

    def describe(self) -> str:
        cap = "all submitted" if self.workers is None else f"up to {self.workers} in flight"
        return f"Ray tasks of {self.cpus_per_run} CPU(s) and {self.gpus_per_run} GPU(s) each, {cap}"

    def submit(self, run: Run, dev_samples: int | None) -> None:
        settings = {**run.settings, "output_dir": str(Path(run.settings["output_dir"]).absolute())}
        ref = self._task.remote(settings, dev_samples, os.getcwd(), self.cpus_per_run)
        self._refs[ref] = (run, time.perf_counter())

    def wait(self, timeout: float) -> list[Outcome]:
        if not self._refs:
            return []
        ray = self._ray
        ready, rest = ray.wait(list(self._refs), num_returns=1, timeout=timeout)
        if ready and rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        outcomes = []
        for ref in ready:
            run, started = self._refs.pop(ref)
            seconds = time.perf_counter() - started
            try:
                outcomes.append(Outcome(run, seconds, ray.get(ref)))
            except Exception as err:  # the task's error (with its traceback), a lost worker or node
                outcomes.append(Outcome(run, seconds, None, f"{type(err).__name__}: {str(err)[-2000:]}"))
        return outcomes

    def stop(self) -> int:
        for ref in self._refs:
            with contextlib.suppress(Exception):
                self._ray.cancel(ref, force=True)
        stopped = len(self._refs)
        self._refs.clear()
        return stopped

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()


def make_executor(name: str = "local", workers: int | None = None, threads: int | None = None,
                  address: str | None = None, gpus_per_run: float = 0.0) -> Executor:
    """An executor by name (``EXECUTORS``): ``threads`` are each local run's CPU threads or each Ray task's
    CPUs; ``address`` and ``gpus_per_run`` are Ray's."""
    if name == "local":
        return LocalExecutor(workers, threads)
    if name == "inline":
        if workers not in (None, 1):
            raise ValueError("the inline executor runs one run at a time; use --executor local for workers")
        return InlineExecutor()
    if name == "ray":
        return RayExecutor(address, workers, threads or 1, gpus_per_run)
    raise ValueError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
