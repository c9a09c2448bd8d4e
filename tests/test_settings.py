"""ode_bert.settings: the one settings object, its presets, its stored form, its variants and CLI flags."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig

import ode_bert
import solvers
from ode_bert import ODESettings, convert, ex_bert, im_bert
from ode_bert import settings as settings_module
from ode_bert.cli import _TRAINING_FIELDS, build_parser
from ode_bert.settings import (
    GRAD_MODES,
    ROOT_FINDER_NAMES,
    SETTING_NAMES,
    SOLVER_NAMES,
    VARIANTS,
    settings_for_variant,
    settings_taken_by,
)
from ode_bert.train import TrainConfig

VOCAB = 99


@pytest.fixture(autouse=True)
def quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()


def tiny_bert() -> nn.Module:
    """A seeded random BERT classifier in eval mode (two calls give identical weights)."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                        vocab_size=VOCAB, num_labels=3)  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch()).logits


# --------------------------------------------------------------------------------------------------
# Names the command line reads without torch are the registries' names
# --------------------------------------------------------------------------------------------------


def test_torch_free_names_equal_the_registries() -> None:
    assert list(SOLVER_NAMES) == solvers.available()
    assert list(ROOT_FINDER_NAMES) == solvers.available_root_finders()
    assert list(GRAD_MODES) == solvers.available_grad_modes()
    assert settings_module.FRAMINGS == ("residual", "layer")
    assert list(VARIANTS) == ["bert", "ex", "im", "ode"]


