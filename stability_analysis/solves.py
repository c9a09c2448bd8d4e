"""How hard a converted model's implicit equations are to solve, input by input.

An implicit layer solves one equation per sequence, and the root finder records each sequence's iterations,
residual and convergence. ``example_solves`` collects that record over a list of inputs, so that inputs can
be compared: e.g. an AdvGLUE sentence against the GLUE original it was made from (``advglue_pairs``), or
the examples whose solves converged against those whose solves did not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .perturbation import Text, _model_inputs


@dataclass(frozen=True)
class ExampleSolves:
    """The implicit solves of one pass over a list of inputs: rows are inputs, columns implicit layers."""

    layers: list[int]  # encoder index of each column
    iterations: Tensor  # (inputs, layers) long
    rel_residual: Tensor  # (inputs, layers) ||g(z) - z|| / ||g(z)|| where the finder stopped
    converged: Tensor  # (inputs, layers) bool
    predictions: Tensor | None  # (inputs,) argmax of the logits; None for a model without logits

    @property
    def total_iterations(self) -> Tensor:
        """Iterations per input, summed over the implicit layers."""
        return self.iterations.sum(dim=1)

    @property
    def all_converged(self) -> Tensor:
        """Whether every implicit layer's solve converged, per input."""
        return self.converged.all(dim=1)

    def select(self, rows: Sequence[int]) -> ExampleSolves:
        """The records of the inputs at ``rows``, in that order: reuse a pass instead of solving again."""
        index = torch.as_tensor(list(rows), dtype=torch.long)
        return ExampleSolves(
            layers=self.layers,
            iterations=self.iterations[index],
            rel_residual=self.rel_residual[index],
            converged=self.converged[index],
            predictions=None if self.predictions is None else self.predictions[index],
        )


def example_solves(
    model: nn.Module, tokenizer: Any, texts: Sequence[Text], max_length: int = 64, batch_size: int = 64
) -> ExampleSolves:
    """Run ``model`` (eval mode, no gradients) over ``texts`` in order and keep each input's solve record.

    ``texts`` are sentences or (sentence, sentence) pairs. A sequence's solve does not depend on the others
    in its batch (padding is held fixed and every root finder stops per sample), so ``batch_size`` changes
    only the speed, up to floating-point rounding. Raises ``ValueError`` if ``model`` has no implicit layer.
    """
    from ode_bert import solver_stats

    if not texts:
        raise ValueError("texts is empty")
    model.eval()
    device = next(model.parameters()).device
    batches, predictions = [], []
    for start in range(0, len(texts), batch_size):
        inputs = _model_inputs(tokenizer, texts[start:start + batch_size], max_length)
        with torch.no_grad():
            output = model(**{name: tensor.to(device) for name, tensor in inputs.items()})
        roots = [(s.layer, s.root) for s in solver_stats(model) if s.root is not None]
        if not roots:
            raise ValueError("the model has no implicit layer; convert it with an implicit solver first "
                             "(e.g. ode_bert.im_bert(model))")
        batches.append(roots)
        logits = getattr(output, "logits", None)
        predictions.append(None if logits is None else logits.argmax(-1).cpu())

    def columns(name: str) -> Tensor:
        return torch.cat([torch.stack([getattr(root, name).cpu() for _, root in roots], dim=1)
                          for roots in batches])

    return ExampleSolves(
        layers=[layer for layer, _ in batches[0]],
        iterations=columns("iterations"),
        rel_residual=columns("rel_residual"),
        converged=columns("converged"),
        predictions=None if predictions[0] is None else torch.cat(predictions),
    )
