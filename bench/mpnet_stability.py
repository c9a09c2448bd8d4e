"""Layer spectra and perturbation growth of all-mpnet-base-v2 (12 layers, hidden 768) beside
all-MiniLM-L6-v2 (6 layers, hidden 384), on real AdvGLUE SST-2 sentences.

    python -m bench.mpnet_stability [--sentences 3] [--max-length 12] [--pairs 8] [--threads 1]

Per model and layer, in the residual framing ``f_l(h) = Layer_l(h) - h`` (``euler`` with step 1 is the
stock model):

* the rightmost eigenvalue of the Jacobian ``J = df_l/dh`` at the state the layer sees on the model's
  own forward pass (its real part is the spectral abscissa, the growth rate of the exact flow's most
  amplified mode), by Arnoldi (ARPACK ``eigs``, ``which="LR"``) on the matrix-free JVP operator of
  ``stability_analysis.JacobianOperator``, for each of ``--sentences`` clean AdvGLUE SST-2 sentences cut to
  ``--max-length`` tokens (the Jacobian has ``tokens x hidden`` rows, so short sentences keep it cheap);
* the logarithmic 2-norm ``mu_2(J)`` (Lanczos), the bound ``Re lambda <= mu_2`` that decides contraction
  for every perturbation, not only eigenvectors;
* the growth factor of a real perturbation per layer, ``(||h'_l - h_l|| / ||h'_{l-1} - h_{l-1}||)``
  (geometric mean over ``--pairs`` AdvGLUE clean/adversarial word-substitution pairs,
  ``stability_analysis.perturbation_growth``), for the stock model and for EX-BERT and IM-BERT at
  ``im_bert``'s defaults (step 0.5; implicit: at most 20 iterations, tol 1e-2 since ode-bert 0.2.0; the
  committed results were measured at the former 1e-4).

Writes ``bench/results/mpnet-stability.json`` (``mpnet-stability-quick.json`` with ``--quick``) and prints
one table per model. Progress (one line per layer and sentence) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigs

from bench._common import RESULTS_DIR, describe, machine, parse_args, table

NAME = "mpnet_stability"
OUT = RESULTS_DIR / "mpnet-stability.json"
# (label, name for ode_bert.load_model): None is the default offline all-MiniLM-L6-v2
MODELS = (("all-MiniLM-L6-v2", None), ("all-mpnet-base-v2", "all-mpnet-base-v2"))
ARNOLDI_TOL = 1e-3  # relative accuracy of the Ritz values: three digits, a third fewer JVPs than 1e-5


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sentences", type=int, default=3, help="sentences for the spectra (default 3)")
    parser.add_argument("--max-length", type=int, default=12,
                        help="tokens per sentence for the spectra, [CLS] and [SEP] included (default 12)")
    parser.add_argument("--pairs", type=int, default=8, help="AdvGLUE pairs for the growth (default 8)")
    parser.add_argument("--growth-max-length", type=int, default=48,
                        help="tokens per sentence for the growth (default 48)")
    parser.add_argument("--models", default="minilm,mpnet", help="comma-separated: minilm, mpnet")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $ODE_BERT_DATA_DIR)")


def rightmost_eigenvalue(operator: Any, tol: float = ARNOLDI_TOL) -> tuple[complex, int]:
    """The eigenvalue of largest real part of ``operator`` (a ``JacobianOperator``) and the JVPs it took.

    Two Ritz values are asked for (one alone converges poorly when the top two real parts are close).
    """
    linear = operator.linear_operator()
    count = 0

    def counted(vector: np.ndarray) -> np.ndarray:
        nonlocal count
        count += 1
        return linear.matvec(vector)

    values = eigs(LinearOperator(linear.shape, matvec=counted, dtype=np.float64), k=2, which="LR", tol=tol,
                  return_eigenvectors=False)
    return complex(values[np.argmax(values.real)]), count


def layer_spectra(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
                  label: str) -> list[dict[str, Any]]:
    """Per layer and sentence: rightmost eigenvalue, log norm, JVPs and seconds."""
    from ode_bert import LayerField
    from stability_analysis.spectra import JacobianOperator, log_norm

    rows = []
    for index, text in enumerate(texts):
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        captured = LayerField.capture(model, "residual", **encoded)
        for layer, (field, h) in enumerate(captured):
            start = time.perf_counter()
            operator = JacobianOperator(lambda x, f=field: f(0.0, x), h)
            value, jvps = rightmost_eigenvalue(operator)
            mu = log_norm(operator)
            seconds = time.perf_counter() - start
            rows.append({"layer": layer, "sentence": index, "tokens": int(h.shape[-2]), "rightmost_real":
                         value.real, "rightmost_imag": value.imag, "log_norm": mu, "arnoldi_jvps": jvps,
                         "seconds": seconds})
            print(f"{label} sentence {index} layer {layer}: Re lambda_max {value.real:.4f}, mu_2 {mu:.3f} "
                  f"({jvps} JVPs, {seconds:.1f} s)", file=sys.stderr, flush=True)
    return rows


def growth_factors(model: torch.nn.Module, tokenizer: Any, pairs: int, max_length: int,
                   data_dir: str | None) -> dict[str, Any]:
    """Per-layer growth of the AdvGLUE perturbation: stock model, EX-BERT and IM-BERT (im_bert defaults)."""
    from ode_bert.settings import ODESettings
    from stability_analysis import perturbation_growth

    im = ODESettings.preset("im")
    common = {"perturbation": "advglue", "max_length": max_length, "max_pairs": pairs, "data_dir": data_dir,
              "field": "residual"}
    stock = perturbation_growth(model, tokenizer, solver_names=["euler"], step=1.0, **common)["euler"]
    ode = perturbation_growth(model, tokenizer, solver_names=["euler", im.solver], step=im.step,
                              convert_options={im.solver: {"tol": im.tol, "max_iter": im.max_iter}}, **common)
    result = {}
    for name, curve in (("stock", stock), ("ex", ode["euler"]), ("im", ode[im.solver])):
        per_layer = curve.ratios[:, 1:] / curve.ratios[:, :-1]  # (pairs, layers)
        result[name] = {
            "factor": np.exp(np.log(per_layer).mean(axis=0)).tolist(),  # geometric mean over pairs
            "total": float(np.exp(np.log(curve.ratios[:, -1]).mean())),
            "pairs": int(curve.ratios.shape[0]),
            "max_residual": curve.max_residual,
        }
    return result


def summary_rows(spectra: list[dict[str, Any]], growth: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per layer: spectra averaged (and the largest real part) over sentences, growth factors."""
    layers = sorted({row["layer"] for row in spectra})
    rows = []
    for layer in layers:
        mine = [row for row in spectra if row["layer"] == layer]
        real = [row["rightmost_real"] for row in mine]
        rows.append({
            "layer": layer,
            "re_mean": float(np.mean(real)),
            "re_max": float(np.max(real)),
            "mu_mean": float(np.mean([row["log_norm"] for row in mine])),
            "g_stock": growth["stock"]["factor"][layer],
            "g_ex": growth["ex"]["factor"][layer],
            "g_im": growth["im"]["factor"][layer],
        })
    return rows


