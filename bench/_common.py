"""Helpers shared by the benchmark scripts: arguments, machine description, inputs, timing, cost counting.

Every script is one command run from the repository root, ``python -m bench.NAME [--device cpu|cuda]
[--model PATH] [--quick]``; it
prints a table and writes JSON to ``bench/results/NAME.json`` (``NAME-quick.json`` with ``--quick``,
so a smoke test never overwrites the full results).

Cost unit for transformer layers (``FlopCount``): one *layer evaluation* is the matrix-multiply FLOPs
of one forward of the layer on the batch. A root finder's cost is all matrix-multiply FLOPs it spends
(forwards, reverse-mode VJPs, forward-mode JVPs, its own small least-squares products) divided by that
unit, so a VJP through the layer counts as the evaluations it costs (1.0 for a VJP w.r.t. the input).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


def parse_args(name: str, description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The common command line (``--device``, ``--model``, ``--quick``, ``--out``) plus script options.

    ``args.command`` is the command as typed from the repository root (recorded in the JSON).
    """
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=description)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run (default cpu)")
    parser.add_argument("--model", default=None,
                        help="path or hub name of a BERT-style encoder (default: offline all-MiniLM-L6-v2)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test configuration (seconds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: steadier ratios on a shared machine)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON output (default bench/results/{name}.json; {name}-quick.json if --quick)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    typed = sys.argv[1:] if argv is None else argv
    args.command = " ".join(["python", "-m", f"bench.{name}", *map(shlex.quote, typed)])
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda given but CUDA is not available")
    torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = RESULTS_DIR / (f"{name}-quick.json" if args.quick else f"{name}.json")
    return args


def machine(device: str) -> dict[str, Any]:
    """What the numbers were measured on: the run records' machine facts (``ode_bert.train.machine_record``)
    under the keys bench results have always used, with the device the benchmark ran on."""
    from ode_bert.train import machine_record

    record = machine_record()
    info: dict[str, Any] = {
        "cpu": record["cpu"],
        "cpu_cores": record["cpu_count"],
        "torch_threads": record["torch_threads"],
        "torch": record["torch"],
        "python": record["python"],
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def describe(info: dict[str, Any]) -> str:
    """One line naming the machine, for printed tables."""
    where = f"GPU {info['gpu']}" if "gpu" in info else "CPU"
    return (f"{where}; host CPU {info['cpu']} ({info['cpu_cores']} cores, "
            f"{info['torch_threads']} torch threads), torch {info['torch']}")


def sst2_sentences(count: int, offset: int = 0) -> list[str]:
    """``count`` SST-2 dev sentences from ``offset`` (data directory: ``$ODE_BERT_DATA_DIR``)."""
    from ode_bert.data import load_clean_dev

    examples = load_clean_dev("sst2")["sst2"]
    if offset + count > len(examples):
        raise ValueError(f"asked for SST-2 dev {offset}..{offset + count}; only {len(examples)} sentences")
    return [ex.text_a for ex in examples[offset:offset + count]]


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so a timer reads the time the work took."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """``(seconds, result)`` of ``fn()``, synchronising the GPU before and after."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def median(values: Iterable[float]) -> float:
    """Median ignoring ``nan`` (``inf``, e.g. "not reached", counts); ``nan`` if nothing is left."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


class FlopCount(TorchDispatchMode):
    """Counts matrix-multiply FLOPs of every op dispatched while active (forward, backward, forward-mode).

    Uses torch's own FLOP formulas (``torch.utils.flop_counter``) but no module tracking, so it does
    not interfere with ``torch.autograd.grad`` on leaf tensors. Attention kernels without a registered
    formula (e.g. the CPU flash-attention kernel) are not counted; they are a few percent of a layer at
    sentence lengths and are left out of every method alike.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += int(formula(*args, **kwargs, out_val=out))
        return out


def fmt(value: Any, spec: str) -> str:
    """Format a number (``-`` for None/nan) for a table cell."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return format(value, spec)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text (Markdown) table: ``columns`` are ``(key, header, format spec)``."""
    headers = [header for _, header, _ in columns]
    body = [[fmt(row.get(key), spec) if spec or row.get(key) is None else str(row[key])
             for key, _, spec in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |" for r in body]
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n")
    print(f"wrote {path}")
