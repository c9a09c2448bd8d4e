"""Training-step time, peak memory and inference latency of IM-models relative to the stock model.

Configurations: the stock classifier, and ``ode_bert.convert`` (implicit Euler, default step, field and
root finder) on the first ``k`` layers (``k`` in ``--ks``; ``all`` = every layer) for each gradient mode
(``unroll``, ``implicit``, ``one_step``). Each model is a copy of the same pretrained classifier with
its own AdamW optimizer, trained on one fixed batch of SST-2 dev sentences.

* Step time: forward + backward + optimizer step, timed per configuration in interleaved rounds (a
  fresh random order every round, same dropout seed for every model within a round); the ratio to
  the stock model is taken within each round and the median over rounds is reported.
* Inference latency: ``eval()`` forward under ``no_grad``, same protocol.
* Peak memory of one training step. CUDA: ``torch.cuda.max_memory_allocated``. CPU: bytes live before
  the step (parameters, gradients, optimizer state, batch) plus the peak of torch's CPU allocator during
  the step, read from ``torch.profiler`` memory events (``profile_memory=True``, "Total Allocated"); both
  count everything torch allocates, weights included. Also reported: what the forward leaves allocated
  for the backward (activations) and the peak above the start during forward + backward.
* ``--tol`` and ``--max-iter`` set the converted models' root tolerance and iteration cap.
* Memory versus iterations: the same step with the finder forced to run exactly ``--iters`` iterations
  (unreachable tolerance), to show which gradient modes grow with the iteration count.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import solvers
from bench._common import (
    describe,
    machine,
    median,
    parse_args,
    sst2_sentences,
    table,
    timed,
    write_json,
)
from ode_bert import FRAMINGS, convert, solver_stats
from ode_bert.pretrained import load_model, resolve_model_path
from ode_bert.settings import IM_BERT_FIELD, IM_BERT_STEP

GRAD_MODES = ("unroll", "implicit", "one_step")
_IMPLICIT_EULER = solvers.get("implicit_euler")  # its default root finder and gradient mode
DEFAULT_ROOT, DEFAULT_GRAD = _IMPLICIT_EULER.root, _IMPLICIT_EULER.grad


def extra_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ks", nargs="+", default=["1", "3", "all"], help="numbers of implicit layers")
    parser.add_argument("--grads", nargs="+", default=list(GRAD_MODES))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--field", choices=FRAMINGS, default=IM_BERT_FIELD,
                        help=f"vector field of the implicit layers (default {IM_BERT_FIELD}, as im_bert)")
    parser.add_argument("--step", type=float, default=IM_BERT_STEP,
                        help=f"step of the implicit layers (default {IM_BERT_STEP}, as im_bert)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--tol", type=float, default=None,
                        help="root tolerance of the converted models (default: the library's, dtype-aware)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="root iterations cap of the converted models (default: the library's)")
    parser.add_argument("--iters", type=int, nargs="+", default=[5, 20],
                        help="forced iteration counts for the memory-versus-iterations table")


def layer_spec(k: str) -> str | list[int]:
    return "all" if k == "all" else list(range(int(k)))


def storage_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def live_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> int:
    """Live tensors of a training step: parameters, gradients, buffers, optimizer state, the batch."""
    tensors = [*model.parameters(), *model.buffers(), *batch.values()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return storage_bytes(tensors)


class Config:
    """One model under test with its optimizer."""

    def __init__(self, name: str, model: nn.Module, k: str | None, grad: str | None) -> None:
        self.name, self.model, self.k, self.grad = name, model, k, grad
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model(**batch).loss
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def infer(self, batch: dict[str, torch.Tensor]) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(**{k: v for k, v in batch.items() if k != "labels"})


def _profiled_peak(fn: Any) -> tuple[Any, int, int]:
    """``(fn(), peak, end)``: bytes torch's CPU allocator held during / after ``fn()`` above the start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        trace_events = json.loads(trace.read_text())["traceEvents"]
    events = [e for e in trace_events
              if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]  # CPU allocator
    if not events:
        return result, 0, 0
    events.sort(key=lambda e: e["ts"])
    totals = [e["args"]["Total Allocated"] for e in events]
    # "Total Allocated" counts every allocation made while memory profiling was on, in any session:
    # rebase it on the value just before this session's first event
    baseline = totals[0] - events[0]["args"]["Bytes"]
    return result, max(0, max(totals) - baseline), totals[-1] - baseline


