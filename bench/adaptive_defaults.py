"""Adaptive solvers inside ``convert``: what each tolerance costs and how accurate it is, on real MiniLM.

For each adaptive solver (dopri5, bosh3, adaptive_heun, dopri8) and ``rtol`` in 1e-3 .. 1e-7 (``atol`` =
``rtol / 100``), one float32 forward of a few SST-2 dev sentences through MiniLM with every layer converted
(``field="residual"``, step 1: each layer integrates ``dh/dt = Layer(h) - h`` over ``[l, l+1]``). Reported:

- layer evaluations over the six layers (the stock model makes 6) and the forward's wall time as a ratio to
  the stock forward, timed in the same run;
- the error of the last hidden state against a float64 reference solve of the same ODE (dopri8,
  ``rtol`` 1e-10, ``atol`` 1e-12), as max abs error and relative to the largest reference value;
- the distance to the stock model's output (the ODE's exact flow is a different map from one Euler step:
  an adaptive model must be fine-tuned, its accuracy is about the flow, not about the stock output).

A run that exhausts the solver's substep budget (``max_num_steps``) is reported as such. The chosen defaults
(``ode_bert.settings.ADAPTIVE_DEFAULTS``) and the table are in docs/choosing-a-solver.md.

    python -m bench.adaptive_defaults                  # about 10 minutes on 2 CPU cores
    python -m bench.adaptive_defaults --quick          # dopri5 at 1e-3 and 1e-4, 2 sentences (seconds)
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import torch

import ode_bert
import solvers
from bench._common import describe, machine, parse_args, sst2_sentences, table, write_json

SOLVERS = ("dopri5", "bosh3", "adaptive_heun", "dopri8")
RTOLS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
REFERENCE = {"solver": "dopri8", "rtol": 1e-10, "atol": 1e-12}  # in float64


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    parser.add_argument("--rtols", nargs="+", type=float, default=list(RTOLS))
    parser.add_argument("--sentences", type=int, default=4, help="SST-2 dev sentences (default 4)")


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, torch.Tensor, int]:
    """``(seconds, last hidden state, layer evaluations)`` of one forward."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model(**batch).last_hidden_state
    seconds = time.perf_counter() - start
    return seconds, out, sum(s.nfev for s in ode_bert.solver_stats(model)) or 6


def measure(model: torch.nn.Module, batch: dict[str, torch.Tensor], solver_names: list[str],
            rtols: list[float]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of the table, and the reference solve's own cost."""
    ode_bert.unconvert(model)
    stock_seconds, stock, _ = _forward(model, batch)
    reference_model = copy.deepcopy(model).double()
    ode_bert.convert(reference_model, REFERENCE["solver"], rtol=REFERENCE["rtol"], atol=REFERENCE["atol"],
                     max_num_steps=100_000)
    ref_seconds, reference, ref_evals = _forward(reference_model, batch)
    mask = batch["attention_mask"].bool()  # real tokens only: padding positions are not compared
    reference, stock = reference[mask], stock[mask].double()
    scale = float(reference.abs().max())
    rows = []
    for name in solver_names:
        for rtol in rtols:
            ode_bert.convert(model, name, rtol=rtol, atol=rtol / 100)
            row: dict[str, Any] = {"solver": name, "rtol": rtol, "atol": rtol / 100}
            try:
                seconds, out, evals = _forward(model, batch)
            except solvers.StepBudgetError as err:
                row.update(evals=None, note=f"substep budget exhausted: {str(err)[:80]}")
                rows.append(row)
                print(f"{name} rtol {rtol:g}: budget exhausted", flush=True)
                continue
            error = float((out[mask].double() - reference).abs().max())
            row.update(
                evals=evals, evals_per_layer=evals / 6, time_ratio=seconds / stock_seconds,
                max_abs_error=error, rel_error=error / scale,
                vs_stock=float((out[mask].double() - stock).abs().max()),
            )  # fmt: skip
            rows.append(row)
            print(f"{name} rtol {rtol:g}: {evals} evaluations, error {error:.2e}", flush=True)
    ode_bert.unconvert(model)
    return rows, {**REFERENCE, "evals": ref_evals, "time_ratio": ref_seconds / stock_seconds, "scale": scale}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args("adaptive_defaults", __doc__.split("\n")[0], _extra, argv)
    if args.quick:
        args.solvers, args.rtols, args.sentences = ["dopri5"], [1e-3, 1e-4], 2
    model, tokenizer = ode_bert.load_model(args.model)
    model.eval()
    sentences = sst2_sentences(args.sentences)
    batch = dict(tokenizer(sentences, padding=True, return_tensors="pt"))
    rows, reference = measure(model, batch, args.solvers, args.rtols)
    info = machine(args.device)
    print(f"\n{describe(info)}; {len(sentences)} SST-2 dev sentences, float32, every layer, residual field, "
          f"step 1; reference: {reference['solver']} rtol {reference['rtol']:g} in float64 "
          f"({reference['evals']} evaluations); stock forward = 6 evaluations")
    print(table(rows, [
        ("solver", "solver", ""), ("rtol", "rtol", "g"), ("evals", "evaluations (6 layers)", "d"),
        ("time_ratio", "time / stock", ".0f"), ("max_abs_error", "max abs error", ".1e"),
        ("rel_error", "relative error", ".1e"), ("vs_stock", "max abs diff. to stock", ".2f"),
    ]))  # fmt: skip
    payload = {"command": args.command, "machine": info, "sentences": sentences, "reference": reference,
               "rows": rows}  # fmt: skip
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
