"""Did a run that predicts one label learn nothing, or does it rank the examples behind a collapsed decision
margin? Per run, on the clean dev set in evaluation mode (binary tasks):

* accuracy, and the share of the most predicted label;
* the AUC of the logit margin (logit of label 1 minus logit of label 0): 0.5 is no ranking at all;
* the accuracy of the best threshold on that margin, chosen on the same examples (an upper bound, for scale);
* the spread of the margin (median and interquartile range): a collapsed model's margins barely differ;
* per layer, how alike the first token's hidden states of different examples are (mean pairwise cosine
  similarity, from the embeddings to the last layer): where the representation collapses;
* the same for the last layer's own output ``Layer(h)``, before the connection mixes it with its input:
  the hidden state is ``h' = h + s (Layer(h') - h')`` for an implicit Euler step of the residual framing,
  ``h + s (Layer(h) - h)`` for an explicit one, ``Layer(h)`` for a stock layer. A connection with ``s < 1``
  keeps part of the layer's input, which for the first token is nearly the same for every sentence, so its
  hidden state is more alike across examples than the layer's output is (``Layer`` is recovered from the
  two states, exactly for ``euler``, to the solve's tolerance for ``implicit_euler``; other methods: none).

    R=runs/v030/sst2-n1000
    python -m bench.separation $R/im-tol1e-2-seed12 $R/im-tol1e-2-seed14 --out separation.md
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch.utils.data import DataLoader

from ode_bert.convert import ode_config
from ode_bert.data import get_task, load_clean_dev, stratified_subset
from ode_bert.encoding import Collator, EncodedDataset
from ode_bert.evaluate import DEV_SUBSET_SEED, load_run_model
from ode_bert.io import atomic_open
from ode_bert.layers import parse_layers
from ode_bert.settings import ODESettings
from ode_bert.train import MODEL_DIR, read_train_config

RECOVERABLE = {"euler", "implicit_euler"}  # one-stage steps, whose layer output the two states determine


def last_layer_output(before: torch.Tensor, after: torch.Tensor, settings: ODESettings | None,
                      layers: int) -> torch.Tensor | None:
    """The last of ``layers`` layers' output from its input ``before`` and the hidden state ``after`` it (see
    the module docstring); ``None`` where the step's method does not determine it."""
    if settings is None or layers - 1 not in parse_layers(settings.layers, layers):
        return after  # a stock layer: the hidden state is its output
    if settings.solver not in RECOVERABLE:
        return None
    change = (after - before) / settings.step
    if settings.field == "layer":  # f = Layer: h' - h = s Layer(h or h')
        return change
    evaluated_at = after if settings.solver == "implicit_euler" else before
    return evaluated_at + change  # f = Layer(h) - h


