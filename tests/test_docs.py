"""Every Python code block of README.md and docs/*.md runs as written (issue: documentation cannot rot).

The blocks of one file run in order in one namespace, as a reader pasting them into one session would, in a
temporary working directory (they may save models). A block right after an ``<!-- slow -->`` line is marked
slow; nothing is skipped.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?P<marker><!-- slow -->\s*\n)?```python\n(?P<code>.*?)```", re.DOTALL)


def python_blocks(path: Path) -> list[tuple[str, bool]]:
    """``(code, slow)`` of each fenced Python block of ``path``, in order."""
    return [(m["code"], m["marker"] is not None) for m in BLOCK.finditer(path.read_text(encoding="utf-8"))]


def test_the_block_reader_finds_blocks_and_slow_markers() -> None:
    text = "intro\n```python\na = 1\n```\n<!-- slow -->\n```python\nb = 2\n```\n```bash\nls\n```\n"
    assert [(m["code"], m["marker"] is not None) for m in BLOCK.finditer(text)] == [
        ("a = 1\n", False),
        ("b = 2\n", True),
    ]


def _params() -> list:
    params = []
    for path in DOCS:
        blocks = python_blocks(path)
        if blocks:
            marks = [pytest.mark.slow] if any(slow for _, slow in blocks) else []
            params.append(pytest.param(path, blocks, id=path.relative_to(REPO).as_posix(), marks=marks))
    return params


@pytest.mark.parametrize(("path", "blocks"), _params())
def test_code_blocks_run_as_written(
    path: Path, blocks: list[tuple[str, bool]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for number, (code, _) in enumerate(blocks, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # e.g. a tolerance the dtype cannot reach
            try:
                exec(compile(code, f"{path.name} block {number}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"{path.name}, code block {number} fails as written:\n{code}") from err
    assert os.getcwd() == str(tmp_path)
