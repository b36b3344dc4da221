"""Per-row training weights from scores.

:func:`score_to_weight` turns a score array and a ``kept`` mask into float64 weights with two
invariants, for every method:

* pruned rows weigh exactly 0;
* kept rows' weights have mean 1 (up to float rounding), so a weighted mean loss
  ``sum(w_i * loss_i) / n_kept`` keeps the scale of the unweighted one and learning rates carry over.

Methods (``s`` are the kept rows' scores, ``n`` how many there are):

``"uniform"``
    ``w = 1``. The scores are not needed (``scores=None`` is accepted) and ``invert`` changes nothing.
``"normalized"``
    Importance weights proportional to the score, ``w_i = s_i / mean(s)``, as in importance
    sampling with probability proportional to a score (e.g. loss- or gradient-norm-proportional
    sampling, Katharopoulos & Fleuret 2018, arXiv:1803.00942). Proportional weights are only
    meaningful for a ratio-scale score, so kept scores must be ``>= 0`` (EL2N, GraNd, losses,
    perplexities are); no shift is applied, because a shift would change every ratio ``w_i / w_j``.
    If every kept score is 0 the weights are uniform (the limit of equal scores). ``invert=True`` uses
    the reciprocal, ``w_i ∝ 1 / s_i``, which keeps ratios symmetric (``w_i / w_j = s_j / s_i``); it
    needs every kept score ``> 0``.
``"softmax"``
    ``w = n * softmax(s / T)`` computed after subtracting the maximum (no overflow). ``T -> inf``
    gives uniform weights, ``T -> 0`` puts all the mass on the highest score(s). ``invert=True`` uses
    ``-s``, so the lowest scores weigh most.
``"clipped"``
    The ``"normalized"`` weights ``w`` (``invert`` as there) mapped to ``clip(c * w, clip_min,
    clip_max)`` with the one scale ``c > 0`` that makes the mean exactly 1. ``c`` is found by bisection
    on the monotone, piecewise-linear ``c -> mean(clip(c * w, lo, hi))`` until the set of rows clipped
    low / high is settled, then solved in closed form on that piece,
    ``c = (n - lo * n_low - hi * n_high) / sum(w_mid)``. This is a single monotone map, so the order
    of the weights is kept and the bounds hold exactly (unlike clip-then-renormalise, which can push
    weights back out of the bounds). A mean of 1 is reachable only if ``clip_min <= 1 <= clip_max``;
    ``clip_min`` defaults to 0 and ``clip_max`` to infinity (give at least one). Clipping bounds the
    variance that importance weights add to the loss, as weight truncation does in importance
    sampling (Ionides 2008, "Truncated importance sampling").

``temperature`` is used only by ``"softmax"`` (it is validated always); ``clip_min``/``clip_max`` are
accepted only with ``"clipped"``. NaN or infinite scores among kept rows raise (naming how many);
pruned rows' scores are never read. With no kept row every weight is 0.
"""

from __future__ import annotations

import math

import numpy as np

from winnow.selectors.checks import is_real

__all__ = ["METHODS", "score_to_weight"]

METHODS = ("uniform", "normalized", "softmax", "clipped")


def _proportional(s: np.ndarray, invert: bool, method: str) -> np.ndarray:
    """Mean-1 weights proportional to ``s`` (or ``1 / s`` with ``invert``)."""
    if invert:
        bad = int(np.count_nonzero(s <= 0))
        if bad:
            raise ValueError(
                f"method={method!r} with invert=True needs kept scores > 0 (weights ∝ 1/score); "
                f"{bad} kept scores are <= 0"
            )
        # 1/s scaled by min(s) stays in (0, 1] and never overflows.
        w = s.min() / s
    else:
        bad = int(np.count_nonzero(s < 0))
        if bad:
            raise ValueError(
                f"method={method!r} needs kept scores >= 0 (weights ∝ score); {bad} kept scores are negative"
            )
        top = s.max()
        if top == 0:
            return np.ones_like(s)
        w = s / top  # in [0, 1]: the sum below cannot overflow
    return w / w.mean()


