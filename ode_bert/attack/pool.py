"""Several attacks at a time: each (run folder, attack) in a child process of its own.

``attack_runs(jobs, workers)`` runs ``attack_run`` for every ``(run_dir, AttackConfig)`` of ``jobs``, up to
``workers`` at a time (``python -m ode_bert.attack.pool PAYLOAD``), each child with ``threads`` CPU threads
(default: the cores shared out) and its output (progress bar, warnings) in the log beside the attack's
folder, ``RUN_DIR/attacks/<split>-<recipe>.log``. Jobs start in the order given, and each writes only into
its own attack folder (locked, ``io.exclusive``), so the records are those of the same attacks run one by
one; an interrupted call resumes like a single attack (run it again). One job failing stops no other: the
failures are raised together at the end, with their logs' tails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..io import die_with_parent, end_process_groups


class AttacksFailed(ValueError):
    """Some attacks of ``attack_runs`` failed (the others finished); a ``ValueError`` as ``RunsFailed``,
    so that the command line reports it as an error, not a crash."""


def _folder(run_dir: str | Path, config: Any) -> Path:
    """The folder attack ``config`` on ``run_dir`` writes (``runner.attack_dir``)."""
    from ..train import read_train_config
    from .runner import attack_dir

    return attack_dir(run_dir, read_train_config(run_dir)["task"], config)


def log_path(run_dir: str | Path, config: Any) -> Path:
    """Where a child writes the output of attack ``config`` on ``run_dir``: beside its attack folder."""
    folder = _folder(run_dir, config)
    return folder.with_name(folder.name + ".log")


def attack_runs(
    jobs: Sequence[tuple[str | Path, Any]],
    workers: int,
    threads: int | None = None,
    data_dir: str | None = None,
    on_done: Callable[[Path, Any, dict[str, Any]], None] | None = None,
    poll_seconds: float = 0.5,
) -> list[dict[str, Any]]:
    """Run each ``(run_dir, AttackConfig)`` of ``jobs`` in a child process, ``workers`` at a time; return the
    summaries in the order of ``jobs``. ``on_done(run_dir, config, summary)`` is called as each finishes."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    waiting = list(enumerate(jobs))
    running: dict[int, subprocess.Popen[bytes]] = {}
    summaries: dict[int, dict[str, Any]] = {}
    failures: list[str] = []
    with _stopped_on_exit(running):
        while waiting or running:
            while waiting and len(running) < workers:
                index, (run_dir, config) = waiting.pop(0)
                payload = json.dumps({"run_dir": str(run_dir), "config": dataclasses.asdict(config),
                                      "data_dir": data_dir})  # fmt: skip
                log = log_path(run_dir, config)
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "ab") as out:
                    running[index] = subprocess.Popen(
                        [sys.executable, "-m", "ode_bert.attack.pool", payload], stdout=out,
                        stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=die_with_parent,
                    )  # fmt: skip
            for index, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[index]
                run_dir, config = jobs[index]
                summary = _summary(run_dir, config) if process.returncode == 0 else None
                if summary is None:
                    tail = log_path(run_dir, config).read_text(errors="replace")[-1500:]
                    failures.append(f"{config.recipe} on {run_dir}: exit {process.returncode}; log tail:\n"
                                    f"{tail}")
                    continue
                summaries[index] = summary
                if on_done is not None:
                    on_done(Path(run_dir), config, summary)
            if running:
                time.sleep(poll_seconds)
    if failures:
        raise AttacksFailed(f"{len(failures)} of {len(jobs)} attack(s) failed:\n" + "\n".join(failures))
    return [summaries[i] for i in range(len(jobs))]


def _summary(run_dir: str | Path, config: Any) -> dict[str, Any] | None:
    """The summary a finished child wrote (``None`` if it wrote none)."""
    from .files import SUMMARY_FILE

    path = _folder(run_dir, config) / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@contextlib.contextmanager
def _stopped_on_exit(running: dict[int, subprocess.Popen[bytes]]) -> Iterator[None]:
    """On an exception or Ctrl-C, end the children in flight (their attacks resume on the next call)."""
    try:
        yield
    except BaseException:
        end_process_groups(running.values())
        raise


def main(argv: list[str] | None = None) -> None:
    """One job in a child process: ``PAYLOAD`` is JSON ``{"run_dir", "config": AttackConfig fields,
    "data_dir"}``."""
    from .runner import AttackConfig, attack_run

    (payload,) = sys.argv[1:] if argv is None else argv
    job = json.loads(payload)
    attack_run(job["run_dir"], AttackConfig(**job["config"]), job["data_dir"])


if __name__ == "__main__":
    main()
