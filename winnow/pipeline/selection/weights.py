"""Weight methods (``select.weights.method``): score-to-weight transforms
(:func:`winnow.selectors.score_to_weight`: uniform, normalized, softmax, clipped) and the loss-to-weight
strategies of Sow et al. 2025 (:func:`winnow.selectors.loss_to_weight`: linupper, quadratic, extremes,
with ``temperature`` as their r). Every method gives 0 to pruned rows and mean 1 over the kept rows."""

from __future__ import annotations

from typing import Any

from winnow.pipeline.selection.registry import WeightMethod, register_weights

SCORE_OPTIONS = ("temperature", "clip_min", "clip_max", "invert")
LOSS_OPTIONS = ("temperature", "delta", "range_quantile", "per_stratum")


def _score_to_weight(scores: Any, kept: Any, w: Any, strata: Any) -> Any:
    from winnow.selectors import score_to_weight

    return score_to_weight(
        scores,
        kept,
        method=w.method,
        temperature=w.temperature,
        clip_min=w.clip_min,
        clip_max=w.clip_max,
        invert=w.invert,
    )


def _loss_to_weight(scores: Any, kept: Any, w: Any, strata: Any) -> Any:
    from winnow.selectors import loss_to_weight

    return loss_to_weight(
        scores,
        kept,
        strategy=w.method,
        temperature=w.temperature,
        delta=w.delta,
        range_quantile=w.range_quantile,
        strata=strata if w.per_stratum else None,
    )


register_weights(
    WeightMethod(
        "uniform", _score_to_weight, needs_score=False, options=SCORE_OPTIONS, family="weight method"
    )
)
for _name in ("normalized", "softmax", "clipped"):
    register_weights(WeightMethod(_name, _score_to_weight, options=SCORE_OPTIONS, family="weight method"))
for _name in ("linupper", "quadratic", "extremes"):
    register_weights(WeightMethod(_name, _loss_to_weight, options=LOSS_OPTIONS, family="loss strategy"))
