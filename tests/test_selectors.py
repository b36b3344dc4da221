"""Selectors against plain references written out by hand (loops, sorted(), fractions)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from winnow.selectors import random_select, score_to_weight, select

# ----------------------------------------------------------------------------------------------
# hand-written references
# ----------------------------------------------------------------------------------------------


def ref_groups(strata, n):
    """Stratum -> row list, strata in order of first appearance; every NaN label is one stratum."""
    if strata is None:
        return [list(range(n))]
    groups = {}
    for i in range(n):
        v = strata[i]
        if isinstance(v, float) and v != v:
            v = "<nan>"
        groups.setdefault(v, []).append(i)
    return list(groups.values())


def ref_round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


def ref_split(count, sizes):
    total = sum(sizes)
    c = min(count, total)
    exact = [Fraction(c * s, total) for s in sizes]
    out = [math.floor(q) for q in exact]
    rest = c - sum(out)
    by_rem = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_rem[:rest]:
        out[i] += 1
    return out


def ref_select(scores, *, fraction=None, count=None, threshold=None, keep="highest", offset=0.0, strata=None):
    n = len(scores)
    kept = [False] * n
    if threshold is not None:
        for i in range(n):
            s = float(scores[i])
            if s == s and ((keep == "highest" and s >= threshold) or (keep == "lowest" and s <= threshold)):
                kept[i] = True
        return np.array(kept, dtype=bool)
    groups = ref_groups(strata, n)
    if fraction is not None:
        quotas = [ref_round_half_up(Fraction(str(fraction)) * len(g)) for g in groups]
    else:
        quotas = ref_split(count, [len(g) for g in groups])
    for rows, q in zip(groups, quotas, strict=True):
        valid = [i for i in rows if scores[i] == scores[i]]
        if keep == "lowest":
            ranked = sorted(valid, key=lambda i: (scores[i], i))
        else:
            ranked = sorted(valid, key=lambda i: (-scores[i], i))
        start = ref_round_half_up(Fraction(str(offset)) * len(rows)) if keep == "band" else 0
        for i in ranked[start : start + q]:
            kept[i] = True
    return np.array(kept, dtype=bool)


def make_scores(seed, n=137, nan_frac=0.1, levels=12):
    """Integer-valued scores (many ties) with some NaNs and infinities."""
    rng = np.random.default_rng(seed)
    s = rng.integers(0, levels, size=n).astype(float)
    s[rng.random(n) < nan_frac] = np.nan
    s[rng.choice(n, 2, replace=False)] = [np.inf, -np.inf]
    return s


def make_strata(seed, n=137):
    """Uneven strata: one tiny, one huge, None and string labels mixed."""
    rng = np.random.default_rng(seed + 1000)
    labels = np.array(["web", "code", "books", None, "x"], dtype=object)
    return labels[rng.choice(5, size=n, p=[0.55, 0.25, 0.1, 0.07, 0.03])]


# ----------------------------------------------------------------------------------------------
# select
# ----------------------------------------------------------------------------------------------

FRACTIONS = [0.01, 0.1, 0.25, 0.35, 0.5, 0.77, 1.0]
COUNTS = [0, 1, 7, 50, 136, 137, 500]


@pytest.mark.parametrize("use_strata", [False, True])
@pytest.mark.parametrize("keep", ["highest", "lowest"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fraction_count_threshold_match_reference(seed, keep, use_strata):
    s = make_scores(seed)
    strata = make_strata(seed) if use_strata else None
    for f in FRACTIONS:
        got = select(s, fraction=f, keep=keep, strata=strata)
        np.testing.assert_array_equal(
            got, ref_select(s, fraction=f, keep=keep, strata=strata), err_msg=f"f={f}"
        )
    for c in COUNTS:
        got = select(s, count=c, keep=keep, strata=strata)
        np.testing.assert_array_equal(got, ref_select(s, count=c, keep=keep, strata=strata), err_msg=f"c={c}")
    for t in [-np.inf, 0.0, 3.0, 5.5, 11.0, np.inf]:
        got = select(s, threshold=t, keep=keep, strata=strata)
        np.testing.assert_array_equal(got, ref_select(s, threshold=t, keep=keep), err_msg=f"t={t}")


@pytest.mark.parametrize("use_strata", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_band_matches_reference(seed, use_strata):
    s = make_scores(seed)
    strata = make_strata(seed) if use_strata else None
    for off in [0.0, 0.05, 0.1, 0.3, 0.5]:
        for f in [0.1, 0.25, 0.5]:
            got = select(s, fraction=f, keep="band", offset=off, strata=strata)
            ref = ref_select(s, fraction=f, keep="band", offset=off, strata=strata)
            np.testing.assert_array_equal(got, ref, err_msg=f"offset={off} fraction={f}")
        for c in [0, 5, 40, 137, 1000]:
            got = select(s, count=c, keep="band", offset=off, strata=strata)
            ref = ref_select(s, count=c, keep="band", offset=off, strata=strata)
            np.testing.assert_array_equal(got, ref, err_msg=f"offset={off} count={c}")


def test_band_skips_the_hardest():
    s = np.arange(10, dtype=float)  # row i has score i; descending order is 9, 8, ..., 0
    kept = select(s, fraction=0.3, keep="band", offset=0.2)
    assert np.flatnonzero(kept).tolist() == [5, 6, 7]
    assert np.array_equal(
        select(s, fraction=0.3, keep="band"), select(s, fraction=0.3)
    )  # offset 0 == highest
    # a count window runs off the end: only what is left is kept
    assert np.flatnonzero(select(s, count=5, keep="band", offset=0.8)).tolist() == [0, 1]


def test_ties_are_broken_by_index():
    s = np.array([1.0, 2.0, 2.0, 2.0, 1.0, 2.0, 0.0])
    assert np.flatnonzero(select(s, count=2)).tolist() == [1, 2]
    assert np.flatnonzero(select(s, count=5)).tolist() == [0, 1, 2, 3, 5]
    assert np.flatnonzero(select(s, count=2, keep="lowest")).tolist() == [0, 6]
    flat = np.zeros(9)
    assert np.flatnonzero(select(flat, count=4)).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(select(flat, count=4, keep="lowest")).tolist() == [0, 1, 2, 3]
    assert np.flatnonzero(select(flat, count=3, keep="band", offset=0.34)).tolist() == [3, 4, 5]
    # -0.0 and 0.0 are the same score
    assert np.flatnonzero(select(np.array([0.0, -0.0, 0.0]), count=2)).tolist() == [0, 1]


def test_nan_never_kept():
    s = np.array([np.nan, 1.0, np.nan, 3.0, 2.0, np.nan])
    for kw in [
        dict(fraction=1.0),
        dict(count=100),
        dict(threshold=-np.inf),
        dict(count=6, keep="lowest"),
        dict(threshold=np.inf, keep="lowest"),
        dict(fraction=1.0, keep="band"),
    ]:
        kept = select(s, **kw)
        assert not kept[np.isnan(s)].any(), kw
        assert kept[~np.isnan(s)].all(), kw
    # the fraction budget counts NaN rows (n = 6) and is not enlarged to make up for them
    assert select(s, fraction=0.5).sum() == 3
    assert select(np.array([np.nan, np.nan, 1.0, 2.0]), fraction=0.25).tolist() == [False, False, False, True]
    assert select(np.array([np.nan, np.nan, np.nan, 1.0]), fraction=0.5).tolist() == [
        False,
        False,
        False,
        True,
    ]
    assert select(np.full(4, np.nan), fraction=1.0).sum() == 0


def test_count_above_n_keeps_all_and_zero_keeps_none():
    s = np.arange(5.0)
    assert select(s, count=5).all() and select(s, count=10**9).all()
    assert not select(s, count=0).any()
    assert select(np.array([]), fraction=0.5).shape == (0,)
    assert select(np.array([]), count=3, strata=np.array([], dtype=object)).shape == (0,)


def test_nested_budgets():
    s = make_scores(3, n=300)
    strata = make_strata(3, n=300)
    prev = np.zeros(300, dtype=bool)
    for f in np.linspace(0.05, 1.0, 20):
        cur = select(s, fraction=float(f), strata=strata)
        assert not (prev & ~cur).any()
        prev = cur


def test_strata_count_split_is_largest_remainder_and_exact():
    sizes = [1, 2, 3, 50, 7, 13]
    strata = np.repeat(np.array(["a", "b", "c", "d", "e", "f"]), sizes)
    s = np.random.default_rng(0).random(sum(sizes))
    for c in range(0, sum(sizes) + 5):
        kept = select(s, count=c, strata=strata)
        assert kept.sum() == min(c, sum(sizes))
        per = [int(kept[strata == k].sum()) for k in "abcdef"]
        assert per == ref_split(c, sizes)
        # each stratum within 1 of its exact proportional share
        for p, n_i in zip(per, sizes, strict=True):
            assert abs(p - Fraction(min(c, 76) * n_i, 76)) < 1
    # a worked example: shares 2.5, 1.5, 1.0 -> floors 2, 1, 1; the leftover row goes to the tie
    # that appears first
    strata = np.array(["x"] * 5 + ["y"] * 3 + ["z"] * 2)
    kept = select(np.arange(10.0), count=5, strata=strata)
    assert [int(kept[strata == k].sum()) for k in "xyz"] == [3, 1, 1]
    # order of first appearance decides that tie, not the label's value nor the size: here y comes
    # first, so y gets the leftover row
    strata2 = np.array(["y"] * 3 + ["x"] * 5 + ["z"] * 2)
    kept2 = select(np.arange(10.0), count=5, strata=strata2)
    assert [int(kept2[strata2 == k].sum()) for k in "xyz"] == [2, 2, 1]


def test_strata_label_kinds():
    s = np.arange(12.0)
    objs = np.array(["a", None, "a", 1, None, 1, float("nan"), "a", None, 1, float("nan"), "a"], dtype=object)
    kept = select(s, fraction=0.5, strata=objs)
    np.testing.assert_array_equal(kept, ref_select(s, fraction=0.5, strata=objs))
    assert kept[[6, 10]].sum() == 1  # the two NaN labels are one stratum
    floats = np.array([0.5, np.nan, 0.5, np.nan, 2.0, 2.0])
    assert select(np.arange(6.0), fraction=0.5, strata=floats).tolist() == [
        False,
        False,
        True,
        True,
        False,
        True,
    ]
    ints = np.array([3, 3, 3, 1, 1, 1])
    assert select(np.arange(6.0), count=2, strata=ints).tolist() == [False, False, True, False, False, True]
    assert select(np.arange(6.0), count=2, strata=list("aaabbb")).tolist() == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]


def test_strata_array_kinds_agree():
    """The plain-dtype fast path and the object path group and order strata the same way."""
    rng = np.random.default_rng(9)
    s = make_scores(9, n=400)
    codes = rng.choice(7, size=400, p=[0.4, 0.2, 0.15, 0.1, 0.1, 0.04, 0.01])
    as_str = np.array([f"d{c}" for c in codes])
    variants = [
        as_str,
        as_str.astype(object),
        list(as_str),
        codes,
        codes.astype(float),
        codes.astype(object),
        np.char.encode(as_str),
    ]
    for kw in [dict(fraction=0.3), dict(count=77), dict(count=77, keep="band", offset=0.2)]:
        ref = ref_select(s, strata=list(as_str), **kw)
        for v in variants:
            np.testing.assert_array_equal(select(s, strata=v, **kw), ref, err_msg=str(type(v)))
    for v in variants:
        for kw in [dict(fraction=0.3), dict(count=77)]:
            got = random_select(400, seed=1, strata=v, **kw)
            np.testing.assert_array_equal(got, random_select(400, seed=1, strata=list(as_str), **kw))


def test_fraction_rounding_is_exact_half_up():
    # 0.145 * 100 is 14.499999999999998 in binary floating point; the budget is round_half_up(14.5) = 15
    assert select(np.arange(100.0), fraction=0.145).sum() == 15
    assert select(np.arange(10.0), fraction=0.25).sum() == 3  # 2.5 -> 3, not banker's 2
    assert select(np.arange(10.0), fraction=0.24).sum() == 2
    assert select(np.arange(3.0), fraction=0.1).sum() == 0  # 0.3 -> 0: a small stratum can keep nothing
    # offset + fraction is checked exactly on the decimals: 1 is allowed, anything above is not
    assert np.flatnonzero(select(np.arange(10.0), fraction=0.3, keep="band", offset=0.7)).tolist() == [
        0,
        1,
        2,
    ]
    with pytest.raises(ValueError, match="offset"):
        select(np.arange(10.0), fraction=0.3, keep="band", offset=0.7000001)


def test_threshold_ignores_strata():
    s = make_scores(5)
    st = make_strata(5)
    np.testing.assert_array_equal(select(s, threshold=4.0, strata=st), select(s, threshold=4.0))


# ----------------------------------------------------------------------------------------------
# random_select
# ----------------------------------------------------------------------------------------------


def test_random_reproducible_and_sized():
    strata = make_strata(7, n=1000)
    a = random_select(1000, fraction=0.3, seed=11, strata=strata)
    b = random_select(1000, fraction=0.3, seed=11, strata=strata)
    assert a.dtype == bool and np.array_equal(a, b)
    assert not np.array_equal(a, random_select(1000, fraction=0.3, seed=12, strata=strata))
    groups = ref_groups(list(strata), 1000)
    for rows in groups:
        assert a[rows].sum() == ref_round_half_up(Fraction(3, 10) * len(rows))
    c = random_select(1000, count=333, seed=11, strata=strata)
    assert c.sum() == 333
    assert [int(c[rows].sum()) for rows in groups] == ref_split(333, [len(r) for r in groups])
    assert random_select(10, count=50, seed=0).all()
    assert not random_select(10, count=0, seed=0).any()
    assert random_select(0, fraction=0.5, seed=0).shape == (0,)
    # without strata: exactly round_half_up(f * n)
    assert random_select(101, fraction=0.5, seed=3).sum() == 51


def test_random_reproducible_across_processes():
    code = (
        "import numpy as np; from winnow.selectors import random_select;"
        "st = np.array(['a'] * 30 + ['b'] * 11 + [None] * 5, dtype=object);"
        "print(''.join('1' if k else '0' for k in random_select(46, fraction=0.4, seed=2024, strata=st)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    st = np.array(["a"] * 30 + ["b"] * 11 + [None] * 5, dtype=object)
    here = "".join("1" if k else "0" for k in random_select(46, fraction=0.4, seed=2024, strata=st))
    assert out == here


def test_random_nested_and_uniform():
    prev = np.zeros(500, dtype=bool)
    for c in range(0, 501, 25):
        cur = random_select(500, count=c, seed=5)
        assert not (prev & ~cur).any()
        prev = cur
    # each row is kept with probability ~0.2 over many seeds (binomial: 400 draws, sd ~ 8)
    hits = sum(random_select(20, fraction=0.2, seed=s).astype(int) for s in range(400))
    assert hits.sum() == 400 * 4
    assert (np.abs(hits - 80) < 40).all()


# ----------------------------------------------------------------------------------------------
# score_to_weight
# ----------------------------------------------------------------------------------------------


def ref_softmax_weights(s, kept, T, invert):
    idx = [i for i in range(len(s)) if kept[i]]
    z = [(-s[i] if invert else s[i]) / T for i in idx]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    tot = sum(e)
    out = np.zeros(len(s))
    for i, v in zip(idx, e, strict=True):
        out[i] = len(idx) * v / tot
    return out


def ref_normalized_weights(s, kept, invert):
    idx = [i for i in range(len(s)) if kept[i]]
    v = [1.0 / s[i] if invert else s[i] for i in idx]
    mean = sum(v) / len(v)
    out = np.zeros(len(s))
    for i, x in zip(idx, v, strict=True):
        out[i] = x / mean
    return out


def ref_clipped_weights(s, kept, lo, hi, invert):
    """Bisection by hand on c -> mean(clip(c * w)), 300 halvings."""
    w = ref_normalized_weights(s, kept, invert)
    idx = [i for i in range(len(s)) if kept[i]]
    hi_ = math.inf if hi is None else hi
    lo_ = 0.0 if lo is None else lo

    def mean_at(c):
        return sum(min(max(c * w[i], lo_), hi_) for i in idx) / len(idx)

    a, b = 0.0, 1.0
    while mean_at(b) < 1.0:
        b *= 2.0
    for _ in range(300):
        m = (a + b) / 2
        if mean_at(m) < 1.0:
            a = m
        else:
            b = m
    out = np.zeros(len(s))
    for i in idx:
        out[i] = min(max(b * w[i], lo_), hi_)
    return out


def weight_inputs(seed, n=200):
    rng = np.random.default_rng(seed)
    s = rng.gamma(2.0, 1.5, size=n) + 0.01
    kept = rng.random(n) < 0.6
    s[~kept & (rng.random(n) < 0.3)] = np.nan  # NaN on pruned rows is fine
    return s, kept


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_invariants_and_references(seed, invert):
    s, kept = weight_inputs(seed)
    cases = {
        "uniform": (dict(method="uniform"), np.where(kept, 1.0, 0.0)),
        "normalized": (dict(method="normalized"), ref_normalized_weights(s, kept, invert)),
        "softmax": (dict(method="softmax", temperature=0.7), ref_softmax_weights(s, kept, 0.7, invert)),
        "clipped": (
            dict(method="clipped", clip_min=0.3, clip_max=1.6),
            ref_clipped_weights(s, kept, 0.3, 1.6, invert),
        ),
        "clipped_max": (
            dict(method="clipped", clip_max=1.25),
            ref_clipped_weights(s, kept, None, 1.25, invert),
        ),
        "clipped_min": (
            dict(method="clipped", clip_min=0.8),
            ref_clipped_weights(s, kept, 0.8, None, invert),
        ),
    }
    for name, (kw, ref) in cases.items():
        w = score_to_weight(s, kept, invert=invert, **kw)
        assert w.dtype == np.float64 and w.shape == s.shape, name
        assert (w[~kept] == 0).all(), name
        assert abs(w[kept].mean() - 1.0) < 1e-12, name
        np.testing.assert_allclose(w, ref, rtol=1e-9, atol=1e-12, err_msg=name)
        if name.startswith("clipped"):
            lo, hi = kw.get("clip_min", 0.0), kw.get("clip_max", math.inf)
            assert (w[kept] >= lo).all() and (w[kept] <= hi).all(), name
            # one monotone map: the order of the normalised weights is kept
            base = ref_normalized_weights(s, kept, invert)[kept]
            order = np.argsort(base, kind="stable")
            assert (np.diff(w[kept][order]) >= -1e-15).all(), name
    # high scores weigh more, or less with invert
    w = score_to_weight(s, kept, method="normalized", invert=invert)
    top, bottom = np.nanargmax(np.where(kept, s, np.nan)), np.nanargmin(np.where(kept, s, np.nan))
    assert (w[top] > w[bottom]) != invert


def test_softmax_temperature():
    s = np.array([0.0, 1.0, 2.0, 5.0, np.nan])
    kept = np.array([True, True, True, True, False])
    w_hot = score_to_weight(s, kept, method="softmax", temperature=1e9)
    np.testing.assert_allclose(w_hot[kept], 1.0, atol=1e-8)
    spreads = [
        np.ptp(score_to_weight(s, kept, method="softmax", temperature=t)[kept]) for t in [0.3, 1, 3, 10, 100]
    ]
    assert all(a > b for a, b in zip(spreads, spreads[1:], strict=False))
    w_cold = score_to_weight(s, kept, method="softmax", temperature=1e-6)
    np.testing.assert_allclose(w_cold, [0, 0, 0, 4, 0], atol=1e-12)
    # huge scores / tiny temperature: no overflow
    big = np.array([1e300, -1e300, 1e300])
    w = score_to_weight(big, np.ones(3, bool), method="softmax", temperature=1e-300)
    np.testing.assert_allclose(w, [1.5, 0, 1.5])
    w = score_to_weight(big, np.ones(3, bool), method="softmax", temperature=1e-300, invert=True)
    np.testing.assert_allclose(w, [0, 3, 0])


def test_clipped_edge_cases():
    s, kept = weight_inputs(4)
    # bounds that bind nothing: same as normalized
    np.testing.assert_allclose(
        score_to_weight(s, kept, method="clipped", clip_min=0.0, clip_max=1e6),
        score_to_weight(s, kept, method="normalized"),
        rtol=1e-12,
    )
    for lo, hi in [(1.0, None), (None, 1.0), (1.0, 5.0), (0.2, 1.0)]:
        w = score_to_weight(s, kept, method="clipped", clip_min=lo, clip_max=hi)
        np.testing.assert_array_equal(w, np.where(kept, 1.0, 0.0))
    # zero scores are lifted to clip_min
    z = np.array([0.0, 0.0, 1.0, 3.0])
    w = score_to_weight(z, np.ones(4, bool), method="clipped", clip_min=0.25, clip_max=2.0)
    assert w.min() >= 0.25 and w.max() <= 2.0 and abs(w.mean() - 1) < 1e-12
    np.testing.assert_allclose(w, ref_clipped_weights(z, [True] * 4, 0.25, 2.0, False), rtol=1e-9)
    # a flat piece: two values pinned at the bounds already average 1
    two = np.array([1.0, 1.0, 9.0, 9.0])
    w = score_to_weight(two, np.ones(4, bool), method="clipped", clip_min=0.5, clip_max=1.5)
    np.testing.assert_allclose(w, [0.5, 0.5, 1.5, 1.5])
    # large arrays converge fast
    rng = np.random.default_rng(0)
    big = rng.lognormal(0, 2, size=200_000)
    w = score_to_weight(big, np.ones(big.size, bool), method="clipped", clip_min=0.1, clip_max=3.0)
    assert abs(w.mean() - 1) < 1e-12 and w.min() >= 0.1 and w.max() <= 3.0


def test_weights_special_inputs():
    kept = np.array([True, False, True])
    assert score_to_weight(None, kept).tolist() == [1.0, 0.0, 1.0]
    assert score_to_weight(np.array([1.0, 2.0, 3.0]), np.zeros(3, bool), method="softmax").tolist() == [
        0,
        0,
        0,
    ]
    # all-zero kept scores: proportional weights are uniform
    assert score_to_weight(np.array([0.0, 5.0, 0.0]), kept, method="normalized").tolist() == [1.0, 0.0, 1.0]
    # integer scores are fine
    np.testing.assert_allclose(score_to_weight(np.array([1, 7, 3]), kept, method="normalized"), [0.5, 0, 1.5])
    # pruned rows' scores are never read, even when infinite or negative
    np.testing.assert_allclose(
        score_to_weight(np.array([1.0, -np.inf, 3.0]), kept, method="normalized", invert=True), [1.5, 0, 0.5]
    )


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------

S = np.array([1.0, 2.0, 3.0])
K = np.array([True, True, False])

SELECT_ERRORS = [
    (dict(), r"^exactly one of fraction, count, threshold must be given, got none$"),
    (
        dict(fraction=0.5, count=2),
        r"^exactly one of fraction, count, threshold must be given, got fraction and count$",
    ),
    (dict(fraction=1.5), r"^fraction must be in \(0, 1\], got 1\.5$"),
    (dict(fraction=0.0), r"^fraction must be in \(0, 1\], got 0\.0$"),
    (dict(fraction=float("nan")), r"^fraction must be in \(0, 1\], got nan$"),
    (dict(fraction=True), r"^fraction must be in \(0, 1\], got True$"),
    (dict(count=-1), r"^count must be an integer >= 0, got -1$"),
    (dict(count=2.0), r"^count must be an integer >= 0, got 2\.0$"),
    (dict(threshold=float("nan")), r"^threshold must be a number \(not NaN\), got nan$"),
    (dict(threshold="1"), r"^threshold must be a number \(not NaN\), got '1'$"),
    (dict(count=1, keep="top"), r"^keep must be one of 'highest', 'lowest', 'band', got 'top'$"),
    (dict(count=1, keep="band", offset=1.0), r"^offset must be in \[0, 1\), got 1\.0$"),
    (dict(count=1, keep="band", offset=-0.1), r"^offset must be in \[0, 1\), got -0\.1$"),
    (
        dict(count=1, offset=0.1),
        r"^offset is only used with keep='band', got offset=0\.1 with keep='highest'$",
    ),
    (
        dict(threshold=1.0, keep="band"),
        r"^threshold cannot be used with keep='band'; give fraction or count$",
    ),
    (
        dict(fraction=0.6, keep="band", offset=0.5),
        r"^offset \+ fraction must be <= 1 for keep='band', got 0\.5 \+ 0\.6$",
    ),
    (
        dict(count=1, strata=np.array(["a", "b"])),
        r"^strata must have the same length as scores \(3\), got 2$",
    ),
    (dict(count=1, strata=np.zeros((3, 1))), r"^strata must be a 1-D array, got shape \(3, 1\)$"),
    (
        dict(count=1, strata=np.array([[1], [2], [3]], dtype=object)),
        r"^strata must be a 1-D array, got shape \(3, 1\)$",
    ),
    (
        dict(count=1, strata=np.array([{}, 1, 2], dtype=object)),
        r"^strata values must be hashable, got dict at row 0$",
    ),
]


@pytest.mark.parametrize(("kw", "msg"), SELECT_ERRORS)
def test_select_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        select(S, **kw)


def test_select_score_errors():
    with pytest.raises(ValueError, match=r"^scores must be a 1-D array, got shape \(2, 2\)$"):
        select(np.zeros((2, 2)), count=1)
    with pytest.raises(ValueError, match=r"^scores must be a real numeric array, got dtype <U1$"):
        select(np.array(["a", "b"]), count=1)
    with pytest.raises(ValueError, match=r"^scores must be a real numeric array, got dtype complex128$"):
        select(np.array([1j]), count=1)


RANDOM_ERRORS = [
    (dict(n=-1, fraction=0.5, seed=0), r"^n must be an integer >= 0, got -1$"),
    (dict(n=3.0, fraction=0.5, seed=0), r"^n must be an integer >= 0, got 3\.0$"),
    (dict(n=3, seed=0), r"^exactly one of fraction, count must be given, got none$"),
    (
        dict(n=3, fraction=0.5, count=1, seed=0),
        r"^exactly one of fraction, count must be given, got fraction and count$",
    ),
    (dict(n=3, fraction=2, seed=0), r"^fraction must be in \(0, 1\], got 2$"),
    (dict(n=3, count=-2, seed=0), r"^count must be an integer >= 0, got -2$"),
    (dict(n=3, count=1, seed=-1), r"^seed must be an integer >= 0, got -1$"),
    (dict(n=3, count=1, seed=1.5), r"^seed must be an integer >= 0, got 1\.5$"),
    (dict(n=3, count=1, seed=0, strata=["a"]), r"^strata must have the same length as scores \(3\), got 1$"),
]


@pytest.mark.parametrize(("kw", "msg"), RANDOM_ERRORS)
def test_random_select_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        random_select(**kw)


def test_random_select_needs_seed():
    with pytest.raises(TypeError):
        random_select(3, fraction=0.5)


WEIGHT_ERRORS = [
    (
        S,
        K,
        dict(method="rank"),
        r"^method must be one of 'uniform', 'normalized', 'softmax', 'clipped', got 'rank'$",
    ),
    (S, K, dict(temperature=0), r"^temperature must be a finite number > 0, got 0$"),
    (S, K, dict(temperature=float("inf")), r"^temperature must be a finite number > 0, got inf$"),
    (
        S,
        K,
        dict(method="softmax", clip_max=2.0),
        r"^clip_min and clip_max are only used with method='clipped', got method='softmax'$",
    ),
    (S, K, dict(method="clipped"), r"^method='clipped' needs clip_min or clip_max$"),
    (
        S,
        K,
        dict(method="clipped", clip_min=1.5),
        r"^clip_min must be in \[0, 1\] so that a mean of 1 is reachable, got 1\.5$",
    ),
    (
        S,
        K,
        dict(method="clipped", clip_min=-0.1),
        r"^clip_min must be in \[0, 1\] so that a mean of 1 is reachable, got -0\.1$",
    ),
    (
        S,
        K,
        dict(method="clipped", clip_max=0.5),
        r"^clip_max must be >= 1 so that a mean of 1 is reachable, got 0\.5$",
    ),
    (S, K, dict(invert="yes"), r"^invert must be a bool, got 'yes'$"),
    (S, np.array([1, 1, 0]), dict(), r"^kept must be a boolean array, got dtype int64$"),
    (S, np.ones((3, 1), bool), dict(), r"^kept must be a 1-D array, got shape \(3, 1\)$"),
    (S, np.ones(2, bool), dict(), r"^kept must have the same length as scores \(3\), got 2$"),
    (np.zeros((3, 1)), K, dict(), r"^scores must be a 1-D array, got shape \(3, 1\)$"),
    (np.array(["a", "b", "c"]), K, dict(), r"^scores must be a real numeric array, got dtype <U1$"),
    (None, K, dict(method="softmax"), r"^scores are required for method='softmax'$"),
    (
        np.array([np.nan, np.nan, np.nan]),
        K,
        dict(),
        r"^scores has 2 NaN values among kept rows; every kept row needs a score$",
    ),
    (
        np.array([np.nan, 1.0, np.nan]),
        K,
        dict(method="softmax"),
        r"^scores has 1 NaN values among kept rows; every kept row needs a score$",
    ),
    (
        np.array([np.inf, 1.0, 2.0]),
        K,
        dict(method="normalized"),
        r"^scores has 1 infinite values among kept rows; every kept score must be finite$",
    ),
    (
        np.array([-1.0, 1.0, 2.0]),
        K,
        dict(method="normalized"),
        r"^method='normalized' needs kept scores >= 0 \(weights ∝ score\); 1 kept scores are negative$",
    ),
    (
        np.array([0.0, 1.0, 2.0]),
        K,
        dict(method="normalized", invert=True),
        r"^method='normalized' with invert=True needs kept scores > 0 \(weights ∝ 1/score\); 1 kept scores are <= 0$",
    ),
    (
        np.array([-1.0, 1.0, 2.0]),
        K,
        dict(method="clipped", clip_max=2.0),
        r"^method='clipped' needs kept scores >= 0 \(weights ∝ score\); 1 kept scores are negative$",
    ),
    (
        np.array([0.0, 0.0, 0.0, 1.0]),
        np.ones(4, bool),
        dict(method="clipped", clip_max=2.0),
        r"^clip_max=2\.0 is too small: with 3 of 4 kept rows at weight 0 the mean cannot reach 1$",
    ),
]


@pytest.mark.parametrize(("scores", "kept", "kw", "msg"), WEIGHT_ERRORS)
def test_weight_errors(scores, kept, kw, msg):
    with pytest.raises(ValueError, match=msg):
        score_to_weight(scores, kept, **kw)


# ----------------------------------------------------------------------------------------------
# real data: scikit-learn digits
# ----------------------------------------------------------------------------------------------


def test_digits_stratified_by_label_keeps_class_proportions():
    # The UCI optical digits bundled with scikit-learn (1797 images, 8x8, 10 classes); read straight from
    # the package data as sklearn.datasets.load_digits does, to skip importing scikit-learn/scipy (seconds).
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        pytest.skip("scikit-learn is not installed")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(path, delimiter=",")
    X, y = data[:, :-1], data[:, -1].astype(int)
    assert X.shape == (1797, 64) and sorted(set(y.tolist())) == list(range(10))
    n = len(y)
    centroids = {c: X[y == c].mean(axis=0) for c in np.unique(y)}
    dist = np.array([np.linalg.norm(X[i] - centroids[y[i]]) for i in range(n)])  # "hardness" score
    labels = y.astype(str)  # strata as strings, as they come out of scores/rows.parquet
    classes, sizes = np.unique(labels, return_counts=True)

    for kw in [
        dict(fraction=0.3),
        dict(count=500),
        dict(fraction=0.2, keep="band", offset=0.1),
        dict(count=321, keep="lowest"),
    ]:
        kept = select(dist, strata=labels, **kw)
        total = int(kept.sum())
        if "count" in kw:
            assert total == kw["count"]
        for c, n_c in zip(classes, sizes, strict=True):
            k_c = int(kept[labels == c].sum())
            # the class keeps its input share of the kept rows, to within one example
            assert abs(k_c - total * n_c / n) <= 1, (kw, c, k_c, total * n_c / n)
            # and, within the class, the kept rows are the ones the rule asks for
            d_in, d_out = dist[(labels == c) & kept], dist[(labels == c) & ~kept]
            if kw.get("keep", "highest") == "highest":
                assert d_in.min() >= d_out.max()
            elif kw["keep"] == "lowest":
                assert d_in.max() <= d_out.min()
        np.testing.assert_array_equal(kept, ref_select(dist, strata=labels, **kw))

    # the same budget without strata skews the classes (hard classes such as 8 and 9 over-kept)
    flat = select(dist, fraction=0.3)
    worst = max(abs(int(flat[labels == c].sum()) - 0.3 * n_c) for c, n_c in zip(classes, sizes, strict=True))
    assert worst > 1

    rand = random_select(n, fraction=0.3, seed=0, strata=labels)
    for c, n_c in zip(classes, sizes, strict=True):
        assert abs(int(rand[labels == c].sum()) - int(rand.sum()) * n_c / n) <= 1

    # weights on the digits selection: mean 1 over kept rows, every method
    kept = select(dist, fraction=0.5, strata=labels)
    for kw in [
        dict(method="normalized"),
        dict(method="softmax", temperature=float(dist.std())),
        dict(method="clipped", clip_min=0.5, clip_max=2.0),
    ]:
        w = score_to_weight(dist, kept, **kw)
        assert (w[~kept] == 0).all() and abs(w[kept].mean() - 1) < 1e-12
