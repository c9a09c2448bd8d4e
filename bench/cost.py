"""What an implicit layer costs, lever by lever: root-finder overhead against torchdeq, row compaction,
tolerance and gradient mode, on the real layers of a pretrained encoder (default all-MiniLM-L6-v2).

Three parts, each measured side by side in one process:

* ``finders``: for every encoder layer and step ``s`` (``--steps``), ``z = h + s f(z)`` with ``f = Layer(h)
  - h`` (the ``residual`` framing) on batches of real hidden states (SST-2 dev sentences of one token
  length, the states entering each layer in the stock model), started from the explicit Euler predictor.
  Per finder: evaluations of ``g`` (predictor included) until it stops at relative residual ``--tol``
  (capped at ``--cap``), whether every sample of the returned point is within the tolerance (recomputed
  here), and the time per evaluation relative to one evaluation alone (``--iters`` iterations forced, so
  every finder does the same work per round). ode-bert's finders against torchdeq 0.1.0's (the ``bench``
  extra: ``pip install -e .[bench]``; without it the torchdeq rows are left out, said in the output).
* ``compaction``: an ``im_bert`` model in inference on padded batches of consecutive SST-2 dev sentences,
  with and without ``compact_rows``: layer rows evaluated, time, and whether the logits are identical.
* ``training``: training step (and its backward pass alone) and inference of ``im_bert`` variants
  (tolerance, evaluation and adjoint tolerance, gradient mode, row compaction) against the stock classifier
  on one padded batch, with the evaluations per layer solve and the VJPs per adjoint solve, plus a
  modelled fine-tuning run (``--run``: training steps and evaluation batches of the RESULTS.md core table)
  from the measured times.

Times are CPU **process** time (``time.process_time``, one torch thread): on a shared machine a process
that waits for a core is not charged for the wait, so ratios measured in one process stay steady where
wall-clock ratios swing with the load. Rounds interleave the configurations in a fresh random order; ratios
are medians over rounds of per-round ratios.

    python -m bench.cost                       # CPU -> bench/results/cost.json
    python -m bench.cost --parts finders --steps 1 2 --out bench/results/cost-finders.json
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import solvers
from bench._common import describe, machine, median, parse_args, sst2_sentences, table, write_json
from bench.implicit_step import _load, batches, relative_residual
from ode_bert import im_bert, solver_stats
from ode_bert.field import LayerField
from ode_bert.pretrained import load_model, resolve_model_path

try:  # benchmark-only dependency (the ``bench`` extra)
    from torchdeq.solver.anderson import anderson_solver
    from torchdeq.solver.broyden import broyden_solver
except ImportError:  # pragma: no cover - depends on the environment
    anderson_solver = broyden_solver = None

# ode-bert's finders with their defaults, Broyden as it was before (limited memory 20, line search with 4
# halvings), and torchdeq's two with theirs (Anderson with ode-bert's history length 5 and lam 1e-4).
OURS = ("anderson", "broyden", "broyden:m=20,max_backtracks=4", "broyden:max_backtracks=4")
TORCHDEQ = ("torchdeq:anderson", "torchdeq:broyden")
PARTS = ("finders", "compaction", "training")


def cpu_time(fn: Callable[[], Any]) -> float:
    """Process CPU seconds of ``fn()`` (GPU work is not counted: this script measures the CPU)."""
    start = time.process_time()
    fn()
    return time.process_time() - start


class Counted:
    """A fixed-point map that counts its calls (each on the whole batch)."""

    def __init__(self, g: Callable[[Tensor], Tensor]) -> None:
        self.g, self.calls = g, 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.g(z)


Solve = Callable[[Callable[[Tensor], Tensor], Tensor], Tensor]


def make_solve(spec: str, tol: float, max_iter: int) -> Solve:
    """``solve(g, z0) -> z`` for a finder spec (``name`` or ``name:opt=value,...``; ``torchdeq:NAME``)."""
    if spec.startswith("torchdeq:"):
        kind = spec.partition(":")[2]
        if kind == "anderson":  # its first two calls are g(z0) and g(g(z0)), then one per iteration
            return lambda g, z0: anderson_solver(g, z0, max_iter=max_iter + 1, tol=tol, stop_mode="rel", m=5,
                                                 lam=1e-4)[0]
        return lambda g, z0: broyden_solver(g, z0, max_iter=max_iter, tol=tol, stop_mode="rel")[0]
    name, _, opts = spec.partition(":")
    options = {k: int(v) for k, _, v in (item.partition("=") for item in filter(None, opts.split(",")))}
    finder = solvers.get_root_finder(name, tol=tol, max_iter=max_iter, on_failure="ignore", **options)
    return lambda g, z0: finder.solve(g, z0)[0]


def finder_row(spec: str, g: Callable[[Tensor], Tensor], h: Tensor, tol: float, cap: int) -> dict[str, Any]:
    """Evaluations until ``spec`` stops at ``tol`` (predictor included) and the recomputed residual."""
    counted = Counted(g)
    z = make_solve(spec, tol, cap)(counted, counted(h))
    residual = float(relative_residual(z, g(z)).max())
    reached = residual <= 1.05 * tol
    return {"finder": spec, "evals": counted.calls, "residual": residual, "reached": reached,
            "evals_to_tol": counted.calls if reached else math.inf}


def finder_overhead(specs: Sequence[str], g: Callable[[Tensor], Tensor], h: Tensor, iters: int,
                    rounds: int) -> dict[str, float]:
    """Per finder, CPU time per evaluation of a solve forced to ``iters`` iterations, over the time of one
    evaluation alone (median over interleaved rounds of per-round ratios)."""
    jobs: dict[str, Callable[[], int]] = {}
    for spec in specs:
        solve = make_solve(spec, 1e-30, iters)

        def job(solve: Solve = solve) -> int:
            counted = Counted(g)
            solve(counted, counted(h))
            return counted.calls

        jobs[spec] = job
    calls = {spec: job() for spec, job in jobs.items()}  # also warms every path up
    per_eval: dict[str, list[float]] = {spec: [] for spec in [*specs, "eval"]}
    for r in range(rounds):
        order = [*specs, "eval"]
        random.Random(r).shuffle(order)
        for spec in order:
            if spec == "eval":
                per_eval[spec].append(cpu_time(lambda: [g(h) for _ in range(iters)]) / iters)
            else:
                per_eval[spec].append(cpu_time(jobs[spec]) / calls[spec])
    return {spec: median(t / e for t, e in zip(per_eval[spec], per_eval["eval"])) for spec in specs}


def run_finders(args: argparse.Namespace, payload: dict[str, Any]) -> dict[str, Any]:
    """The ``finders`` part; ``payload`` with the results so far is written after every batch."""
    model, tokenizer = _load(args.model, "sdpa")
    specs = list(OURS) + (list(TORCHDEQ) if anderson_solver is not None else [])
    rows: list[dict[str, Any]] = []
    overhead_rows: list[dict[str, Any]] = []
    for b, text in enumerate(batches(tokenizer, args.batches, args.batch_size, "none")):
        inputs = tokenizer(text, padding=True, return_tensors="pt")
        captured = LayerField.capture(model, "residual", **inputs)
        for layer, (fld, h) in enumerate(captured[: args.layers]):
            for s in args.steps:
                def g(z: Tensor, fld: LayerField = fld, h: Tensor = h, s: float = s) -> Tensor:
                    return h + s * fld(0.0, z)

                with torch.no_grad():
                    for spec in specs:
                        rows.append({"batch": b, "layer": layer, "step": s,
                                     **finder_row(spec, g, h, args.tol, args.cap)})
                    if s == args.steps[0]:  # overhead does not depend on the step: measure it once
                        ratios = finder_overhead(specs, g, h, args.iters, args.rounds)
                        overhead_rows += [{"batch": b, "layer": layer, "finder": k, "time_per_eval": v}
                                          for k, v in ratios.items()]
                print(f"batch {b} layer {layer} s={s:g}: " + ", ".join(
                    f"{r['finder']} {r['evals']}{'' if r['reached'] else '*'}" for r in rows[-len(specs):]),
                    flush=True)
        payload["finders"] = summarise_finders(args, specs, rows, overhead_rows)
        payload["finders"]["batches_done"] = b + 1
        write_json(args.out, payload)  # partial results survive an interrupted run
    return payload["finders"]


def summarise_finders(args: argparse.Namespace, specs: Sequence[str], rows: list[dict[str, Any]],
                      overhead_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step and finder: median and worst layer of the per-layer median evaluations (over batches)."""
    summary = []
    for s in args.steps:
        for spec in specs:
            per_layer = []
            for layer in sorted({r["layer"] for r in rows}):
                mine = [r for r in rows if r["step"] == s and r["finder"] == spec and r["layer"] == layer]
                reached = sum(r["reached"] for r in mine)
                per_layer.append(median(r["evals_to_tol"] for r in mine) if 2 * reached > len(mine)
                                 else math.inf)
            summary.append({"step": s, "finder": spec, "evals_median": median(per_layer),
                            "evals_worst": max(per_layer), "evals_by_layer": per_layer,
                            "layers_reached": f"{sum(v != math.inf for v in per_layer)}/{len(per_layer)}",
                            "time_per_eval": median(o["time_per_eval"] for o in overhead_rows
                                                    if o["finder"] == spec)})
    return {"rows": rows, "overhead": overhead_rows, "summary": summary,
            "torchdeq": anderson_solver is not None}


