"""Warm starts of the adjoint solve across epochs (issue 18): measured before building it.

The ``implicit`` gradient solves ``u = J_g(z*)^T u + v`` per implicit layer in the backward pass (about 40%
of an IM-BERT training step), starting from the incoming gradient ``v``. The lever: start each example's
adjoint solve of epoch ``e`` from its solution of epoch ``e - 1``, shifted like the forward warm start
(``v_now + (u - v)_stored``). The library has no such option; this script measures what it would save
before anyone builds it. One IM-BERT (``im_bert`` defaults, every layer implicit) is fine-tuned as
``bench.warm_start`` does (stratified SST-2 subset, AdamW, linear schedule). During the run
``solvers.watch_adjoint_solves`` reports every adjoint solve; the probe stores each example's ``u - v`` on
its real tokens (float32) and, where every example of the batch has one from an earlier epoch, solves the
same adjoint a second time from the shifted guess, for counting only: the gradient the run uses is always
the cold solve's, so the run is the run ``ode-bert train`` makes.

Reported per tolerance and epoch: evaluations (vector-Jacobian products) per adjoint solve, cold and, on the
same solves, from the guess; per layer; the relative error of each start (``||start - u|| / ||u||``; the
solve must bring it to about the tolerance); and the cosine between an example's incoming gradient ``v`` now
and at its previous visit (how much of ``u`` the guess can know).
"""

from __future__ import annotations

import contextlib
import statistics
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import set_seed

import solvers
from bench._common import describe, machine, parse_args, table, write_json
from bench.warm_start import Run, fine_tuning_batches, fine_tuning_options
from ode_bert import im_bert
from ode_bert.data import load_train, stratified_subset
from ode_bert.layers import find_layers
from ode_bert.pretrained import load_model
from ode_bert.train import EXAMPLE_IDS


class AdjointProbe:
    """Counts every adjoint solve of a run (``solvers.watch_adjoint_solves``) and, where every example of the
    batch has an adjoint stored from an earlier visit, solves it again from the shifted guess."""

    def __init__(self, layers: int) -> None:
        self.layers = layers  # implicit layers: the backward pass solves them last to first
        self.epoch = 0
        self.ids: list[int] = []
        self.real: Tensor | None = None  # bool (batch, tokens) of the current batch
        self.solved_in_batch = 0
        self.stored: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (id, layer) -> (u - v, v)
        self.solves: list[dict[str, Any]] = []

    def batch(self, ids: list[int], attention_mask: Tensor) -> None:
        """The next training step's example ids and mask."""
        self.ids, self.real, self.solved_in_batch = ids, attention_mask != 0, 0

    def installed(self) -> contextlib.AbstractContextManager[None]:
        """Watch the adjoint solves while the run trains."""
        return solvers.watch_adjoint_solves(self.measure)

    def measure(self, solve: solvers.AdjointSolve) -> None:
        """Count this adjoint solve, solve it again from the stored guess, store its ``u - v``."""
        assert self.real is not None, "call batch() before each training step"
        layer = self.layers - 1 - self.solved_in_batch
        self.solved_in_batch += 1
        v, u, real = solve.v, solve.u, self.real
        tokens = real.sum(dim=1).tolist()
        record = {"epoch": self.epoch, "layer": layer, "cold_nfev": solve.info.nfev,
                  "cold_start_error": float((v - u).norm() / u.norm())}  # fmt: skip
        old = [self.stored.get((i, layer)) for i in self.ids]
        if all(entry is not None for entry in old):
            guess = v.clone()
            guess[real] += torch.cat([entry[0] for entry in old])
            _, warm = solve.solve_from(guess)
            record["warm_nfev"] = warm.nfev
            record["warm_start_error"] = float((guess - u).norm() / u.norm())
            record["v_cosines"] = [
                float(torch.nn.functional.cosine_similarity(now.flatten(), entry[1].flatten(), dim=0))
                for now, entry in zip(v[real].split(tokens), old)
            ]
        for i, increment, v_row in zip(self.ids, (u - v)[real].split(tokens), v[real].split(tokens)):
            self.stored[(i, layer)] = (increment.clone(), v_row.clone())
        self.solves.append(record)


