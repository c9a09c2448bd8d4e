"""Command-line parsing: subcommands, comma or space separated lists, errors that name valid choices."""

from __future__ import annotations

import pytest

from ode_bert.cli import COMMANDS, build_parser, main


def test_every_documented_subcommand_is_registered() -> None:
    assert {"train", "eval", "compare", "analyze", "demo"} <= set(COMMANDS)


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


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ('{"train_sample": 64}', ["train_sample", "did you mean 'train_samples'"]),
        ('{"lr": 1e-3', ["not valid JSON"]),
        ("[1, 2]", ["expected a JSON object"]),
    ],
)
def test_demo_settings_are_checked_before_any_work(
    settings: str, named: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["demo", "--settings", settings])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert all(text in err for text in named), err


def test_demo_settings_override_known_keys() -> None:
    args = build_parser().parse_args(["demo", "--settings", '{"train_samples": 64, "lr": 0.001}'])
    assert args.settings == {"train_samples": 64, "lr": 0.001}


def test_interrupt_says_how_to_resume(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(config: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("ode_bert.train.train", interrupted)
    assert main(["train", "--output-dir", str(tmp_path / "run")]) == 130
    assert "--resume" in capsys.readouterr().err
