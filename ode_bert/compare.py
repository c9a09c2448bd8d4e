"""Paired comparison of variants (BERT, EX-BERT, IM-BERT, ...) over seeds on identical data.

Kept for existing imports: the implementation is ``ode_bert.experiments`` (``compare``, the settings check
of reused runs, paired statistics, tables and plots); see docs/experiments.md.
"""

from __future__ import annotations

from .experiments import (
    METRICS,
    NOT_TAKEN,
    check_reuse,
    compare,
    format_markdown,
    paired_difference,
    reuse_problem,
    summarize,
)
from .experiments import plot_scores as plot

__all__ = ["METRICS", "NOT_TAKEN", "check_reuse", "compare", "format_markdown", "paired_difference", "plot",
           "reuse_problem", "summarize"]
