"""Relative residual of the IM-connection's solve after k iterations: gd (fixed or controlled step), Anderson.

Pretrained MiniLM (not fine-tuned), implicit Euler on layers 0 and 1 (`im_bert` defaults otherwise), the
first 16 SST-2 dev sentences; prints, per root finder and iteration cap, each layer's max relative residual.

    python bench/experiments/gd_residuals.py
"""

from __future__ import annotations

import warnings

import torch

import ode_bert
import solvers
from ode_bert.data import load_clean_dev
from ode_bert.pretrained import load_model

# gd with the paper's fixed step (two sizes), gd with its default step control (from lr 0.5), Anderson
FINDERS = [("gd", {"lr": 0.5, "backtrack": False}), ("gd", {"lr": 0.1, "backtrack": False}), ("gd", {}),
           ("anderson", {})]
CAPS = (1, 2, 5, 10, 20, 40)


def main() -> None:
    warnings.filterwarnings("ignore", category=solvers.ConvergenceWarning)
    sentences = [ex.text_a for ex in load_clean_dev("sst2")["sst2"][:16]]
    model, tokenizer = load_model(None, num_labels=2)
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    print("root finder, options, max_iter: max relative residual of layers 0, 1")
    for root, options in FINDERS:
        for cap in CAPS:
            ode_bert.unconvert(model)
            ode_bert.im_bert(model, root=root, max_iter=cap, layers="0-1", root_options=options)
            model.eval()
            with torch.no_grad():
                model(**batch)
            residuals = [f"{s.residual:.3g}" for s in ode_bert.solver_stats(model)]
            print(root, options, cap, residuals, flush=True)


if __name__ == "__main__":
    main()
