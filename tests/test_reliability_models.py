"""Bad inputs and faults against model conversion and save/load (issue 15): each is named, none is silent.

Every test compares against an independent reference where there is one (the stock Hugging Face model's
outputs, the converted model's outputs before saving) and checks the message names what went wrong.
"""

from __future__ import annotations

import copy
import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    GPT2LMHeadModel,
)

import ode_bert
import solvers
from ode_bert import NonFiniteError, convert, find_layers
from ode_bert.pretrained import looks_local
from ode_bert.settings import CONFIG_KEYS_V1, CONFIG_VERSION, check_stored_config

VOCAB = 99
settings_module = importlib.import_module("ode_bert.settings")  # where the stored form is defined


@pytest.fixture(autouse=True)
def quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()


def tiny_bert(num_layers: int = 2, **config_kw) -> nn.Module:
    """A seeded random BERT classifier in eval mode (two calls give identical weights)."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
                        intermediate_size=37, vocab_size=VOCAB, num_labels=3, initializer_range=0.2,
                        **config_kw)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval()


def tiny_gpt2(use_cache: bool) -> nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                        bos_token_id=0, eos_token_id=0, use_cache=use_cache)
    return GPT2LMHeadModel(config).eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(5, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**(inputs or batch())).logits


def saved_rk4(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """An rk4 model on layer 0 only (step 0.5), saved; returns the folder and its logits before saving."""
    model = convert(tiny_bert(), "rk4", layers="0", step=0.5)
    want = logits(model)
    model.save_pretrained(tmp_path)
    return tmp_path, want


def edit_config(folder: Path, edit) -> Path:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return path


def load(folder: Path) -> nn.Module:
    return ode_bert.from_pretrained(str(folder), AutoModelForSequenceClassification).eval()


# --------------------------------------------------------------------------------------------------
# 1. The stored configuration: versioned, complete, or an error naming the key and the file
# --------------------------------------------------------------------------------------------------


def test_convert_stores_a_versioned_config_and_reload_reproduces_the_outputs(tmp_path) -> None:
    folder, want = saved_rk4(tmp_path)
    stored = json.loads((folder / "config.json").read_text())["ode_bert"]
    assert stored["version"] == CONFIG_VERSION == 3
    assert set(stored) == {"version", *CONFIG_KEYS_V1, "eval_tol"}
    loaded = load(folder)
    assert torch.equal(logits(loaded), want)
    assert not torch.allclose(logits(tiny_bert()), want, atol=1e-3)  # the stock model differs


@pytest.mark.parametrize("key", CONFIG_KEYS_V1)
def test_a_missing_key_is_an_error_naming_it_and_the_file(tmp_path, key: str) -> None:
    folder, _ = saved_rk4(tmp_path)
    path = edit_config(folder, lambda c: c["ode_bert"].pop(key))
    with pytest.raises(ValueError, match=rf"missing key\(s\) '{key}'") as err:
        load(folder)
    assert str(path) in str(err.value)


def test_configs_saved_before_versioning_load_as_version_1(tmp_path) -> None:
    folder, want = saved_rk4(tmp_path)
    edit_config(folder, lambda c: [c["ode_bert"].pop(k) for k in ("version", "eval_tol")])  # as saved then
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete version-1 configs load without a warning
        loaded = load(folder)
    assert torch.equal(logits(loaded), want)
    assert ode_bert.ode_config(loaded)["version"] == CONFIG_VERSION  # re-saving upgrades it
    edit_config(folder, lambda c: c["ode_bert"].pop("solver"))  # version 1 requires every key too
    with pytest.raises(ValueError, match=r"missing key\(s\) 'solver'; config version 1 requires"):
        load(folder)


def test_an_empty_config_is_an_error_not_the_stock_model(tmp_path) -> None:
    folder, _ = saved_rk4(tmp_path)
    edit_config(folder, lambda c: c.update(ode_bert={}))
    with pytest.raises(ValueError, match=r"missing key\(s\) 'solver', 'layers', 'step'"):
        load(folder)


@pytest.mark.parametrize("value", ["garbage", 3, ["rk4"], True])
def test_a_config_that_is_not_a_dict_gets_a_clear_message(tmp_path, value) -> None:
    folder, _ = saved_rk4(tmp_path)
    path = edit_config(folder, lambda c: c.update(ode_bert=value))
    with pytest.raises(ValueError, match="must be a JSON object of solver settings") as err:
        load(folder)
    assert str(path) in str(err.value)
    model = load_stock_with(value)
    with pytest.raises(ValueError, match="must be a JSON object"):
        ode_bert.ode_config(model)


def load_stock_with(value) -> nn.Module:
    model = tiny_bert()
    model.config.ode_bert = value
    return model


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("step", "fast", r"key 'step' must be a number"),
        ("layers", {"a": 1}, r"key 'layers' must be a list of layer indices"),
        ("solver_options", [1], r"key 'solver_options' must be a JSON object"),
        ("max_iter", 2.5, r"key 'max_iter' must be null or an integer"),
        ("version", "two", r"key 'version' must be an integer"),
        ("solver", "rk5", r"cannot be applied: Unknown solver 'rk5'\. Did you mean 'rk4'\?"),
        ("layers", [0, 5], r"cannot be applied: layer indices \[5\] out of range"),
        ("step", -1.0, r"cannot be applied: step must be a positive finite number"),
    ],
)
def test_malformed_values_are_errors_naming_the_key_and_the_file(tmp_path, key, value, message) -> None:
    folder, _ = saved_rk4(tmp_path)
    path = edit_config(folder, lambda c: c["ode_bert"].update({key: value}))
    with pytest.raises(ValueError, match=message) as err:
        load(folder)
    assert str(path) in str(err.value)


def test_unknown_keys_and_newer_versions_are_errors(tmp_path) -> None:
    folder, _ = saved_rk4(tmp_path)
    edit_config(folder, lambda c: c["ode_bert"].update(solvr="rk4"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'solvr'.*Did you mean 'solver'\?"):
        load(folder)
    edit_config(folder, lambda c: c["ode_bert"].pop("solvr"))
    edit_config(folder, lambda c: c["ode_bert"].update(version=CONFIG_VERSION + 1))
    with pytest.raises(ValueError, match=r"written by a newer ode-bert.*upgrade ode-bert"):
        load(folder)


def test_keys_added_in_later_versions_take_their_default(monkeypatch) -> None:
    """A key added later (``eval_tol``, version 3): older configs get its documented default (None: evaluation
    at the training tolerance, as they computed), silently; a current one must have it, an older one must
    not. The mechanism's warning, for a key whose entry asks for it, is checked on a made-up next key."""
    v2 = {"version": 2, "solver": "implicit_euler", "layers": [0], "step": 1.0, "field": "residual",
          "root": None, "grad": None, "tol": 1e-2, "max_iter": None, "solver_options": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        settings = check_stored_config(v2, "x/config.json")
    assert settings["eval_tol"] is None and settings["version"] == 3 == CONFIG_VERSION
    with pytest.raises(ValueError, match=r"x/config.json: missing key\(s\) 'eval_tol'; config version 3"):
        check_stored_config({**v2, "version": 3}, "x/config.json")
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'eval_tol' for config version 2"):
        check_stored_config({**v2, "eval_tol": 0.1}, "x/config.json")  # written only with version 3
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'version' for config version 1"):
        check_stored_config({**v2, "version": 1}, "x/config.json")  # "version" arrived in version 2

    monkeypatch.setattr(settings_module, "CONFIG_VERSION", 4)
    monkeypatch.setattr(settings_module, "CONFIG_ADDED_KEYS",
                        {**settings_module.CONFIG_ADDED_KEYS, "new_key": (4, "old behaviour", True)})
    with pytest.warns(UserWarning, match=r"has no 'new_key', added in version 4: using the default 'old"):
        settings = check_stored_config(v2, "x/config.json")
    assert (settings["new_key"], settings["version"], settings["eval_tol"]) == ("old behaviour", 4, None)


# --------------------------------------------------------------------------------------------------
# 2. The saved folder says how to load it (plain transformers gives the stock model silently)
# --------------------------------------------------------------------------------------------------


def test_saved_folder_has_a_model_card_saying_how_to_load(tmp_path) -> None:
    model = convert(tiny_bert(), "rk4", layers="0", step=0.5)
    want = logits(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ode_bert.resolve_model_path(None))
    ode_bert.save_pretrained(model, tmp_path, tokenizer=tokenizer)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: ode-bert\n")  # hub metadata (YAML front matter)
    assert "ode_bert.from_pretrained" in card and "AutoModelForSequenceClassification" in card
    assert '"solver": "rk4"' in card and "stock" in card
    # the fault the card warns about: plain transformers loads the stock model, without a word
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(plain), logits(tiny_bert()))
    assert not torch.allclose(logits(plain), want, atol=1e-3)
    assert torch.equal(logits(load(tmp_path)), want)


