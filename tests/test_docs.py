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


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text: lowercased, punctuation but ``-`` and ``_``
    dropped, spaces as ``-``; a repeated heading gets ``-1``, ``-2``, ... Code blocks hold no headings."""
    anchors, counts = set(), {}
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    for heading in re.findall(r"^#{1,6} (.+)$", prose, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        repeat = counts.get(slug, 0)
        anchors.add(slug if repeat == 0 else f"{slug}-{repeat}")
        counts[slug] = repeat + 1
    return anchors


def test_heading_anchors_follow_githubs_rule() -> None:
    text = ("# A b\n## 0.3.0's draws: 15 seeds (SST-2, 1,000)\n```\n# not a heading\n```\n## A b\n"
            "### x_y − z\n")
    assert heading_anchors(text) == {"a-b", "030s-draws-15-seeds-sst-2-1000", "a-b-1", "x_y--z"}


def test_links_to_headings_resolve() -> None:
    """Every ``[text](FILE.md#anchor)`` and ``[text](#anchor)`` of the project's markdown names a heading
    that exists: a renamed section (its seed count, say) must take its links along."""
    files = [*REPO.glob("*.md"), *(REPO / "docs").glob("*.md"), *(REPO / "bench").rglob("*.md")]
    anchors = {path.resolve(): heading_anchors(path.read_text(encoding="utf-8")) for path in files}
    broken = []
    for path in files:
        for target, anchor in re.findall(r"\]\(([^)\s#]*)#([^)\s]+)\)", path.read_text(encoding="utf-8")):
            resolved = (path.parent / target).resolve() if target else path.resolve()
            if resolved in anchors and anchor not in anchors[resolved]:
                broken.append(f"{path.relative_to(REPO)} -> {target}#{anchor}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)
