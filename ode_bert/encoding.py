"""Examples as model inputs: a tokenized dataset and the collator that pads its batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .data import Example


class EncodedDataset(torch.utils.data.Dataset):
    """Tokenized examples (no padding; ``Collator`` pads each batch to its longest member)."""

    def __init__(self, examples: Sequence[Example], tokenizer: Any, max_length: int) -> None:
        texts_a = [ex.text_a for ex in examples]
        texts_b = [ex.text_b for ex in examples]
        pairs = any(b is not None for b in texts_b)
        self.encodings = tokenizer(
            texts_a, texts_b if pairs else None, truncation=True, max_length=max_length
        )
        self.labels = [ex.label for ex in examples]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = {k: v[i] for k, v in self.encodings.items()}
        item["labels"] = self.labels[i]
        return item


class Collator:
    """Pads a list of ``EncodedDataset`` items into a batch of tensors."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return self.tokenizer.pad(items, return_tensors="pt")
