"""DPP greedy MAP against a plain brute-force reference (slogdet of every candidate's submatrix)."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pytest
import torch

from winnow.selectors.dpp import (
    greedy_map,
    kernel_rows,
    kernel_submatrix,
    log_det,
    log_det_distance,
    quality_from_relevance,
)

# ----------------------------------------------------------------------------------------------
# plain references, written out independently of the module
# ----------------------------------------------------------------------------------------------


def ref_kernel(X, kernel="cosine", quality=None, sigma=1.0, kappa=1.0):
    """The full N x N kernel in float64 numpy."""
    X = np.asarray(X, dtype=np.float64)
    if kernel in ("cosine", "vmf"):
        X = X / np.linalg.norm(X, axis=1, keepdims=True)
    G = X @ X.T
    if kernel == "vmf":
        S = np.exp(kappa * (G - 1.0))
    elif kernel == "rbf":
        D = ((X[:, None, :] - X[None, :, :]) ** 2).sum(-1)
        S = np.exp(-D / (2 * sigma**2))
    else:
        S = G
    if kernel in ("cosine", "vmf"):
        np.fill_diagonal(S, 1.0)  # exact on unit vectors; rounding would decide the first pick's tie
    q = np.ones(len(X)) if quality is None else np.asarray(quality, dtype=np.float64)
    return q[:, None] * S * q[None, :]


def ref_greedy(L, k, eps=1e-10):
    """At each step try every candidate, take the argmax of slogdet of the enlarged submatrix."""
    picks, gains, cur = [], [], 0.0
    for _ in range(min(k, len(L))):
        best, best_j = -math.inf, None
        for i in range(len(L)):
            if i in picks:
                continue
            s = picks + [i]
            sign, ld = np.linalg.slogdet(L[np.ix_(s, s)])
            v = ld if sign > 0 else -math.inf
            if v > best:  # strict: ties keep the lowest index
                best, best_j = v, i
        if best_j is None or not math.exp(best - cur) >= eps:
            break
        picks.append(best_j)
        gains.append(best - cur)
        cur = best
    return picks, gains


def random_embeddings(n, d, seed):
    return np.random.default_rng(seed).standard_normal((n, d))


def paragraphs():
    """Distinct paragraphs of at least 25 words from the Python docs' pydoc topics."""
    from pydoc_data.topics import topics

    seen, out = set(), []
    for name in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[name]):
            words = re.findall(r"[a-z]+", p.lower())
            key = " ".join(words)
            if len(words) >= 25 and key not in seen:
                seen.add(key)
                out.append(words)
    return out


def tfidf(docs):
    """TF-IDF bag of words over words in >= 2 documents, rows unit-normalised (numpy only)."""
    df = Counter(w for doc in docs for w in set(doc))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in df.items() if c >= 2))}
    X = np.zeros((len(docs), len(vocab)))
    for r, doc in enumerate(docs):
        for w, c in Counter(doc).items():
            if w in vocab:
                X[r, vocab[w]] = c * math.log(len(docs) / df[w])
    X /= np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    return X


@pytest.fixture(scope="module")
def docs():
    return paragraphs()


# ----------------------------------------------------------------------------------------------
# greedy MAP against the brute-force reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kernel,params,n,d,k,seed",
    [
        ("cosine", {}, 60, 16, 12, 0),
        ("linear", {}, 50, 10, 8, 1),
        ("rbf", {"sigma": 2.0}, 60, 5, 15, 2),
        ("vmf", {"kappa": 3.0}, 60, 8, 15, 3),
    ],
)
def test_picks_equal_bruteforce_random(kernel, params, n, d, k, seed):
    X = random_embeddings(n, d, seed=seed)
    L = ref_kernel(X, kernel, **params)
    ref_picks, ref_gains = ref_greedy(L, k)
    r = greedy_map(torch.tensor(X), k, kernel=kernel, dtype=torch.float64, **params)
    assert r.picks.tolist() == ref_picks
    np.testing.assert_allclose(r.gains.numpy(), ref_gains, rtol=1e-8, atol=1e-8)
    S = r.picks.numpy()
    sign, ld = torch.linalg.slogdet(torch.tensor(L[np.ix_(S, S)]))
    assert float(sign) > 0 and r.logdet == pytest.approx(float(ld), abs=1e-8)
    assert r.stopped == "k"


