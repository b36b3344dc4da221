"""Selectors: pure numpy rules that turn per-row scores into a ``kept`` mask and training weights.

Imports only numpy and the standard library (see docs/ARCHITECTURE.md, "Layers").

* :func:`select` — keep rows by score: ``fraction`` / ``count`` / ``threshold`` with
  ``keep="highest" | "lowest" | "band"`` (Data Diet offset window), optionally per stratum.
* :func:`random_select` — the seeded random baseline with the same budgets and strata.
* :func:`score_to_weight` — float64 weights, 0 on pruned rows and mean 1 over kept rows.
"""

from winnow.selectors.prune import KEEP_RULES, random_select, select
from winnow.selectors.weights import METHODS, score_to_weight

__all__ = ["KEEP_RULES", "METHODS", "random_select", "score_to_weight", "select"]