COLUMNS = [("layer", "layer", "d"), ("re_mean", "Re λ_max (mean)", ".3f"),
           ("re_max", "Re λ_max (max)", ".3f"), ("mu_mean", "μ₂ (mean)", ".2f"),
           ("g_stock", "growth stock", ".3f"), ("g_ex", "growth EX 0.5", ".3f"),
           ("g_im", "growth IM 0.5", ".3f")]


def write_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON through a temporary file and a rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(payload, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(NAME, __doc__.splitlines()[0], _options, argv)
    if args.out == RESULTS_DIR / f"{NAME}.json":  # not given: this benchmark's own file name
        args.out = OUT
    elif args.out == RESULTS_DIR / f"{NAME}-quick.json":
        args.out = OUT.with_name(OUT.stem + "-quick.json")
    if args.quick:
        args.sentences, args.max_length, args.pairs = 1, 6, 2
    chosen = [label for label in args.models.split(",") if label]
    known = {"minilm": MODELS[0], "mpnet": MODELS[1]}
    unknown = [label for label in chosen if label not in known]
    if unknown or not chosen or args.sentences < 1 or args.pairs < 1 or args.max_length < 4:
        raise SystemExit(f"--models takes {', '.join(known)} (got {args.models!r}); --sentences and --pairs "
                         f"must be >= 1 and --max-length >= 4")
    if args.model is not None:
        raise SystemExit("--model is not used here: --models chooses among minilm and mpnet")

    from ode_bert import load_model
    from stability_analysis.perturbation import advglue_pairs

    texts = [clean for clean, _ in advglue_pairs("sst2", args.data_dir)[: args.sentences]]
    results: dict[str, Any] = {"benchmark": NAME, "command": args.command, "machine": machine(args.device),
                               "texts": texts, "max_length": args.max_length, "pairs": args.pairs,
                               "growth_max_length": args.growth_max_length, "arnoldi_tol": ARNOLDI_TOL,
                               "models": {}}
    for label in chosen:
        title, name = known[label]
        start = time.perf_counter()
        model, tokenizer = load_model(name)
        model.eval()
        growth = growth_factors(model, tokenizer, args.pairs, args.growth_max_length, args.data_dir)
        print(f"{title}: growth done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        spectra = layer_spectra(model, tokenizer, texts, args.max_length, title)
        rows = summary_rows(spectra, growth)
        results["models"][title] = {"spectra": spectra, "growth": growth, "table": rows,
                                    "seconds": time.perf_counter() - start}
        print(f"\n{title} ({len(rows)} layers; spectra of {len(texts)} sentences of <= {args.max_length} "
              f"tokens, growth over {growth['stock']['pairs']} AdvGLUE pairs)")
        print(table(rows, COLUMNS))
        print("total growth over all layers: " + ", ".join(
            f"{name} {value['total']:.3f}" for name, value in growth.items())
            + f"; IM worst root residual {growth['im']['max_residual']:.1e}")
    print(f"\nmachine: {describe(results['machine'])}")
    write_atomic(Path(args.out), results)


if __name__ == "__main__":
    main()