def test_picks_equal_bruteforce_real_paragraphs(docs):
    X = tfidf(docs[:150])
    L = ref_kernel(X, "cosine")
    ref_picks, ref_gains = ref_greedy(L, 15)
    for dtype in (torch.float64, torch.float32):
        r = greedy_map(X, 15, kernel="cosine", dtype=dtype)
        assert r.picks.tolist() == ref_picks, dtype
        np.testing.assert_allclose(r.gains.numpy(), ref_gains, atol=1e-4 if dtype == torch.float32 else 1e-9)


def test_quality_weighted_equals_bruteforce_and_log_det():
    X = random_embeddings(50, 12, seed=3)
    q = np.random.default_rng(4).uniform(0.2, 2.0, 50)
    L = ref_kernel(X, "vmf", quality=q, kappa=2.0)
    ref_picks, _ = ref_greedy(L, 10)
    r = greedy_map(X, 10, kernel="vmf", kappa=2.0, quality=q, dtype=torch.float64)
    assert r.picks.tolist() == ref_picks
    S = r.picks
    assert r.logdet == pytest.approx(log_det(X, S, kernel="vmf", kappa=2.0, quality=q), abs=1e-9)
    sub = kernel_submatrix(X, S, kernel="vmf", kappa=2.0, quality=q)
    np.testing.assert_allclose(sub.numpy(), L[np.ix_(S.numpy(), S.numpy())], atol=1e-12)


def test_kernel_rows_match_full_kernel():
    X = random_embeddings(40, 6, seed=5)
    for kernel, params in [("cosine", {}), ("linear", {}), ("rbf", {"sigma": 1.5}), ("vmf", {"kappa": 4.0})]:
        L = ref_kernel(X, kernel, **params)
        idx = [3, 0, 39, 17, 3, 8, 21]
        rows = kernel_rows(X, idx, kernel=kernel, dtype=torch.float64, chunk_size=3, **params)
        np.testing.assert_allclose(rows.numpy(), L[idx], atol=1e-10)


# ----------------------------------------------------------------------------------------------
# stopping, quality, precision, ties
# ----------------------------------------------------------------------------------------------


def test_threshold_stops_at_rank_and_at_eps():
    X = random_embeddings(50, 8, seed=6)
    r = greedy_map(X, 20, kernel="cosine", dtype=torch.float64)
    assert r.picks.numel() == 8 and r.stopped == "threshold"
    L = ref_kernel(X, "vmf", kappa=1.0)
    r = greedy_map(X, 50, kernel="vmf", kappa=1.0, eps=0.5, dtype=torch.float64)
    assert r.stopped == "threshold" and 0 < r.picks.numel() < 50
    assert (r.gains.numpy() >= math.log(0.5)).all()
    ref_picks, _ = ref_greedy(L, 50, eps=0.5)
    assert r.picks.tolist() == ref_picks
    # the next pick would have had d2 < eps
    S = r.picks.tolist()
    base = np.linalg.slogdet(L[np.ix_(S, S)])[1]
    nxt = max(np.linalg.slogdet(L[np.ix_(S + [i], S + [i])])[1] for i in range(50) if i not in S)
    assert math.exp(nxt - base) < 0.5
    r = greedy_map(X[:5], 9, kernel="vmf", dtype=torch.float64)
    assert r.picks.numel() == 5 and r.stopped == "exhausted"
    assert greedy_map(X, 0).picks.numel() == 0


def test_quality_picks_high_q_earlier():
    X = random_embeddings(80, 16, seed=7)
    q = np.ones(80)
    q[[11, 57]] = [3.0, 2.0]
    r = greedy_map(X, 10, kernel="cosine", quality=q)
    assert r.picks[:2].tolist() == [11, 57]
    rel = np.random.default_rng(8).standard_normal(80)
    plain = greedy_map(X, 10, kernel="cosine", quality=quality_from_relevance(rel, 0.0))
    assert plain.picks.tolist() == greedy_map(X, 10, kernel="cosine").picks.tolist()
    tuned = greedy_map(X, 10, kernel="cosine", quality=quality_from_relevance(rel, 0.9))
    assert tuned.picks[0] == int(np.argmax(rel))
    assert rel[tuned.picks.numpy()].mean() > rel[plain.picks.numpy()].mean() + 0.5
    # position of each item in the selection order moves earlier with higher theta
    order = {
        theta: greedy_map(X, 80, kernel="vmf", quality=quality_from_relevance(rel, theta)).picks.tolist()
        for theta in (0.0, 0.8)
    }
    top = np.argsort(-rel)[:10]
    assert np.mean([order[0.8].index(i) for i in top]) < np.mean([order[0.0].index(i) for i in top])
    theta = 0.6
    np.testing.assert_allclose(
        quality_from_relevance(rel, theta).numpy(), np.exp(theta * rel / (2 * (1 - theta)))
    )


