"""Warm starts across training epochs (issue 18): a short fine-tuning with and without, side by side.

For each tolerance in ``--tols``, two copies of the same IM-BERT (``im_bert`` defaults, every layer
implicit, the same seed: same classifier head, same data order, same dropout draws) are fine-tuned in lockstep
on a stratified SST-2 training subset: one starting every implicit solve cold (the explicit Euler predictor,
as today), one with ``ode_bert.warm_start.WarmStartStore`` (each example's solve of epoch ``e`` starts from
its fixed point of epoch ``e - 1``, shifted by the change of the layer input). Each training step of the
two models runs back to back, each with its own RNG state, so both runs are the runs ``ode-bert train``
would make.

Reported per run and epoch: evaluations per (batch, layer) solve in the forward (``solver_stats``: the
predictor where it runs, the iterations, and the evaluation that attaches the gradient), CPU process time of
the training steps (forward, backward with the adjoint solves, AdamW), and at the end the store's bytes and
the clean accuracy on a stratified 200-example subset of the SST-2 dev set (one seed: a sanity check).
Also the store's size for the SST-2 plan run (1,000 examples, max length 64, MiniLM 6 layers x 384),
computed from the tokenized subsets of seeds 1-5.

``--no-dropout`` trains with every dropout off: each example's equation then changes between epochs with the
weights only, which shows how much of the guess's error comes from the new dropout masks of each epoch.

Times are CPU process time (``time.process_time``), which a loaded machine does not charge for waiting.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from bench._common import describe, machine, parse_args, table, write_json
from ode_bert import im_bert, solver_stats
from ode_bert.data import load_clean_dev, load_train, stratified_subset
from ode_bert.encoding import Collator, EncodedDataset
from ode_bert.evaluate import predict
from ode_bert.layers import find_layers
from ode_bert.pretrained import load_model
from ode_bert.train import EXAMPLE_IDS, CollatorWithExampleIds, EpochSampler, WithExampleIds, parameter_groups
from ode_bert.warm_start import WarmStartStore
from solvers import ConvergenceWarning


def fine_tuning_options(parser: argparse.ArgumentParser, tols: Sequence[float]) -> None:
    """The short fine-tuning's options, shared with ``bench.adjoint_warm_start``."""
    parser.add_argument("--train-samples", type=int, default=256, help="stratified SST-2 training subset")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tols", type=float, nargs="+", default=list(tols),
                        help="root tolerances (im_bert's default: 1e-2 since 0.2.0, 1e-4 before)")


def extra_options(parser: argparse.ArgumentParser) -> None:
    fine_tuning_options(parser, tols=(1e-4, 1e-2))
    parser.add_argument("--dev-samples", type=int, default=200, help="stratified SST-2 dev subset scored")
    parser.add_argument("--plan-samples", type=int, default=1000,
                        help="training subset of the plan run whose store size is computed")
    parser.add_argument("--no-dropout", action="store_true",
                        help="train with every dropout off (p = 0): an example's equation then changes "
                        "between epochs with the weights only, not with new dropout masks (a comparison)")


def fine_tuning_batches(
    examples: Sequence[Any], tokenizer: Any, args: argparse.Namespace
) -> tuple[EpochSampler, DataLoader]:
    """The training batches as ``ode-bert train`` draws them (with example ids; ``sampler.set_epoch`` per
    epoch), shared with ``bench.adjoint_warm_start``."""
    dataset = WithExampleIds(EncodedDataset(examples, tokenizer, args.max_length))
    sampler = EpochSampler(len(dataset), args.seed)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler,
                        collate_fn=CollatorWithExampleIds(Collator(tokenizer)))  # fmt: skip
    return sampler, loader


