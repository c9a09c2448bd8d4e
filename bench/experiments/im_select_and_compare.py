"""Choose the IM-connection on held-out training data, then compare it with BERT over seeds.

Phase 1 fine-tunes one IM candidate per (field, step) on a seeded low-resource SST-2 subset with part of it
held out, and keeps the candidate with the best held-out accuracy (dev and AdvGLUE are never looked at).
Phase 2 runs BERT and the chosen IM-model on the same data for every seed, pair by pair, so an interrupted
run still leaves complete pairs. ``results.json`` in ``--out`` is rewritten atomically after every run.

    python bench/experiments/im_select_and_compare.py --out runs/im_sst2 [--model DIR] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ode_bert.compare import paired_difference
from ode_bert.evaluate import evaluate
from ode_bert.train import TrainConfig, train, write_json_atomic

CANDIDATES = [
    {"field": "residual", "step": 1.0},
    {"field": "residual", "step": 0.5},
    {"field": "layer", "step": 0.25},
]


def run(out: Path, name: str, dev_samples: int | None = None, **options: Any) -> dict[str, Any]:
    """Train and evaluate one configuration (skipped when its metrics already exist)."""
    run_dir = out / name
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        start = time.perf_counter()
        evaluate(train(TrainConfig(output_dir=str(run_dir), **options)), dev_samples=dev_samples)
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    return json.loads(metrics_path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", help="model path or hub name (default: offline MiniLM)")
    parser.add_argument("--data-dir", help="data directory (default: ODE_BERT_DATA_DIR or ../shared/data)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="phase 2 seeds")
    parser.add_argument("--train-samples", type=int, default=500, help="low-resource training size")
    parser.add_argument("--selection-train-samples", type=int, default=400,
                        help="phase 1 training size, a quarter of it held out")
    parser.add_argument("--select-only", action="store_true", help="stop after choosing (phase 1)")
    parser.add_argument("--max-iter", type=int, default=10, help="iteration cap of the implicit solve")
    args = parser.parse_args()
    out = Path(args.out)
    common = {"task": "sst2", "model": args.model, "data_dir": args.data_dir, "epochs": 2,
              "batch_size": 32, "lr": 2e-4, "max_length": 64, "train_samples": args.train_samples}
    settings = {**common, "max_iter": args.max_iter, "selection_train_samples": args.selection_train_samples}
    results: dict[str, Any] = {"settings": settings, "selection": [], "pairs": []}

    for candidate in CANDIDATES:
        name = f"select-im-{candidate['field']}-s{candidate['step']}"
        options = {**common, "train_samples": args.selection_train_samples}
        # only the held-out score matters here; a small dev subset keeps the run short
        metrics = run(out, name, dev_samples=100, variant="im", seed=1, holdout=0.25, max_iter=args.max_iter,
                      **options, **candidate)
        heldout = metrics["heldout"]
        results["selection"].append(
            {**candidate, "heldout_acc": heldout["overall"], "solver": heldout["solver"]}
        )
        write_json_atomic(out / "results.json", results)
    best = max(results["selection"], key=lambda c: c["heldout_acc"])
    chosen = {"field": best["field"], "step": best["step"]}
    results["chosen"] = chosen
    print("chosen on held-out data:", chosen, flush=True)
    if args.select_only:
        return

    for seed in args.seeds:
        bert = run(out, f"bert-seed{seed}", variant="bert", seed=seed, **common)
        im = run(out, f"im-seed{seed}", variant="im", seed=seed, max_iter=args.max_iter, **common,
                 **chosen)
        results["pairs"].append({"seed": seed, **{
            f"{variant}_{metric}": 100 * m[metric]["overall"]
            for variant, m in (("bert", bert), ("im", im)) for metric in ("clean", "advglue")
        }, "im_solver": im["advglue"]["solver"]})
        pairs = results["pairs"]
        results["paired_difference"] = {
            m: paired_difference([p[f"im_{m}"] for p in pairs], [p[f"bert_{m}"] for p in pairs])
            for m in ("clean", "advglue")
        }
        write_json_atomic(out / "results.json", results)
    print(json.dumps(results, indent=1, default=str), flush=True)


if __name__ == "__main__":
    main()