def test_fp32_matches_fp64():
    X = random_embeddings(400, 64, seed=9)
    a = greedy_map(X, 40, kernel="vmf", kappa=2.0, dtype=torch.float32)
    b = greedy_map(X, 40, kernel="vmf", kappa=2.0, dtype=torch.float64)
    assert a.picks.tolist() == b.picks.tolist()
    np.testing.assert_allclose(a.gains.numpy(), b.gains.numpy(), atol=1e-4)
    assert a.logdet == pytest.approx(b.logdet, abs=1e-3)


def test_ties_break_to_lowest_index():
    X = np.eye(6)[[0, 1, 1, 2, 0, 3]]  # rows 4 and 2 duplicate 0 and 1
    r = greedy_map(X, 6, kernel="cosine", dtype=torch.float64)
    assert r.picks.tolist() == [0, 1, 3, 5] and r.stopped == "threshold"


def test_start_forces_first_picks():
    X = random_embeddings(30, 6, seed=10)
    L = ref_kernel(X, "rbf")
    r = greedy_map(X, 5, kernel="rbf", dtype=torch.float64, start=[7, 2])
    assert r.picks[:2].tolist() == [7, 2]
    S = r.picks.numpy()
    assert r.logdet == pytest.approx(np.linalg.slogdet(L[np.ix_(S, S)])[1], abs=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    X = torch.tensor(random_embeddings(2000, 32, seed=11), dtype=torch.float32)
    a = greedy_map(X.cuda(), 50, kernel="vmf", kappa=2.0)
    b = greedy_map(X, 50, kernel="vmf", kappa=2.0, dtype=torch.float64)
    assert a.picks.tolist() == b.picks.tolist()


# ----------------------------------------------------------------------------------------------
# near-duplicates and the log-det distance
# ----------------------------------------------------------------------------------------------


def planted(docs, n_orig=200, n_dup=50, seed=0):
    """``n_orig`` real paragraphs plus near-copies of the first ``n_dup`` with 3 words replaced."""
    rng = np.random.default_rng(seed)
    base = docs[:n_orig]
    words = sorted({w for d in base for w in d})
    dups = []
    for d in base[:n_dup]:
        d = list(d)
        for pos in rng.choice(len(d), 3, replace=False):
            d[pos] = words[rng.integers(len(words))]
        dups.append(d)
    pairs = [(i, n_orig + i) for i in range(n_dup)]
    return tfidf(base + dups), pairs


def dup_pairs(sel, pairs):
    s = set(int(i) for i in sel)
    return sum(a in s and b in s for a, b in pairs)


def test_dpp_avoids_planted_near_duplicates(docs):
    X, pairs = planted(docs)
    k = 80
    sel = greedy_map(X, k, kernel="cosine").picks
    assert sel.numel() == k
    rng = np.random.default_rng(1)
    rand = [dup_pairs(rng.choice(len(X), k, replace=False), pairs) for _ in range(300)]
    # expected under random: 50 * (80/250) * (79/249) ~ 5.1 pairs
    assert np.mean(rand) > 3.5
    assert dup_pairs(sel, pairs) == 0


def test_log_det_distance(docs):
    X, pairs = planted(docs)
    k = 30
    greedy = greedy_map(X, k, kernel="cosine", dtype=torch.float64).picks
    with_dups = [a for a, _ in pairs[:15]] + [b for _, b in pairs[:15]]
    ldd_greedy = log_det_distance(X, greedy, seeds=3)
    ldd_dups = log_det_distance(X, with_dups, seeds=3)
    ldd_rand = log_det_distance(X, np.random.default_rng(2).choice(len(X), k, replace=False), seeds=3)
    assert ldd_greedy > -2.0
    assert ldd_dups < ldd_rand < ldd_greedy
    refs = [
        greedy_map(
            X, k, kernel="cosine", dtype=torch.float64, start=[int(np.random.default_rng(s).integers(len(X)))]
        ).logdet
        for s in range(3)
    ]
    assert ldd_greedy == pytest.approx(log_det(X, greedy) - np.mean(refs), abs=1e-9)


# ----------------------------------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda X: greedy_map(X, 3, kernel="poly"), "unknown kernel"),
        (lambda X: greedy_map(X, -1), "k must be"),
        (lambda X: greedy_map(X, True), "k must be"),
        (lambda X: greedy_map(X, 2.0), "k must be"),
        (lambda X: greedy_map(X[0], 2), "2-D"),
        (lambda X: greedy_map(X[:0], 2), "2-D"),
        (lambda X: greedy_map(X, 2, kernel="rbf", sigma=0), "sigma"),
        (lambda X: greedy_map(X, 2, kernel="vmf", kappa=-1.0), "kappa"),
        (lambda X: greedy_map(X, 2, quality=-np.ones(10)), "quality must be finite"),
        (lambda X: greedy_map(X, 2, quality=np.ones(9)), "quality must have shape"),
        (lambda X: greedy_map(X, 2, eps=-1.0), "eps"),
        (lambda X: greedy_map(X, 2, dtype=torch.float16), "dtype"),
        (lambda X: greedy_map(X, 3, start=[1, 1]), "repeated"),
        (lambda X: greedy_map(X, 1, start=[1, 2]), "more than k"),
        (lambda X: greedy_map(X, 3, start=[10]), r"\[0, 10\)"),
        (lambda X: greedy_map(X, 3, start=[0.5]), "integers"),
        (lambda X: greedy_map(np.vstack([X, np.zeros((1, 4))]), 2, kernel="cosine"), "all-zero rows"),
        (lambda X: greedy_map(np.where(np.eye(10, 4) > 0, np.nan, X), 2), "NaN"),
        (lambda X: quality_from_relevance(np.ones(3), 1.0), "theta"),
        (lambda X: quality_from_relevance(np.ones((3, 2)), 0.5), "1-D"),
        (lambda X: log_det_distance(X, [0, 1], kernel="linear"), "unit-diagonal"),
        (lambda X: log_det_distance(X, [0, 0]), "repeated"),
        (lambda X: log_det_distance(X, []), "empty"),
        (lambda X: log_det_distance(X, [0, 1], seeds=0), "seeds"),
        (lambda X: log_det_distance(X, list(range(6)), kernel="cosine"), "rank"),
        (lambda X: kernel_rows(X, [0], chunk_size=0), "chunk_size"),
    ],
)
def test_bad_args_raise(call, match):
    X = random_embeddings(10, 4, seed=12)
    with pytest.raises(ValueError, match=match):
        call(X)


