"""Execute the stability notebooks with the venv's "python3" kernel (cwd notebooks/): they must run without
error and show at least one figure. 02 and 03 run the real MiniLM (about 40 s together on two cores, most of
it implicit solves in 02): they are ``slow`` (``make test-all``); 01 runs in ``make test``."""

from __future__ import annotations

import os
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = [
    "01_stability_regions.ipynb",
    pytest.param("02_perturbation_growth.ipynb", marks=pytest.mark.slow),
    pytest.param("03_layer_spectra.ipynb", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_and_shows_a_figure(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel runs in notebooks/; put the repository first on its path so it imports this checkout's
    # packages even where an older editable install does not map them.
    repo_root = str(NOTEBOOK_DIR.parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    if os.environ.get("ODE_BERT_DATA_DIR"):  # a relative data dir means relative to here, not to notebooks/
        monkeypatch.setenv("ODE_BERT_DATA_DIR", os.path.abspath(os.environ["ODE_BERT_DATA_DIR"]))
    notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name} produced no figure"
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert printed.strip(), f"{name} printed no numbers"
