"""Command-line parsing: subcommands, comma or space separated lists, errors that name valid choices."""

from __future__ import annotations

import ast
import subprocess
import sys
import time

import pytest

from ode_bert.cli import build_parser, commands, main

HEAVY = ("torch", "transformers", "scipy", "matplotlib", "solvers", "ode_bert.convert", "ode_bert.train")


def test_every_documented_subcommand_is_registered() -> None:
    assert {"train", "eval", "compare", "analyze", "demo", "experiment"} <= set(commands())


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--variants", "bert,ex,im", "--seeds", "1,2,3"],
        ["compare", "--variants", "bert", "ex", "im", "--seeds", "1", "2", "3"],
        ["compare", "--variants", "bert,ex", "im", "--seeds", "1,2", "3"],
    ],
)
def test_compare_lists_accept_commas_and_spaces(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.variants == ["bert", "ex", "im"]
    assert args.seeds == [1, 2, 3]


def test_unknown_variant_lists_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--variants", "bert,imm"])
    err = capsys.readouterr().err
    assert "imm" in err and "bert, ex, im" in err


def test_non_integer_seed_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--seeds", "1,two"])
    assert "int" in capsys.readouterr().err


def test_analyze_rejects_unknown_solver_with_choices(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["analyze", "--solvers", "eulr", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2
    assert "eulr" in err and "implicit_euler" in err


@pytest.mark.parametrize("argv", [["--pairs", "1"], ["--seeds", "1"], ["--train", "5"]])
def test_demo_sizes_are_checked_before_any_work(
    argv: list[str], tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Checked before the model or the data load: nothing is written, no heavy module is imported."""
    assert main(["demo", *argv, "--out", str(tmp_path / "demo")]) == 2
    assert "must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_interrupt_says_how_to_resume(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(config: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("ode_bert.train.train", interrupted)
    assert main(["train", "--output-dir", str(tmp_path / "run")]) == 130
    assert "--resume" in capsys.readouterr().err


def _modules_loaded_by(argv: list[str]) -> list[str]:
    """The heavy modules imported by ``ode-bert ARGV`` (run in a fresh interpreter; exits are expected)."""
    code = (
        "import sys, ode_bert.cli\n"
        f"try:\n    ode_bert.cli.main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return ast.literal_eval(done.stderr.strip().splitlines()[-1])  # the printed list


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["eval", "--help"], ["train", "--variant", "xx"], ["trian"]]
)
def test_help_and_usage_errors_import_no_torch(argv: list[str]) -> None:
    """Issue 20: --help and argument errors answer before torch and transformers are imported."""
    assert _modules_loaded_by(argv) == []


def test_every_subcommand_help_imports_no_torch() -> None:
    """Issue 20: ``ode-bert COMMAND --help`` for every registered subcommand (``compare`` and ``demo`` read
    the experiments package's variants and executor options) loads none of the heavy modules."""
    code = (
        "import sys, ode_bert.cli\n"
        "for name in ode_bert.cli.commands():\n"
        "    try:\n        ode_bert.cli.main([name, '--help'])\n    except SystemExit:\n        pass\n"
        f"    print(name, sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    loaded = dict(line.split(" ", 1) for line in done.stderr.strip().splitlines())
    assert set(loaded) == set(commands()), done.stderr
    assert all(modules == "[]" for modules in loaded.values()), loaded


def test_package_import_is_lazy() -> None:
    code = (
        "import sys, ode_bert, ode_bert.settings\n"
        "assert [name for name in dir(ode_bert) if name[0] != '_'] == sorted(ode_bert.__all__)\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
        "import ode_bert.train\n"
        "assert callable(ode_bert.convert) and ode_bert.ODESettings.__module__ == 'ode_bert.settings'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _seconds(*args: str) -> float:
    """The fastest of three runs of ``python ARGS`` (the machine may be busy with other work)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, *args], capture_output=True, check=False, timeout=120)
        times.append(time.perf_counter() - start)
    return min(times)


def test_help_starts_about_as_fast_as_python() -> None:
    """``ode-bert train --help`` costs a few interpreter start-ups, not a torch import (~30x one)."""
    baseline = _seconds("-c", "pass")
    help_time = _seconds("-m", "ode_bert", "train", "--help")
    assert help_time < max(1.0, 10 * baseline), (help_time, baseline)