class Run:
    """One fine-tuning run: model, optimizer, scheduler, its own RNG state and (warm) its store."""

    def __init__(self, model: torch.nn.Module, args: argparse.Namespace, steps: int, warm: bool) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=args.lr)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, math.ceil(0.1 * steps), steps)
        self.store = WarmStartStore() if warm else None
        self.rng = torch.get_rng_state()
        self.epochs: list[dict[str, Any]] = []

    def start_epoch(self) -> None:
        self.epochs.append({"evals": 0, "layer_solves": 0, "cpu_s": 0.0, "steps": 0, "loss": 0.0})
        if self.store is not None:
            self.store.reset_counts()

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """One training step (as ``ode_bert.train``), timed and counted into the current epoch."""
        torch.set_rng_state(self.rng)
        batch = dict(batch)
        ids = batch.pop(EXAMPLE_IDS)
        self.model.train()
        start = time.process_time()
        if self.store is not None:
            with self.store.batch(self.model, ids, batch["attention_mask"]):
                loss = self.model(**batch).loss
        else:
            loss = self.model(**batch).loss
        stats = solver_stats(self.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        record = self.epochs[-1]
        record["cpu_s"] += time.process_time() - start
        record["steps"] += 1
        record["loss"] += loss.item()
        record["evals"] += sum(s.nfev for s in stats)
        record["layer_solves"] += len(stats)
        self.rng = torch.get_rng_state()

    def end_epoch(self) -> None:
        record = self.epochs[-1]
        record["evals_per_solve"] = record["evals"] / record["layer_solves"]
        record["mean_loss"] = record.pop("loss") / record["steps"]
        if self.store is not None:
            record["store"] = self.store.stats()


def store_size_of_plan(args: argparse.Namespace, tokenizer: Any, hidden: int, layers: int) -> dict[str, Any]:
    """Bytes of a float16 store for the plan run: its training subsets (seeds 1-5), real tokens each."""
    examples = load_train("sst2")
    per_seed = []
    for seed in range(1, 6):
        subset = stratified_subset(examples, args.plan_samples, seed)
        encoded = EncodedDataset(subset, tokenizer, args.max_length).encodings["input_ids"]
        per_seed.append([len(ids) for ids in encoded])
    means = [statistics.mean(lengths) for lengths in per_seed]
    itemsize = torch.finfo(torch.float16).bits // 8
    per_token_layer = hidden * itemsize
    return {
        "examples": args.plan_samples, "max_length": args.max_length, "hidden": hidden, "layers": layers,
        "mean_real_tokens_per_seed": means,
        "max_real_tokens": max(max(lengths) for lengths in per_seed),
        "bytes_per_token_and_layer": per_token_layer,
        "bytes_per_example_and_layer_mean": statistics.mean(means) * per_token_layer,
        "store_bytes_per_seed": [sum(lengths) * per_token_layer * layers for lengths in per_seed],
    }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args("warm_start", __doc__.splitlines()[0], extra_options, argv)
    if args.quick:
        args.train_samples, args.dev_samples, args.plan_samples, args.batch_size = 32, 32, 64, 16
    info = machine(args.device)
    print(describe(info))
    examples = stratified_subset(load_train("sst2"), args.train_samples, args.seed)
    dev = stratified_subset(load_clean_dev("sst2")["sst2"], args.dev_samples, 0)
    results = []
    plan = None
    for tol in args.tols:
        set_seed(args.seed)
        base, tokenizer = load_model(args.model, num_labels=2)
        im_bert(base, tol=tol)
        if args.no_dropout:
            for module in base.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if plan is None:
            plan = store_size_of_plan(args, tokenizer, base.config.hidden_size, len(find_layers(base)))
        sampler, loader = fine_tuning_batches(examples, tokenizer, args)
        steps = len(loader) * args.epochs
        torch.manual_seed(args.seed)  # the same RNG state for both runs' dropout
        runs = {"cold": Run(base, args, steps, warm=False),
                "warm": Run(copy.deepcopy(base), args, steps, warm=True)}  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # counted by the stats instead
            for epoch in range(args.epochs):
                sampler.set_epoch(epoch)
                for run in runs.values():
                    run.start_epoch()
                for number, batch in enumerate(loader):
                    for name in (("cold", "warm") if number % 2 == 0 else ("warm", "cold")):
                        runs[name].step(batch)
                    done = {n: r.epochs[-1]["evals"] / r.epochs[-1]["layer_solves"] for n, r in runs.items()}
                    print(f"tol {tol:g} epoch {epoch + 1} step {number + 1}/{len(loader)}: evals per layer "
                          f"solve so far, " + ", ".join(f"{n} {v:.2f}" for n, v in done.items()), flush=True)
                for run in runs.values():
                    run.end_epoch()
            for name, run in runs.items():
                run.model.eval()
                predictions = predict(run.model, tokenizer, dev, args.max_length)
                accuracy = sum(p == ex.label for p, ex in zip(predictions, dev)) / len(dev)
                results.append({"tol": tol, "start": name, "epochs": run.epochs, "dev_accuracy": accuracy,
                                "dev_predicted_1": sum(predictions) / len(dev),
                                "dev_predictions": predictions,
                                "store_bytes": run.store.nbytes if run.store else 0})  # fmt: skip
    rows = []
    by_tol = {tol: {r["start"]: r for r in results if r["tol"] == tol} for tol in args.tols}
    for tol, pair in by_tol.items():
        for name, result in pair.items():
            last = args.epochs - 1
            rows.append({
                "tol": f"{tol:g}", "start": name,
                **{f"e{e + 1}": result["epochs"][e]["evals_per_solve"] for e in range(args.epochs)},
                "cpu": result["epochs"][last]["cpu_s"] / pair["cold"]["epochs"][last]["cpu_s"],
                "store": result["store_bytes"] / 2**20, "acc": result["dev_accuracy"],
                "loss": result["epochs"][last]["mean_loss"], "ones": result["dev_predicted_1"],
                "agree": statistics.mean(
                    a == b for a, b in zip(result["dev_predictions"], pair["cold"]["dev_predictions"])
                ),
            })  # fmt: skip
    columns = [("tol", "tol", ""), ("start", "start", ""),
               *((f"e{e + 1}", f"evals/layer solve, epoch {e + 1}", ".2f") for e in range(args.epochs)),
               ("cpu", f"CPU time of epoch {args.epochs} steps / cold", ".3f"), ("store", "store MiB", ".2f"),
               ("loss", f"mean loss, epoch {args.epochs}", ".4f"),
               ("acc", f"dev accuracy ({args.dev_samples})", ".3f"),
               ("ones", "predicted 1", ".3f"), ("agree", "same predictions as cold", ".3f")]  # fmt: skip
    print(table(rows, columns))
    assert plan is not None
    tokens, total = plan["mean_real_tokens_per_seed"], [b / 1e6 for b in plan["store_bytes_per_seed"]]
    print(f"store for the plan run ({plan['examples']} examples, max length {plan['max_length']}, "
          f"{plan['layers']} layers x {plan['hidden']}, float16): "
          f"{plan['bytes_per_example_and_layer_mean']:.0f} bytes per example and layer on average (mean real "
          f"tokens {min(tokens):.1f}-{max(tokens):.1f} over seeds 1-5, at most {plan['max_real_tokens']}), "
          f"{min(total):.2f}-{max(total):.2f} MB in all")
    payload = {"benchmark": "warm_start", "command": args.command, "machine": info,
               "settings": {k: v for k, v in vars(args).items() if k not in ("command", "out")},
               "results": results, "plan_store": plan}  # fmt: skip
    payload["settings"]["tols"] = list(args.tols)
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
