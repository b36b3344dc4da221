"""Seeded random projections of per-example gradients (Johnson-Lindenstrauss maps): TensorSketch (the
default) or Kronecker-structured maps.

TensorSketch (Pham & Pagh 2013, "Fast and scalable polynomial kernels via explicit feature maps", KDD,
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

__all__ = [
    "DEFAULT_PROJ_KIND",
    "PROJ_KINDS",
    "SketchHashes",
    "derived_seed",
    "projection_factors",
    "sketch_dense",
    "split_dim",
    "vector_view",
]

PROJ_KINDS = ("tensor_sketch", "rademacher", "gaussian")
DEFAULT_PROJ_KIND = "tensor_sketch"

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
