"""Render the Markdown tables of BENCHMARKS.md from the JSON results of the other scripts.

``python -m bench.report [RESULT.json ...]`` (default: every ``bench/results/*.json``) prints, per file,
its command and machine and the tables, so each number in BENCHMARKS.md can be traced to a file and
the command that wrote it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import RESULTS_DIR, describe, fmt, table

DEFAULT_FINDER = "anderson"


def evals(value: float, cap: float) -> str:
    """An evaluation count, ``>cap`` when the tolerance was not reached."""
    return f">{cap:g}" if value == math.inf else f"{value:.1f}"


def implicit_step(data: dict[str, Any]) -> str:
    cap, tol = data["config"]["cap"], data["config"]["tol"]
    budgets = data["config"]["budgets"]
    out = []
    for framing in data["config"]["framings"]:
        rows = [dict(r) for r in data["over_layers"] if r["framing"] == framing]
        for r in rows:
            r["median"], r["worst"] = evals(r["evals_median"], cap), evals(r["evals_worst"], cap)
        rows.sort(key=lambda r: (r["step"], r["evals_median"], r["evals_worst"]))
        out.append(f"Framing `{framing}`: evaluations to relative residual {tol:g} (median over batches, "
                   f"then median and worst over layers), time per solve in layer-evaluation times, best "
                   f"residual within a budget of evaluations (median over layers):\n")
        out.append(table(rows, [("step", "s", "g"), ("finder", "finder", ""),
                                ("median", "evals (median layer)", ""), ("worst", "evals (worst layer)", ""),
                                ("layers_reached", "layers reaching tol", ""),
                                ("time_in_evals", "time / eval time", ".0f"),
                                *[(f"res@{b:g}", f"res after {b:g}", ".1e") for b in budgets]]))
        out.append("")
    finders = data["config"]["finders"]
    comparable = DEFAULT_FINDER in finders and any(name.startswith("gd") for name in finders)
    return "\n".join(out) + ("\n" + target_table(data) if comparable else "")


def target_table(data: dict[str, Any]) -> str:
    """Per layer at s = 1: the default finder's evaluations against gd's (target: <= 8 and <= gd / 3)."""
    cap = data["config"]["cap"]
    summary = [r for r in data["summary"] if r["step"] == 1.0]
    out = []
    for framing in data["config"]["framings"]:
        by_layer: dict[int, dict[str, dict[str, Any]]] = {}
        for r in summary:
            if r["framing"] == framing:
                by_layer.setdefault(r["layer"], {})[r["finder"]] = r
        rows = []
        for layer, finders in sorted(by_layer.items()):
            default = finders[DEFAULT_FINDER]["evals_to_tol"]
            gds = [r for name, r in finders.items() if name.startswith("gd")]
            gd_best = min(r["evals_to_tol"] for r in gds)
            ratio = gd_best / default if default != math.inf else math.nan
            rows.append({"layer": layer, "default": evals(default, cap), "gd": evals(gd_best, cap),
                         "ratio": (f">= {cap / default:.1f}" if gd_best == math.inf and default != math.inf
                                   else fmt(ratio, ".1f")),
                         "le8": "yes" if default <= 8 else "no",
                         "gd_residual": min(r["residual"] for r in gds),
                         "default_res5": finders[DEFAULT_FINDER]["res@5"]})
        out.append(f"Target check, framing `{framing}`, s = 1 ({DEFAULT_FINDER} vs the better gd variant):\n")
        out.append(table(rows, [("layer", "layer", "d"), ("default", f"{DEFAULT_FINDER} evals", ""),
                                ("gd", "gd evals", ""), ("ratio", "gd / default", ""),
                                ("le8", "<= 8 evals", ""),
                                ("gd_residual", f"gd residual after {cap:g}", ".1e"),
                                ("default_res5", f"{DEFAULT_FINDER} residual after 5", ".1e")]))
        out.append("")
    return "\n".join(out)


def training_overhead(data: dict[str, Any]) -> str:
    stock = data["stock"]
    head = (f"Stock model: training step {stock['step_ms']:.1f} ms, inference {stock['infer_ms']:.1f} ms, "
            f"peak memory {stock['peak_mb']:.0f} MiB (batch {data['config']['batch_size']}, max length "
            f"{data['config']['max_length']}); implicit layers use root finder `{data['default_root']}`, "
            f"tolerance {data['config']['tol'] or 'library default'}, max_iter "
            f"{data['config'].get('max_iter') or 'library default'}; memory: {data['memory_method']}.\n")
    rows = [dict(r, default="yes" if r["default"] else "") for r in data["rows"]]
    main = table(rows, [("config", "configuration", ""), ("default", "default grad", ""),
                        ("step_ratio", "train step x", ".2f"), ("infer_ratio", "inference x", ".2f"),
                        ("peak_ratio", "peak memory x", ".2f"), ("saved_ratio", "activations x", ".2f"),
                        ("evals_per_layer", "evals / implicit layer", ".1f"),
                        ("max_residual", "max residual", ".1e")])
    sweep = table(data["memory_vs_iterations"], [
        ("grad", "grad", ""), ("iterations", "forced iterations", "d"),
        ("peak_ratio", "peak memory x", ".2f"), ("saved_ratio", "activations x", ".2f"),
        ("fwd_bwd_ratio", "fwd+bwd memory x", ".2f")])
    return f"{head}\n{main}\n\nEvery layer implicit, root iterations forced:\n\n{sweep}\n"


def stiff(data: dict[str, Any]) -> str:
    out = []
    for name, result in data["problems"].items():
        rows = []
        for r in result["cheapest"]:
            row = dict(r)
            if r.get("dopri5 capped"):
                row["torchdiffeq dopri5"] = f"> {r['torchdiffeq dopri5'] or 0}"
            rows.append(row)
        out.append(f"`{name}` on [0, {result['t_end']:g}]: fewest f evaluations reaching each relative error "
                   f"(`-`: no run in the sweep did):\n")
        out.append(table(rows, [("target", "error <=", ".0e"), ("implicit_euler", "implicit_euler (NK)", "d"),
                                ("scipy BDF", "scipy BDF", "d"), ("scipy Radau", "scipy Radau", "d"),
                                ("torchdiffeq dopri5", "dopri5", ""),
                                ("dopri5 / implicit_euler", "dopri5 / implicit_euler", ".0f"),
                                ("implicit_euler seconds", "implicit_euler s", ".2f"),
                                ("scipy BDF seconds", "BDF s", ".3f"),
                                ("torchdiffeq dopri5 seconds", "dopri5 s", ".1f")]))
        out.append("\nAll runs:\n")
        out.append(table(result["runs"], [("method", "method", ""), ("setting", "setting", ""),
                                          ("evals", "f evals", "d"), ("seconds", "seconds", ".3f"),
                                          ("error", "rel. error", ".1e"), ("capped", "capped", "")]))
        out.append("")
    return "\n".join(out)


RENDERERS = {"implicit_step": implicit_step, "training_overhead": training_overhead, "stiff": stiff}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="*", type=Path)
    args = parser.parse_args(argv)
    files = args.files or sorted(RESULTS_DIR.glob("*.json"))
    for path in files:
        data = json.loads(path.read_text())
        print(f"### {path.name}\n\n`{data['command']}`  \n{describe(data['machine'])}\n")
        print(RENDERERS[data["benchmark"]](data))


if __name__ == "__main__":
    main()
