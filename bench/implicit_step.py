"""Cost of one implicit-Euler step per root finder, on the real layers of a pretrained encoder.

For every encoder layer, step ``s`` and framing (``residual``: ``f = Layer(h) - h``; ``layer``:
``f = Layer(h)``), solve ``z = h + s f(z)`` for batches of real hidden states (SST-2 dev sentences, the
states entering that layer in the stock model) with each root finder, starting from the explicit Euler
predictor ``h + s f(h)`` as the implicit step does. Reported per configuration (medians over batches):

* evaluations and wall time to reach relative residual ``--tol`` (``||g(z) - z|| / ||g(z)||``, every
  sample of the batch), capped at ``--cap`` evaluations;
* the final relative residual, recomputed here from the returned ``z`` (and the one the finder reported);
* the best residual reached within fixed budgets of ``--budgets`` evaluations.

Evaluations are FLOP-equivalents (see ``_common``): the predictor counts 1, a forward 1, a VJP through
the layer w.r.t. its input 1 more, a forward-mode JVP what it costs. Finders run with their default options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

import solvers
from bench._common import (
    FlopCount,
    describe,
    machine,
    median,
    parse_args,
    sst2_sentences,
    table,
    timed,
    write_json,
)
from ode_bert.field import LayerField
from ode_bert.pretrained import from_pretrained, resolve_model_path

# Each finder with its default options, plus variants worth comparing (``name:option=value,...``):
# gd with the paper's fixed step (0.5 diverges on these layers, 0.1 creeps), half-damped Picard and
# Anderson (for the residual framing at s = 1, z = h + Layer(z) - z is z = (h + Layer(z)) / 2), and a
# Newton-Krylov with a small Krylov space and a loose inner tolerance.
FINDERS = ("gd", "gd:backtrack=false", "gd:lr=0.1,backtrack=false", "picard", "picard:damping=0.5",
           "anderson", "anderson:beta=0.5", "newton_krylov", "newton_krylov:krylov_dim=5,eta=0.1", "broyden")


def make_finder(spec: str, tol: float) -> solvers.RootFinder:
    """A root finder from ``name`` or ``name:option=value,...`` (numbers and true/false parsed), never
    warning."""
    name, _, opts = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("true", "false"):
            options[key] = value.lower() == "true"
        else:
            options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
    return solvers.get_root_finder(name, tol=tol, max_iter=10_000, on_failure="ignore", **options)


class BudgetExhausted(Exception):
    """Raised inside the fixed-point map once the evaluation budget is spent (stops any finder)."""


def relative_residual(z: Tensor, gz: Tensor) -> Tensor:
    """Per-sample ``||g(z) - z|| / ||g(z)||`` in float64."""
    z, gz = z.detach().double(), gz.detach().double()
    return solvers.sample_norm(gz - z) / solvers.sample_norm(gz).clamp_min(1e-300)


@dataclass
class Probe:
    """The fixed-point map handed to a finder: counts calls, enforces the budget, records residuals.

    With a ``counter`` the budget is in evaluations (FLOPs / ``unit``) and each call records
    ``(cost so far, per-sample residual at the point evaluated)``; without one it is ``max_calls`` calls.
    """

    g: Callable[[Tensor], Tensor]
    counter: FlopCount | None = None
    unit: float = 1.0
    cap: float = math.inf
    max_calls: int | None = None
    calls: int = 0
    trace: list[tuple[float, Tensor]] = field(default_factory=list)

    def cost(self) -> float:
        return self.counter.total / self.unit if self.counter is not None else float("nan")

    def __call__(self, z: Tensor) -> Tensor:
        if self.counter is not None and self.cost() + 1 > self.cap + 1e-9:
            raise BudgetExhausted
        if self.max_calls is not None and self.calls >= self.max_calls:
            raise BudgetExhausted
        self.calls += 1
        gz = self.g(z)
        if self.counter is not None:
            self.trace.append((self.cost(), relative_residual(z, gz)))
        return gz


def best_within(trace: list[tuple[float, Tensor]], budget: float) -> float:
    """Worst sample's best residual among the points evaluated with cost <= ``budget`` (nan if none)."""
    inside = [res for cost, res in trace if cost <= budget + 1e-9]
    if not inside:
        return float("nan")
    return float(torch.stack(inside).min(dim=0).values.max())