def test_dependent_start_raises():
    X = np.eye(4)[[0, 0, 1, 2]]
    with pytest.raises(ValueError, match="start index 1"):
        greedy_map(X, 3, kernel="cosine", dtype=torch.float64, start=[0, 1])


def test_isotropic_log_det_distance_orders_sets_by_diversity():
    from winnow.selectors.dpp import isotropic_log_det_distance

    g = torch.Generator().manual_seed(3)
    spread = torch.nn.functional.normalize(torch.randn(60, 16, generator=g, dtype=torch.float64), dim=1)
    base = spread[:6]
    clumped = torch.nn.functional.normalize(
        base.repeat(10, 1) + 0.05 * torch.randn(60, 16, generator=g, dtype=torch.float64), dim=1
    )
    X = torch.cat([spread, clumped])
    kw = {"kernel": "vmf", "kappa": 2.0, "size": 30, "seeds": 3}
    d_spread = isotropic_log_det_distance(X, range(60), **kw)
    d_clumped = isotropic_log_det_distance(X, range(60, 120), **kw)
    assert 0 <= d_spread < d_clumped
    assert isotropic_log_det_distance(X, range(60), **kw) == d_spread  # seeded
    with pytest.raises(ValueError, match="seeds"):
        isotropic_log_det_distance(X, range(60), seeds=0)


def test_isotropic_distance_is_finite_with_exact_duplicates_and_json_stays_strict(tmp_path):
    import json

    from winnow.pipeline.atomic import write_json
    from winnow.selectors.dpp import isotropic_log_det_distance

    X = torch.nn.functional.normalize(
        torch.randn(10, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1
    )
    X = torch.cat([X, X])  # every row twice
    d = isotropic_log_det_distance(X, range(20), size=20, kernel="vmf", kappa=2.0)
    assert math.isfinite(d) and d > isotropic_log_det_distance(X, range(10), size=10, kernel="vmf", kappa=2.0)
    write_json(tmp_path / "m.json", {"a": float("-inf"), "b": [float("nan"), 1.0]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": None,
        "b": [None, 1.0],
    }
