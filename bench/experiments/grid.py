"""Run a plan of fine-tuning comparisons in parallel worker processes and summarize them group by group.

A group is one task and training size with named variants (BERT, EX-BERT, IM-BERT, IM-BERT with the
paper's gradient-descent solver, ...), each run for every seed; the variants of a seed train on the same
examples from the same classifier initialisation, so differences to BERT are paired by seed. Each run lives
in ``OUT/<group>/<variant>-seed<seed>``: runs with a ``metrics.json`` are skipped (and recorded, with no wall
time, if ``results.jsonl`` lacks them, e.g. runs linked in from another folder), interrupted ones resumed;
both only if their saved settings (``train_config.json``, ``metrics.json``'s ``dev_samples``) are the ones
the plan asks for: every run is checked before any starts, and a mismatch is refused with the differing keys.
After every finished run ``results.jsonl`` gets a line and ``summary.json`` and ``tables.md`` are rewritten
atomically, so stopping (``--deadline``, Ctrl-C, a kill) loses only the runs in flight.

Several workers pay off on a GPU, where one small model's run is bound by kernel launches, not arithmetic;
on a CPU use ``--workers 1``. The core table of RESULTS.md::

    python bench/experiments/grid.py --plan core --out runs/grid --workers 14
    python bench/experiments/grid.py --report runs/grid/results.jsonl --pairs im:ex --plot runs/grid/diff.png
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ode_bert.compare import METRICS, NOT_TAKEN, check_reuse, paired_difference, reuse_problem, summarize
from ode_bert.train import CONFIG_FILE, RunDirError, TrainConfig, atomic_open, write_json_atomic

BASELINE = "bert"
# Fine-tuning settings of every run: the ones the IM-connection was chosen with (RESULTS.md).
COMMON: dict[str, Any] = {"epochs": 2, "batch_size": 32, "lr": 2e-4}
MAX_LENGTH = {"sst2": 64}  # sentence-pair tasks: DEFAULT_MAX_LENGTH
DEFAULT_MAX_LENGTH = 128
# Variant name -> TrainConfig settings; unset solver settings take the im_bert / ex_bert defaults.
VARIANTS: dict[str, dict[str, Any]] = {
    "bert": {"variant": "bert"},
    "ex": {"variant": "ex"},
    "im": {"variant": "im"},
    # the paper's solver, gradient descent on the residual: as the library runs it (step size from 0.5,
    # halved where a step does not decrease the residual) and with the paper's fixed step; a fixed 0.5
    # diverges on MiniLM's layers, 0.1 converges (bench/experiments/gd_residuals.py)
    "im-gd": {"variant": "im", "root": "gd"},
    "im-gd-fixed": {"variant": "im", "root": "gd", "solver_options": {"root_options": {"backtrack": False}}},
    "im-gd-lr0.1": {"variant": "im", "root": "gd",
                    "solver_options": {"root_options": {"lr": 0.1, "backtrack": False}}},
    "ex-layer": {"variant": "ex", "field": "layer", "step": 1.0},  # the paper's framing, h + Layer(h)
    "im-layer": {"variant": "im", "field": "layer", "step": 1.0},
    # the settings im_select.py chose on held-out data (MiniLM's upper half of layers, max_iter 10), and
    # their explicit control on the same layers
    "im-upper": {"variant": "im", "layers": "3-5", "max_iter": 10},
    "ex-upper": {"variant": "ex", "layers": "3-5"},
}


@dataclass(frozen=True)
class Group:
    """Variants compared on one task and training size."""

    task: str
    train_samples: int
    variants: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.task}-n{self.train_samples}"


# A plan's groups run in order; a group may add variants to one of an earlier plan (same name, same runs).
# Every group with "im" has "ex", its explicit control at the same step.
PLANS: dict[str, list[Group]] = {
    "core": [Group("sst2", 1000, ("im", "bert", "ex")), Group("rte", 1000, ("im", "bert", "ex"))],
    "extensions": [
        Group("sst2", 1000, ("im-gd", "im-gd-lr0.1", "im-gd-fixed")),
        Group("qnli", 1000, ("im", "bert", "ex")),
        Group("mnli", 1000, ("im", "bert", "ex")),
        Group("qqp", 1000, ("im", "bert", "ex")),
        Group("sst2", 2000, ("im", "bert", "ex")),
        Group("sst2", 500, ("im", "bert", "ex")),
        Group("sst2", 1000, ("im-layer", "ex-layer")),
        Group("sst2", 1000, ("im-upper", "ex-upper")),
    ],
}


@dataclass(frozen=True)
class Job:
    group: Group
    variant: str
    seed: int

    def run_dir(self, out: Path) -> Path:
        return out / self.group.name / f"{self.variant}-seed{self.seed}"

    def config(self, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """TrainConfig fields of this run: ``options`` minus solver settings the variant does not take."""
        settings = VARIANTS[self.variant]
        options = {k: v for k, v in options.items() if k not in NOT_TAKEN.get(settings["variant"], ())}
        max_length = MAX_LENGTH.get(self.group.task, DEFAULT_MAX_LENGTH)
        return {**COMMON, "max_length": max_length, **options, **settings,
                "task": self.group.task, "train_samples": self.group.train_samples, "seed": self.seed,
                "output_dir": str(self.run_dir(out))}

    def train_config(self, out: Path, options: dict[str, Any]) -> TrainConfig:
        """This run's ``TrainConfig``, checked (resumed if its folder has settings already)."""
        try:
            config = TrainConfig(**self.config(out, options),
                                 resume=(self.run_dir(out) / CONFIG_FILE).is_file())
        except TypeError as err:
            raise ValueError(f"unknown training setting in --set or the plan: {err}") from err
        config.validate()
        return config


