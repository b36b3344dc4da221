"""Per-example gradients from one batched backward: squared norms, seeded random projections and group
sums / Grams of every example's loss gradient, without a per-example copy of the parameters (GraNd,
influence and gradient embeddings, DoGE/DGA build on it).

Layout, bottom up: :mod:`~winnow.grads.rules` (per-layer rules that factor a module's per-example
gradients), :mod:`~winnow.grads.kernels` (the math on those factors), :mod:`~winnow.grads.projection`
(the seeded Kronecker projections), :mod:`~winnow.grads.accumulators` (one per computed quantity),
:mod:`~winnow.grads.engine` (:class:`GradEngine`: hooks, the backward, the results),
:mod:`~winnow.grads.params` (which parameters), :mod:`~winnow.grads.losses` (the per-example losses of
the pipeline's tasks) and :mod:`~winnow.grads.fast_paths` (exact speed substitutions).

This package imports torch (and transformers' model types by name only); nothing from the rest of
winnow, so that scorers, selectors and the pipeline can all build on it.
"""

from winnow.grads.accumulators import AdamUpdate
from winnow.grads.engine import SQNORM_METHODS, GradEngine
from winnow.grads.fast_paths import fast_paths
from winnow.grads.losses import next_token_losses, per_example_loss, token_nll
from winnow.grads.params import parse_params, select_parameters
from winnow.grads.projection import PROJ_KINDS, projection_factors
from winnow.grads.rules import Dense, Outer, Record, Rule, register_rule

__all__ = [
    "AdamUpdate",
    "PROJ_KINDS",
    "SQNORM_METHODS",
    "Dense",
    "GradEngine",
    "Outer",
    "Record",
    "Rule",
    "fast_paths",
    "next_token_losses",
    "parse_params",
    "per_example_loss",
    "projection_factors",
    "register_rule",
    "select_parameters",
    "token_nll",
]
