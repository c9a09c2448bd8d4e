"""What the NaN/Inf checks of the ODE connections cost: the real MiniLM, batch 32 x 64 tokens, no_grad.

The stock model, a converted one with the checks and the same conversion without them run in turn in every
round (so load changes hit all three alike); the checks are also timed alone, as an euler forward runs
them (input and output of every layer). RELIABILITY.md quotes the result.

    python -m bench.nan_check [--solver euler] [--repeats 30]
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
import transformers

import ode_bert
from bench._common import describe, machine, parse_args, write_json
from solvers import all_finite


def main(argv: list[str] | None = None) -> dict[str, Any]:
    def extra(parser: Any) -> None:
        parser.add_argument("--solver", default="euler", help="solver of the converted model (default euler)")
        parser.add_argument("--repeats", type=int, default=30, help="timed rounds (default 30)")

    args = parse_args("nan_check", __doc__.splitlines()[0], extra, argv)
    repeats, shape = (2, (2, 8)) if args.quick else (args.repeats, (32, 64))
    transformers.logging.set_verbosity_error()
    stock = transformers.AutoModel.from_pretrained(ode_bert.resolve_model_path(args.model)).eval()
    settings = {"step": 0.5, "max_iter": 20} if args.solver == "implicit_euler" else {"step": 1.0}
    checked = ode_bert.convert(copy.deepcopy(stock), args.solver, **settings)
    unchecked = ode_bert.convert(copy.deepcopy(stock), args.solver, **settings)
    for layer in ode_bert.find_layers(unchecked):
        layer.forward.check_finite = False
    ids = torch.randint(1000, 20000, shape, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    models = {"stock": stock, "checked": checked, "unchecked": unchecked}
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(**inputs)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(**inputs)
                times[name].append(time.perf_counter() - start)
        states = stock(**inputs, output_hidden_states=True).hidden_states
        start = time.perf_counter()
        for _ in range(repeats):
            for before, after in zip(states[:-1], states[1:]):
                all_finite(before)
                all_finite(after)
        checks_ms = 1e3 * (time.perf_counter() - start) / repeats
    ms = {name: 1e3 * statistics.median(values) for name, values in times.items()}
    paired = statistics.median(a / b for a, b in zip(times["checked"], times["unchecked"])) - 1
    result = {"benchmark": "nan_check", "command": args.command, "machine": machine(args.device),
              "solver": args.solver, "batch": list(shape), "repeats": repeats, "median_ms": ms,
              "paired_overhead": paired, "checks_alone_ms": checks_ms,
              "checks_share_of_forward": checks_ms / ms["unchecked"]}
    print(describe(result["machine"]))
    print(f"{args.solver} on MiniLM, batch {shape[0]} x {shape[1]} tokens, median of {repeats}: stock "
          f"{ms['stock']:.1f} ms, checked {ms['checked']:.1f} ms, unchecked {ms['unchecked']:.1f} ms; "
          f"paired checked/unchecked {100 * paired:+.2f}%; the checks alone {checks_ms:.2f} ms = "
          f"{100 * result['checks_share_of_forward']:.2f}% of the unchecked forward")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