def _layer_means(solves: list[dict[str, Any]], layer: int) -> dict[str, Any]:
    these = [s for s in solves if s["layer"] == layer]
    return {"layer": layer, "cold_nfev": statistics.mean(s["cold_nfev"] for s in these),
            "warm_nfev": statistics.mean(s["warm_nfev"] for s in these)}


def summarize(solves: list[dict[str, Any]], layers: int) -> dict[str, Any]:
    """Per epoch: mean evaluations per adjoint solve cold and (paired) from the guess, per layer too."""
    out = {}
    for epoch in sorted({s["epoch"] for s in solves}):
        these = [s for s in solves if s["epoch"] == epoch]
        paired = [s for s in these if "warm_nfev" in s]
        entry: dict[str, Any] = {"solves": len(these),
                                 "cold_nfev": statistics.mean(s["cold_nfev"] for s in these),
                                 "cold_start_error": statistics.median(s["cold_start_error"] for s in these)}
        if paired:
            entry.update({
                "paired_solves": len(paired),
                "paired_cold_nfev": statistics.mean(s["cold_nfev"] for s in paired),
                "warm_nfev": statistics.mean(s["warm_nfev"] for s in paired),
                "warm_start_error": statistics.median(s["warm_start_error"] for s in paired),
                "v_cosine_median": statistics.median(c for s in paired for c in s["v_cosines"]),
                "per_layer": [_layer_means(paired, layer) for layer in range(layers)],
            })  # fmt: skip
        out[f"epoch {epoch + 1}"] = entry
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args("adjoint_warm_start", __doc__.splitlines()[0],
                      lambda parser: fine_tuning_options(parser, tols=(1e-2, 1e-4)), argv)
    if args.quick:
        args.train_samples, args.batch_size, args.tols = 32, 16, args.tols[:1]
    info = machine(args.device)
    print(describe(info))
    examples = stratified_subset(load_train("sst2"), args.train_samples, args.seed)
    results = []
    for tol in args.tols:
        set_seed(args.seed)
        model, tokenizer = load_model(args.model, num_labels=2)
        im_bert(model, tol=tol)
        layers = len(find_layers(model))
        sampler, loader = fine_tuning_batches(examples, tokenizer, args)
        run = Run(model, args, len(loader) * args.epochs, warm=False)
        probe = AdjointProbe(layers)
        with probe.installed(), warnings.catch_warnings():
            warnings.simplefilter("ignore", solvers.ConvergenceWarning)
            for epoch in range(args.epochs):
                sampler.set_epoch(epoch)
                probe.epoch = epoch
                run.start_epoch()
                for number, batch in enumerate(loader):
                    probe.batch(batch[EXAMPLE_IDS].tolist(), batch["attention_mask"])
                    run.step(batch)
                    print(f"tol {tol:g} epoch {epoch + 1} step {number + 1}/{len(loader)}", flush=True)
                run.end_epoch()
        results.append({"tol": tol, "epochs": summarize(probe.solves, layers), "solves": probe.solves})
    rows = [{"tol": f"{r['tol']:g}", "epoch": epoch, **{k: v for k, v in entry.items() if k != "per_layer"}}
            for r in results for epoch, entry in r["epochs"].items()]  # fmt: skip
    print(table(rows, [("tol", "tol", ""), ("epoch", "epoch", ""), ("solves", "adjoint solves", ""),
                       ("cold_nfev", "evals per solve, cold", ".2f"),
                       ("paired_cold_nfev", "same solves, cold", ".2f"),
                       ("warm_nfev", "from the guess", ".2f"),
                       ("cold_start_error", "start error, cold", ".3f"),
                       ("warm_start_error", "start error, guess", ".3f"),
                       ("v_cosine_median", "cosine of v, now vs last visit", ".3f")]))  # fmt: skip
    payload = {"benchmark": "adjoint_warm_start", "command": args.command, "machine": info,
               "settings": {k: v for k, v in vars(args).items() if k not in ("command", "out")},
               "results": results}  # fmt: skip
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