def plan_jobs(plans: list[str], seeds: list[int], groups: list[str] | None = None,
              variants: list[str] | None = None) -> list[Job]:
    """Every (group, variant, seed) run of the plans, group by group, all variants of a seed together, so
    that runs stopped early still leave complete seeds to pair; ``groups`` / ``variants`` keep only
    those names (and the baseline, which the others are paired with)."""
    keep = None if variants is None else {*variants, BASELINE}
    return [Job(g, v, s) for p in plans for g in PLANS[p] if groups is None or g.name in groups
            for s in seeds for v in g.variants if keep is None or v in keep]


def run_worker(config: dict[str, Any], dev_samples: int | None) -> None:
    """Train and evaluate one run in this process (what each worker process does)."""
    from ode_bert.evaluate import evaluate
    from ode_bert.train import TrainConfig, train

    config["resume"] = (Path(config["output_dir"]) / CONFIG_FILE).is_file()
    evaluate(train(TrainConfig(**config)), dev_samples=dev_samples)


def _result_line(job: Job, metrics: dict[str, Any], seconds: float | None) -> dict[str, Any]:
    """The record of one finished run: scores per split, solver statistics, wall time."""
    line: dict[str, Any] = {"group": job.group.name, "task": job.group.task, "variant": job.variant,
                            "settings": VARIANTS[job.variant], "seed": job.seed,
                            "train_samples": job.group.train_samples, "seconds": seconds}
    for metric in METRICS:
        m = metrics[metric]
        line[metric] = {"overall": m["overall"], "tasks": m["tasks"], "solver": m["solver"],
                        "splits": m["splits"], "constant": m["constant_baseline"]["overall"]}
    return line


