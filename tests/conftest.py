"""Fixtures shared by the test modules."""

from __future__ import annotations

import string

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 2-layer, 32-wide random BertModel with a character-level WordPiece tokenizer, saved to disk."""
    root = tmp_path_factory.mktemp("tiny")
    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *string.punctuation,
             *(f"##{c}" for c in chars)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2,
    )  # fmt: skip
    torch.manual_seed(0)
    BertModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return str(root / "model")


class Interrupted(Exception):
    """Stands in for a crash or Ctrl-C right after the first checkpoint of a training run is written."""


@pytest.fixture
def train_until_first_checkpoint(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - returns the runner
    """``run(config)``: ``ode_bert.train(config)`` stopped right after it writes its first checkpoint."""
    from ode_bert import train as train_module

    def run(config: object) -> None:
        real_save = train_module.save_checkpoint

        def save_then_crash(path: object, state: dict) -> None:
            real_save(path, state)
            raise Interrupted

        with monkeypatch.context() as patch:
            patch.setattr(train_module, "save_checkpoint", save_then_crash)
            with pytest.raises(Interrupted):
                train_module.train(config)

    return run