def _clip_mean_one(w: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``clip(c * w, lo, hi)`` with the scale ``c`` that makes the mean 1 (``w >= 0``, mean 1)."""
    n = len(w)
    if lo == 1.0 or hi == 1.0:
        return np.ones_like(w)  # every weight on one side of 1 with mean 1: all are 1

    def mean_at(c: float) -> float:
        return float(np.clip(c * w, lo, hi).mean())

    def solve_on_piece(c: float) -> float | None:
        """Closed-form c on the linear piece that contains ``c``; None if it falls outside."""
        cw = c * w
        low, high = cw < lo, cw > hi
        mid = ~(low | high)
        sum_mid = float(w[mid].sum())
        if sum_mid == 0.0:
            return c if abs(mean_at(c) - 1.0) <= 1e-12 else None
        n_low, n_high = int(np.count_nonzero(low)), int(np.count_nonzero(high))
        pinned = (lo * n_low if n_low else 0.0) + (hi * n_high if n_high else 0.0)  # no 0 * inf
        c_star = (n - pinned) / sum_mid
        cw = c_star * w
        tol = 1e-12 * max(1.0, c_star)
        ok = (
            np.all(cw[low] <= lo + tol * w[low])
            and np.all(cw[high] >= hi - tol * w[high])
            and np.all((cw[mid] >= lo - tol * w[mid]) & (cw[mid] <= hi + tol * w[mid]))
        )
        return c_star if ok and c_star > 0 else None

    # Bracket: mean_at(0) = lo < 1. mean_at(1) >= 1 when hi is infinite (clip only raises values);
    # otherwise the largest reachable mean is at c = hi / min positive w (every positive w at hi).
    a, b = 0.0, 1.0
    if mean_at(b) < 1.0:
        pos = w[w > 0]
        b = hi / float(pos.min())
        if mean_at(b) < 1.0 - 1e-12:
            n_zero = n - len(pos)
            raise ValueError(
                f"clip_max={hi!r} is too small: with {n_zero} of {n} kept rows at weight 0 "
                f"the mean cannot reach 1"
            )
    c = solve_on_piece(b)
    for _ in range(200):
        if c is not None:
            break
        m = 0.5 * (a + b)
        c = solve_on_piece(m)
        if mean_at(m) < 1.0:
            a = m
        else:
            b = m
    if c is None:  # pragma: no cover - bisection converges far sooner on float64
        c = b
    return np.clip(c * w, lo, hi)


def score_to_weight(
    scores: np.ndarray | None,
    kept: np.ndarray,
    *,
    method: str = "uniform",
    temperature: float = 1.0,
    clip_min: float | None = None,
    clip_max: float | None = None,
    invert: bool = False,
) -> np.ndarray:
    """Float64 training weights: 0 on pruned rows, mean 1 over kept rows (see the module docstring).

    Args:
        scores: 1-D real array, one score per row (``None`` only with ``method="uniform"``).
        kept: 1-D boolean mask of the same length (e.g. from :func:`winnow.selectors.select`).
        method: ``"uniform"``, ``"normalized"``, ``"softmax"`` or ``"clipped"``.
        temperature: softmax temperature ``T > 0``.
        clip_min, clip_max: bounds for ``"clipped"``, ``0 <= clip_min <= 1 <= clip_max``.
        invert: give low scores the larger weights (``1/score`` for normalized/clipped, ``-score``
            for softmax).

    Raises:
        ValueError: on an invalid argument, or NaN/infinite scores among kept rows.
    """
    if method not in METHODS:
        raise ValueError(
            f"method must be one of 'uniform', 'normalized', 'softmax', 'clipped', got {method!r}"
        )
    if not is_real(temperature) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if method != "clipped" and (clip_min is not None or clip_max is not None):
        raise ValueError(f"clip_min and clip_max are only used with method='clipped', got method={method!r}")
    if method == "clipped":
        if clip_min is None and clip_max is None:
            raise ValueError("method='clipped' needs clip_min or clip_max")
        if clip_min is not None and (not is_real(clip_min) or not (0.0 <= clip_min <= 1.0)):
            raise ValueError(f"clip_min must be in [0, 1] so that a mean of 1 is reachable, got {clip_min!r}")
        if clip_max is not None and (not is_real(clip_max) or math.isnan(clip_max) or clip_max < 1.0):
            raise ValueError(f"clip_max must be >= 1 so that a mean of 1 is reachable, got {clip_max!r}")
    if not isinstance(invert, bool | np.bool_):
        raise ValueError(f"invert must be a bool, got {invert!r}")

    k = np.asarray(kept)
    if k.ndim != 1:
        raise ValueError(f"kept must be a 1-D array, got shape {k.shape}")
    if k.dtype != np.bool_:
        raise ValueError(f"kept must be a boolean array, got dtype {k.dtype}")
    if scores is None:
        if method != "uniform":
            raise ValueError(f"scores are required for method={method!r}")
        s_all = None
    else:
        s_all = np.asarray(scores)
        if s_all.ndim != 1:
            raise ValueError(f"scores must be a 1-D array, got shape {s_all.shape}")
        if s_all.dtype.kind not in "biuf":
            raise ValueError(f"scores must be a real numeric array, got dtype {s_all.dtype}")
        if len(s_all) != len(k):
            raise ValueError(f"kept must have the same length as scores ({len(s_all)}), got {len(k)}")
        s_all = s_all.astype(np.float64, copy=False)

    out = np.zeros(len(k), dtype=np.float64)
    n_kept = int(np.count_nonzero(k))
    if s_all is not None:
        s = s_all[k]
        n_nan = int(np.count_nonzero(np.isnan(s)))
        if n_nan:
            raise ValueError(f"scores has {n_nan} NaN values among kept rows; every kept row needs a score")
        n_inf = int(np.count_nonzero(np.isinf(s)))
        if n_inf:
            raise ValueError(
                f"scores has {n_inf} infinite values among kept rows; every kept score must be finite"
            )
    if n_kept == 0:
        return out

    if method == "uniform":
        w = np.ones(n_kept)
    elif method == "softmax":
        z = -s if invert else s
        with np.errstate(over="ignore"):  # exponents <= 0; a tiny T sends them to -inf, exp -> 0
            e = np.exp((z - z.max()) / float(temperature))
        w = e * (n_kept / e.sum())
    else:
        w = _proportional(s, bool(invert), method)
        if method == "clipped":
            lo = 0.0 if clip_min is None else float(clip_min)
            hi = math.inf if clip_max is None else float(clip_max)
            w = _clip_mean_one(w, lo, hi)
    out[k] = w
    return out
