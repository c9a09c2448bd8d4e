"""RESULTS.md's tables against the committed run records they say they come from.

Each section of RESULTS.md that shows a ``grid.py --report FILES [--pairs A:B ...]`` command is checked
against what that command prints (``grid.py`` is a front-end of ``ode_bert.experiments``, whose report is
run here; one command is also run as written): every summary row (``| variant | seeds | ...``) and every
paired row (``| a − b | ...``, with or without the group and seed columns), each possibly without its
trailing columns, must be printed by it, bold markup aside, and every per-seed cell ``clean / AdvGLUE`` must
be that seed's scores in the records. A number edited by hand, or records changed without the text, fails
here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ode_bert import experiments
from ode_bert.experiments.cli import build_parser

REPO = Path(__file__).resolve().parents[1]

TASKS = {"SST-2": "sst2", "RTE": "rte", "QNLI": "qnli", "MNLI": "mnli", "QQP": "qqp"}


def report_sections() -> list[tuple[str, str, list[list[str]]]]:
    """(title, text, arguments of each ``--report`` command) of the RESULTS.md sections that have one and
    show tables (the summary only points to a figure)."""
    found = []
    for section in re.split(r"\n(?=## )", (REPO / "RESULTS.md").read_text()):
        joined = re.sub(r"\\\n\s*", " ", section)  # shell line continuations
        commands = [shlex.split(c) for c in re.findall(r"grid\.py --report ([^\n#]*)", joined)]
        if commands and "\n| " in section:
            found.append((section.splitlines()[0].lstrip("# "), section, commands))
    return found


SECTIONS = report_sections()


def run_report(commands: list[list[str]]) -> tuple[list[dict[str, Any]], str]:
    """The records the commands read and the text they print."""
    records: list[dict[str, Any]] = []
    printed = []
    for command in commands:
        args = build_parser().parse_args(["--report", *command])  # a --plot is not drawn here
        loaded = experiments.load_records([REPO / path for path in args.report])
        printed.append(experiments.format_report(loaded, args.pairs))
        records += loaded
    return records, "\n".join(printed)


def cells(row: str) -> tuple[str, ...]:
    """The cells of a markdown table row, bold markup removed."""
    return tuple(c.strip().replace("**", "") for c in row.strip().strip("|").split("|"))


def header_column(header: str) -> tuple[str | None, str]:
    """A per-seed table's column header, ``"SST-2 im"`` or ``"im"``, as (task or None, variant)."""
    words = header.split()
    return (TASKS[words[0]], words[1]) if len(words) == 2 else (None, words[0])


def test_report_sections_are_found() -> None:
    """The parser sees the report commands (otherwise the test below would check nothing)."""
    assert len(SECTIONS) >= 5
    assert all(commands for _, _, commands in SECTIONS)


@pytest.mark.parametrize(("title", "section", "commands"), SECTIONS, ids=[s[0][:48] for s in SECTIONS])
def test_tables_are_the_records(title: str, section: str, commands: list[list[str]]) -> None:
    records, printed = run_report(commands)
    printed_rows = [cells(line) for line in printed.splitlines() if line.startswith("| ")]
    summary_rows = {row for row in printed_rows if row[0] in experiments.VARIANTS}
    pair_rows = {row for row in printed_rows if " − " in row[1]}
    short_pairs = {(group_row[1], *group_row[3:]) for group_row in pair_rows}
    checked = 0
    seed_header: tuple[str, ...] | None = None
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("|---"):
            continue
        row = cells(line)
        if row[0] == "seed":
            seed_header = row
        elif row[0] in experiments.VARIANTS:
            assert any(shown[:len(row)] == row for shown in summary_rows), \
                f"{title}: summary row not printed by the report: {line}"
        elif " − " in row[0]:
            assert any(shown[:len(row)] == row for shown in short_pairs), \
                f"{title}: paired row not printed by the report: {line}"
        elif len(row) > 1 and " − " in row[1]:
            assert any(shown[:len(row)] == row for shown in pair_rows), \
                f"{title}: paired row not printed by the report: {line}"
        elif row[0].isdigit() and seed_header is not None:
            seed = int(row[0])
            for header, value in zip(seed_header[1:], row[1:], strict=True):
                task, variant = header_column(header)
                scores = {f"{100 * r['clean']['overall']:.2f} / {100 * r['advglue']['overall']:.2f}"
                          for r in records if r["variant"] == variant and r["seed"] == seed
                          and task in (None, r["task"])}
                assert value in scores, f"{title}: seed {seed}, {header}: {value} is not in the records"
        else:
            continue
        checked += 1
    assert checked >= 3, f"{title}: only {checked} rows checked"


def test_a_report_command_runs_as_written() -> None:
    """The first report command of RESULTS.md, run as a reader would (the script, from the repository root,
    without --plot), prints what the report above was checked as."""
    _, _, commands = SECTIONS[0]
    command = [arg for arg in commands[0] if not arg.endswith(".png") and arg != "--plot"]
    result = subprocess.run([sys.executable, "bench/experiments/grid.py", "--report", *command], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == run_report([command])[1] + "\n"