def test_model_card_for_stock_models_and_foreign_readmes(tmp_path) -> None:
    (tmp_path / "README.md").write_text("# my notes\n")
    model = convert(tiny_bert(), "euler", step=0.5)
    ode_bert.save_pretrained(model, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "ode_bert.from_pretrained" in card and card.endswith("# my notes\n")  # kept, below the card
    ode_bert.unconvert(model)
    (tmp_path / "README.md").write_text(card.replace("# my notes\n", ""))
    ode_bert.save_pretrained(model, tmp_path)  # a stock model: the stale ode-bert card goes
    assert not (tmp_path / "README.md").exists()
    assert not list(tmp_path.glob(".README.*"))


def test_training_runs_save_the_model_card(tmp_path) -> None:
    from ode_bert.train import _save_final

    model = convert(tiny_bert(), "implicit_euler", step=0.5, tol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ode_bert.resolve_model_path(None))
    _save_final(model, tokenizer, tmp_path)
    card = (tmp_path / "model" / "README.md").read_text()
    assert '"solver": "implicit_euler"' in card and "ode_bert.from_pretrained" in card


# --------------------------------------------------------------------------------------------------
# 3. Decoders with a KV cache: exact per-stage caches (tests/test_families.py), adaptive solvers refused
# --------------------------------------------------------------------------------------------------


def test_decoder_with_use_cache_refuses_adaptive_solvers_at_convert() -> None:
    stock = tiny_gpt2(use_cache=True)
    with torch.no_grad():
        out = convert(tiny_gpt2(use_cache=True), "euler")(torch.arange(7)[None] + 5)
    assert out.past_key_values.get_seq_length() == 7  # one evaluation per layer: the cache is right
    for solver in ("rk4", "midpoint", "implicit_euler"):  # per-stage histories keep these exact
        with torch.no_grad():
            out = convert(tiny_gpt2(use_cache=True), solver)(torch.arange(7)[None] + 5)
        assert out.past_key_values.get_seq_length() == 7
    for solver in ("dopri5", "bosh3"):
        model = tiny_gpt2(use_cache=True)
        with pytest.raises(ValueError, match=r"decoder configured with use_cache=True.*use_cache=False"):
            convert(model, solver)
        assert ode_bert.ode_config(model) is None
    bert_decoder = tiny_bert(is_decoder=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        convert(bert_decoder, "dopri5")
    assert stock.config.use_cache


def test_decoder_calls_with_a_cache_are_refused_for_adaptive_solvers() -> None:
    ids = torch.arange(7)[None] + 5
    model = convert(tiny_gpt2(use_cache=False), "dopri5", field="residual")
    with pytest.raises(ValueError, match=r"layer 0 \(dopri5; .*receives a key/value cache.*use_cache=False"):
        model(ids, use_cache=True)  # the sub-steps depend on the whole sequence
    with pytest.raises(ValueError, match="receives a key/value cache"):
        model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=True)
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 9)  # the config's no-cache
    with torch.no_grad():
        out = model(ids, use_cache=False)
    assert out.logits.shape == (1, 7, VOCAB) and out.past_key_values is None


