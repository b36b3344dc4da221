"""Score-based pruning rules and a seeded random baseline.

Everything here is pure numpy over one score array per call and returns a boolean ``kept`` mask of
the same length. The rules and every choice they make:

Ordering
    Rows are ranked by score with a *stable* sort, so tied scores keep their input order: among equal
    scores the row with the smaller index ranks first (is kept first) for ``keep="highest"``,
    ``"lowest"`` and ``"band"`` alike. NaN scores always rank last and are **never kept** by a
    score-based rule (not by fraction, count nor threshold), whatever ``keep`` is. ``+inf`` and ``-inf``
    are ordinary, comparable values.

Budgets
    ``fraction`` (in ``(0, 1]``) keeps ``round_half_up(fraction * n)`` rows, where ``n`` is the number
    of rows of the stratum *including NaN rows*; the budget is not enlarged to make up for NaN rows
    that cannot be kept, so a stratum with many NaNs may keep fewer rows than its budget.
    ``count`` (an integer ``>= 0``) keeps that many rows; a count larger than the number of rows keeps
    every (non-NaN) row rather than raising.
    ``threshold`` keeps ``score >= threshold`` with ``keep="highest"`` and ``score <= threshold`` with
    ``keep="lowest"``; it is a per-row rule, so ``strata`` does not change its result.

Band (Data Diet offset)
    ``keep="band"`` is the offset experiment of Paul, Ganguli and Dziugaite, "Deep Learning on a Data
    Diet: Finding Important Examples Early in Training", NeurIPS 2021 (arXiv:2107.07075): rows are
    sorted by score descending (hardest first), the top ``offset`` are skipped (at high pruning rates
    the very hardest examples, often mislabelled or ambiguous, hurt) and the next ``fraction``/``count``
    rows are kept. Here ``offset`` is always a *fraction* of the stratum size in ``[0, 1)``, so one
    value means the same thing in every stratum: ``skip = round_half_up(offset * n)``. With
    ``fraction`` the window must fit (``offset + fraction <= 1``); with ``count`` the window is cut at
    the end of the sorted rows. ``offset`` is only accepted with ``keep="band"``, and ``band`` does not
    take a ``threshold``.

Strata
    ``strata`` (one label per row: domain, class, ...; any hashable values, ``None`` allowed, every
    float NaN counts as one stratum) applies the rule within each stratum separately. A ``fraction``
    (and the band's ``offset``) is applied to each stratum's own size. A ``count`` is split across
    strata in proportion to their sizes by the largest-remainder (Hamilton) method, with exact integer
    arithmetic: stratum ``i`` of size ``n_i`` gets ``floor(c * n_i / N)`` and the ``c - sum(floors)``
    leftover rows go one each to the strata with the largest remainders ``c * n_i mod N``, ties going
    to the stratum that appears first in the data; so the quotas sum exactly to ``c = min(count, N)``
    (they can only fall short where a stratum's quota meets NaN scores, which are not redistributed).

Random baseline
    :func:`random_select` draws one key ``u ~ U[0, 1)`` per row from
    ``np.random.default_rng(seed)`` and keeps, in each stratum, the rows with the smallest keys, with
    the same budgets as :func:`select`. The keys depend only on ``seed`` and ``n`` (not on the
    process, nor on the strata), so the mask is reproducible, and a smaller budget with the same seed
    keeps a subset of what a larger one keeps.

``round_half_up(f * n)`` is ``floor(f * n + 1/2)`` computed exactly on the decimal value of ``f``
as written (``repr``): ``0.145 * 100`` is 14.5 and keeps 15, although the float product is 14.4999...
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from fractions import Fraction

import numpy as np

from winnow.selectors.checks import is_int, is_real

__all__ = ["random_select", "select"]

KEEP_RULES = ("highest", "lowest", "band")
_NAN_STRATUM = object()  # the one stratum every float NaN label falls into


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------


def _check_budget(fraction, count, threshold=None, *, allow_threshold: bool = True) -> None:
    given = [
        name
        for name, v in (("fraction", fraction), ("count", count), ("threshold", threshold))
        if v is not None
    ]
    names = "fraction, count, threshold" if allow_threshold else "fraction, count"
    if len(given) != 1:
        got = "none" if not given else " and ".join(given)
        raise ValueError(f"exactly one of {names} must be given, got {got}")
    if fraction is not None:
        if not is_real(fraction) or not (0.0 < float(fraction) <= 1.0):
            raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if count is not None:
        if not is_int(count) or int(count) < 0:
            raise ValueError(f"count must be an integer >= 0, got {count!r}")
    if threshold is not None:
        if not is_real(threshold) or math.isnan(float(threshold)):
            raise ValueError(f"threshold must be a number (not NaN), got {threshold!r}")


def _as_scores(scores) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != 1:
        raise ValueError(f"scores must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"scores must be a real numeric array, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


def _exact(x: float) -> Fraction:
    """The decimal value as written (``0.35``, not the binary float just below it)."""
    return Fraction(repr(float(x)))


def _round_half_up(fraction: float, n: int) -> int:
    """``floor(fraction * n + 1/2)`` in exact rational arithmetic."""
    return math.floor(_exact(fraction) * n + Fraction(1, 2))


def _groups(strata, n: int) -> list[np.ndarray]:
    """Row indices of each stratum, strata in order of first appearance (one group if ``strata`` is None)."""
    if strata is None:
        return [np.arange(n)]
    arr = np.asarray(strata, dtype=object) if not isinstance(strata, np.ndarray) else strata
    if arr.ndim != 1:
        raise ValueError(f"strata must be a 1-D array, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"strata must have the same length as scores ({n}), got {len(arr)}")
    if arr.dtype.kind in "biufUS" and n:
        # Fast path for plain dtypes: np.unique (NaNs grouped as one, equal_nan), then the strata
        # reordered by first appearance so both paths give the same order.
        _, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        code = rank[inverse.reshape(-1)]
        order = np.argsort(code, kind="stable")
        bounds = np.flatnonzero(np.diff(code[order])) + 1
        return np.split(order, bounds)
    index: dict[Hashable, list[int]] = {}
    for i, v in enumerate(arr.tolist()):
        if isinstance(v, float) and math.isnan(v):
            v = _NAN_STRATUM
        try:
            index.setdefault(v, []).append(i)
        except TypeError:
            raise ValueError(f"strata values must be hashable, got {type(v).__name__} at row {i}") from None
    return [np.asarray(ix, dtype=np.int64) for ix in index.values()]


def _split_count(count: int, sizes: list[int]) -> list[int]:
    """Largest-remainder (Hamilton) apportionment of ``min(count, N)`` over strata of ``sizes``."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    c = min(count, total)
    floors = [c * s // total for s in sizes]
    rems = [c * s % total for s in sizes]
    left = c - sum(floors)
    order = sorted(range(len(sizes)), key=lambda i: (-rems[i], i))
    for i in order[:left]:
        floors[i] += 1
    return floors


def _quotas(groups: list[np.ndarray], fraction, count) -> list[int]:
    sizes = [len(g) for g in groups]
    if fraction is not None:
        return [budget(s, fraction=fraction) for s in sizes]
    return _split_count(int(count), sizes)


def budget(n: int, *, fraction: float | None = None, count: int | None = None) -> int:
    """How many of ``n`` rows a budget keeps: ``floor(fraction * n + 1/2)`` in exact decimal arithmetic
    (``fraction: 0.25`` of 10 rows keeps 3, never banker's rounding's 2), or ``min(count, n)``.

    The one budget rule of every selector: :func:`select`, :func:`random_select` (per stratum, where a
    count is split by largest remainder) and the DPP selection all call it.
    """
    _check_budget(fraction, count, allow_threshold=False)
    if fraction is not None:
        return min(_round_half_up(fraction, n), n)
    return min(int(count), n)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------


def select(
    scores: np.ndarray,
    *,
    fraction: float | None = None,
    count: int | None = None,
    threshold: float | None = None,
    keep: str = "highest",
    offset: float = 0.0,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean ``kept`` mask that keeps rows by score (see the module docstring for every rule).

    Args:
        scores: 1-D real array, one score per row (higher = harder / more important for EL2N-like
            scores). NaN rows are never kept.
        fraction: keep ``round_half_up(fraction * n)`` rows per stratum; in ``(0, 1]``.
        count: keep this many rows in total (split over strata by largest remainder); ``>= 0``; a
            count above the number of rows keeps all of them.
        threshold: keep ``score >= threshold`` (``"highest"``) or ``score <= threshold`` (``"lowest"``).
            Exactly one of ``fraction``, ``count``, ``threshold``.
        keep: ``"highest"``, ``"lowest"`` or ``"band"`` (Data Diet offset window, arXiv:2107.07075).
        offset: for ``"band"`` only: the fraction ``[0, 1)`` of each stratum's highest-scoring rows to
            skip before the kept window.
        strata: optional 1-D array of stratum labels (any hashable values, ``None`` allowed), same
            length as ``scores``; the rule is applied within each stratum.

    Returns:
        ``np.ndarray`` of dtype bool and the length of ``scores``.

    Raises:
        ValueError: on any invalid argument, with a one-line message naming it.
    """
    s = _as_scores(scores)
    n = len(s)
    _check_budget(fraction, count, threshold)
    if keep not in KEEP_RULES:
        raise ValueError(f"keep must be one of 'highest', 'lowest', 'band', got {keep!r}")
    if not is_real(offset) or not (0.0 <= float(offset) < 1.0):
        raise ValueError(f"offset must be in [0, 1), got {offset!r}")
    offset = float(offset)
    if keep != "band" and offset != 0.0:
        raise ValueError(f"offset is only used with keep='band', got offset={offset!r} with keep={keep!r}")
    if keep == "band" and threshold is not None:
        raise ValueError("threshold cannot be used with keep='band'; give fraction or count")
    if keep == "band" and fraction is not None and _exact(offset) + _exact(fraction) > 1:
        raise ValueError(f"offset + fraction must be <= 1 for keep='band', got {offset!r} + {fraction!r}")

    groups = _groups(strata, n)  # validates strata even for a threshold
    kept = np.zeros(n, dtype=bool)
    if threshold is not None:
        t = float(threshold)
        with np.errstate(invalid="ignore"):
            kept[:] = s >= t if keep == "highest" else s <= t
        return kept

    quotas = _quotas(groups, fraction, count)
    for rows, q in zip(groups, quotas, strict=True):
        g = s[rows]
        valid = ~np.isnan(g)
        # Stable sort puts ties in index order; negating for "descending" keeps that (NaN sorts last
        # either way and is then dropped by `valid`).
        order = np.argsort(g if keep == "lowest" else -g, kind="stable")
        start = _round_half_up(offset, len(rows)) if keep == "band" else 0
        window = order[start : start + q]
        window = window[valid[window]]
        kept[rows[window]] = True
    return kept


def random_select(
    n: int,
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """Seeded uniform-random ``kept`` mask over ``n`` rows: the baseline every score rule must beat.

    Budgets and strata work as in :func:`select` (``fraction`` per stratum with ``round_half_up``;
    ``count`` split by largest remainder; a count above ``n`` keeps all). One key per row is drawn
    from ``np.random.default_rng(seed)`` and each stratum keeps its rows with the smallest keys, so
    the mask is reproducible across processes and platforms for a given numpy bit generator (PCG64)
    and nested across budgets for a fixed seed.

    Raises:
        ValueError: on an invalid ``n``, budget, ``seed`` or ``strata``.
    """
    if not is_int(n) or int(n) < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    n = int(n)
    _check_budget(fraction, count, allow_threshold=False)
    if not is_int(seed) or int(seed) < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    groups = _groups(strata, n)
    keys = np.random.default_rng(int(seed)).random(n)
    kept = np.zeros(n, dtype=bool)
    for rows, q in zip(groups, _quotas(groups, fraction, count), strict=True):
        kept[rows[np.argsort(keys[rows], kind="stable")[:q]]] = True
    return kept
