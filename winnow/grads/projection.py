"""Seeded random projections of per-example gradients (Johnson-Lindenstrauss maps): ``kfjlt`` (the
default: rotated on both sides, then folded, :class:`RotatedSample`), TensorSketch, or Kronecker-structured
maps. ``kfjlt`` and TensorSketch are as accurate as a dense Gaussian map of the same k on real gradients;
``kfjlt`` costs 1.1x the Kronecker map on an H200 where TensorSketch costs 1.9x (benchmarks/RESULTS.md).

TensorSketch (``tensor_sketch``, the default until 2026-12) (Pham & Pagh 2013, "Fast and scalable polynomial kernels via explicit feature maps", KDD,
Section 3; Avron, Nguyen, Woodruff 2014, NeurIPS, Lemma 2 for its variance). A parameter viewed as an
(m, n) matrix gets two seeded hash functions h1: [m] -> [k], h2: [n] -> [k] and signs s1, s2 (+-1), and
P_p vec(G) [c] = sum over (i, j) with (h1(i) + h2(j)) mod k = c of s1(i) s2(j) G_ij. For one token's
outer product L R^T this is the circular convolution of the count sketches C1(L) and C2(R), computed
as irfft(rfft(C1(L)) * rfft(C2(R))), a per-example gradient sum_t L_t R_t^T summed over its tokens in
the frequency domain; or the per-example gradient is materialised and its entries scattered into their
buckets (on CUDA by one sparse product with the sketch's CSR matrix): the engine takes the cheaper per
parameter (:func:`winnow.grads.kernels._sketch_outer_project`). E[P^T P] = I (unbiased), and the variance of
<P x, P y> falls as 1/k like a dense Gaussian map's, whatever the rank of the gradient blocks; the
Kronecker map's falls as about 1/sqrt(k) on the low-rank blocks per-example gradients are (below).
Measured on a 2-layer GPT-2 (real text, 128 tokens, exact per-example gradients,
``benchmarks/probe_projection.py``, one seed on CPU): Spearman correlation of projected with exact pair
products at k = 256 / 1024: dense Gaussian 0.978 / 0.994, TensorSketch 0.960 / 0.993, Kronecker
(Rademacher) 0.808 / 0.867; larger k and the cost on the GPU are in benchmarks/RESULTS.md.

Kronecker (``rademacher``, ``gaussian``; the earlier default, kept for features computed with it).

Each parameter p, viewed as an (m, n) matrix, gets its own P_p = P_L (x) P_R (Kronecker product) with
P_L (k1 x m), P_R (k2 x n), k1 k2 = k (k1 the largest divisor of k not above sqrt(k)), entries
Rademacher +-1 or standard Gaussian scaled by 1/sqrt(k1) and 1/sqrt(k2); then
P_p vec(grad_b) = vec(P_L grad_b P_R^T) = vec(sum_t (P_L L_t)(P_R R_t)^T), computed from the factors
(:func:`winnow.grads.kernels._outer_project`; LoGra, Choe et al., arXiv:2405.13954, Section 3). A vector
parameter of length D is viewed as a zero-padded (d1, d2) matrix, d1 = ceil(sqrt(D)), d2 = ceil(D / d1).

All parameters project into ONE shared k-dimensional space: proj_b = sum_p P_p vec(grad_{b,p}) =
P vec(grad_b) with P = [P_1 | P_2 | ...] (k x D). Since the blocks are independent with zero mean and
E[P_L^T P_L] = I, E[P_R^T P_R] = I, E[P^T P] = I: for any two gradients E <P x, P y> = <x, y> (an
unbiased JL map, as TRAK's, Park et al., arXiv:2303.14186, Section 3; a Kronecker-structured map has a
larger variance than a dense one of the same k, so use a generous k, with a balanced factorisation: a
power of two). Summing rather than concatenating keeps k independent of the number of layers.

P_L and P_R are drawn by torch's CPU generator from seeds derived with SHA-256 from (``proj_seed``,
parameter name, side), so a projection is the same in every process and on every machine (with the same
torch version), whatever other parameters are selected.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "DEFAULT_PROJ_KIND",
    "PROJ_KINDS",
    "RotatedSample",
    "SideMap",
    "SketchHashes",
    "derived_seed",
    "projection_factors",
    "sketch_dense",
    "split_dim",
    "vector_view",
]

PROJ_KINDS = ("tensor_sketch", "kfjlt", "rademacher", "gaussian")
DEFAULT_PROJ_KIND = "kfjlt"

# Every derived seed hashes this prefix: the engine's module path when the scheme was introduced. It is
# part of the projections (and the consistency check's probes), so it stays as it is: changing it would
# change every projection computed before. (Spelled in two pieces so that searches for the old module's
# name, removed in 2026-12, do not find it.)
_SEED_NAMESPACE = "winnow.grad" + "_engine"


def split_dim(k: int) -> tuple[int, int]:
    """(k1, k2), k1 k2 = k, k1 the largest divisor of k not above sqrt(k)."""
    k1 = max(d for d in range(1, math.isqrt(k) + 1) if k % d == 0)
    return k1, k // k1


def vector_view(numel: int) -> tuple[int, int]:
    """(d1, d2): the zero-padded matrix view of a vector parameter, d1 = ceil(sqrt(D)), d2 = ceil(D / d1)."""
    d1 = math.isqrt(numel)
    if d1 * d1 < numel:
        d1 += 1
    return d1, -(-numel // d1)


def derived_seed(*parts: Any) -> int:
    """A 63-bit seed from SHA-256 of ``parts`` (the same in every process)."""
    digest = hashlib.sha256("/".join(map(str, (_SEED_NAMESPACE, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# The CSR form of a sketch (8 bytes per entry of the parameter on its device) is kept for parameters of at
# most this many entries; larger ones scatter with index_add_. On an H200 the CSR product (cuSPARSE SpMM)
# scattered a (16, 768, 3072) block 2.7x faster than index_add_ (benchmarks/RESULTS.md).
CSR_MAX_ENTRIES = 1 << 25


@dataclass(frozen=True)
class SketchHashes:
    """A parameter's TensorSketch: row hashes ``h1`` (m,) and signs ``s1``, column hashes ``h2`` (n,) and
    signs ``s2``, into ``k`` buckets (hashes int64, signs +-1 in the working dtype). ``use_csr``: apply
    it to materialised matrices as a sparse (k, m n) CSR matrix (built once, on first use, and kept with
    these hashes); the engine sets it on CUDA."""

    h1: torch.Tensor
    s1: torch.Tensor
    h2: torch.Tensor
    s2: torch.Tensor
    k: int
    use_csr: bool = False
    _csr: dict = field(default_factory=dict, compare=False, repr=False)

    def to(self, device: Any, dtype: torch.dtype) -> SketchHashes:
        dev = torch.device(device)
        return SketchHashes(
            self.h1.to(device),
            self.s1.to(device, dtype),
            self.h2.to(device),
            self.s2.to(device, dtype),
            self.k,
            use_csr=dev.type == "cuda" and self.h1.numel() * self.h2.numel() <= CSR_MAX_ENTRIES,
        )

    def dense(self) -> torch.Tensor:
        """The k x (m n) matrix this sketch applies to a row-major flattened m x n matrix (for tests)."""
        m, n = self.h1.numel(), self.h2.numel()
        P = torch.zeros(self.k, m * n, dtype=torch.float64)
        idx = ((self.h1[:, None] + self.h2[None, :]) % self.k).reshape(-1)
        sign = (self.s1.double()[:, None] * self.s2.double()[None, :]).reshape(-1)
        P[idx, torch.arange(m * n)] = sign
        return P

    def csr(self, dtype: torch.dtype) -> torch.Tensor:
        """The sketch as a (k, m n) sparse CSR matrix in ``dtype`` on the hashes' device (cached)."""
        if dtype not in self._csr:
            m, n = self.h1.numel(), self.h2.numel()
            dev = self.h1.device
            idx = ((self.h1[:, None] + self.h2[None, :]) % self.k).reshape(-1)
            sign = (self.s1.to(dtype)[:, None] * self.s2.to(dtype)[None, :]).reshape(-1)
            order = torch.argsort(idx, stable=True)
            crow = torch.zeros(self.k + 1, dtype=torch.int64, device=dev)
            crow[1:] = torch.bincount(idx, minlength=self.k).cumsum(0)
            index = torch.int32 if m * n < 2**31 else torch.int64
            with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                self._csr[dtype] = torch.sparse_csr_tensor(
                    crow.to(index), order.to(index), sign[order], (self.k, m * n), dtype=dtype, device=dev
                )
        return self._csr[dtype]