def by_group(results: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """Run records as group -> variant -> seed -> record."""
    groups: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in results:
        groups.setdefault(r["group"], {}).setdefault(r["variant"], {})[r["seed"]] = r
    return groups


def summarize_groups(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per group: mean, std and paired difference to BERT over the seeds each variant shares with BERT."""
    summary: dict[str, Any] = {}
    for name, by_variant in by_group(results).items():
        baseline_seeds = set(by_variant.get(BASELINE, {}))
        scores = {
            v: {s: {m: r[m]["overall"] for m in METRICS} for s, r in runs.items() if s in baseline_seeds}
            for v, runs in by_variant.items()
        }
        scores = {v: s for v, s in scores.items() if s}
        if BASELINE not in scores:
            continue
        stats = summarize(scores, BASELINE)
        for v, runs in by_variant.items():
            if v not in stats:
                continue
            kept = [runs[s] for s in sorted(scores[v])]
            seconds = [r["seconds"] for r in kept if r["seconds"] is not None]
            stats[v]["seeds"] = sorted(scores[v])
            stats[v]["mean_seconds"] = sum(seconds) / len(seconds) if seconds else None
            # explicit connections have no solve to report (no residual)
            solver = [r["advglue"]["solver"] for r in kept
                      if r["advglue"]["solver"] and r["advglue"]["solver"]["max_rel_residual"] is not None]
            if solver:
                stats[v]["advglue_solver"] = {
                    "converged_fraction": sum(s["converged_fraction"] for s in solver) / len(solver),
                    "mean_iterations": sum(s["mean_iterations"] for s in solver) / len(solver),
                    "max_rel_residual": max(s["max_rel_residual"] or 0.0 for s in solver),
                }
        first = next(iter(by_variant[BASELINE].values()))
        summary[name] = {"variants": stats, "constant": {m: 100 * first[m]["constant"] for m in METRICS}}
    return summary


def _interval(d: dict[str, Any]) -> str:
    """A paired difference as ``mean [low, high]`` (no interval with one seed)."""
    if d["ci_low"] is None:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]"


def load_records(paths: list[Path]) -> list[dict[str, Any]]:
    """The run records of ``results.jsonl`` files, one per (group, variant, seed): a record with a wall
    time wins over one without (a run linked into a second folder is recorded there without one)."""
    records: dict[tuple[str, str, int], dict[str, Any]] = {}
    for path in paths:
        for line in filter(None, path.read_text().splitlines()):
            record = json.loads(line)
            key = (record["group"], record["variant"], record["seed"])
            if key not in records or record["seconds"] is not None:
                records[key] = record
    return list(records.values())


def format_pairs(results: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> str:
    """Markdown table of paired differences ``a - b`` between variants, per group, over their shared seeds."""
    out = ["| group | pair | seeds | Δ clean [95% CI] | Δ AdvGLUE [95% CI] |", "|---|---|---|---|---|"]
    for name, runs in by_group(results).items():
        for a, b in pairs:
            seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
            if not seeds:
                continue
            cells = [_interval(paired_difference([100 * runs[a][s][m]["overall"] for s in seeds],
                                                 [100 * runs[b][s][m]["overall"] for s in seeds]))
                     for m in METRICS]
            out.append(f"| {name} | {a} − {b} | {len(seeds)} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def format_tables(summary: dict[str, Any]) -> str:
    """One markdown table per group (scores in %, Δ = paired difference to BERT with its 95% t CI)."""

    def diff(entry: dict[str, Any]) -> str:
        d = entry.get("diff")
        return "baseline" if d is None else _interval(d)

    def spread(entry: dict[str, Any]) -> str:
        std = "" if entry["std"] is None else f" ± {entry['std']:.2f}"
        return f"{entry['mean']:.2f}{std}"

    out = []
    for name, group in summary.items():
        const = group["constant"]
        out += [f"### {name}", "",
                f"Constant prediction (majority training class): clean {const['clean']:.2f}, "
                f"AdvGLUE {const['advglue']:.2f}.", "",
                "| variant | seeds | clean mean ± std | Δ clean [95% CI] | AdvGLUE mean ± std "
                "| Δ AdvGLUE [95% CI] | AdvGLUE solves converged | max rel. residual | s per run |",
                "|---|---|---|---|---|---|---|---|---|"]
        for variant, v in group["variants"].items():
            solver = v.get("advglue_solver")
            conv = f"{100 * solver['converged_fraction']:.0f}%" if solver else "-"
            resid = f"{solver['max_rel_residual']:.1e}" if solver else "-"
            secs = f"{v['mean_seconds']:.0f}" if v["mean_seconds"] is not None else "-"
            out.append(f"| {variant} | {len(v['seeds'])} | {spread(v['clean'])} | {diff(v['clean'])} | "
                       f"{spread(v['advglue'])} | {diff(v['advglue'])} | {conv} | {resid} | {secs} |")
        out.append("")
    return "\n".join(out)


def format_seeds(results: list[dict[str, Any]]) -> str:
    """Per group, a markdown table of each run's clean / AdvGLUE score (%) by seed, variants in plan order:
    the runs behind the means, to spot a collapsed seed."""
    order = list(VARIANTS)
    out = []
    for name, runs in by_group(results).items():
        variants = sorted(runs, key=order.index)
        seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
        out += [f"Per seed, {name}, clean / AdvGLUE:", "", f"| seed | {' | '.join(variants)} |",
                "|---" * (len(variants) + 1) + "|"]
        for seed in seeds:
            cells = [" / ".join(f"{100 * runs[v][seed][m]['overall']:.2f}" for m in METRICS)
                     if seed in runs[v] else "-" for v in variants]
            out.append(f"| {seed} | {' | '.join(cells)} |")
        out.append("")
    return "\n".join(out)


def plot_differences(summary: dict[str, Any], path: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """Forest plot of every variant's paired difference to BERT (mean and 95% CI), clean and AdvGLUE side by
    side, one row per (group, variant), written atomically as PNG. Returns the rows drawn, top to bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(group, variant, stats) for group, entry in summary.items()
            for variant, stats in entry["variants"].items() if variant != BASELINE]
    if not rows:
        raise ValueError("no variant besides the baseline to plot")
    fig, axes = plt.subplots(1, len(METRICS), sharey=True, figsize=(10, 1.2 + 0.32 * len(rows)))
    ys = list(range(len(rows)))[::-1]
    for ax, metric in zip(axes, METRICS):
        for y, (_, _, stats) in zip(ys, rows):
            d = stats[metric]["diff"]
            if d["ci_low"] is None:  # one seed: no interval, drawn grey
                ax.plot(d["mean"], y, "o", color="tab:gray")
                continue
            excludes_zero = d["ci_low"] > 0 or d["ci_high"] < 0
            ax.errorbar(d["mean"], y, xerr=[[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]], fmt="o",
                        capsize=3, color="tab:red" if excludes_zero else "tab:blue")
        ax.axvline(0, color="gray", linewidth=1)
        ax.set_xlabel(f"Δ {METRICS[metric]} vs BERT (points, 95% CI)")
        ax.grid(axis="x", alpha=0.3)
    labels = [f"{group} {variant} (n={len(stats['seeds'])})" for group, variant, stats in rows]
    axes[0].set_yticks(ys, labels)
    fig.suptitle("Paired difference to BERT by seed; red: interval excludes zero, grey: one seed")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return rows


class Scheduler:
    """Runs jobs in up to ``workers`` child processes and records each finished run."""

    def __init__(self, out: Path, jobs: list[Job], workers: int, options: dict[str, Any],
                 dev_samples: int | None, threads: int) -> None:
        self.out, self.workers, self.options, self.dev_samples = out, workers, options, dev_samples
        self.threads = threads
        # before anything runs: every setting valid, and no run to reuse or resume made with other settings
        check_reuse([(job.run_dir(out), job.train_config(out, options)) for job in jobs], dev_samples)
        self.results: list[dict[str, Any]] = []
        self.pending: deque[Job] = deque(job for job in jobs if not self._take_finished(job))
        self.total = len(jobs)
        self.running: dict[Job, tuple[subprocess.Popen[bytes], float]] = {}

    def _start(self, job: Job) -> None:
        run_dir = job.run_dir(self.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"config": job.config(self.out, self.options), "dev_samples": self.dev_samples})
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads)}
        with open(run_dir / "log.txt", "ab") as log:
            process = subprocess.Popen([sys.executable, __file__, "--worker", payload], stdout=log,
                                       stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running[job] = (process, time.perf_counter())

    def _finish(self, job: Job, returncode: int, started: float) -> None:
        seconds = time.perf_counter() - started
        metrics_path = job.run_dir(self.out) / "metrics.json"
        label = f"{job.group.name} {job.variant} seed {job.seed}"
        if returncode != 0 or not metrics_path.is_file():
            log = (job.run_dir(self.out) / "log.txt").read_text(errors="replace")[-2000:]
            print(f"FAILED {label} (exit {returncode}) after {seconds:.0f} s; log tail:\n{log}", flush=True)
            return
        line = _result_line(job, json.loads(metrics_path.read_text()), seconds)
        self.results.append(line)
        self._record(line)
        self.write_summary()
        clean, adv = (100 * line[m]["overall"] for m in METRICS)
        done = f"[{len(self.results)}/{self.total}]"
        print(f"{done} {label}: {seconds:.0f} s, clean {clean:.2f}, AdvGLUE {adv:.2f}", flush=True)

    def _take_finished(self, job: Job) -> bool:
        """Whether ``job`` has finished already (its ``metrics.json`` exists: run earlier, linked in, or
        finished meanwhile by another grid on the same folder); if so it joins the results, and is recorded
        without a wall time unless ``results.jsonl`` has it."""
        metrics_path = job.run_dir(self.out) / "metrics.json"
        if not metrics_path.is_file():
            return False
        run_dir = job.run_dir(self.out)
        problem = reuse_problem(run_dir, job.train_config(self.out, self.options), self.dev_samples)
        if problem is not None:
            raise RunDirError(f"{run_dir} is not reused: {problem}")
        line = _result_line(job, json.loads(metrics_path.read_text()), None)
        self.results.append(line)
        if (job.group.name, job.variant, job.seed) not in self._recorded():
            self._record(line)
        return True

    def _recorded(self) -> set[tuple[str, str, int]]:
        """(group, variant, seed) of the runs ``results.jsonl`` already has a line for."""
        path = self.out / "results.jsonl"
        records = load_records([path]) if path.is_file() else []
        return {(r["group"], r["variant"], r["seed"]) for r in records}

    def _record(self, line: dict[str, Any]) -> None:
        """Append a finished run's line to ``results.jsonl`` (its wall time is null if not run here)."""
        with open(self.out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def write_summary(self) -> None:
        summary = summarize_groups(self.results)
        write_json_atomic(self.out / "summary.json", summary)
        with atomic_open(self.out / "tables.md") as f:
            f.write(format_tables(summary) + "\n" + format_seeds(self.results))

    def stop(self) -> None:
        """Kill the runs in flight (their checkpoints let a later call resume them)."""
        for process, _ in self.running.values():
            os.killpg(process.pid, signal.SIGTERM)
        for process, _ in self.running.values():
            process.wait()
        if self.running:
            print(f"stopped {len(self.running)} run(s) in flight; rerun to resume them", flush=True)
        self.running.clear()

    def run(self, deadline: float | None) -> None:
        """Work through the jobs until all are done or ``deadline`` (perf_counter seconds) passes."""
        try:
            while self.pending or self.running:
                if deadline is not None and time.perf_counter() > deadline:
                    print("deadline reached", flush=True)
                    break
                while self.pending and len(self.running) < self.workers:
                    job = self.pending.popleft()
                    if not self._take_finished(job):
                        self._start(job)
                time.sleep(0.5)
                for job, (process, started) in list(self.running.items()):
                    if process.poll() is not None:
                        del self.running[job]
                        self._finish(job, process.returncode, started)
        finally:
            self.stop()
            self.write_summary()


def format_report(records: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> str:
    """What ``--report`` prints: group tables, the paired differences ``pairs`` (if any), runs by seed."""
    parts = [format_tables(summarize_groups(records))]
    if pairs:
        parts.append(format_pairs(records, pairs) + "\n")
    parts.append(format_seeds(records))
    return "\n".join(parts)


def _variant_pair(text: str) -> tuple[str, str]:
    """``--pairs`` argument ``A:B`` as (A, B), both known variants."""
    a, _, b = text.partition(":")
    if not {a, b} <= set(VARIANTS):
        raise argparse.ArgumentTypeError(f"takes A:B with A, B among {', '.join(VARIANTS)}; got {text!r}")
    return a, b


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (also parses the report commands quoted in RESULTS.md, in tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--plan", nargs="+", choices=list(PLANS), default=["core"], help="plans, in order")
    parser.add_argument("--out", default="runs/grid", help="output directory (default runs/grid)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="seeds (default 1-5)")
    parser.add_argument("--groups", nargs="+", metavar="GROUP", help="only these groups, e.g. sst2-n1000")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="only these variants (and the baseline, bert)")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (default 1)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (default: cores / workers)")
    parser.add_argument("--deadline", type=float, help="stop after this many seconds, killing runs in flight")
    parser.add_argument("--model", help="model path or hub name (default: the offline MiniLM)")
    parser.add_argument("--data-dir", help="data directory (default: ODE_BERT_DATA_DIR or ../shared/data)")
    parser.add_argument("--dev-samples", type=int, help="score a stratified subset of each clean dev split")
    parser.add_argument("--set", default="{}", metavar="JSON",
                        help='further TrainConfig settings for every run, e.g. \'{"epochs": 3}\'')
    parser.add_argument("--report", nargs="+", type=Path, metavar="JSONL",
                        help="run nothing: print the tables of these results.jsonl records")
    parser.add_argument("--pairs", nargs="+", type=_variant_pair, default=[], metavar="A:B",
                        help="with --report: also paired differences A - B between variants, e.g. im:ex")
    parser.add_argument("--plot", type=Path, metavar="PNG",
                        help="with --report: also draw every variant's difference to BERT into this PNG")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report:
        records = load_records(args.report)
        print(format_report(records, args.pairs))
        if args.plot:
            plot_differences(summarize_groups(records), args.plot)
            print(f"wrote {args.plot}")
        return
    if args.worker:
        payload = json.loads(args.worker)
        run_worker(payload["config"], payload["dev_samples"])
        return
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    options = {k: v for k, v in (("model", args.model), ("data_dir", args.data_dir)) if v is not None}
    options.update(json.loads(args.set))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    known = {g.name for p in args.plan for g in PLANS[p]}
    if args.groups and not set(args.groups) <= known:
        parser.error(f"unknown group(s) {sorted(set(args.groups) - known)}; the plans have {sorted(known)}")
    offered = {v for p in args.plan for g in PLANS[p] if not args.groups or g.name in args.groups
               for v in g.variants}
    if args.variants and not set(args.variants) <= offered:
        parser.error(f"variant(s) {sorted(set(args.variants) - offered)} are in none of the selected groups, "
                     f"which have {sorted(offered)}")
    jobs = plan_jobs(args.plan, args.seeds, args.groups, args.variants)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    try:
        scheduler = Scheduler(out, jobs, args.workers, options, args.dev_samples, threads)
    except ValueError as err:  # a bad setting, or runs in --out made with other settings (RunDirError)
        sys.exit(f"grid: error: {err}")
    print(f"{len(jobs)} runs, {len(scheduler.pending)} to do, {args.workers} at a time", flush=True)
    deadline = None if args.deadline is None else time.perf_counter() + args.deadline
    scheduler.run(deadline)


if __name__ == "__main__":
    main()
