"""Issue 20: adaptive solvers get practical tolerances inside convert, old saved configs keep theirs, and a
forward that costs far more than the stock model warns while it runs and says so in solver_stats."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from transformers import BertConfig, BertModel

import ode_bert
import solvers
from ode_bert.convert import EVALUATION_BUDGET, EvaluationBudgetWarning
from ode_bert.settings import ADAPTIVE_DEFAULTS, LEGACY_ADAPTIVE_TOLERANCES, ODESettings

ADAPTIVE = [name for name in solvers.available() if solvers.METHODS.lookup(name).adaptive]


def test_every_adaptive_solver_gets_the_defaults_unless_given() -> None:
    assert set(ADAPTIVE) == {"adaptive_heun", "bosh3", "dopri5", "dopri8"}
    for name in ADAPTIVE:
        assert ODESettings(solver=name).make_method().rtol == ADAPTIVE_DEFAULTS["rtol"]
        given = ODESettings(solver=name, solver_options={"rtol": 1e-6})
        assert given.solver_options == {"rtol": 1e-6, "atol": ADAPTIVE_DEFAULTS["atol"]}
        assert ODESettings.from_dict(given.to_dict()) == given  # stored explicitly, read back unchanged
    assert ODESettings(solver="rk4").solver_options == {}  # fixed-step methods take no tolerances


def test_a_config_saved_before_the_defaults_keeps_the_tolerances_it_ran_with() -> None:
    """Configs saved earlier hold no rtol/atol: they ran with the solvers' own defaults, read from the
    method's signature here, and must load with those, not with the new defaults."""
    signature = inspect.signature(solvers.METHODS.lookup("dopri5").__init__).parameters
    assert {k: signature[k].default for k in ("rtol", "atol")} == LEGACY_ADAPTIVE_TOLERANCES
    stored = ODESettings(solver="dopri5").to_dict()
    stored["solver_options"] = {}
    method = ODESettings.from_dict(stored).make_method()
    assert (method.rtol, method.atol) == (1e-7, 1e-9)
    stored["solver_options"] = {"rtol": 1e-4}
    assert ODESettings.from_dict(stored).make_method().atol == 1e-9


def _tiny() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, initializer_range=0.5)
    return BertModel(config).eval()


def test_a_costly_forward_warns_and_solver_stats_flag_it() -> None:
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    model = ode_bert.convert(_tiny(), "dopri5", rtol=1e-7, atol=1e-9)  # the solvers' own defaults
    expected = r"layer \d \(dopri5, rtol=1e-07.*more than 100"
    with pytest.warns(EvaluationBudgetWarning, match=expected) as caught:
        model(input_ids=ids)
    layers = [str(w.message).split(" (")[0] for w in caught if w.category is EvaluationBudgetWarning]
    assert layers == ["layer 0", "layer 1"]  # once per layer
    stats = ode_bert.solver_stats(model)
    assert all(s.nfev > EVALUATION_BUDGET and s.over_budget and s.budget == EVALUATION_BUDGET for s in stats)
    assert "over budget: layer(s) 0, 1" in str(stats)

    ode_bert.convert(model, "dopri5")  # the defaults
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvaluationBudgetWarning)
        model(input_ids=ids)
    stats = ode_bert.solver_stats(model)
    assert not any(s.over_budget for s in stats) and "over budget" not in str(stats)
    ode_bert.convert(model, "rk4")
    model(input_ids=ids)
    assert [s.budget for s in ode_bert.solver_stats(model)] == [None, None]  # fixed cost: no budget
