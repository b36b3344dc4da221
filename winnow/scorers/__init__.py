"""Scorers: per-example scores from a model and a batch (torch only; see docs/ARCHITECTURE.md).

``get_scorer(name, **params)`` builds a registered scorer; ``SCORERS`` maps names to classes.
"""

from winnow.scorers.base import SCORERS, TASKS, Param, Scorer, get_scorer, register
from winnow.scorers.el2n import (
    EL2N,
    causal_lm_el2n,
    causal_lm_hidden_states,
    causal_lm_token_el2n,
    el2n_from_logits,
    lm_head_params,
    reduce_token_scores,
)
from winnow.scorers.grand import GraNd  # noqa: F401  (registers the "grand" scorer)
from winnow.scorers.loss import LossScorer  # noqa: F401  (registers the "loss" scorer)

__all__ = [
    "EL2N",
    "SCORERS",
    "TASKS",
    "Param",
    "Scorer",
    "causal_lm_el2n",
    "causal_lm_hidden_states",
    "causal_lm_token_el2n",
    "el2n_from_logits",
    "get_scorer",
    "lm_head_params",
    "reduce_token_scores",
    "register",
]