def solve_once(name: str, fld: LayerField, h: Tensor, s: float, tol: float, cap: float, unit: float,
               budgets: list[float], device: torch.device) -> dict[str, Any]:
    """One counted solve (cost, trace, residuals) then one timed solve doing the same evaluations."""

    def g(z: Tensor) -> Tensor:
        return h + s * fld(0.0, z)

    finder = make_finder(name, tol)
    counter = FlopCount()
    probe = Probe(g, counter=counter, unit=unit, cap=cap)
    outcome: tuple[Tensor, Any] | None = None
    with counter:
        z0 = g(h)  # explicit Euler predictor, 1 evaluation
        try:
            outcome = finder.solve(probe, z0)
        except BudgetExhausted:
            outcome = None
    cost = probe.cost()
    row: dict[str, Any] = {"finder": name, "calls": probe.calls + 1, "cost": cost}
    for budget in budgets:
        row[f"res@{budget:g}"] = best_within(probe.trace, budget)
    if outcome is None:
        row.update(status="cap", converged=False, reported_residual=None,
                   residual=best_within(probe.trace, cap), nfev=None, nvjp=None)
    else:
        z, info = outcome
        with torch.no_grad():
            recomputed = float(relative_residual(z, g(z)).max())
        converged = bool(info.all_converged)
        row.update(status="converged" if converged else "stopped", converged=converged,
                   reported_residual=info.max_rel_residual, residual=recomputed,
                   nfev=info.nfev, nvjp=getattr(info, "nvjp", None))
    row["evals_to_tol"] = cost if row["converged"] else math.inf

    timed_probe = Probe(g, max_calls=probe.calls)

    def run() -> None:
        z_start = g(h)
        with contextlib.suppress(BudgetExhausted):
            finder.solve(timed_probe, z_start)

    row["seconds"], _ = timed(run, device)
    return row


def layer_unit(fld: LayerField, h: Tensor, device: torch.device, repeats: int) -> tuple[float, float]:
    """FLOPs of one forward of the layer on the batch, and its median wall time (seconds)."""
    counter = FlopCount()
    with counter, torch.no_grad():
        fld(0.0, h)
    times = [timed(lambda: fld(0.0, h), device)[0] for _ in range(repeats)]
    return float(counter.total), median(times)


def extra_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=float, nargs="+", default=[0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--framings", nargs="+", default=["residual", "layer"], choices=["residual", "layer"])
    parser.add_argument("--finders", nargs="+", default=list(FINDERS))
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layer indices (default all)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--cap", type=float, default=100.0, help="evaluation budget per solve")
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 10.0, 20.0])
    parser.add_argument("--padding", default="none", choices=["none", "pad"],
                        help="none: each batch holds sentences of one token length (no padding positions); "
                             "pad: consecutive sentences padded to the longest")
    parser.add_argument("--resummarise", action="store_true",
                        help="measure nothing: recompute the summaries of the runs stored in --out")
    parser.add_argument("--attn", default="eager",
                        help="attention implementation (eager: the CPU sdpa kernel has no double backward, "
                             "which newton_krylov's Jacobian-vector products need)")


