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


CODE_PATHS = ["AVX2", "AVX512"]


def _start(cbwr: str | None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    if cbwr is not None:
        env["MKL_CBWR"] = cbwr
    return subprocess.Popen([sys.executable, "-c", SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def solutions() -> dict[str | None, str]:
    """Hash and iteration count of the solve per code path (``None``: MKL's own choice); the processes
    run at the same time (one thread each), since most of each one's time is importing torch."""
    started = {cbwr: _start(cbwr) for cbwr in [None, *CODE_PATHS]}
    found = {}
    try:
        for cbwr, process in started.items():
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            found[cbwr] = out.strip()
    finally:
        for process in started.values():
            process.kill()
            process.wait()
    return found


@pytest.mark.parametrize("cbwr", CODE_PATHS)
def test_anderson_solution_is_identical_across_mkl_code_paths(
    cbwr: str, solutions: dict[str | None, str]
) -> None:
    assert solutions[cbwr] == solutions[None]
