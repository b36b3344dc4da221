"""Loss-to-weight strategies of loss-based sample reweighting (Sow et al., ICLR 2025).

Reference: Daouda Sow, Herbert Woisetschläger, Saikiran Bulusu, Shiqiang Wang, Hans-Arno Jacobsen,
Yingbin Liang, "Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining",
ICLR 2025, arXiv:2502.06733 (Algorithm 1, "Fully Online Instance Reweighting"; the strategies LinUpper,
Quadratic and Extremes), and the authors' code, github.com/sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025
(README "Core code pieces": ``normalize_losses``, ``apply_strategy``, ``scale_losses``; ``src/trainer.py``:
``h_func``, ``f_func_linupper``, ``f_func_mid``, ``f_func_extremes``, ``g_func``). The formulas below are
those of the released code, which is what the paper's experiments ran; the paper's own equation numbers
are not quoted here because its full text was not at hand when this was written.

For the kept rows ``l_1 .. l_n`` of one group (the whole kept set, or one stratum, see below):

1. Normalise the losses to ``[-delta, delta]`` by the group's range (``h_func``)::

       x_i = delta * (2 l_i - l_max - l_min) / max(l_max - l_min, 1e-6)

   (the code writes it ``2 delta l / R - delta (l_max + l_min) / R``; the same number). The floor
   ``1e-6`` on the range is the code's: losses that agree to within it get (nearly) uniform weights.
2. Apply the strategy ``f`` (``f_func_*``):

   ``"linupper"`` (LinUpper)   ``f(x) = min(x + delta, delta)``: rises linearly from 0 at the
                               lowest loss to ``delta`` at the middle of the range, flat above. Low-loss
                               (already learned, redundant) rows are down-weighted, high-loss rows are
                               not up-weighted beyond the cap. The strategy the paper recommends.
   ``"quadratic"`` (Quadratic, ``mid`` in trainer.py)  ``f(x) = 1 - x^2 / delta^2``: largest in the
                               middle of the range, both the lowest and the highest losses down-weighted.
   ``"extremes"`` (Extremes)   ``f(x) = |x|``: the opposite, both ends up-weighted, the middle down.

3. Exponentiate with the temperature ``r`` (``g_func``, trainer argument ``kl_reg``, "the KL
   regularisation coefficient") and normalise over the group::

       w_i = n * exp((f_i - max_j f_j) / r) / sum_k exp((f_k - max_j f_j) / r)

   ``softmax(f / r)`` is the maximiser over the probability simplex of ``sum_i p_i f_i - r KL(p || uniform)``,
   the KL-regularised weighting the ``kl_reg`` name refers to. The code divides by the sum (weights sum
   to 1 over the global batch) and multiplies the weighted loss by the batch size (``* world_size *
   len(device_weights)``), so its effective per-sample multipliers are ``n * p_i``: mean 1, as here.

Properties: ``f`` lies in ``[0, delta]`` for LinUpper and Extremes and in ``[0, 1]`` for Quadratic, so
within a group the largest weight is at most ``exp(delta / r)`` (LinUpper, Extremes) or ``exp(1 / r)``
(Quadratic) times the smallest: a large ``r`` gives nearly uniform weights, ``r -> 0`` puts the mass on
the rows with the largest ``f``. For Quadratic ``delta`` cancels (``x / delta`` is in ``[-1, 1]``); for
the other two only ``delta / r`` matters. The authors ran ``delta = 1`` and ``r = kl_reg`` (default 1).

Weights follow :func:`winnow.selectors.score_to_weight`'s invariants: float64, exactly 0 on pruned rows,
mean 1 over the kept rows (and, with ``strata``, mean 1 within every stratum's kept rows).

Deviations from the paper, all deliberate:

* Offline, over a set. The paper reweights online: each minibatch's losses come from the model being
  trained, at that step, and the min/max and the softmax run over that minibatch (gathered over GPUs).
  winnow computes the losses once with proxy checkpoints and applies the map over the whole kept set,
  so a row's weight is fixed for the whole of training and the normalising range is the set's range,
  which is wider than a minibatch's. The paper's warm-up (``burnout_steps``: no reweighting for the
  first steps) and its schedule of ``r`` have no offline counterpart.
* ``strata`` (optional; same labels as :func:`winnow.selectors.select`'s ``strata``, e.g. domain) runs
  steps 1-3 within each stratum's kept rows: each stratum gets its own range, and its kept rows keep
  mean weight 1, so reweighting never moves weight between strata (domain proportions stay those of
  the selection). This is the analogue of the paper's per-minibatch normalisation; passing random
  labels ``rng.permutation(n) // batch_size`` reproduces minibatch-sized groups if wanted.
* ``range_quantile = q > 0`` (default 0, the paper's min/max) takes ``l_min``/``l_max`` as the ``q`` and
  ``1 - q`` quantiles of the group's kept losses (numpy's linear interpolation) and clips ``x`` to
  ``[-delta, delta]``: over millions of rows one degenerate document (loss 12 among losses near 3)
  would otherwise squash every other row into a narrow band of ``x``. Rows beyond a quantile get the
  weight of that quantile.
* Token-count weighting. The authors' trainer multiplies each sample's weight with its share of the
  batch's tokens (a token-weighted baseline loss). These weights are per-row multipliers only; how the
  trainer normalises rows of different lengths is the consumer's choice, applied on top.

Losses may be any finite real numbers (the map only uses their order and range). NaN or infinite
losses among kept rows raise; pruned rows' losses are never read.
"""

