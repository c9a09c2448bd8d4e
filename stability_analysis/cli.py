"""``ode-bert analyze``: stability regions, perturbation growth and layer spectra of an encoder.

``analyze_command`` is the subcommand; ``ode-bert`` finds it through the ``ode_bert.commands`` entry point
(``pyproject.toml``), so ``ode_bert`` does not import this package. For example::

    ode-bert analyze --solvers euler,implicit_euler --perturbation noise,advglue --spectra --out results/

writes ``regions.png``, ``growth_<perturbation>.png`` and ``analysis.json`` (all numbers) into ``--out``.
Adding the arguments imports nothing heavy (``ode-bert --help`` stays fast); torch, the model and the
analysis modules load when the command runs.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _names(text: str, valid: list[str] | tuple[str, ...], what: str) -> list[str]:
    """Split a comma-separated list and check every item against ``valid``."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in valid]
    if not names or unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown) or repr(text)}; valid: {', '.join(valid)}")
    return names


def analyze_command(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], dict[str, Any]]:
    """stability regions, perturbation growth and layer spectra of an encoder per solver

    Adds the ``analyze`` options to ``parser`` and returns the handler, ``run_analyze`` (the contract of
    an ``ode_bert.commands`` entry point: the docstring's first line is the command's help).
    """
    parser.add_argument("--model", help="hub name or local path (default: the offline all-MiniLM-L6-v2)")
    parser.add_argument("--solvers", default="euler,implicit_euler",
                        help="comma-separated solver names (default euler,implicit_euler)")
    parser.add_argument("--perturbation", default="noise",
                        help="comma-separated kinds: noise (random), worst (gradient ascent), advglue (word "
                        "substitutions) (default noise)")
    parser.add_argument("--out", required=True, help="output directory for plots and analysis.json")
    parser.add_argument("--task", default="sst2", help="AdvGLUE task for the input sentences (default sst2)")
    parser.add_argument("--num-examples", type=int, default=8, help="sentences / pairs (default 8)")
    parser.add_argument("--max-length", type=int, default=32, help="maximum tokens per sentence (default 32)")
    parser.add_argument("--eps", type=float, default=0.01,
                        help="RMS per-token norm of the embedding perturbation (default 0.01)")
    parser.add_argument("--attack-steps", type=int, default=5, help="gradient-ascent steps of 'worst'")
    parser.add_argument("--step", type=float, default=1.0, help="ODE step size per layer (default 1.0)")
    parser.add_argument("--field", default="residual", choices=["residual", "layer"],
                        help="vector field framing (default residual: euler step 1 is the stock model)")
    parser.add_argument("--spectra", action="store_true",
                        help="also estimate layer-Jacobian spectra of the first sentence and plot "
                        "step*lambda of the rightmost eigenvalues on the stability regions")
    parser.add_argument("--spectra-k", type=int, default=4,
                        help="rightmost (largest real part) eigenvalues per layer (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--data-dir", help="data directory (default: $ODE_BERT_DATA_DIR or ../shared/data)")
    return run_analyze


def _json_number(value: float) -> float | str:
    """JSON has no infinity: write it as the string "inf"."""
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


OVERLAY_CAPTION = (
    "points: step·λ = {step:g}·λ for the {k} rightmost eigenvalues (largest real part)\n"
    "of each layer's field Jacobian at the first sentence; α = spectral abscissa max Re λ\n"
    "(> 0: the linearised flow grows). The largest-magnitude eigenvalues, which bound\n"
    "explicit steps, are not shown."
)


def run_analyze(args: argparse.Namespace) -> dict[str, Any]:
    """Run the analysis described by ``args``, write plots and ``analysis.json``; return the numbers."""
    from matplotlib.figure import Figure

    import solvers
    from ode_bert import DEFAULT_MODEL, load_model

    from .functions import stability_function
    from .perturbation import PERTURBATIONS, advglue_pairs, perturbation_growth, plot_growth
    from .regions import plot_stability_region
    from .spectra import layer_spectra, region_overlay, spectral_abscissa

    solver_names = _names(args.solvers, solvers.available(), "solver(s)")
    kinds = _names(args.perturbation, PERTURBATIONS, "perturbation(s)")
    if args.num_examples < 1 or args.max_length < 4 or args.eps <= 0:
        raise ValueError("--num-examples must be >= 1, --max-length >= 4 and --eps > 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model)
    model.eval()
    texts = [clean for clean, _ in advglue_pairs(args.task, args.data_dir)[: args.num_examples]]
    report: dict[str, Any] = {"model": args.model or DEFAULT_MODEL, "solvers": solver_names,
                              "step": args.step, "field": args.field, "eps": args.eps, "texts": texts}

    with_tableau = [n for n in solver_names if solvers.METHODS.lookup(n).tableau is not None]
    report["stability"] = {
        name: {k: _json_number(v) if isinstance(v, float) else v
               for k, v in stability_function(name).properties().items()}
        for name in with_tableau
    }

    report["growth"] = {}
    for kind in kinds:
        curves = perturbation_growth(
            model, tokenizer, texts, solver_names, kind, eps=args.eps, max_length=args.max_length,
            attack_steps=args.attack_steps, seed=args.seed, step=args.step, field=args.field,
            advglue_task=args.task, max_pairs=args.num_examples, data_dir=args.data_dir,
        )
        report["growth"][kind] = {name: curve.to_dict() for name, curve in curves.items()}
        figure = Figure(figsize=(6, 4))
        plot_growth(curves, ax=figure.add_subplot())
        figure.savefig(out / f"growth_{kind}.png", dpi=120, bbox_inches="tight")
        for name, curve in curves.items():
            print(f"{kind:>8} {name:<18} growth per layer: " + " ".join(f"{v:.3f}" for v in curve.mean))

    overlay = None
    if args.spectra:
        encoded = tokenizer(texts[:1], truncation=True, max_length=args.max_length, return_tensors="pt")
        spectra = layer_spectra(model, encoded["input_ids"], encoded["attention_mask"], k=args.spectra_k,
                                framing=args.field, which="LR")
        report["spectra"] = [{**s.to_dict(), "spectral_abscissa": spectral_abscissa(s)} for s in spectra]
        overlay = region_overlay(spectra, args.step)
        for s in spectra:
            print(f"layer {s.layer}: ||J||_2 = {s.spectral_norm:.3f}, mu_2(J) = {s.log_norm:.3f}, "
                  f"spectral abscissa max Re(lambda) = {spectral_abscissa(s):+.3f}")
    if with_tableau:
        figure = Figure(figsize=(7, 6))
        plot_stability_region(with_tableau, ax=figure.add_subplot(), overlay=overlay)
        if overlay is not None:
            figure.text(0.5, 0.0, OVERLAY_CAPTION.format(k=args.spectra_k, step=args.step), ha="center",
                        va="top", fontsize="small")  # below the axes; bbox_inches="tight" keeps it
        figure.savefig(out / "regions.png", dpi=120, bbox_inches="tight")
    (out / "analysis.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'analysis.json'} and plots to {out}")
    return report
