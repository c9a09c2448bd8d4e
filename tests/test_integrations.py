"""A converted model inside other tools: ``transformers.Trainer`` and ``torch.compile``.

The Trainer test runs a whole Trainer life cycle on an ``im_bert`` model (train with periodic evaluation,
a checkpoint folder, a final evaluation) and reloads the checkpoint folder with ``ode_bert.from_pretrained``.
The compile test (slow: inductor compiles C++ for the forward and the backward, 46 s on the 2-core machine
and several minutes when it is loaded) checks the compiled model against eager; ``tests/test_convert.py``
has the quicker dynamo-only (``backend="eager"``) check of the forward.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

import ode_bert
import solvers

VOCAB, TOKENS, LABELS = 99, 7, 3


def tiny_classifier() -> nn.Module:
    """A 2-layer, 32-wide random BERT classifier with dropout, seeded."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=LABELS)  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


class Sentences(torch.utils.data.Dataset):
    """``size`` random sentences of ``TOKENS`` ids; every other one ends in two padding positions."""

    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (size, TOKENS), generator=generator)
        self.mask = torch.ones_like(self.ids)
        self.mask[1::2, -2:] = 0
        self.ids[self.mask == 0] = 0
        self.labels = self.ids[:, 0] % LABELS  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}

    def batch(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids, "attention_mask": self.mask}


def test_trainer_trains_evaluates_checkpoints_and_the_checkpoint_reloads(tmp_path: Path) -> None:
    from transformers import Trainer, TrainingArguments

    model = ode_bert.im_bert(tiny_classifier())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, dev = Sentences(16, seed=1), Sentences(8, seed=2)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        learning_rate=5e-3, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=4,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev)
    with warnings.catch_warnings():
        warnings.simplefilter("error", solvers.ConvergenceWarning)  # every implicit solve converges
        result = trainer.train()
        metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # it trained
    evaluated_at = [entry["step"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert evaluated_at == [2, 4, 4]  # two evaluations during training, then the final one
    # the final evaluation is the cross-entropy of the trained ODE model, computed here independently
    model.eval()
    with torch.no_grad():
        logits = model(**dev.batch()).logits
    want = torch.nn.functional.cross_entropy(logits, dev.labels)
    assert metrics["eval_loss"] == pytest.approx(float(want), rel=1e-5)

    checkpoint = tmp_path / "checkpoint-4"
    stored = json.loads((checkpoint / "config.json").read_text())["ode_bert"]
    assert stored == ode_bert.ode_config(model)
    loaded = ode_bert.from_pretrained(checkpoint, AutoModelForSequenceClassification).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**dev.batch()).logits, logits)
        stock = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
        stock_logits = stock(**dev.batch()).logits
    assert (stock_logits - logits).abs().max() > 1e-3  # plain transformers loads the stock model
    assert ode_bert.solver_stats(loaded) and not ode_bert.solver_stats(stock)


@pytest.mark.slow
def test_torch_compile_inductor_matches_eager_forward_and_backward() -> None:
    inputs = Sentences(4, seed=3).batch()
    labels = torch.tensor([0, 1, 2, 0])
    eager = ode_bert.convert(tiny_classifier().eval(), "rk4", field="residual", step=0.5)
    compiled_model = ode_bert.convert(tiny_classifier().eval(), "rk4", field="residual", step=0.5)
    compiled = torch.compile(compiled_model)
    want = eager(**inputs, labels=labels)
    got = compiled(**inputs, labels=labels)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