def _cuda_peak(fn: Any) -> tuple[Any, int, int]:
    """``(fn(), peak, end)``: CUDA bytes allocated during / after ``fn()`` above the start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start


def step_memory(config: Config, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, float]:
    """Memory of one training step, in MiB.

    ``peak_mb``: the highest total over the whole step, weights and optimizer state included;
    ``saved_mb``: what the forward leaves allocated for the backward (activations); ``fwd_bwd_mb``: the
    peak above the step's start during forward + backward (activations, solver work, gradients).
    """
    measure = _cuda_peak if device.type == "cuda" else _profiled_peak
    model, optimizer = config.model, config.optimizer
    model.train()
    optimizer.zero_grad(set_to_none=True)
    before = live_bytes(model, optimizer, batch)
    torch.manual_seed(0)
    loss, forward_peak, saved = measure(lambda: model(**batch).loss)
    _, backward_peak, _ = measure(loss.backward)
    del loss
    before_optimizer = live_bytes(model, optimizer, batch)
    _, optimizer_peak, _ = measure(optimizer.step)
    fwd_bwd = max(forward_peak, saved + backward_peak)
    mib = 2.0**20
    return {"peak_mb": max(before + fwd_bwd, before_optimizer + optimizer_peak) / mib,
            "saved_mb": saved / mib, "fwd_bwd_mb": fwd_bwd / mib}


def make_configs(stock: nn.Module, ks: list[str], grads: list[str], tol: float | None,
                 max_iter: int | None, field: str, step: float) -> list[Config]:
    configs = [Config("stock", copy.deepcopy(stock), None, None)]
    for k in ks:
        for grad in grads:
            model = convert(copy.deepcopy(stock), layers=layer_spec(k), step=step, field=field, grad=grad,
                            tol=tol, max_iter=max_iter)
            configs.append(Config(f"k={k} {grad}", model, k, grad))
    return configs


def interleaved(configs: list[Config], rounds: int, run: Any, device: torch.device) -> dict[str, list[float]]:
    """Per configuration, the seconds of ``run(config, round)`` in each of ``rounds`` shuffled rounds."""
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    for r in range(rounds):
        order = list(configs)
        random.Random(r).shuffle(order)
        for config in order:
            torch.manual_seed(1000 + r)
            seconds, _ = timed(lambda c=config: run(c), device)
            times[config.name].append(seconds)
    return times


def ratios(times: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of each configuration's time divided by the stock model's in the same round."""
    stock = times["stock"]
    return {name: median(t / s for t, s in zip(ts, stock)) for name, ts in times.items()}