def summarise(rows: list[dict[str, Any]], budgets: list[float]) -> list[dict[str, Any]]:
    """Medians over batches per (framing, step, layer, finder)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["framing"], row["step"], row["layer"], row["finder"]), []).append(row)
    out = []
    for (framing, step, layer, finder), rs in groups.items():
        converged = sum(r["converged"] for r in rs)
        entry = {
            "framing": framing, "step": step, "layer": layer, "finder": finder,
            # a configuration counts as reaching the tolerance when most batches do
            "evals_to_tol": median(r["evals_to_tol"] for r in rs) if 2 * converged > len(rs) else math.inf,
            "converged": f"{converged}/{len(rs)}",
            "ms": 1e3 * median(r["seconds"] for r in rs),
            "time_in_evals": median(r["seconds"] / r["eval_seconds"] for r in rs),
            "residual": median(r["residual"] for r in rs),
        }
        for budget in budgets:
            entry[f"res@{budget:g}"] = median(r[f"res@{budget:g}"] for r in rs)
        out.append(entry)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("implicit_step", __doc__.splitlines()[0], extra_options, argv)
    if args.quick:
        args.steps, args.framings, args.layers = [1.0], ["residual"], [0]
        args.batches, args.batch_size, args.cap, args.budgets = 1, 2, 20.0, [5.0, 10.0]
    if args.resummarise:
        stored = json.loads(args.out.read_text())
        args.command, args.budgets = stored["command"], stored["config"]["budgets"]
        save(args, stored["machine"], stored["runs"], stored["batches_done"], stored)
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=solvers.ConvergenceWarning)
    model, tokenizer = _load(args.model, args.attn)
    model.to(device)
    info = machine(args.device)
    print(describe(info))

    rows: list[dict[str, Any]] = []
    order = list(args.finders)
    for b, text in enumerate(batches(tokenizer, args.batches, args.batch_size, args.padding)):
        inputs = tokenizer(text, padding=True, truncation=True, max_length=128, return_tensors="pt")
        inputs = inputs.to(device)
        captured = LayerField.capture(model, "residual", **inputs)
        layers = args.layers if args.layers is not None else list(range(len(captured)))
        for index in layers:
            stock_field, h = captured[index]
            for framing in args.framings:
                fld = LayerField(stock_field.layer, framing, stock_field.args, stock_field.kwargs)
                unit, eval_seconds = layer_unit(fld, h, device, repeats=3)
                for s in args.steps:
                    random.Random(f"{b}-{index}-{framing}-{s}").shuffle(order)  # interleave finders
                    for name in order:
                        row = solve_once(name, fld, h, s, args.tol, args.cap, unit, args.budgets, device)
                        row.update(batch=b, layer=index, framing=framing, step=s, eval_seconds=eval_seconds,
                                   tokens=int(h.shape[0] * h.shape[1]))
                        rows.append(row)
                    print(f"batch {b} layer {index} {framing} s={s:g}: " + ", ".join(
                        f"{r['finder']} {r['cost']:.0f}{'' if r['converged'] else '*'}"
                        for r in rows[-len(order):]), flush=True)
        save(args, info, rows, batches_done=b + 1)  # partial results survive an interrupted run

    summary, overview = save(args, info, rows, batches_done=args.batches)
    budget_columns = [(f"res@{b:g}", f"res@{b:g}", ".1e") for b in args.budgets]
    print(table(summary, [
        ("framing", "framing", ""), ("step", "s", "g"), ("layer", "layer", "d"), ("finder", "finder", ""),
        ("evals_to_tol", f"evals to {args.tol:g}", ".1f"), ("converged", "conv", ""), ("ms", "ms", ".1f"),
        ("time_in_evals", "time/eval", ".1f"), ("residual", "final res", ".1e"), *budget_columns]))
    print("\nOver layers (evals: median and worst layer; inf = not reached within the cap):")
    print(table(overview, [
        ("framing", "framing", ""), ("step", "s", "g"), ("finder", "finder", ""),
        ("evals_median", "evals median", ".1f"), ("evals_worst", "evals worst", ".1f"),
        ("layers_reached", "layers reached", ""), ("time_in_evals", "time/eval", ".1f"), *budget_columns]))


def save(args: argparse.Namespace, info: dict[str, Any], rows: list[dict[str, Any]], batches_done: int,
         stored: dict[str, Any] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Summarise the runs so far and write the JSON; returns (per-layer summary, over-layers summary).

    ``stored``: a result file being re-summarised, whose model and configuration are kept.
    """
    summary = summarise(rows, args.budgets)
    overview = over_layers(summary, args.budgets)
    internal = ("out", "device", "model", "command", "resummarise")
    config = {k: v for k, v in vars(args).items() if k not in internal}
    write_json(args.out, {
        "benchmark": "implicit_step",
        "command": args.command,
        "machine": info,
        "model": stored["model"] if stored else resolve_model_path(args.model),
        "config": stored["config"] if stored else config,
        "batches_done": batches_done,
        "cost_unit": "matrix-multiply FLOPs of one layer forward on the batch (predictor included in costs)",
        "over_layers": overview,
        "summary": summary,
        "runs": rows,
    })
    return summary, overview


def over_layers(summary: list[dict[str, Any]], budgets: list[float]) -> list[dict[str, Any]]:
    """Per (framing, step, finder): median and worst layer of the per-layer medians."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for entry in summary:
        groups.setdefault((entry["framing"], entry["step"], entry["finder"]), []).append(entry)
    out = []
    for (framing, step, finder), es in groups.items():
        evals = [e["evals_to_tol"] for e in es]
        row = {"framing": framing, "step": step, "finder": finder,
               "evals_median": statistics.median(evals), "evals_worst": max(evals),
               "layers_reached": f"{sum(v != math.inf for v in evals)}/{len(evals)}",
               "time_in_evals": median(e["time_in_evals"] for e in es)}
        for budget in budgets:
            row[f"res@{budget:g}"] = median(e[f"res@{budget:g}"] for e in es)
        out.append(row)
    return out


def batches(tokenizer: Any, count: int, size: int, padding: str) -> list[list[str]]:
    """``count`` batches of ``size`` SST-2 dev sentences.

    ``padding="none"``: sentences grouped by token length, one length per batch (the most common
    lengths first), so every position is a real token; ``"pad"``: consecutive sentences.
    """
    if padding == "pad":
        return [sst2_sentences(size, offset=i * size) for i in range(count)]
    pool = sst2_sentences(872)
    by_length: dict[int, list[str]] = {}
    for sentence in pool:
        by_length.setdefault(len(tokenizer(sentence)["input_ids"]), []).append(sentence)
    lengths = sorted((n for n, group in by_length.items() if len(group) >= size),
                     key=lambda n: (-len(by_length[n]), n))
    if len(lengths) < count:
        raise ValueError(f"only {len(lengths)} token lengths have {size} sentences; ask for fewer batches")
    return [by_length[n][:size] for n in lengths[:count]]


def _load(model: str | None, attn: str) -> tuple[torch.nn.Module, Any]:
    """The stock encoder (eval mode, frozen) and its tokenizer."""
    import transformers

    encoder = from_pretrained(model, transformers.AutoModel, attn_implementation=attn).eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder, transformers.AutoTokenizer.from_pretrained(resolve_model_path(model))


if __name__ == "__main__":
    main()