def auc(margins: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a random label-1 example has a larger margin than a random label-0 one, ties
    counting one half (the Mann-Whitney statistic over the number of pairs)."""
    positive, negative = margins[labels == 1], margins[labels == 0]
    if not len(positive) or not len(negative):
        raise ValueError("the AUC needs examples of both labels")
    ranks = rankdata(margins)  # tied margins share their mean rank
    rank_sum = ranks[labels == 1].sum() - len(positive) * (len(positive) + 1) / 2
    return float(rank_sum / (len(positive) * len(negative)))


def best_threshold_accuracy(margins: np.ndarray, labels: np.ndarray) -> float:
    """The highest accuracy of predicting label 1 for margins above some threshold, the threshold chosen on
    these same examples (every cut between sorted margins, and all-one-label)."""
    cuts = np.concatenate([[-np.inf], np.unique(margins)])
    return float(max(((margins > cut) == labels).mean() for cut in cuts))


def mean_pairwise_cosine(states: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of distinct rows of ``states`` (examples x features)."""
    if len(states) < 2:
        raise ValueError("pairwise similarity needs at least two examples")
    unit = torch.nn.functional.normalize(states.double(), dim=-1)
    total = unit.sum(0)
    n = len(unit)
    return float((total @ total - n) / (n * (n - 1)))  # sum over i != j of <u_i, u_j>


def check_run(run_dir: Path) -> None:
    """A clear error, before any work, for a folder that is not a finished run of a binary task."""
    if not (run_dir / MODEL_DIR / "config.json").is_file():
        raise ValueError(f"{run_dir} is not a finished training run (no {MODEL_DIR}/config.json)")
    task = get_task(read_train_config(run_dir)["task"])
    if task.num_labels != 2:
        raise ValueError(f"{run_dir}: task {task.name} has {task.num_labels} labels; the margin needs two")


def probe_run(run_dir: Path, data_dir: str | None, limit: int | None, batch_size: int) -> dict[str, Any]:
    """The figures of the module docstring for one finished run (checked by ``check_run``), on its clean dev
    split (a fixed stratified subset of ``limit`` examples if given, the one ``evaluate --dev-samples``
    scores)."""
    config = read_train_config(run_dir)
    splits = load_clean_dev(config["task"], data_dir if data_dir is not None else config.get("data_dir"))
    (examples,) = splits.values()  # binary tasks have one dev split (MNLI's two are of a 3-label task)
    if limit is not None:
        examples = stratified_subset(examples, min(limit, len(examples)), DEV_SUBSET_SEED)
    labels = np.array([ex.label for ex in examples])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_run_model(run_dir / MODEL_DIR)
    model.to(device).eval()
    loader = DataLoader(EncodedDataset(examples, tokenizer, config["max_length"]), batch_size=batch_size,
                        collate_fn=Collator(tokenizer))  # fmt: skip
    margins, first_tokens = [], []
    with torch.no_grad():
        for batch in loader:
            batch.pop("labels", None)
            out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True)
            margins.append((out.logits[:, 1] - out.logits[:, 0]).float().cpu())
            # the first token of every hidden state: (layers + 1, batch, width)
            first_tokens.append(torch.stack([h[:, 0] for h in out.hidden_states]).float().cpu())
    margin = torch.cat(margins).numpy()
    states = torch.cat(first_tokens, dim=1)
    stored = ode_config(model)  # the conversion the model was loaded with
    settings = None if stored is None else ODESettings.from_dict(stored)
    output = last_layer_output(states[-2], states[-1], settings, len(states) - 1)
    predicted = (margin > 0).astype(int)
    return {
        "run": run_dir.name,
        "n": len(labels),
        "accuracy": float((predicted == labels).mean()),
        "one_label_share": float(max(predicted.mean(), 1 - predicted.mean())),
        "auc": auc(margin, labels),
        "best_threshold_accuracy": best_threshold_accuracy(margin, labels),
        "margin_quartiles": [float(q) for q in np.percentile(margin, [25, 50, 75])],
        "first_token_cosine": [mean_pairwise_cosine(layer) for layer in states],
        "last_layer_output_cosine": None if output is None else mean_pairwise_cosine(output),
    }


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Two tables: the margin figures per run, and the first-token similarity per run and layer."""
    layers = len(rows[0]["first_token_cosine"])
    lines = ["| run | dev examples | accuracy | one label | AUC | best threshold | margin median [IQR] |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        q1, median, q3 = r["margin_quartiles"]
        lines.append(f"| {r['run']} | {r['n']} | {100 * r['accuracy']:.2f} | "
                     f"{100 * r['one_label_share']:.0f}% | {r['auc']:.3f} | "
                     f"{100 * r['best_threshold_accuracy']:.2f} | "
                     f"{median:+.2f} [{q1:+.2f}, {q3:+.2f}] |")  # fmt: skip
    heads = ["embeddings", *(f"layer {i}" for i in range(1, layers))]
    lines += ["", "| run | " + " | ".join(heads) + " | last layer's own output |",
              "|---|" + "---|" * (layers + 1)]
    for r in rows:
        own = r["last_layer_output_cosine"]
        cells = [f"{c:.3f}" for c in r["first_token_cosine"]] + ["–" if own is None else f"{own:.3f}"]
        lines.append(f"| {r['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders ('ode-bert train')")
    parser.add_argument("--data-dir", help="data directory (default: each run's own)")
    parser.add_argument("--limit", type=int, help="a fixed stratified subset of this many dev examples")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 2:
        parser.error(f"--limit must be at least 2, got {args.limit}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    for run in args.runs:
        check_run(run)
    rows = []
    for i, run in enumerate(args.runs, 1):
        start = time.perf_counter()
        rows.append(probe_run(run, args.data_dir, args.limit, args.batch_size))
        seconds = time.perf_counter() - start
        print(f"[{i}/{len(args.runs)}] {run}: {seconds:.0f} s", file=sys.stderr, flush=True)
    text = markdown(rows)
    if args.out is not None:
        with atomic_open(args.out) as f:
            f.write(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
