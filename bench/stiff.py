"""Stiff ODEs: function evaluations and wall time to reach a given accuracy, per solver.

Problems: Robertson's chemical kinetics on ``[0, 40]`` and Van der Pol with ``mu = 1000``
(``y1' = y2``, ``y2' = mu (1 - y1^2) y2 - y1``, ``y(0) = (2, 0)``) on ``[0, T_vdp]`` (default 20, inside
the first slow phase). Error: the largest component-wise relative error at the final time against
``scipy.integrate.solve_ivp(method="Radau", rtol=1e-10, atol=1e-14)``.

Solvers: ``implicit_euler`` (``solvers.odeint``, root finder ``newton_krylov``, fixed steps on a uniform
or a geometric grid, several step counts); ``solve_ivp`` ``BDF`` and ``Radau`` (several ``rtol``,
finite-difference Jacobians); torchdiffeq ``dopri5`` (several ``rtol``, at most ``--dopri-max-steps``
steps: a capped run is reported as such, its evaluations a lower bound).

Counting: every call of ``f`` on one state is one evaluation (scipy's finite-difference Jacobian
columns included); a forward-mode Jacobian-vector product through ``f`` (``torch.func.jvp``, as
newton_krylov uses) counts 2, the primal and the tangent.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchdiffeq
from scipy.integrate import solve_ivp

import solvers
from bench._common import describe, machine, parse_args, table, write_json


@dataclass(frozen=True)
class Problem:
    """A stiff test problem written once for numpy (scipy) and torch."""

    name: str
    y0: tuple[float, ...]
    t_end: float
    rhs_np: Callable[[float, np.ndarray], np.ndarray]
    rhs_torch: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    first_step: float  # first step of the geometric grid


def robertson_np(t: float, y: np.ndarray) -> np.ndarray:
    return np.array([-0.04 * y[0] + 1e4 * y[1] * y[2],
                     0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,
                     3e7 * y[1] ** 2])


def robertson_torch(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([-0.04 * y[0] + 1e4 * y[1] * y[2],
                        0.04 * y[0] - 1e4 * y[1] * y[2] - 3e7 * y[1] ** 2,
                        3e7 * y[1] ** 2])


MU = 1000.0


def vdp_np(t: float, y: np.ndarray) -> np.ndarray:
    return np.array([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])


def vdp_torch(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.stack([y[1], MU * (1 - y[0] ** 2) * y[1] - y[0]])


class Counter:
    """Wraps a right-hand side and counts its cost in evaluations (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.evals = 0

    def __call__(self, t: Any, y: Any) -> Any:
        dual = isinstance(y, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(y)
        self.evals += 2 if dual else 1
        return self.fn(t, y)


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    """Largest component-wise relative error."""
    return float(np.max(np.abs(y - ref) / np.abs(ref)))


def run_implicit_euler(problem: Problem, steps: int, grid: str) -> dict[str, Any]:
    f = Counter(problem.rhs_torch)
    if grid == "uniform":
        t = torch.linspace(0.0, problem.t_end, steps + 1, dtype=torch.float64)
    else:
        t = torch.cat([torch.zeros(1, dtype=torch.float64),
                       torch.logspace(math.log10(problem.first_step), math.log10(problem.t_end), steps,
                                      dtype=torch.float64)])
    y0 = torch.tensor(problem.y0, dtype=torch.float64)
    start = time.perf_counter()
    ys, stats = solvers.odeint(f, y0, t, method="implicit_euler", root="newton_krylov")
    seconds = time.perf_counter() - start
    return {"method": "implicit_euler", "setting": f"{grid} {steps} steps", "evals": f.evals,
            "seconds": seconds, "y": ys[-1].numpy(), "capped": False,
            "unconverged_steps": stats.unconverged_steps}


def run_scipy(problem: Problem, method: str, rtol: float) -> dict[str, Any]:
    f = Counter(problem.rhs_np)
    start = time.perf_counter()
    sol = solve_ivp(f, (0.0, problem.t_end), problem.y0, method=method, rtol=rtol, atol=1e-10)
    seconds = time.perf_counter() - start
    return {"method": f"scipy {method}", "setting": f"rtol {rtol:g}", "evals": f.evals, "seconds": seconds,
            "y": sol.y[:, -1], "capped": not sol.success}


def run_dopri5(problem: Problem, rtol: float, max_steps: int) -> dict[str, Any]:
    f = Counter(problem.rhs_torch)
    y0 = torch.tensor(problem.y0, dtype=torch.float64)
    t = torch.tensor([0.0, problem.t_end], dtype=torch.float64)
    start = time.perf_counter()
    try:
        y = torchdiffeq.odeint(f, y0, t, method="dopri5", rtol=rtol, atol=1e-10,
                               options={"max_num_steps": max_steps})[-1].numpy()
        capped = False
    except AssertionError:  # torchdiffeq's "max_num_steps exceeded"
        y, capped = np.full(len(problem.y0), np.nan), True
    seconds = time.perf_counter() - start
    return {"method": "torchdiffeq dopri5", "setting": f"rtol {rtol:g}", "evals": f.evals, "seconds": seconds,
            "y": y, "capped": capped}


def cheapest(runs: list[dict[str, Any]], method: str, target: float) -> dict[str, Any] | None:
    """The run of ``method`` with the fewest evaluations whose error is at most ``target``."""
    ok = [r for r in runs if r["method"] == method and not r["capped"] and r["error"] <= target]
    return min(ok, key=lambda r: r["evals"]) if ok else None


def extra_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vdp-end", type=float, default=20.0, help="final time of Van der Pol")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800, 1600])
    parser.add_argument("--rtols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8])
    parser.add_argument("--dopri-rtols", type=float, nargs="+", default=[1e-3, 1e-5, 1e-7])
    parser.add_argument("--dopri-max-steps", type=int, default=200_000)
    parser.add_argument("--targets", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4, 1e-6])


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args("stiff", __doc__.splitlines()[0], extra_options, argv)
    if args.quick:
        args.vdp_end, args.steps, args.rtols, args.dopri_rtols = 2.0, [8, 16], [1e-3], [1e-3]
        args.dopri_max_steps, args.targets = 200, [1e-2]
    warnings.filterwarnings("ignore", category=solvers.ConvergenceWarning)
    info = machine("cpu")  # the ODE states are a few numbers: CPU only, whatever --device says
    print(describe(info))
    problems = [
        Problem("robertson", (1.0, 0.0, 0.0), 40.0, robertson_np, robertson_torch, 1e-6),
        Problem("vanderpol_mu1000", (2.0, 0.0), args.vdp_end, vdp_np, vdp_torch, 1e-6),
    ]
    results: dict[str, Any] = {}
    for problem in problems:
        reference = solve_ivp(problem.rhs_np, (0.0, problem.t_end), problem.y0, method="Radau",
                              rtol=1e-10, atol=1e-14).y[:, -1]
        runs = []
        for grid in ("uniform", "geometric"):
            runs += [run_implicit_euler(problem, n, grid) for n in args.steps]
        for method in ("BDF", "Radau"):
            runs += [run_scipy(problem, method, rtol) for rtol in args.rtols]
        runs += [run_dopri5(problem, rtol, args.dopri_max_steps) for rtol in args.dopri_rtols]
        for r in runs:
            r["error"] = relative_error(r["y"], reference)
            r["y"] = [float(v) for v in r["y"]]
        print(f"\n{problem.name} on [0, {problem.t_end:g}] (reference y(T) = {reference.tolist()})")
        print(table(runs, [("method", "method", ""), ("setting", "setting", ""), ("evals", "f evals", "d"),
                           ("seconds", "seconds", ".3f"), ("error", "rel. error", ".1e"),
                           ("capped", "capped", "")]))
        best = []
        for target in args.targets:
            row: dict[str, Any] = {"target": target}
            for method in ("implicit_euler", "scipy BDF", "scipy Radau", "torchdiffeq dopri5"):
                hit = cheapest(runs, method, target)
                row[method] = hit["evals"] if hit else None
                row[f"{method} seconds"] = hit["seconds"] if hit else None
            dopri, euler = row["torchdiffeq dopri5"], row["implicit_euler"]
            capped = [r["evals"] for r in runs if r["method"] == "torchdiffeq dopri5" and r["capped"]]
            if dopri is None and capped:  # it would need more than it spent before the cap
                dopri = min(capped)
                row["dopri5 capped"] = True
            row["dopri5 / implicit_euler"] = dopri / euler if dopri and euler else None
            best.append(row)
        print("\nFewest evaluations reaching each relative error (- : none of the runs did):")
        print(table(best, [("target", "error <=", ".0e"), ("implicit_euler", "implicit_euler", "d"),
                           ("scipy BDF", "BDF", "d"), ("scipy Radau", "Radau", "d"),
                           ("torchdiffeq dopri5", "dopri5", "d"), ("dopri5 capped", "dopri5 capped", ""),
                           ("dopri5 / implicit_euler", "dopri5 / IE", ".0f")]))
        results[problem.name] = {"t_end": problem.t_end, "reference": reference.tolist(), "runs": runs,
                                 "cheapest": best}
    write_json(args.out, {
        "benchmark": "stiff",
        "command": args.command,
        "machine": info,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "device", "model", "command")},
        "counting": "f calls; a forward-mode JVP through f counts 2; scipy finite-difference columns 1 each",
        "problems": results,
    })


if __name__ == "__main__":
    main()
