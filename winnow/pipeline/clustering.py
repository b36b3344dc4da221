"""k-means cluster assignment for cluster-partitioned DPP selection (`select.dpp.clusters`).

faiss lives here, not in `winnow/selectors` (which imports only torch and numpy). faiss-gpu runs
k-means on every GPU it sees and silently on the CPU when it sees none (or when the module is
faiss-cpu), so the GPU is asked for only when `faiss.get_num_gpus() > 0`.
"""

from __future__ import annotations

import numpy as np

from winnow.errors import WinnowError
from winnow.selectors.checks import is_int

__all__ = ["kmeans_assign"]

_ASSIGN_CHUNK = 1 << 20  # rows per nearest-centroid search, so query buffers stay bounded


def _faiss():
    try:
        import faiss
    except ImportError:
        raise WinnowError("select.dpp.clusters needs faiss: pip install -e '.[cpu]' (or '.[gpu]')") from None
    return faiss


def kmeans_assign(X: np.ndarray, n_clusters: int, seed: int, niter: int = 20) -> np.ndarray:
    """Cluster label (int64, in ``[0, n_clusters)``) of every row of ``X`` (N, d) by faiss k-means.

    Trains on a sample of at most ``256 * n_clusters`` rows drawn without replacement by
    ``numpy.random.default_rng(seed)`` (all rows when N is smaller), with faiss's own seed ``seed``
    for the initial centroids, for ``niter`` Lloyd iterations; then assigns every row to its nearest
    centroid (L2), a chunk at a time: ``X`` may be a memory-mapped float16 file, of which only the sample
    and one chunk are in memory as float32. On the GPU when ``faiss.get_num_gpus() > 0``, else on the CPU. Deterministic for
    a given seed on one machine. Some clusters may end up empty. Raises ``ValueError`` for bad
    arguments and ``WinnowError`` when faiss is not installed.
    """
    if not is_int(n_clusters) or n_clusters < 1:
        raise ValueError(f"n_clusters must be an integer >= 1, got {n_clusters!r}")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if not is_int(niter) or niter < 1:
        raise ValueError(f"niter must be an integer >= 1, got {niter!r}")
    X = np.asarray(X)  # a memory-mapped array stays mapped (no copy)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X must be a non-empty 2-D (N, d) array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.issubdtype(X.dtype, np.complexfloating):
        raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
    n, d = X.shape
    if n_clusters > n:
        raise ValueError(f"n_clusters={n_clusters} is more than the {n} rows of X")

    def rows(a: int, b: int) -> np.ndarray:  # float32 rows a..b, one chunk in memory at a time
        part = np.ascontiguousarray(X[a:b], dtype=np.float32)
        if not np.isfinite(part).all():
            raise ValueError("X has NaN or infinite entries")
        return part

    if n_clusters == 1:
        for a in range(0, n, _ASSIGN_CHUNK):
            rows(a, a + _ASSIGN_CHUNK)
        return np.zeros(n, dtype=np.int64)

    faiss = _faiss()
    use_gpu = faiss.get_num_gpus() > 0
    n_train = min(n, 256 * n_clusters)
    rng = np.random.default_rng(seed)
    pick = None if n_train == n else np.sort(rng.choice(n, n_train, replace=False))
    train = rows(0, n) if pick is None else np.ascontiguousarray(X[pick], dtype=np.float32)
    if not np.isfinite(train).all():
        raise ValueError("X has NaN or infinite entries")
    # max_points_per_centroid: we sampled already, so faiss must not subsample again (with its own rng);
    # min_points_per_centroid=1: no warning on stderr for small samples; faiss seeds are 32-bit.
    km = faiss.Kmeans(
        d,
        int(n_clusters),
        niter=int(niter),
        seed=int(seed) & 0x7FFFFFFF,
        gpu=use_gpu,
        max_points_per_centroid=max(256, -(-n_train // n_clusters)),
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(train)
    del train
    labels = np.empty(n, dtype=np.int64)
    for a in range(0, n, _ASSIGN_CHUNK):
        _, idx = km.index.search(rows(a, a + _ASSIGN_CHUNK), 1)
        labels[a : a + _ASSIGN_CHUNK] = idx[:, 0]
    return labels
