"""Determinantal point process (DPP) diversity selection: kernels, greedy MAP inference, log-det measures.

Imports only torch, numpy and the standard library (see docs/ARCHITECTURE.md, "Layers"). Everything
works on CPU and CUDA tensors; the N x N kernel is never formed: kernel rows are computed lazily from
the embeddings ``X`` (N, d), one matrix-vector product per row.

Kernel (``kernel=``), ``L = diag(q) S diag(q)``
    ``"linear"``   ``S_ij = x_i^T x_j``
    ``"cosine"``   ``S_ij = x_i^T x_j / (|x_i| |x_j|)`` (rows normalised; zero rows are refused)
    ``"rbf"``      ``S_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))``, with ``|x_i - x_j|^2`` computed as
                   ``|x_i|^2 + |x_j|^2 - 2 x_i^T x_j`` clamped at 0 (one matrix-vector product per row)
    ``"vmf"``      von Mises-Fisher, ``S_ij = exp(kappa (x_i^T x_j - 1))`` on the unit-normalised rows
    ``q`` (``quality=``, length N, finite and ``>= 0``) defaults to all ones. ``"linear"`` and
    ``"cosine"`` have rank at most ``d``: greedy MAP can pick at most ``d`` items from them before the
    stopping threshold ends it; ``"rbf"`` and ``"vmf"`` are full rank for distinct points.

Quality from relevance (:func:`quality_from_relevance`)
    Chen, Zhang, Zhou, "Fast Greedy MAP Inference for Determinantal Point Process to Improve
    Recommendation Diversity", NeurIPS 2018 (arXiv:1709.05135), Section 4 ("Improving recommendation
    diversity"): with relevance scores ``r_i`` and a trade-off ``theta`` in ``[0, 1)``, maximising
    ``theta * sum_{i in S} r_i + (1 - theta) * log det S_S`` is, up to the factor ``1 - theta``, the
    DPP MAP problem for the kernel ``L = diag(exp(alpha r)) S diag(exp(alpha r))`` with
    ``alpha = theta / (2 (1 - theta))``, since ``log det L_S = 2 alpha sum r_i + log det S_S``. So
    ``q_i = exp(theta r_i / (2 (1 - theta)))``; ``theta = 0`` is pure diversity (``q = 1``).

Greedy MAP (:func:`greedy_map`), Algorithm 1 of Chen et al. 2018
    Incremental Cholesky: keep ``c`` (k x N) and ``d2`` (N), ``d2_i = L_ii`` at the start. At each
    step pick ``j = argmax_i d2_i`` over the unpicked items (ties: the lowest index), whose marginal
    gain is ``log det L_{S+j} - log det L_S = log d2_j``; stop *before* picking it if ``d2_j < eps``.
    Then ``e = (L_{j,:} - c_{:t,j}^T c_{:t,:}) / sqrt(d2_j)``, append ``e`` as row ``t`` of ``c`` and
    update ``d2 -= e**2``. Time ``O(N k^2 + N k d)`` (the ``N k d`` for the kernel rows), memory
    ``O(N k + N d)``. ``log det L_S`` is the sum of the gains.

Cluster-partitioned greedy MAP (:func:`partitioned_greedy_map`)
    For pools past one device's memory: given a cluster label per row (k-means, e.g.
    ``winnow.pipeline.clustering.kmeans_assign``), run :func:`greedy_map` inside each cluster alone
    (that cluster's rows moved to the device, then freed), keep up to ``k`` picks per cluster with
    their gains, and merge them by gain. Peak device memory is that of the largest cluster,
    ``O(n_c k + n_c d)``. What it gives up against global greedy: the kernel between clusters is
    never looked at, so two near-identical rows that k-means put in different clusters can both be
    picked; the gains are within-cluster gains (conditioned only on the earlier picks of the same
    cluster), not the marginal gains of the merged set, and the cut at ``k`` ranks them against
    each other as if the clusters were independent; and ``log det L_S`` is no longer the sum of the
    gains, so it is recomputed exactly (or not at all for large ``k``). When the clusters are
    well separated (cross-cluster kernel entries near 0) the two agree.

Log-det distance (:func:`log_det_distance`)
    After Wang, Shen, Guo, Stallone, Kim, Golland, Panda, "Diversity Measurement and Subset Selection
    for Instruction Tuning Datasets" (2024, arXiv:2402.02318), which measures the diversity of a
    dataset by the log-determinant distance between it and a maximally diverse reference dataset of
    the same size. Their exact formula was not at hand when this was written (only the abstract), so
    the definition implemented is this one, on a kernel with unit diagonal (``cosine``, ``rbf`` or
    ``vmf``; no quality)::

        LDD(S) = log det L_S - mean_{s = 1..seeds} log det L_{R_s}

    where ``R_s`` is a greedy-MAP selection of ``|S|`` items from the same pool ``X`` whose first item is
    drawn uniformly at random with ``numpy.random.default_rng(seed0 + s)`` (the rest greedy). ``LDD`` is
    ``<= 0`` for typical sets and near 0 for a set as diverse as the greedy reference; ``-inf`` when
    ``L_S`` is singular (e.g. a duplicate pair).
"""