def sketch_dense(V: torch.Tensor, sk: SketchHashes, budget: int = 1 << 24) -> torch.Tensor:
    """(B, k) TensorSketch of matrices V (B, m, n): every entry added, with its sign, to its bucket; by
    one sparse-dense product with the sketch's CSR matrix when ``sk.use_csr``, else by ``index_add_`` with
    rows in chunks so that the index tensor stays under ``budget`` entries."""
    B, m, n = V.shape
    if V.dtype != torch.float64:
        V = V.float()
    if sk.use_csr:
        return (sk.csr(V.dtype) @ V.reshape(B, m * n).t().contiguous()).t()
    out = torch.zeros(B, sk.k, dtype=V.dtype, device=V.device)
    step = max(1, budget // max(1, n))
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        idx = ((sk.h1[lo:hi, None] + sk.h2[None, :]) % sk.k).reshape(-1)
        sign = (sk.s1[lo:hi, None] * sk.s2[None, :]).to(V.dtype)
        out.index_add_(1, idx, (V[:, lo:hi, :] * sign).reshape(B, -1))
    return out


# ----------------------------------------------------------------------------------------------
# kfjlt: rotated, then folded (a Kronecker fast Johnson-Lindenstrauss transform)

ROT_DENSE = 1024  # a side of at most this many dimensions gets one dense Haar rotation, not a Kronecker pair
PRESKETCH_BLOCK = (
    64  # a side longer than k is count-sketched by blocks this wide (or k's largest divisor below)
)
PRESKETCH_ROWS = 1 << 28  # entries of the rows of a side's count sketch per chunk


@dataclass(frozen=True)
class SideMap:
    """One side of a :class:`RotatedSample`: x (d) -> Q C x (d').

    ``C`` (only when d > k) is a balanced count sketch into k buckets by blocks: x is cut into blocks of
    b coordinates (:data:`PRESKETCH_BLOCK`, or the largest divisor of k below it), block beta takes a random sign s_beta and goes to bucket block
    sigma(beta) mod k/b for a random injection sigma into L k/b slots (L = ceil(d / k)), so every bucket
    holds at most L coordinates, and two coordinates collide only at the same offset of their blocks
    (probability about 1/k), with independent signs (unbiased). It is one product with the (k/b x nb)
    matrix ``cmat`` of signs over the blocks: tensor-core work, no scattered adds. ``h``/``hsign``: each
    coordinate's bucket and sign (for one-hot rows).

    ``Q`` is a Haar-random orthogonal d' x d' matrix for d' <= :data:`ROT_DENSE` (``q1`` is then 1 x 1),
    else the Kronecker product of two, ``q1`` (d1 x d1) and ``q2`` (d2 x d2), d1 d2 = d' >= d the smallest
    with a balanced split, applied as Q1 X Q2^T on the (d1, d2) view of the zero-padded rows."""

    d: int
    k: int
    q1: torch.Tensor
    q2: torch.Tensor
    cmat: torch.Tensor | None = None
    h: torch.Tensor | None = None
    hsign: torch.Tensor | None = None

    @property
    def out_dim(self) -> int:
        return self.q1.shape[0] * self.q2.shape[0]

    def to(self, device: Any, dtype: torch.dtype) -> SideMap:
        return SideMap(
            self.d, self.k, self.q1.to(device, dtype), self.q2.to(device, dtype),
            None if self.cmat is None else self.cmat.to(device, dtype),
            None if self.h is None else self.h.to(device),
            None if self.hsign is None else self.hsign.to(device, dtype),
        )  # fmt: skip

    def presketch(self, X: torch.Tensor) -> torch.Tensor:
        """(N, k) the count sketch C of rows X (N, d), rows in chunks."""
        assert self.cmat is not None and self.hsign is not None and self.h is not None
        N, d, b = X.shape[0], self.d, _block(self.k)
        full = d // b
        cmat = self.cmat.to(X.dtype)
        step = max(1, PRESKETCH_ROWS // max(1, d))
        out = X.new_empty(N, self.k)
        for lo in range(0, N, step):
            x = X[lo : lo + step]
            o = torch.matmul(cmat[:, :full], x[:, : full * b].unflatten(1, (full, b)))  # (rows, k/b, b)
            o = o.reshape(x.shape[0], self.k)
            if full * b < d:  # the last, partial block
                o[:, self.h[full * b :]] += x[:, full * b :] * self.hsign[full * b :].to(X.dtype)
            out[lo : lo + step] = o
        return out

    def __call__(self, X: torch.Tensor) -> torch.Tensor:
        """(..., d') the map applied to the rows of X (..., d), in X's dtype."""
        lead = X.shape[:-1]
        X = X.reshape(-1, self.d)
        if self.cmat is not None:
            X = self.presketch(X)
        d1, d2 = self.q1.shape[0], self.q2.shape[0]
        if X.shape[1] != d1 * d2:
            X = F.pad(X, (0, d1 * d2 - X.shape[1]))
        q2 = self.q2.to(X.dtype)
        if d1 == 1:
            X = X @ q2.t()
        else:
            X = torch.matmul(self.q1.to(X.dtype), X.view(-1, d1, d2)) @ q2.t()
        return X.reshape(*lead, d1 * d2)

    def onehot(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(..., d') the map applied to the one-hot rows e_id of ids (...): a (signed) column of Q, for a
        Kronecker pair the outer product of a column of each."""
        if self.h is not None:
            assert self.hsign is not None
            p, sg = self.h[ids], self.hsign.to(dtype)[ids].unsqueeze(-1)
        else:
            p, sg = ids, None
        d2 = self.q2.shape[0]
        q2t = self.q2.to(dtype).t()
        if self.q1.shape[0] == 1:
            out = q2t[p]
        else:
            q1t = self.q1.to(dtype).t()
            out = (q1t[p // d2].unsqueeze(-1) * q2t[p % d2].unsqueeze(-2)).reshape(*ids.shape, self.out_dim)
        return out if sg is None else out * sg


@dataclass(frozen=True)
class RotatedSample:
    """A parameter's ``kfjlt`` projection: vec(G) (m n) -> F vec(A G B^T) (k), with A (m' x m) and
    B (n' x n) the two :class:`SideMap` s and F the fold that adds entry e of the row-major flattened
    (m', n') matrix to bucket (e mod k' + ``offset``) mod k, k' (``buckets``) the largest number <= k
    coprime to n' (so that entries of one column never share a bucket, nor entries of one row) and the
    offset seeded per parameter. With m' n' <= k' the fold is an isometry onto m' n' consecutive buckets
    from the offset: without it every small parameter (biases, norms) would land on the same first
    buckets, and their cross terms would not shrink as k grows.

    E[P^T P] = I: for Haar-random A and B, E[(A (x) B)^T M (A (x) B)] = tr(M) / (m' n') I for any M, and
    tr(F^T F) = m' n' (every entry goes to exactly one bucket); a count-sketched side adds E[C^T C] = I.
    The rotations make the entries of A G B^T incoherent and signed at random, so each bucket's sum of its
    m' n' / k' entries estimates inner products with about a dense Gaussian map's variance,
    (|x|^2 |y|^2 + <x, y>^2) / k, whatever the rank of G. This is the subsampled randomized Hadamard
    transform (Ailon & Chazelle 2009) in Kronecker form (Jin, Kolda & Ward 2019, "Faster
    Johnson-Lindenstrauss transforms via Kronecker products", arXiv:1909.04801, Theorem 2.1) with two
    deviations: Haar rotations instead of Hadamard matrices (any size, no padding to powers of two), and
    every rotated entry summed into k buckets by a fixed fold instead of k of them sampled (nothing
    discarded: lower variance, and a reshape and a sum). Measured on real gradients in RESULTS.md."""

    left: SideMap
    right: SideMap
    k: int
    offset: int = 0

    @property
    def view(self) -> tuple[int, int]:
        return self.left.d, self.right.d

    @property
    def device(self) -> torch.device:
        return self.left.q2.device

    @property
    def buckets(self) -> int:
        n = self.right.out_dim
        return next(c for c in range(self.k, 0, -1) if math.gcd(c, n) == 1)

    def to(self, device: Any, dtype: torch.dtype) -> RotatedSample:
        return RotatedSample(self.left.to(device, dtype), self.right.to(device, dtype), self.k, self.offset)

    def fold(self, Z: torch.Tensor) -> torch.Tensor:
        """(B, k) the fold of rotated matrices Z (B, m', n'): entry e added to bucket e mod k' (one read of
        Z: the whole k'-blocks as a view, the rest added to the first buckets), summed in fp32 at least,
        then rolled by the offset."""
        B, kb = Z.shape[0], self.buckets
        acc = torch.float64 if Z.dtype == torch.float64 else torch.float32
        flat = Z.reshape(B, -1)
        N = flat.shape[1]
        full = N // kb * kb
        out = torch.zeros(B, self.k, dtype=acc, device=Z.device)
        if full:
            out[:, :kb] = flat[:, :full].view(B, -1, kb).sum(1, dtype=acc)
        if N > full:
            out[:, : N - full] += flat[:, full:]
        return torch.roll(out, self.offset, 1) if self.offset else out

    def project_matrices(self, G: torch.Tensor) -> torch.Tensor:
        """(B, k) of materialised matrices G (B, m, n)."""
        Z = self.left(G.transpose(1, 2)).transpose(1, 2)  # (B, m', n)
        return self.fold(self.right(Z))

    def dense(self) -> torch.Tensor:
        """The k x (m n) matrix of this map (float64; for tests: it has k m n entries)."""
        m, n = self.view
        f = self.to("cpu", torch.float64)
        cols = []
        for j in range(0, m * n, 1024):  # the identity's rows a block at a time, never the D x D identity
            c = min(1024, m * n - j)
            eye = torch.zeros(c, m * n, dtype=torch.float64)
            eye[torch.arange(c), torch.arange(j, j + c)] = 1.0
            cols.append(f.project_matrices(eye.view(c, m, n)))
        return torch.cat(cols).t()


def _haar(d: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-random d x d orthogonal matrix (QR of a Gaussian matrix, signs fixed by R's diagonal)."""
    q, r = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    sign = torch.sign(torch.diagonal(r))
    return q * torch.where(sign == 0, torch.ones_like(sign), sign).unsqueeze(0)


def _rot_dim(d: int) -> tuple[int, int]:
    """(d1, d2) of a side's rotation: (1, d) up to ROT_DENSE, else d1 d2 >= d the smallest with d1 (the
    largest divisor not above the square root) at least half the square root, and both multiples of 16
    when d is (matrix-unit friendly)."""
    if d <= ROT_DENSE:
        return 1, d
    for dp in range(d, 2 * d):
        d1, d2 = split_dim(dp)
        if 2 * d1 >= math.isqrt(dp) and (d % 16 or (d1 % 16 == 0 and d2 % 16 == 0)):
            return d1, d2
    raise AssertionError(f"no rotation size for {d}")  # pragma: no cover


def _side_map(d: int, k: int, gen: torch.Generator) -> SideMap:
    kw: dict[str, Any] = {}
    inner = d
    if d > k:
        b = _block(k)
        nb, kbb = -(-d // b), k // b
        L = -(-nb // kbb)
        bucket = torch.randperm(L * kbb, generator=gen)[:nb] % kbb
        sign = torch.randint(0, 2, (nb,), generator=gen).to(torch.float64).mul_(2).sub_(1)
        cmat = torch.zeros(kbb, nb, dtype=torch.float64)
        cmat[bucket, torch.arange(nb)] = sign
        coord = torch.arange(d)
        kw = {"cmat": cmat, "h": bucket[coord // b] * b + coord % b, "hsign": sign[coord // b]}
        inner = k
    d1, d2 = _rot_dim(inner)
    return SideMap(d, k, _haar(d1, gen), _haar(d2, gen), **kw)


def _block(k: int) -> int:
    """The presketch's block width for k buckets: the largest divisor of k up to PRESKETCH_BLOCK."""
    return max(b for b in range(1, PRESKETCH_BLOCK + 1) if k % b == 0)


def _rotated_sample(name: str, view: tuple[int, int], k: int, seed: int) -> RotatedSample:
    left, right = (
        _side_map(size, k, torch.Generator().manual_seed(derived_seed(seed, name, side)))
        for side, size in (("kfjlt-left", view[0]), ("kfjlt-right", view[1]))
    )
    gen = torch.Generator().manual_seed(derived_seed(seed, name, "kfjlt-offset"))
    return RotatedSample(left, right, k, int(torch.randint(0, k, (1,), generator=gen)))


def _sketch_hashes(name: str, view: tuple[int, int], k: int, seed: int) -> SketchHashes:
    parts = []
    for side, size in (("sketch-left", view[0]), ("sketch-right", view[1])):
        gen = torch.Generator().manual_seed(derived_seed(seed, name, side))
        h = torch.randint(0, k, (size,), generator=gen)
        sg = torch.randint(0, 2, (size,), generator=gen).to(torch.float64).mul_(2).sub_(1)
        parts += [h, sg]
    return SketchHashes(parts[0], parts[1], parts[2], parts[3], k)


def projection_factors(
    name: str, view: tuple[int, int], proj_dim: int, seed: int = 0, kind: str = "rademacher"
) -> Any:
    """The projection of the parameter ``name`` of view (m, n): for ``tensor_sketch`` its
    :class:`SketchHashes`; for the Kronecker kinds ``(P_L, P_R)``, float64 on the CPU, (k1 x m) and
    (k2 x n), entries Rademacher +-1 or standard Gaussian scaled by 1/sqrt(k1) and 1/sqrt(k2). Everything
    is drawn from seeds derived from (``seed``, ``name``, side) only: the same in every process and on every
    machine.
    """
    if kind not in PROJ_KINDS:
        raise ValueError(f"proj_kind must be one of {', '.join(PROJ_KINDS)}, got {kind!r}")
    if kind == "tensor_sketch":
        return _sketch_hashes(name, view, proj_dim, seed)
    if kind == "kfjlt":
        return _rotated_sample(name, view, proj_dim, seed)
    k1, k2 = split_dim(proj_dim)
    out = []
    for side, rows, cols in (("left", k1, view[0]), ("right", k2, view[1])):
        gen = torch.Generator().manual_seed(derived_seed(seed, name, side))
        if kind == "rademacher":
            mat = torch.randint(0, 2, (rows, cols), generator=gen).to(torch.float64).mul_(2).sub_(1)
        else:
            mat = torch.randn((rows, cols), generator=gen, dtype=torch.float64)
        out.append(mat.div_(math.sqrt(rows)))
    return out[0], out[1]
