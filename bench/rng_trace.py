"""Where each training step's random numbers start: the generator's state at the start of every step and of
every implicit layer's ODE step, over a few training steps of a tiny random IM-BERT.

Prints one line per training step, each state named by its first appearance (``s0``, ``s1``, ...): a name
seen again is a state reused, so the dropout masks drawn from it repeat. ode-bert 0.3.0 draws fresh numbers
every step; 0.2.0's backward pass rewound the generator (README, "Changed in 0.3.0"). To trace 0.2.0, run
this file with the old code first on the path:

    python -m bench.rng_trace
    git archive da6ca08 | tar -x -C /tmp/v020 && PYTHONPATH=/tmp/v020 python bench/rng_trace.py
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence

import torch
from transformers import BertConfig, BertForSequenceClassification

import ode_bert
from ode_bert.convert import ODEConnection


def trace(steps: int = 4, layers: int = 3) -> list[str]:
    """One line per training step: the state it starts from and the state each implicit layer starts from."""
    names: dict[str, str] = {}

    def name() -> str:
        digest = hashlib.sha1(torch.get_rng_state().numpy().tobytes()).hexdigest()
        return names.setdefault(digest, f"s{len(names)}")

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)  # fmt: skip
    model = ode_bert.im_bert(BertForSequenceClassification(config)).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    inputs = torch.randint(5, 50, (4, 12))
    labels = torch.tensor([0, 1, 0, 1])
    seen: list[str] = []
    original = ODEConnection._step

    def traced(self: ODEConnection, *args: object, **kwargs: object) -> object:
        seen.append(f"layer {self.index}: {name()}")
        return original(self, *args, **kwargs)

    lines = []
    ODEConnection._step = traced
    try:
        for step in range(steps):
            seen.clear()
            start = name()
            model(input_ids=inputs, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            lines.append(f"step {step} starts at {start}; " + ", ".join(seen))
    finally:
        ODEConnection._step = original
    return lines


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    print(f"ode-bert from {ode_bert.__file__}")
    lines = trace(args.steps)
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