def layer_cost(config: Config, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Evaluations and root iterations per implicit layer in one training forward (max residual too)."""
    if config.k is None:
        return {"evals_per_layer": 1.0, "max_iterations": 0, "max_residual": None}
    torch.manual_seed(0)
    config.model.train()
    with torch.no_grad():
        config.model(**batch)
    stats = solver_stats(config.model)
    return {
        "evals_per_layer": sum(s.nfev for s in stats) / len(stats),
        "max_iterations": max(s.iterations for s in stats),
        "max_residual": max((s.residual for s in stats if s.residual is not None), default=None),
    }


def add_memory_ratios(row: dict[str, Any], stock: dict[str, Any]) -> None:
    row["peak_ratio"] = row["peak_mb"] / stock["peak_mb"]
    row["saved_ratio"] = row["saved_mb"] / stock["saved_mb"]
    row["fwd_bwd_ratio"] = row["fwd_bwd_mb"] / stock["fwd_bwd_mb"]


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("training_overhead", __doc__.splitlines()[0], extra_options, argv)
    if args.quick:
        args.ks, args.batch_size, args.max_length, args.rounds, args.iters = ["1"], 2, 16, 2, [2]
    device = torch.device(args.device)
    warnings.filterwarnings("ignore", category=solvers.ConvergenceWarning)
    torch.manual_seed(0)
    stock, tokenizer = load_model(args.model, num_labels=2)
    stock.to(device)
    info = machine(args.device)
    print(describe(info))
    text = sst2_sentences(args.batch_size)
    batch = dict(tokenizer(text, padding=True, truncation=True, max_length=args.max_length,
                           return_tensors="pt"))
    batch["labels"] = torch.tensor([i % 2 for i in range(args.batch_size)])
    batch = {k: v.to(device) for k, v in batch.items()}

    configs = make_configs(stock, args.ks, args.grads, args.tol, args.max_iter, args.field, args.step)
    for config in configs:  # warm-up; also creates the optimizer state
        config.train_step(batch)
        config.infer(batch)
    train_times = interleaved(configs, args.rounds, lambda c: c.train_step(batch), device)
    infer_times = interleaved(configs, args.rounds, lambda c: c.infer(batch), device)
    train_ratio, infer_ratio = ratios(train_times), ratios(infer_times)
    rows = []
    for config in configs:
        name = config.name
        rows.append({"config": name, "k": config.k, "grad": config.grad,
                     "default": config.k == "all" and config.grad == DEFAULT_GRAD,
                     "step_ms": 1e3 * median(train_times[name]), "step_ratio": train_ratio[name],
                     "infer_ms": 1e3 * median(infer_times[name]), "infer_ratio": infer_ratio[name],
                     **step_memory(config, batch, device), **layer_cost(config, batch)})
    stock_row = rows[0]
    for row in rows:
        add_memory_ratios(row, stock_row)
    print(f"Stock model: step {stock_row['step_ms']:.1f} ms, inference {stock_row['infer_ms']:.1f} ms, "
          f"peak {stock_row['peak_mb']:.0f} MB; root finder {DEFAULT_ROOT!r}, batch {args.batch_size}")
    print(table(rows, [("config", "config", ""), ("step_ratio", "step x", ".2f"),
                       ("infer_ratio", "inference x", ".2f"), ("peak_ratio", "peak mem x", ".2f"),
                       ("saved_ratio", "activations x", ".2f"),
                       ("fwd_bwd_ratio", "fwd+bwd mem x", ".2f"),
                       ("evals_per_layer", "evals/layer", ".1f"), ("max_residual", "max residual", ".1e"),
                       ("step_ms", "step ms", ".1f"), ("peak_mb", "peak MB", ".0f")]))

    sweep = []
    for grad in args.grads:
        for iters in args.iters:
            model = convert(copy.deepcopy(stock), layers="all", step=args.step, field=args.field, grad=grad,
                            tol=1e-12, max_iter=iters)
            config = Config(f"all {grad} {iters} iterations", model, "all", grad)
            config.train_step(batch)
            entry = {"grad": grad, "iterations": iters, **step_memory(config, batch, device)}
            add_memory_ratios(entry, stock_row)
            sweep.append(entry)
            del config, model
    print("\nPeak memory with every layer implicit and a forced number of root iterations:")
    print(table(sweep, [("grad", "grad", ""), ("iterations", "iterations", "d"),
                        ("peak_ratio", "peak mem x", ".2f"), ("saved_ratio", "activations x", ".2f"),
                       ("fwd_bwd_ratio", "fwd+bwd mem x", ".2f"),
                        ("peak_mb", "peak MB", ".0f")]))
    write_json(args.out, {
        "benchmark": "training_overhead",
        "command": args.command,
        "machine": info,
        "model": resolve_model_path(args.model),
        "default_root": DEFAULT_ROOT,
        "default_grad": DEFAULT_GRAD,
        "memory_method": "cuda max_memory_allocated" if device.type == "cuda"
        else "live tensor bytes before + torch.profiler CPU allocator peak (profile_memory) during",
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "device", "model", "command")},
        "stock": {k: stock_row[k] for k in ("step_ms", "infer_ms", "peak_mb", "saved_mb", "fwd_bwd_mb")},
        "rows": rows,
        "memory_vs_iterations": sweep,
        "train_seconds": train_times,
        "infer_seconds": infer_times,
    })


if __name__ == "__main__":
    main()
