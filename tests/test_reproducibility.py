"""Bit-for-bit reproducibility of the implicit solve across MKL code paths (RELIABILITY.md).

MKL chooses CPU-specific kernels for a batched matrix product with a long reduction; ``MKL_CBWR`` forces one
of them, which emulates running on another CPU on this one. Stock-model arithmetic is unaffected by the
choice; Anderson's Gram products were not, which made IM-BERT runs differ between an AMD and an Intel CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SCRIPT = """
import hashlib, torch, solvers
torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
c = torch.randn(8, 48, 384, generator=gen)
g = lambda z: 0.9 * torch.tanh(z.roll(1, dims=-1) + 0.5 * z) + c   # a contraction with coupled entries
finder = solvers.get_root_finder("anderson", m=5, tol=1e-6, max_iter=40, on_failure="ignore")
z, info = finder.solve(g, torch.zeros_like(c))
print(hashlib.sha1(z.numpy().tobytes()).hexdigest(), int(info.iterations.sum()))
"""


def _solve_under(cbwr: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if cbwr is not None:
        env["MKL_CBWR"] = cbwr
    argv = [sys.executable, "-c", SCRIPT]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def automatic_path() -> str:
    return _solve_under(None)


@pytest.mark.parametrize("cbwr", ["AVX2", "AVX512"])
def test_anderson_solution_is_identical_across_mkl_code_paths(cbwr: str, automatic_path: str) -> None:
    assert _solve_under(cbwr) == automatic_path
