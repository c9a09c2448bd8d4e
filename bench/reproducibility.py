"""Do runs reproduce bit for bit when MKL takes another CPU's code path? (RELIABILITY.md, "Reproducibility")

MKL picks CPU-specific kernels; ``MKL_CBWR=AVX2`` / ``AVX512`` forces one, which emulates another CPU on this
one. For each variant (BERT, EX, IM) the script fine-tunes the real MiniLM for a few steps in a fresh process
per setting and hashes the weights; equal hashes mean the variant's arithmetic does not depend on the path.
``im-float32`` is IM-BERT with Anderson's normal equations in float32, as before the fix.
It also times Anderson's normal equations in float32 against float64 (the fix) beside one layer evaluation.

    python -m bench.reproducibility            # writes bench/results/reproducibility.json
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from typing import Any

from bench._common import REPO, describe, machine, parse_args, table, write_json

TRAIN_STEPS = """
import hashlib, sys, warnings
import torch, transformers
import ode_bert
from ode_bert.data import load_train
warnings.filterwarnings("ignore")
torch.set_num_threads(1)
variant, model_path, steps, batch = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), int(sys.argv[4])
if variant == "im-float32":  # the solver before the fix: Anderson's normal equations in float32
    import solvers
    solvers.ROOT_FINDERS.lookup("anderson").gram_dtype = torch.float32
transformers.set_seed(1)
model, tokenizer = ode_bert.load_model(model_path, num_labels=2)
convert = {"im": ode_bert.im_bert, "im-float32": ode_bert.im_bert, "ex": ode_bert.ex_bert}
convert.get(variant, lambda m: m)(model)
examples = load_train("sst2")[: steps * batch]
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
model.train()
for i in range(steps):
    part = examples[i * batch : (i + 1) * batch]
    encoded = tokenizer([e.text_a for e in part], padding=True, return_tensors="pt")
    loss = model(**encoded, labels=torch.tensor([e.label for e in part])).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(hashlib.sha1(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()[:16])
"""


def weights_hash(variant: str, model: str | None, cbwr: str | None, steps: int, batch: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if cbwr:
        env["MKL_CBWR"] = cbwr
    argv = [sys.executable, "-c", TRAIN_STEPS, variant, model or "", str(steps), str(batch)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=REPO, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} under MKL_CBWR={cbwr}: {done.stderr[-2000:]}")
    return done.stdout.strip()


def normal_equation_cost(batch: int, tokens: int, hidden: int, repeats: int) -> dict[str, float]:
    """Median ms of one Anderson iteration's normal-equation work (history m=5: the new residual difference
    and residual written into the equations' dtype, their products with the history, the small solve) in
    float32 and float64, and of one layer."""
    import torch

    import solvers

    finder = solvers.get_root_finder("anderson")
    gen = torch.Generator().manual_seed(0)
    history = torch.randn(batch, 5, tokens * hidden, generator=gen)
    new = torch.randn(batch, tokens * hidden, generator=gen)
    layer = torch.nn.TransformerEncoderLayer(hidden, 12, 4 * hidden, batch_first=True).eval()
    h = torch.randn(batch, tokens, hidden)

    def iteration(dtype: torch.dtype) -> Any:
        d_f, pair = history.to(dtype), torch.empty(batch, 2, tokens * hidden, dtype=dtype)
        gram = d_f @ d_f.transpose(1, 2)

        def run() -> Any:
            pair[:, 0], pair[:, 1] = new, new
            products = d_f @ pair.transpose(1, 2)
            return finder._solve_normal_equations(gram, products[:, :, 1])

        return run

    def median_ms(fn: Any) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)

    with torch.no_grad():
        return {
            "float32_ms": median_ms(iteration(torch.float32)),
            "float64_ms": median_ms(iteration(torch.float64)),
            "layer_ms": median_ms(lambda: layer(h)),
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args("reproducibility", __doc__.splitlines()[0], argv=argv)
    steps, batch = (1, 4) if args.quick else (3, 16)
    rows = []
    for variant in ("bert", "ex", "im", "im-float32"):
        hashes = {cbwr or "automatic": weights_hash(variant, args.model, cbwr, steps, batch)
                  for cbwr in (None, "AVX2", "AVX512")}
        rows.append({"variant": variant, **hashes, "identical": len(set(hashes.values())) == 1})
    shape = (4, 16, 384) if args.quick else (32, 64, 384)
    cost = normal_equation_cost(*shape, repeats=3 if args.quick else 30)
    cost["extra_per_iteration"] = (cost["float64_ms"] - cost["float32_ms"]) / cost["layer_ms"]
    print(describe(machine(args.device)))
    print(table(rows, [("variant", "variant", "s"), ("automatic", "automatic", "s"), ("AVX2", "AVX2", "s"),
                       ("AVX512", "AVX512", "s"), ("identical", "identical", "")]))
    print(f"normal equations (batch, tokens, hidden) = {shape}: float32 {cost['float32_ms']:.2f} ms, "
          f"float64 {cost['float64_ms']:.2f} ms, one layer {cost['layer_ms']:.2f} ms: "
          f"+{100 * cost['extra_per_iteration']:.1f}% of a layer evaluation per Anderson iteration")
    payload = {"benchmark": "reproducibility", "command": args.command, "machine": machine(args.device),
               "steps": steps, "batch": batch, "rows": rows, "normal_equations": {"shape": shape, **cost}}
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