from __future__ import annotations

import math

import numpy as np

from winnow.selectors.checks import is_real
from winnow.selectors.prune import _groups

__all__ = ["LOSS_STRATEGIES", "loss_to_weight"]

LOSS_STRATEGIES = ("linupper", "quadratic", "extremes")

_RANGE_FLOOR = 1e-6  # the authors' max(l_max - l_min, 1e-6)


def _strategy(x: np.ndarray, strategy: str, delta: float) -> np.ndarray:
    if strategy == "linupper":
        return np.minimum(x + delta, delta)
    if strategy == "quadratic":
        return 1.0 - (x / delta) ** 2
    return np.abs(x)  # extremes


def _group_weights(
    s: np.ndarray, strategy: str, temperature: float, delta: float, range_quantile: float
) -> np.ndarray:
    """Mean-1 weights of one group's kept losses ``s`` (finite, non-empty)."""
    if range_quantile > 0.0:
        lo, hi = (float(v) for v in np.quantile(s, [range_quantile, 1.0 - range_quantile]))
    else:
        lo, hi = float(s.min()), float(s.max())
    span = max(hi - lo, _RANGE_FLOOR)
    x = delta * ((s - lo) + (s - hi)) / span  # = delta (2 l - l_max - l_min) / span, no overflow
    if range_quantile > 0.0:
        x = np.clip(x, -delta, delta)
    f = _strategy(x, strategy, delta)
    with np.errstate(under="ignore"):
        e = np.exp((f - f.max()) / temperature)  # exponents <= 0: no overflow; the max row gives 1
    return e * (len(s) / e.sum())


def loss_to_weight(
    losses: np.ndarray,
    kept: np.ndarray | None = None,
    *,
    strategy: str = "linupper",
    temperature: float = 1.0,
    delta: float = 1.0,
    strata: np.ndarray | None = None,
    range_quantile: float = 0.0,
) -> np.ndarray:
    """Float64 weights from per-row losses by a strategy of Sow et al. (see the module docstring).

    Args:
        losses: 1-D real array, one loss per row (e.g. the ``loss`` column of the ``loss`` scorer).
        kept: 1-D boolean mask of the same length (``None``: every row is kept).
        strategy: ``"linupper"``, ``"quadratic"`` or ``"extremes"``.
        temperature: the paper's ``r`` (``kl_reg``), finite and ``> 0``.
        delta: half-width of the normalised loss range, finite and ``> 0`` (the authors used 1).
        strata: optional 1-D array of group labels (any hashable values), same length; the map runs
            within each group's kept rows and each group's kept rows get mean weight 1.
        range_quantile: ``q`` in ``[0, 0.5)``; ``q > 0`` normalises by the ``q`` / ``1 - q`` quantiles
            instead of the min / max and clips.

    Returns:
        float64 array: 0 on pruned rows, mean 1 over kept rows (all 0 when no row is kept).

    Raises:
        ValueError: on an invalid argument, or NaN/infinite losses among kept rows.
    """
    if strategy not in LOSS_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(map(repr, LOSS_STRATEGIES))}, got {strategy!r}")
    if not is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature (the paper's r) must be a finite number > 0, got {temperature!r}")
    if not is_real(delta) or not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    if not is_real(range_quantile) or not (0.0 <= range_quantile < 0.5):
        raise ValueError(f"range_quantile must be a number in [0, 0.5), got {range_quantile!r}")

    s_all = np.asarray(losses)
    if s_all.ndim != 1:
        raise ValueError(f"losses must be a 1-D array, got shape {s_all.shape}")
    if s_all.dtype.kind not in "biuf":
        raise ValueError(f"losses must be a real numeric array, got dtype {s_all.dtype}")
    n = len(s_all)
    if kept is None:
        k = np.ones(n, dtype=bool)
    else:
        k = np.asarray(kept)
        if k.ndim != 1:
            raise ValueError(f"kept must be a 1-D array, got shape {k.shape}")
        if k.dtype != np.bool_:
            raise ValueError(f"kept must be a boolean array, got dtype {k.dtype}")
        if len(k) != n:
            raise ValueError(f"kept must have the same length as losses ({n}), got {len(k)}")
    s_all = s_all.astype(np.float64, copy=False)
    s_kept = s_all[k]
    n_nan = int(np.count_nonzero(np.isnan(s_kept)))
    if n_nan:
        raise ValueError(f"losses has {n_nan} NaN values among kept rows; every kept row needs a loss")
    n_inf = int(np.count_nonzero(np.isinf(s_kept)))
    if n_inf:
        raise ValueError(
            f"losses has {n_inf} infinite values among kept rows; every kept loss must be finite"
        )

    groups = _groups(strata, n)  # validates strata; one group of every row when None
    out = np.zeros(n, dtype=np.float64)
    for rows in groups:
        rows = rows[k[rows]]
        if len(rows):
            out[rows] = _group_weights(
                s_all[rows], strategy, float(temperature), float(delta), float(range_quantile)
            )
    return out