def test_decoder_without_cache_euler_step_1_is_the_stock_model() -> None:
    ids = torch.randint(5, VOCAB, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tiny_gpt2(use_cache=False)(ids).logits
        got = convert(tiny_gpt2(use_cache=False), "euler", field="residual", step=1.0)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with torch.no_grad():  # with a cache, euler (one evaluation per layer) decodes like the stock model
        want = tiny_gpt2(use_cache=True).generate(ids[:1], max_new_tokens=4, do_sample=False)
        got = convert(tiny_gpt2(use_cache=True), "euler").generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------
# 4./5. NaN and Inf: every connection checks its input and its field's output, naming the layer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["euler", "rk4", "implicit_euler", "dopri5"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_is_named(solver: str, bad: float) -> None:
    embeds = torch.randn(1, 5, 32)
    embeds[0, 2, 3] = bad
    stock = tiny_bert()
    with torch.no_grad():
        assert not torch.isfinite(stock(inputs_embeds=embeds).logits).all()  # stock: NaN logits, no word
    model = convert(tiny_bert(), solver, step=0.5)
    expected = rf"layer 0 \({solver}, field='residual'\): the input hidden state contains NaN or Inf"
    with pytest.raises(NonFiniteError, match=expected):
        model(inputs_embeds=embeds)


def poison(model: nn.Module, layer: int) -> nn.Module:
    """A NaN weight in one layer's feed-forward output: the layer's output is NaN at every position."""
    with torch.no_grad():
        find_layers(model)[layer].output.dense.weight[0, 0] = float("nan")
    return model


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4"])
def test_non_finite_field_in_explicit_steps_is_named(solver: str) -> None:
    assert not torch.isfinite(logits(poison(tiny_bert(3), 1))).all()  # stock: NaN logits, no word
    model = poison(convert(tiny_bert(3), solver, step=0.5), 1)
    with pytest.raises(NonFiniteError, match=rf"layer 1 \({solver}.*output of the ODE step.*vector field"):
        model(**batch())


@pytest.mark.filterwarnings("ignore::solvers.ConvergenceWarning")  # gd's solve of layer 0 stops short
@pytest.mark.parametrize(
    ("solver", "options"),
    [("implicit_euler", {"root": r}) for r in solvers.available_root_finders()]
    + [("trapezoid", {}), ("dopri5", {}), ("bosh3", {})],
)
def test_non_finite_field_inside_implicit_and_adaptive_solves_is_named(solver: str, options: dict) -> None:
    model = poison(convert(tiny_bert(3), solver, step=0.5, **options), 1)
    with pytest.raises(NonFiniteError, match=rf"layer 1 \({solver}.*the vector field returned NaN or Inf"):
        model(**batch())


def test_solver_non_finite_errors_are_re_raised_with_the_layer(monkeypatch) -> None:
    """Whatever non-finite exception the solvers raise inside a solve comes back naming the layer."""

    model = convert(tiny_bert(), "implicit_euler", step=0.5)
    connection = find_layers(model)[1].forward

    def failing_step(*args, **kwargs):
        raise solvers.NonFiniteError("the vector field returned NaN at iteration 3")

    method = copy.copy(connection.method)  # the layers share one method: fail in layer 1 only
    method.step = failing_step
    monkeypatch.setattr(connection, "method", method)
    expected = r"layer 1 \(implicit_euler, field='residual'\): the vector field returned NaN at iteration 3"
    with pytest.raises(NonFiniteError, match=expected) as err:
        model(**batch())
    assert type(err.value.__cause__) is solvers.NonFiniteError


def test_finiteness_fast_path_has_no_false_alarms() -> None:
    from solvers import all_finite

    assert all_finite(torch.full((8,), 3e38))  # the sum overflows, every entry is finite
    assert all_finite(torch.full((8,), 6e4, dtype=torch.float16))
    assert not all_finite(torch.tensor([1.0, float("nan")]))
    assert not all_finite(torch.tensor([float("inf"), -float("inf")], dtype=torch.bfloat16))
    model = convert(tiny_bert(), "euler", step=1.0)  # finite inputs: identical to the stock model
    torch.testing.assert_close(logits(model), logits(tiny_bert()), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# 6. Misspelled names get a suggestion
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "suggestion"),
    [
        ({"solver": "implicit_eulr"}, "implicit_euler"),
        ({"field": "residul"}, "residual"),
        ({"root": "andersen"}, "anderson"),
        ({"grad": "implicitt"}, "implicit"),
        ({"grad": "one-step"}, "one_step"),
        ({"on_failure": "rase"}, "raise"),
    ],
)
def test_misspelled_names_get_a_suggestion(kwargs: dict, suggestion: str) -> None:
    model = tiny_bert()
    with pytest.raises(ValueError, match=rf"Did you mean '{suggestion}'\?"):
        convert(model, **{"solver": "implicit_euler", **kwargs})
    assert ode_bert.ode_config(model) is None


# --------------------------------------------------------------------------------------------------
# 7. A local folder that does not exist
# --------------------------------------------------------------------------------------------------


def test_from_pretrained_on_a_missing_local_folder(tmp_path, monkeypatch) -> None:
    missing = tmp_path / "runs" / "model"
    with pytest.raises(FileNotFoundError, match=f"model folder {missing} does not exist"):
        ode_bert.from_pretrained(missing, AutoModel)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("./model", "../nowhere/model", "runs/model", "~/no-such-ode-bert-model"):
        with pytest.raises(FileNotFoundError, match=f"model folder {name} does not exist"):
            ode_bert.from_pretrained(name, AutoModel)
    (tmp_path / "runs" / "weights.bin").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a model folder"):
        ode_bert.load_model("runs/weights.bin")
    assert not looks_local("org/model") and not looks_local("bert-base-uncased")
    assert looks_local("runs/model") and looks_local(str(missing))
