"""Per-layer-type rules of the per-example gradient engine: one module per layer type, each rule
registered with ``@register_rule`` (:mod:`winnow.grads.rules.base` says what a rule returns).

The rules, with the factors they produce (B examples, T positions, U calls of the module):

=================  ==========================================================  =======================
module             factors per call                                            notes
=================  ==========================================================  =======================
``nn.Linear``      weight (out, in): Outer(g, a); bias: Dense(sum_t g_t)       any leading dims -> T
HF ``Conv1D``      weight (in, out): Outer(a, g); bias: Dense(sum_t g_t)       GPT-2's linear layers
``nn.Embedding``   weight (V, d): Outer(ids, g), g = 0 where id = padding_idx  one-hot rows, gathered
norms              weight / bias: Dense(sum_t g_t * dy_t/dp)                   dy/dp: xhat, or a jvp
``nn.Conv2d``      weight (out, in*kh*kw): Outer(g, unfold(a)); bias: Dense    groups = 1
learned tokens     cls/position tables (ViT): Dense, one replay+vjp per example  TokenParamsRule
=================  ==========================================================  =======================

Rules are matched in the order of :data:`RULES`, which is the order of the imports below (each module
appends its rule when imported): keep it. A new layer type goes in a new module here, imported below;
a project's own rule can also be registered from outside with :func:`register_rule` (tried first).
"""

from winnow.grads.rules.base import (
    RULES,
    Dense,
    Factor,
    Outer,
    Record,
    Rule,
    find_rule,
    register_rule,
)

# the built-in rules, in matching order: each import registers its rule (not sorted on purpose)
# isort: off
from winnow.grads.rules.linear import LinearRule
from winnow.grads.rules.conv1d import Conv1DRule
from winnow.grads.rules.embedding import EmbeddingRule
from winnow.grads.rules.norm import NormRule
from winnow.grads.rules.conv2d import Conv2dRule
from winnow.grads.rules.tokens import TokenParamsRule

# isort: on

__all__ = [
    "RULES",
    "Conv1DRule",
    "Conv2dRule",
    "Dense",
    "EmbeddingRule",
    "Factor",
    "LinearRule",
    "NormRule",
    "Outer",
    "Record",
    "Rule",
    "TokenParamsRule",
    "find_rule",
    "register_rule",
]