def rows_evaluated(root: solvers.RootInfo, batch: int) -> int:
    """Layer rows a root solve evaluated: ``root.rows``, or every row of every call where that is not
    recorded (``None``, or a RootInfo from before row compaction, when this script runs on an older tree)."""
    rows = getattr(root, "rows", None)
    return root.nfev * batch if rows is None else rows


def padded_batches(tokenizer: Any, count: int, size: int, max_length: int) -> list[dict[str, Tensor]]:
    """``count`` padded batches of ``size`` consecutive SST-2 dev sentences (with labels)."""
    out = []
    for i in range(count):
        text = sst2_sentences(size, offset=i * size)
        enc = tokenizer(text, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        enc["labels"] = torch.zeros(size, dtype=torch.long)
        out.append(dict(enc))
    return out


def run_compaction(args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = load_model(args.model, num_labels=2)
    model.eval()
    rows = []
    for b, batch in enumerate(padded_batches(tokenizer, args.batches, args.eval_batch_size, args.max_length)):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits: dict[bool, Tensor] = {}
        rows_done: dict[bool, tuple[int, int]] = {}
        times: dict[bool, list[float]] = {False: [], True: []}

        def forward(compact: bool, inputs: dict[str, Tensor] = inputs, logits: dict = logits) -> None:
            with torch.no_grad():
                logits[compact] = model(**inputs).logits

        for r in range(args.rounds):
            for compact in random.Random(r).sample([False, True], 2):
                im_bert(model, compact_rows=compact)
                times[compact].append(cpu_time(lambda c=compact: forward(c)))
                stats = solver_stats(model)
                rows_done[compact] = (sum(rows_evaluated(s.root, len(inputs["input_ids"])) for s in stats),
                                      sum(s.root.nfev for s in stats) * len(inputs["input_ids"]))
        rows.append({"batch": b, "rows_share": rows_done[True][0] / rows_done[True][1],
                     "time_ratio": median(t / f for t, f in zip(times[True], times[False])),
                     "max_logit_diff": float((logits[True] - logits[False]).abs().max()),
                     "identical": bool(torch.equal(logits[True], logits[False]))})
        print(f"compaction batch {b}: {rows[-1]}", flush=True)
    return {"rows": rows}


# name -> im_bert changes; "bert" is the stock classifier
TRAINING_CONFIGS: dict[str, dict[str, Any] | None] = {
    "bert": None,
    "im": {},
    "im compact": {"compact_rows": True},
    "im tol=1e-3": {"tol": 1e-3},
    "im tol=1e-2": {"tol": 1e-2},
    "im tol=1e-1": {"tol": 1e-1},
    "im tol=1e-1 compact": {"tol": 1e-1, "compact_rows": True},
    "im eval_tol=3e-2": {"tol": 1e-2, "eval_tol": 3e-2},  # trained at 1e-2, evaluated looser
    "im eval_tol=1e-1": {"tol": 1e-2, "eval_tol": 1e-1},
    "im adjoint_tol=3e-2": {"tol": 1e-2, "adjoint_tol": 3e-2},  # a looser backward solve (implicit gradient)
    "im adjoint_tol=1e-1": {"tol": 1e-2, "adjoint_tol": 1e-1},
    "im one_step": {"grad": "one_step"},
    "im one_step tol=1e-3 compact": {"grad": "one_step", "tol": 1e-3, "compact_rows": True},
    "im one_step tol=1e-2 compact": {"grad": "one_step", "tol": 1e-2, "compact_rows": True},
}


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    stock, tokenizer = load_model(args.model, num_labels=2)
    batch = padded_batches(tokenizer, 1, args.train_batch_size, args.max_length)[0]
    eval_batch = padded_batches(tokenizer, 1, args.eval_batch_size, args.max_length)[0]
    eval_inputs = {k: v for k, v in eval_batch.items() if k != "labels"}
    models: dict[str, nn.Module] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    for name in ["bert", *(n for n in args.configs if n != "bert")]:
        changes = TRAINING_CONFIGS[name]
        model = copy.deepcopy(stock)
        models[name] = model if changes is None else im_bert(model, **changes)
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=2e-5)

    backward_times: dict[str, list[float]] = {n: [] for n in models}

    def train(name: str) -> None:
        model, optimizer = models[name], optimizers[name]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        backward_times[name].append(cpu_time(loss.backward))  # the adjoint solves are in here
        optimizer.step()

    def infer(name: str) -> None:
        models[name].eval()
        with torch.no_grad():
            models[name](**eval_inputs)

    costs: dict[str, dict[str, Any]] = {name: {} for name in models}
    for name in models:  # warm-up; the evaluations per layer of a training forward, an adjoint, an inference
        torch.manual_seed(0)
        adjoints: list[solvers.AdjointSolve] = []
        with solvers.watch_adjoint_solves(adjoints.append):
            train(name)
        stats = solver_stats(models[name])
        costs[name]["train_evals"] = sum(s.nfev for s in stats) / len(stats) if stats else 1.0
        costs[name]["adjoint_evals"] = sum(a.info.nfev for a in adjoints) / len(adjoints) if adjoints else 0.0
        infer(name)
        stats = solver_stats(models[name])
        costs[name]["infer_evals"] = sum(s.nfev for s in stats) / len(stats) if stats else 1.0
        batch_rows = len(eval_inputs["input_ids"])
        costs[name]["infer_rows_share"] = (
            sum(rows_evaluated(s.root, batch_rows) for s in stats)
            / sum(s.root.nfev * batch_rows for s in stats) if stats else 1.0)
    times: dict[str, dict[str, list[float]]] = {kind: {n: [] for n in models} for kind in ("train", "infer")}
    for name in models:
        backward_times[name].clear()  # the warm-up's
    for r in range(args.rounds):
        order = list(models)
        random.Random(r).shuffle(order)
        for name in order:
            torch.manual_seed(1000 + r)
            times["train"][name].append(cpu_time(lambda n=name: train(n)))
            times["infer"][name].append(cpu_time(lambda n=name: infer(n)))
    steps, eval_batches = args.run
    out = []
    for name in models:
        train_x = median(t / s for t, s in zip(times["train"][name], times["train"]["bert"]))
        infer_x = median(t / s for t, s in zip(times["infer"][name], times["infer"]["bert"]))
        bert_train, bert_infer = median(times["train"]["bert"]), median(times["infer"]["bert"])
        run_x = (train_x * steps * bert_train + infer_x * eval_batches * bert_infer) / (
            steps * bert_train + eval_batches * bert_infer)
        backward_x = median(t / s for t, s in zip(backward_times[name], backward_times["bert"]))
        out.append({"config": name, "train_x": train_x, "backward_x": backward_x, "infer_x": infer_x,
                    "run_x": run_x, **costs[name],
                    "train_ms": 1e3 * median(times["train"][name]),
                    "infer_ms": 1e3 * median(times["infer"][name])})
    return {"rows": out}


def extra_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--steps", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="sentences per batch (finders)")
    parser.add_argument("--layers", type=int, default=6, help="the first N layers (finders)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--cap", type=int, default=100, help="iteration cap per solve (finders)")
    parser.add_argument("--iters", type=int, default=10, help="iterations of the timed solves (finders)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--configs", nargs="+", default=list(TRAINING_CONFIGS),
                        choices=list(TRAINING_CONFIGS),
                        help="configurations of the training part (bert is always measured: the reference)")
    parser.add_argument("--train-batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--run", type=int, nargs=2, default=[64, 32], metavar=("STEPS", "EVAL_BATCHES"),
                        help="the modelled fine-tuning run: training steps and evaluation batches (default: "
                             "1,000 examples x 2 epochs / 32 = 64 steps; 872 clean + 148 AdvGLUE SST-2 "
                             "sentences / 32 = 32 batches)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args("cost", __doc__.splitlines()[0], extra_options, argv)
    if args.device != "cpu":
        raise SystemExit("bench.cost measures CPU process time; run it with --device cpu")
    if args.quick:
        args.steps, args.batches, args.batch_size, args.layers = [1.0], 1, 2, 1
        args.cap, args.iters, args.rounds = 20, 3, 1
        args.train_batch_size, args.eval_batch_size, args.max_length = 4, 4, 32
    warnings.filterwarnings("ignore", category=solvers.ConvergenceWarning)
    torch.manual_seed(0)
    info = machine(args.device)
    print(describe(info))
    payload: dict[str, Any] = {"benchmark": "cost", "command": args.command, "machine": info,
                               "model": resolve_model_path(args.model), "timing": "CPU process time",
                               "config": {k: v for k, v in vars(args).items()
                                          if k not in ("out", "device", "model", "command")}}
    if "finders" in args.parts:
        run_finders(args, payload)
        if not payload["finders"]["torchdeq"]:
            print("torchdeq is not installed (pip install -e .[bench]): its rows are left out")
        print(table(payload["finders"]["summary"], [
            ("step", "s", "g"), ("finder", "finder", ""), ("evals_median", "evals median", ".1f"),
            ("evals_worst", "evals worst", ".1f"), ("layers_reached", "layers reached", ""),
            ("time_per_eval", "time per eval / eval time", ".3f")]))
        write_json(args.out, payload)
    if "compaction" in args.parts:
        payload["compaction"] = run_compaction(args)
        print(table(payload["compaction"]["rows"], [
            ("batch", "batch", "d"), ("rows_share", "rows evaluated share", ".3f"),
            ("time_ratio", "time compact / full", ".3f"), ("max_logit_diff", "max logit diff", ".1e"),
            ("identical", "identical", "")]))
        write_json(args.out, payload)
    if "training" in args.parts:
        payload["training"] = run_training(args)
        print(table(payload["training"]["rows"], [
            ("config", "configuration", ""), ("train_x", "train step x", ".2f"),
            ("backward_x", "of it backward x", ".2f"), ("infer_x", "inference x", ".2f"),
            ("run_x", "modelled run x", ".2f"), ("train_evals", "evals/layer train", ".1f"),
            ("adjoint_evals", "VJPs/adjoint solve", ".1f"), ("infer_evals", "evals/layer infer", ".1f"),
            ("infer_rows_share", "rows share infer", ".2f")]))
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