# --------------------------------------------------------------------------------------------------
# Validated once, with the registry's suggestions
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver": "implicit_eulr"}, r"Unknown solver 'implicit_eulr'\. Did you mean 'implicit_euler'\?"),
        ({"field": "residul"}, r"Did you mean 'residual'\?.*Valid framings: residual, layer"),
        ({"root": "andersen"}, r"Did you mean 'anderson'\?"),
        ({"grad": "one-step"}, r"Did you mean 'one_step'\?.*Valid modes: implicit, one_step, unroll"),
        ({"solver_options": {"on_failure": "rase"}}, r"on_failure must be one of .*Did you mean 'raise'\?"),
        ({"solver": "rk4", "tol": 1e-3}, r"tol apply to implicit solvers only .*'rk4' does not take them"),
        ({"solver": "euler", "solver_options": {"nonsense": 1}}, r"Unknown option 'nonsense'"),
        ({"solver": "euler", "solver_options": {"on_failure": "raise"}}, r"Unknown option 'on_failure'"),
        ({"solver_options": {"tol": 1e-3}}, r"solver_options repeat the setting\(s\) tol"),
        ({"step": 0.0}, r"step must be a positive finite number"),
        ({"step": float("nan")}, r"step must be a positive finite number"),
        ({"layers": "0-"}, r"bad layer specification '0-'"),
        ({"layers": [1, 1]}, r"duplicate layer indices \[1\]"),
        ({"layers": [-1]}, r"out of range"),
    ],
)
def test_bad_settings_are_named_when_made(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ODESettings(**kwargs)


def test_solver_options_must_be_json() -> None:
    with pytest.raises(TypeError, match="JSON-serialisable"):
        ODESettings(solver="dopri5", solver_options={"rtol": torch.tensor(1e-3)})


def test_values_are_normalised_and_frozen() -> None:
    settings = ODESettings(solver="rk4", layers=[2, 0], step=1)
    assert settings.layers == (2, 0) and isinstance(settings.step, float)
    assert settings == ODESettings(solver="rk4", layers=(2, 0), step=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.step = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError, match="step must be"):
        dataclasses.replace(settings, step=-1.0)  # a changed copy is checked again


def test_failure_policy() -> None:
    assert ODESettings().on_failure == "warn"
    assert ODESettings(solver_options={"on_failure": "raise"}).on_failure == "raise"
    assert ODESettings(solver="rk4").on_failure == "ignore"  # explicit methods have no failure policy


# --------------------------------------------------------------------------------------------------
# Presets, stored form
# --------------------------------------------------------------------------------------------------


def test_presets_are_the_im_bert_and_ex_bert_defaults() -> None:
    # the connection chosen on held-out data (RESULTS.md, "Choosing the IM-connection"); tol 1e-2 since 0.2.0
    im = ODESettings(solver="implicit_euler", layers="all", step=0.5, field="residual", tol=1e-2, max_iter=20)
    ex = ODESettings(solver="euler", layers="all", step=0.5, field="residual")
    assert ODESettings.preset("im") == im and ODESettings.preset("ex") == ex
    assert ODESettings.preset("im", step=0.25, tol=None) == dataclasses.replace(im, step=0.25, tol=None)
    with pytest.raises(ValueError, match=r"Unknown preset 'in'\. Did you mean 'im'\?"):
        ODESettings.preset("in")
    assert ode_bert.ode_config(im_bert(tiny_bert())) == ode_bert.ode_config(convert(tiny_bert(), im))
    assert ode_bert.ode_config(ex_bert(tiny_bert())) == ode_bert.ode_config(convert(tiny_bert(), ex))
    with_options = im_bert(tiny_bert(), layers="1-2", max_iter=3, on_failure="ignore")
    assert ode_bert.ode_config(with_options) == {
        **im.to_dict(), "layers": [1, 2], "max_iter": 3, "solver_options": {"on_failure": "ignore"},
    }  # fmt: skip


@pytest.mark.parametrize(
    "settings",
    [
        ODESettings(),
        ODESettings.preset("im", root="picard", grad="unroll", solver_options={"init": "previous"}),
        ODESettings.preset("im", eval_tol=0.1),
        ODESettings(solver="dopri5", layers=[0, 2], step=0.5, field="layer", solver_options={"rtol": 1e-3}),
    ],
)
def test_round_trip_through_dict_and_config(settings: ODESettings) -> None:
    stored = settings.to_dict()
    assert stored["version"] == settings_module.CONFIG_VERSION
    added = set(settings_module.CONFIG_ADDED_KEYS)
    assert set(stored) == {"version", *settings_module.CONFIG_KEYS_V1, *added} == {"version", *SETTING_NAMES}
    assert ODESettings.from_dict(stored) == settings
    # config.ode_bert is the stored form, with the layers as indices
    model = convert(tiny_bert(), settings)
    config = model.config.ode_bert
    assert config == {**stored, "layers": ode_bert.parse_layers(settings.layers, 3)}
    assert ODESettings.from_dict(config) == dataclasses.replace(settings, layers=tuple(config["layers"]))
    legacy = {k: v for k, v in config.items() if k not in {"version", *added}}  # version 1: before "version"
    assert ODESettings.from_dict(legacy) == dataclasses.replace(ODESettings.from_dict(config), eval_tol=None)


def test_from_dict_names_the_source() -> None:
    stored = {**ODESettings().to_dict(), "solver": "rk5"}
    with pytest.raises(ValueError, match=r"ode_bert in x/config\.json cannot be applied: .*'rk4'"):
        ODESettings.from_dict(stored, "x/config.json")
    with pytest.raises(ValueError, match=r"x/config\.json: key 'step' must be a number"):
        ODESettings.from_dict({**stored, "step": "fast"}, "x/config.json")


# --------------------------------------------------------------------------------------------------
# convert(model, settings) is the keyword form
# --------------------------------------------------------------------------------------------------


def test_settings_and_keywords_convert_alike_and_euler_step1_is_stock() -> None:
    stock = logits(tiny_bert())
    by_settings = convert(tiny_bert(), ODESettings(solver="euler", step=1.0, field="residual"))
    by_keywords = convert(tiny_bert(), "euler", step=1.0, field="residual")
    assert torch.allclose(logits(by_settings), stock, atol=1e-5, rtol=0)
    assert torch.equal(logits(by_settings), logits(by_keywords))
    assert by_settings.config.ode_bert == by_keywords.config.ode_bert

    settings = ODESettings(solver="rk4", layers="0,2", step=0.5, field="layer")
    by_settings = convert(tiny_bert(), settings)
    by_keywords = convert(tiny_bert(), "rk4", layers="0,2", step=0.5, field="layer")
    assert torch.equal(logits(by_settings), logits(by_keywords))
    assert not torch.allclose(logits(by_settings), stock, atol=1e-3)
    assert by_settings.config.ode_bert == by_keywords.config.ode_bert


def test_keywords_change_a_settings_object() -> None:
    model = convert(tiny_bert(), ODESettings.preset("im"), layers="0", on_failure="raise")
    expected = ODESettings.preset("im", layers=[0], solver_options={"on_failure": "raise"})
    assert ODESettings.from_dict(model.config.ode_bert) == expected


# --------------------------------------------------------------------------------------------------
# Variants, TrainConfig and the command line are generated from the settings
# --------------------------------------------------------------------------------------------------


def test_settings_taken_by_each_variant() -> None:
    assert settings_taken_by("bert") == ()
    assert settings_taken_by("ex") == ("layers", "step", "field")
    assert settings_taken_by("im") == tuple(name for name in SETTING_NAMES if name != "solver")
    assert settings_taken_by("ode") == SETTING_NAMES
    # what compare gave each variant before (compare.NOT_TAKEN) is the complement
    not_taken = {v: set(SETTING_NAMES) - set(settings_taken_by(v)) for v in VARIANTS}
    assert not_taken["bert"] == {"solver", "layers", "step", "field", "root", "grad", "tol", "eval_tol",
                                 "max_iter", "solver_options"}  # fmt: skip
    assert not_taken["ex"] == {"solver", "root", "grad", "tol", "eval_tol", "max_iter", "solver_options"}
    with pytest.raises(ValueError, match="unknown variant 'xx'; valid variants: bert, ex, im, ode"):
        settings_taken_by("xx")


def test_settings_for_variant() -> None:
    assert settings_for_variant("bert") is None
    assert settings_for_variant("im") == ODESettings.preset("im")
    assert settings_for_variant("im", solver="implicit_euler", tol=None) == ODESettings.preset("im")
    assert settings_for_variant("ex", step=1.0) == ODESettings.preset("ex", step=1.0)
    assert settings_for_variant("ode", solver="rk4") == ODESettings(solver="rk4")
    with pytest.raises(ValueError, match=r"'bert' is the stock model and takes no solver options \(got step"):
        settings_for_variant("bert", step=0.5)
    with pytest.raises(ValueError, match=r"'ex' .*takes layers, step, field, not tol=0\.001; use variant"):
        settings_for_variant("ex", tol=1e-3)
    with pytest.raises(ValueError, match=r"'im' .* not solver='rk4'"):
        settings_for_variant("im", solver="rk4")


def test_train_config_fields_are_the_settings() -> None:
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert names[: 3 + len(SETTING_NAMES)] == ["task", "model", "variant", *SETTING_NAMES]
    assert list(TrainConfig().to_json())[: len(names) - 1] == names[:-1]  # all but "resume"
    config = TrainConfig(variant="im", layers="0-1", tol=1e-3, solver_options={"root_options": {"m": 3}})
    assert config.settings() == ODESettings.preset(
        "im", layers="0-1", tol=1e-3, solver_options={"root_options": {"m": 3}}
    )
    assert TrainConfig(variant="bert").settings() is None


def test_cli_flags_are_generated_from_the_settings() -> None:
    parser = build_parser("train")
    train = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    actions = {action.dest: action for action in train._actions}
    flagged = [f for f in dataclasses.fields(ODESettings) if f.metadata["type"] is not None]
    assert [f.name for f in flagged] == [n for n in SETTING_NAMES if n != "solver_options"]
    for f in flagged:
        action = actions[f.name]
        assert action.option_strings == [f"--{f.name.replace('_', '-')}"]
        assert action.default is None and action.type is f.metadata["type"]
        assert action.choices == f.metadata["choices"]
    assert actions["grad"].choices == GRAD_MODES and actions["solver"].choices == SOLVER_NAMES
    assert "0.5" in actions["step"].help and "im: 0.01" in actions["tol"].help
    assert "(default tol)" in actions["eval_tol"].help
    assert set(_TRAINING_FIELDS) >= {f.name for f in flagged}
    args = parser.parse_args(["train", "--variant", "ode", "--solver", "trapezoid", "--grad", "unroll",
                              "--max-iter", "3", "--layers", "0-1", "--eval-tol", "0.1"])  # fmt: skip
    options = {name: getattr(args, name) for name in _TRAINING_FIELDS}
    assert TrainConfig(variant="ode", **options).settings() == ODESettings(
        solver="trapezoid", layers="0-1", grad="unroll", max_iter=3, eval_tol=0.1
    )
    for flag in (["--layers", ":-1"], ["--layers=-2:"]):  # a slice; one that starts with "-" needs "="
        args = parser.parse_args(["train", *flag])
        options = {name: getattr(args, name) for name in _TRAINING_FIELDS}
        assert TrainConfig(variant="im", **options).settings().layers == flag[-1].removeprefix("--layers=")
    args = parser.parse_args(["train", "--solver-options", '{"adjoint_tol": 0.1, "compact_rows": true}'])
    options = {name: getattr(args, name) for name in _TRAINING_FIELDS}
    assert TrainConfig(variant="im", **options).settings() == ODESettings.preset(
        "im", solver_options={"adjoint_tol": 0.1, "compact_rows": True}
    )


def test_grad_flag_rejects_unknown_modes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser("train").parse_args(["train", "--grad", "implict"])
    assert "invalid choice: 'implict'" in capsys.readouterr().err