from __future__ import annotations

import heapq
import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from winnow.selectors.checks import is_int

__all__ = [
    "KERNELS",
    "GreedyMapResult",
    "greedy_map",
    "kernel_rows",
    "kernel_submatrix",
    "log_det",
    "log_det_distance",
    "partitioned_greedy_map",
    "quality_from_relevance",
]

KERNELS = ("linear", "cosine", "rbf", "vmf")
_DTYPES = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------
# validation and the prepared kernel
# ----------------------------------------------------------------------------------------------


def _positive_real(name: str, v: object) -> float:
    if (
        not isinstance(v, numbers.Real)
        or isinstance(v, bool | np.bool_)
        or not (math.isfinite(float(v)) and float(v) > 0)
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    return float(v)


class _Kernel:
    """Embeddings prepared once (cast, normalised, squared norms, quality); rows computed on demand."""

    def __init__(self, X, kernel, quality, sigma, kappa, dtype):
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
        if not isinstance(X, torch.Tensor):
            X = torch.as_tensor(np.asarray(X))
        if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
            raise ValueError(f"X must be a non-empty 2-D (N, d) array, got shape {tuple(X.shape)}")
        X = X.to(dtype)
        if not bool(torch.isfinite(X).all()):
            raise ValueError("X has NaN or infinite entries")
        self.kernel = kernel
        self.sigma = _positive_real("sigma", sigma)
        self.kappa = _positive_real("kappa", kappa)
        self.n = X.shape[0]
        if kernel in ("cosine", "vmf"):
            norms = torch.linalg.vector_norm(X, dim=1)
            if bool((norms == 0).any()):
                raise ValueError(f"X has all-zero rows, which the {kernel} kernel cannot normalise")
            X = X / norms[:, None]
        self.X = X
        self.sq = (X * X).sum(1) if kernel in ("linear", "rbf") else None
        if quality is None:
            self.q = None
        else:
            q = torch.as_tensor(np.asarray(quality) if not isinstance(quality, torch.Tensor) else quality)
            if q.shape != (self.n,):
                raise ValueError(f"quality must have shape ({self.n},), got {tuple(q.shape)}")
            q = q.to(device=X.device, dtype=dtype)
            if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
                raise ValueError("quality must be finite and >= 0")
            self.q = q

    def _s(self, G, rows, cols):
        """Similarity from the Gram block ``G = X[rows] X[cols]^T`` (in place where possible)."""
        k = self.kernel
        if k in ("linear", "cosine"):
            return G
        if k == "vmf":
            return G.sub_(1.0).mul_(self.kappa).exp_()
        assert self.sq is not None  # linear and rbf kernels keep the squared norms
        sq_r = self.sq[rows][:, None] if rows is not None else self.sq[:, None]
        sq_c = self.sq[cols][None, :] if cols is not None else self.sq[None, :]
        return G.mul_(-2.0).add_(sq_r).add_(sq_c).clamp_(min=0.0).mul_(-0.5 / self.sigma**2).exp_()

    def diag(self):
        if self.kernel == "linear":
            assert self.sq is not None
            s = self.sq.clone()
        else:  # cosine, rbf, vmf: exactly 1 (so that the first pick's ties are exact ties)
            s = torch.ones(self.n, dtype=self.X.dtype, device=self.X.device)
        return s if self.q is None else s * self.q * self.q

    def row(self, j):
        """``L[j, :]`` (length N)."""
        s = torch.mv(self.X, self.X[j])
        if self.kernel == "vmf":
            s.sub_(1.0).mul_(self.kappa).exp_()
        elif self.kernel == "rbf":
            assert self.sq is not None
            s.mul_(-2.0).add_(self.sq).add_(self.sq[j]).clamp_(min=0.0).mul_(-0.5 / self.sigma**2).exp_()
        return s if self.q is None else s.mul_(self.q).mul_(self.q[j])

    def block(self, rows, cols):
        """``L[rows][:, cols]`` for index tensors ``rows`` and ``cols`` (None: all)."""
        Xr = self.X if rows is None else self.X[rows]
        Xc = self.X if cols is None else self.X[cols]
        s = self._s(Xr @ Xc.T, rows, cols)
        if self.q is not None:
            qr = self.q if rows is None else self.q[rows]
            qc = self.q if cols is None else self.q[cols]
            s = s.mul_(qr[:, None]).mul_(qc[None, :])
        return s


def _index(idx, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(idx) if not isinstance(idx, torch.Tensor) else idx)
    if t.ndim != 1 or (t.numel() and (t.dtype.is_floating_point or t.dtype == torch.bool)):
        raise ValueError("indices must be a 1-D sequence of integers")
    t = t.to(torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
        raise ValueError(f"indices must lie in [0, {n}), got min {int(t.min())}, max {int(t.max())}")
    return t.to(device)


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------


def quality_from_relevance(relevance, theta: float) -> torch.Tensor:
    """Chen et al. 2018 (Section 4) quality ``q_i = exp(theta * r_i / (2 * (1 - theta)))``, theta in [0, 1)."""
    if not isinstance(theta, numbers.Real) or isinstance(theta, bool | np.bool_) or not (0 <= theta < 1):
        raise ValueError(f"theta must be a number in [0, 1), got {theta!r}")
    r = (
        relevance
        if isinstance(relevance, torch.Tensor)
        else torch.as_tensor(np.asarray(relevance, dtype=float))
    )
    if r.ndim != 1 or not bool(torch.isfinite(r).all()):
        raise ValueError("relevance must be a 1-D array of finite numbers")
    r = r if r.dtype.is_floating_point else r.to(torch.float64)
    return torch.exp(r * (float(theta) / (2.0 * (1.0 - float(theta)))))


def kernel_rows(
    X,
    idx,
    *,
    kernel: str = "cosine",
    quality=None,
    sigma: float = 1.0,
    kappa: float = 1.0,
    dtype: torch.dtype = torch.float32,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Rows ``L[idx, :]`` (len(idx), N) of the kernel, computed from ``X`` ``chunk_size`` rows at a time."""
    if not is_int(chunk_size) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    K = _Kernel(X, kernel, quality, sigma, kappa, dtype)
    t = _index(idx, K.n, K.X.device)
    parts = [K.block(t[a : a + chunk_size], None) for a in range(0, t.numel(), chunk_size)]
    return torch.cat(parts) if parts else K.X.new_zeros((0, K.n))


def kernel_submatrix(
    X,
    idx,
    *,
    kernel: str = "cosine",
    quality=None,
    sigma: float = 1.0,
    kappa: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The principal submatrix ``L_S = L[idx][:, idx]`` (m, m), from the rows of ``X`` in ``idx`` only: those
    rows (and their qualities) are taken first, so a large ``X`` (a memory-mapped file) is never cast or
    normalised whole (every kernel here is a function of the two rows and their qualities alone)."""
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(np.asarray(X))
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D (N, d) array, got shape {tuple(X.shape)}")
    t = _index(idx, X.shape[0], X.device)
    q = None
    if quality is not None:
        q = torch.as_tensor(np.asarray(quality) if not isinstance(quality, torch.Tensor) else quality)
        if q.shape != (X.shape[0],):
            raise ValueError(f"quality must have shape ({X.shape[0]},), got {tuple(q.shape)}")
        q = q[t.to(q.device)]
    if t.numel() == 0:
        _Kernel(X[:1], kernel, None if q is None else torch.ones(1), sigma, kappa, dtype)  # the same checks
        return torch.zeros((0, 0), dtype=dtype, device=X.device)
    K = _Kernel(X[t], kernel, q, sigma, kappa, dtype)
    r = torch.arange(t.numel(), device=K.X.device)
    return K.block(r, r)


def log_det(
    X,
    idx,
    *,
    kernel: str = "cosine",
    quality=None,
    sigma: float = 1.0,
    kappa: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> float:
    """``log det L_S`` from the eigenvalues of the symmetric ``L_S`` (0 for the empty set).

    ``-inf`` when ``L_S`` is singular to working precision: its smallest eigenvalue is at most
    ``|S| * eps * max eigenvalue`` (the rank tolerance of ``numpy.linalg.matrix_rank``). Rows that are
    exact duplicates make ``L_S`` singular in exact arithmetic; a determinant read off rounding noise
    (``slogdet``'s sign and magnitude there) would change with the BLAS, the thread count and the machine.
    """
    L = kernel_submatrix(X, idx, kernel=kernel, quality=quality, sigma=sigma, kappa=kappa, dtype=dtype)
    if L.shape[0] == 0:
        return 0.0
    lam = torch.linalg.eigvalsh(L)
    tol = L.shape[0] * torch.finfo(lam.dtype).eps * float(lam.abs().max())
    if float(lam.min()) <= tol:
        return -math.inf
    return float(lam.log().sum())


@dataclass(frozen=True)
class GreedyMapResult:
    """Output of :func:`greedy_map`.

    ``picks`` (int64, CPU): the chosen rows in the order picked. ``gains`` (float64, CPU): the marginal
    gain ``log d2_j`` of each pick. ``logdet``: ``log det L_S`` of the picks, the sum of the gains
    (from :func:`partitioned_greedy_map`: the gains are within-cluster gains and ``logdet`` is
    recomputed exactly, or NaN when not computed).
    ``stopped``: ``"k"`` (k picks made), ``"threshold"`` (the best remaining ``d2`` fell below ``eps``)
    or ``"exhausted"`` (every row picked).
    """

    picks: torch.Tensor
    gains: torch.Tensor
    logdet: float
    stopped: str


def greedy_map(
    X,
    k: int,
    *,
    kernel: str = "cosine",
    quality=None,
    sigma: float = 1.0,
    kappa: float = 1.0,
    eps: float | None = None,
    dtype: torch.dtype = torch.float32,
    start=None,
) -> GreedyMapResult:
    """Greedy MAP of the DPP with kernel ``L`` on ``X``'s rows: Algorithm 1 of Chen et al. (NeurIPS 2018).

    Picks up to ``k`` rows, each the unpicked row of largest ``d2`` (lowest index on ties), stopping
    early when that ``d2`` is below ``eps`` (default ``1e-10`` for float64, ``1e-5`` for float32, where
    cancellation in ``d2 = L_jj - sum e^2`` leaves errors of order ``t * 1e-7``). Runs on ``X``'s
    device in ``dtype``. ``start`` (optional row indices) forces the first picks, in that order; a
    forced pick whose ``d2`` is below ``eps`` raises. See the module docstring for the update.
    """
    if not is_int(k) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    K = _Kernel(X, kernel, quality, sigma, kappa, dtype)
    if eps is None:
        eps = 1e-10 if dtype == torch.float64 else 1e-5
    elif (
        not isinstance(eps, numbers.Real)
        or isinstance(eps, bool | np.bool_)
        or not (eps >= 0 and math.isfinite(eps))
    ):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    forced = [] if start is None else _index(start, K.n, "cpu").tolist()
    if len(set(forced)) != len(forced):
        raise ValueError("start has repeated indices")
    if len(forced) > k:
        raise ValueError(f"start has {len(forced)} indices, more than k={k}")

    n, dev = K.n, K.X.device
    k_max = min(k, n)
    c = torch.empty((k_max, n), dtype=dtype, device=dev)
    d2 = K.diag()
    picks: list[int] = []
    gains: list[float] = []
    stopped = "k" if k_max == k else "exhausted"
    for t in range(k_max):
        if t < len(forced):
            j = forced[t]
            dj2 = float(d2[j])
            if not dj2 >= eps:
                raise ValueError(f"start index {j} has d2={dj2:.3g} < eps={eps:g} given the picks before it")
        else:
            j = int(torch.argmax(d2))
            dj2 = float(d2[j])
            if not dj2 >= eps:  # also catches -inf (all picked) and NaN
                stopped = "threshold"
                break
        e = K.row(j)
        if t:
            e = torch.addmv(e, c[:t].T, c[:t, j], alpha=-1.0)
        e.div_(math.sqrt(dj2))
        c[t] = e
        d2.addcmul_(e, e, value=-1.0)
        d2[j] = -math.inf
        picks.append(j)
        gains.append(math.log(dj2))
    g = torch.tensor(gains, dtype=torch.float64)
    return GreedyMapResult(torch.tensor(picks, dtype=torch.long), g, float(g.sum()), stopped)


def partitioned_greedy_map(
    X,
    k: int,
    clusters,
    *,
    kernel: str = "cosine",
    quality=None,
    sigma: float = 1.0,
    kappa: float = 1.0,
    eps: float | None = None,
    dtype: torch.dtype = torch.float32,
    device=None,
    logdet_max: int = 4096,
) -> GreedyMapResult:
    """Greedy MAP within each cluster, then a merge by gain: the approximation for pools past one device.

    ``clusters`` (length N, integers ``>= 0``) labels each row of ``X``. For each label in increasing
    order, that cluster's rows (and quality) are moved to ``device`` (default: ``X``'s device) and
    :func:`greedy_map` picks up to ``min(k, n_c)`` of them with the same kernel, ``eps`` and ``dtype``;
    then the device copy is dropped, so peak device memory is one cluster's ``O(n_c k + n_c d)``.
    The merge takes candidates in decreasing order of their within-cluster gain ``log d2`` (ties: the
    lower global index) until ``k`` picks, as a k-way merge of the clusters' pick lists (each
    non-increasing in gain), so every cluster contributes a prefix of its own greedy sequence.

    Gives up, against :func:`greedy_map` on all of ``X``: interactions between clusters (two
    near-identical rows in different clusters can both be picked), true marginal gains (``gains``
    are within-cluster gains, each conditioned only on the same cluster's earlier picks), and the
    identity ``logdet = sum(gains)``. ``logdet`` is therefore recomputed exactly with :func:`log_det`
    (float64, on ``device``) on the picked rows when there are at most ``logdet_max`` of them, else
    it is NaN. ``stopped``: ``"k"`` when ``k`` picks were made, else ``"threshold"`` when some
    cluster's greedy stopped at ``eps``, else ``"exhausted"``. With a single cluster the picks and
    gains are those of :func:`greedy_map`.
    """
    if not is_int(k) or k < 0:
        raise ValueError(f"k must be an integer >= 0, got {k!r}")
    if not is_int(logdet_max) or logdet_max < 0:
        raise ValueError(f"logdet_max must be an integer >= 0, got {logdet_max!r}")
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(np.asarray(X))
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D (N, d) array, got shape {tuple(X.shape)}")
    n = X.shape[0]
    lab = torch.as_tensor(np.asarray(clusters) if not isinstance(clusters, torch.Tensor) else clusters)
    if lab.shape != (n,) or lab.dtype.is_floating_point or lab.dtype == torch.bool or lab.is_complex():
        raise ValueError(
            f"clusters must be a 1-D integer array of length {n}, got {lab.dtype} {tuple(lab.shape)}"
        )
    lab = lab.to("cpu", torch.long)
    if int(lab.min()) < 0:
        raise ValueError("clusters must be integers >= 0")
    q = None
    if quality is not None:
        q = torch.as_tensor(np.asarray(quality) if not isinstance(quality, torch.Tensor) else quality)
        if q.shape != (n,):
            raise ValueError(f"quality must have shape ({n},), got {tuple(q.shape)}")
    dev = X.device if device is None else torch.device(device)

    order = torch.argsort(lab, stable=True)  # rows grouped by label, increasing index within a label
    _, counts = torch.unique_consecutive(lab[order], return_counts=True)
    lists: list[tuple[list[int], list[float]]] = []  # (global picks, gains) per cluster, in pick order
    any_threshold = False
    a = 0
    for c in counts.tolist():
        rows = order[a : a + c]
        a += c
        rx = rows.to(X.device)
        Xc = X[rx].to(dev)
        qc = None if q is None else q[rows.to(q.device)].to(dev)
        r = greedy_map(
            Xc, min(k, c), kernel=kernel, quality=qc, sigma=sigma, kappa=kappa, eps=eps, dtype=dtype
        )
        del Xc, qc
        any_threshold |= r.stopped == "threshold"
        lists.append((rows[r.picks].tolist(), r.gains.tolist()))

    # k-way merge: the heap holds each list's best remaining candidate as (-gain, global index, list)
    heap = [(-g[0], p[0], i, 0) for i, (p, g) in enumerate(lists) if p]
    heapq.heapify(heap)
    picks: list[int] = []
    gains: list[float] = []
    while heap and len(picks) < k:
        neg_gain, j, i, h = heapq.heappop(heap)
        picks.append(j)
        gains.append(-neg_gain)
        p, g = lists[i]
        if h + 1 < len(p):
            heapq.heappush(heap, (-g[h + 1], p[h + 1], i, h + 1))

    stopped = "k" if len(picks) == k else ("threshold" if any_threshold else "exhausted")
    pt = torch.tensor(picks, dtype=torch.long)
    logdet = 0.0 if not picks else math.nan
    if picks and len(picks) <= logdet_max:
        sub = pt.to(X.device)
        logdet = log_det(
            X[sub].to(dev),
            torch.arange(len(picks)),
            kernel=kernel,
            quality=None if q is None else q[pt.to(q.device)].to(dev),
            sigma=sigma,
            kappa=kappa,
            dtype=torch.float64,
        )
    return GreedyMapResult(pt, torch.tensor(gains, dtype=torch.float64), logdet, stopped)


def log_det_distance(
    X,
    subset,
    *,
    kernel: str = "cosine",
    sigma: float = 1.0,
    kappa: float = 1.0,
    seeds: int = 5,
    seed0: int = 0,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Wang et al. 2024 style diversity: ``log det L_S`` minus the mean log det of greedy references.

    The references: for ``s`` in ``range(seeds)``, a greedy-MAP selection of ``len(subset)`` rows of the
    same pool ``X``, its first row drawn by ``numpy.random.default_rng(seed0 + s)``. Unit-diagonal
    kernels only (``cosine``, ``rbf``, ``vmf``), no quality. See the module docstring.
    """
    if kernel == "linear":
        raise ValueError("log_det_distance needs a unit-diagonal kernel (cosine, rbf or vmf), not linear")
    if not is_int(seeds) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {seeds!r}")
    if not is_int(seed0):
        raise ValueError(f"seed0 must be an integer, got {seed0!r}")
    K = _Kernel(X, kernel, None, sigma, kappa, dtype)
    t = _index(subset, K.n, "cpu")
    m = t.numel()
    if m == 0:
        raise ValueError("subset is empty")
    if len(set(t.tolist())) != m:
        raise ValueError("subset has repeated indices")
    own = log_det(K.X, t, kernel=kernel, sigma=sigma, kappa=kappa, dtype=dtype)
    refs = []
    for s in range(seeds):
        first = int(np.random.default_rng(seed0 + s).integers(K.n))
        r = greedy_map(K.X, m, kernel=kernel, sigma=sigma, kappa=kappa, dtype=dtype, start=[first])
        if r.picks.numel() < m:
            raise ValueError(f"the pool's kernel has rank < {m}: no reference of the subset's size exists")
        refs.append(r.logdet)
    return own - float(np.mean(refs))


def isotropic_log_det_distance(
    X,
    subset,
    *,
    size: int | None = None,
    kernel: str = "vmf",
    sigma: float = 1.0,
    kappa: float = 1.0,
    seeds: int = 3,
    seed0: int = 0,
    ridge: float = 1e-6,
) -> float:
    """Diversity of a set as its per-item log-det distance to a maximally diverse reference.

    After Wang et al. 2024 ("Diversity Measurement and Subset Selection for Instruction Tuning
    Datasets"), who measure a dataset's diversity by comparing the log-determinant of its kernel
    with that of a maximally diverse reference of the same size. Here the reference is `size` random
    directions, uniform on the unit sphere of the embeddings' dimension (the most spread-out set a
    unit-vector embedding can hold, independent of the pool), and the set is represented by `size`
    rows drawn uniformly from `subset` (all of it when smaller): the result is
    mean over seeds of (log det L_ref − log det L_sample) / size, in nats per item, >= 0 in practice;
    smaller is more diverse. Sampling to a common `size` makes the input and a selection comparable.
    Deviation: the paper's exact reference construction could not be checked offline; this choice
    and the per-item normalisation are ours. Both kernels get `ridge` added to the diagonal, so a set
    with exact duplicates (log det -inf) gets a large finite distance instead of infinity.
    """
    if not is_int(seeds) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    idx = torch.as_tensor(subset, dtype=torch.long).reshape(-1).cpu()
    m = int(size) if size is not None else int(idx.numel())
    if m < 1 or idx.numel() < 1:
        raise ValueError("isotropic_log_det_distance needs a non-empty subset and size >= 1")
    m = min(m, int(idx.numel()))
    d = X.shape[1]
    out = []
    for s in range(seeds):
        g = torch.Generator().manual_seed(seed0 + s)
        pick = idx[torch.randperm(idx.numel(), generator=g)[:m]]
        ref = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=torch.float64), dim=1)

        def ridged(Y, rows):
            K = kernel_submatrix(Y, rows, kernel=kernel, sigma=sigma, kappa=kappa, dtype=torch.float64)
            K = K + ridge * torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
            sign, ld = torch.linalg.slogdet(K)
            return float(ld) if float(sign) > 0 else -math.inf

        ld_set = ridged(X, pick.to(X.device) if isinstance(X, torch.Tensor) else pick)
        ld_ref = ridged(ref, torch.arange(m))
        out.append((ld_ref - ld_set) / m)
    return float(sum(out) / len(out))
