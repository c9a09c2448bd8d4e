"""Attacks against fine-tuned runs: white-box PGD on the ODE's initial value and offline text recipes.

``RECIPES`` are the names ``ode-bert attack --recipe`` takes; this module imports no torch (the command
line reads it for ``--help``). The library: ``ode_bert.attack.embedding`` (PGD, gradient sources),
``ode_bert.attack.text`` (DeepWordBug, PWWS, WordNet), ``ode_bert.attack.runner`` (``attack_run``,
``AttackConfig``: records, summary and plot in the run folder) and ``ode_bert.attack.pool`` (``attack_runs``:
several at a time in child processes). See docs/attack.md.
"""

from __future__ import annotations

RECIPES: dict[str, str] = {
    "pgd-l2": "white-box PGD on the first hidden state, L2 ball relative to its norm",
    "pgd-linf": "white-box PGD on the first hidden state, L-infinity box relative to its RMS entry",
    "deepwordbug": "character edits of the most important words (Gao et al. 2018), Levenshtein budget",
    "pwws": "WordNet synonym substitution by probability-weighted word saliency (Ren et al. 2019)",
}
