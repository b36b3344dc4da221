"""Selectors: pure numpy rules that turn per-row scores into a ``kept`` mask and training weights.

Imports only numpy and the standard library (see docs/ARCHITECTURE.md, "Layers").

* :func:`select` — keep rows by score: ``fraction`` / ``count`` / ``threshold`` with
  ``keep="highest" | "lowest" | "band"`` (Data Diet offset window), optionally per stratum.
* :func:`random_select` — the seeded random baseline with the same budgets and strata.
* :func:`budget` — how many rows a fraction or a count keeps (half up), for every selector.
* :func:`score_to_weight` — float64 weights, 0 on pruned rows and mean 1 over kept rows.
* :func:`loss_to_weight` — the loss-based strategies of Sow et al. (ICLR 2025), same invariants.

:mod:`winnow.selectors.dpp` (greedy MAP inference for DPPs, Chen et al. 2018; torch, CPU or CUDA) is
imported on its own, so that these rules keep needing numpy alone.
"""

from winnow.selectors.loss_weights import LOSS_STRATEGIES, loss_to_weight
from winnow.selectors.prune import KEEP_RULES, budget, random_select, select
from winnow.selectors.weights import METHODS, score_to_weight

__all__ = [
    "KEEP_RULES",
    "LOSS_STRATEGIES",
    "METHODS",
    "budget",
    "loss_to_weight",
    "random_select",
    "score_to_weight",
    "select",
]
