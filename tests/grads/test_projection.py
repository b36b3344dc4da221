"""Projections: reproducible across processes, unbiased (winnow/grads/projection.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from winnow.grads import GradEngine, projection_factors


def test_projection_is_reproducible_across_processes():
    mine = projection_factors("transformer.h.0.attn.c_attn.weight", (16, 48), 64, seed=7)
    code = (
        "import torch; from winnow.grads.projection import projection_factors as f; "
        "a, b = f('transformer.h.0.attn.c_attn.weight', (16, 48), 64, seed=7); "
        "print(float((a * torch.arange(a.numel()).view_as(a)).sum()), float((b * b.cumsum(1)).sum()))"
    )
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert [float(v) for v in got] == [
        float((mine[0] * torch.arange(mine[0].numel()).view_as(mine[0])).sum()),
        float((mine[1] * mine[1].cumsum(1)).sum()),
    ]
    other = projection_factors("transformer.h.0.attn.c_attn.weight", (16, 48), 64, seed=8)
    assert not torch.equal(mine[0], other[0])


@pytest.mark.parametrize("kind", ["tensor_sketch", "kfjlt", "rademacher", "gaussian"])
def test_projection_is_unbiased(kind):
    """E[P^T P] = I: the mean of ||P x||^2 and <P x, P y> over seeds approach ||x||^2 and <x, y>."""
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    g = torch.Generator().manual_seed(0)
    D = sum(p.numel() for p in model.parameters())
    x, y = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    acc = torch.zeros(D, D, dtype=torch.float64)
    seeds = 400
    for s in range(seeds):
        eng = GradEngine(model, proj_dim=16, proj_seed=s, proj_kind=kind)
        P = eng.projection_matrix()
        eng.close()
        acc += P.t() @ P
    acc /= seeds
    # an entry of P^T P has variance 1/16 per seed (Rademacher; Gaussian products: up to 8/16 on the
    # diagonal), so the mean over 400 seeds has sd <= 0.035: 0.2 is over 5 sd
    assert float((acc - torch.eye(D, dtype=torch.float64)).abs().max()) < 0.2
    assert abs(float(x @ acc @ x) / float(x @ x) - 1) < 0.05
    assert abs(float(x @ acc @ y) - float(x @ y)) < 0.05 * float(x.norm() * y.norm())


@pytest.mark.parametrize("method", ["fft", "direct", "auto"])
def test_sketch_evaluations_equal_the_map(method):
    """The FFT and the materialised-gradient evaluations of TensorSketch are the same linear map
    (SketchHashes.dense() applied to the per-example gradient), for dense and one-hot (embedding) uses
    together, in chunks smaller than the batch."""
    from winnow.grads.kernels import _direct_grads, _sketch_outer_project
    from winnow.grads.projection import projection_factors
    from winnow.grads.rules import Outer

    g = torch.Generator().manual_seed(3)
    B, m, n, k = 5, 11, 7, 32
    uses = [
        Outer(
            torch.randn(B, 6, m, generator=g, dtype=torch.float64),
            torch.randn(B, 6, n, generator=g, dtype=torch.float64),
        ),
        Outer(
            torch.randint(0, m, (B, 9), generator=g), torch.randn(B, 9, n, generator=g, dtype=torch.float64)
        ),
        Outer(
            torch.randn(B, 4, m, generator=g, dtype=torch.float64),
            torch.randn(B, 4, n, generator=g, dtype=torch.float64),
        ),
    ]
    sk = projection_factors("w", (m, n), k, seed=1, kind="tensor_sketch")
    want = _direct_grads(uses, 0, B, m, n).reshape(B, -1) @ sk.dense().t()
    got = _sketch_outer_project(uses, sk, budget=3 * m * n, method=method)
    assert torch.allclose(got, want, atol=1e-10)
    with pytest.raises(ValueError, match="method must be one of"):
        _sketch_outer_project(uses, sk, method="fast")


def test_sketch_csr_equals_index_add():
    """sketch_dense by the sketch's CSR matrix (the CUDA path) equals the index_add_ path."""
    import dataclasses

    from winnow.grads.projection import projection_factors, sketch_dense

    sk = projection_factors("w", (9, 13), 16, seed=2, kind="tensor_sketch")
    assert not sk.to("cpu", torch.float64).use_csr
    V = torch.randn(4, 9, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = sketch_dense(V, sk)
    got = sketch_dense(V, dataclasses.replace(sk, use_csr=True))
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(want, V.reshape(4, -1) @ sk.dense().t(), atol=1e-12)


@pytest.mark.parametrize("view", [(11, 7), (150, 7), (13, 200)])
def test_kfjlt_evaluations_equal_the_map(view):
    """kfjlt's factor path (rotate each use's rows, one product, fold) and its materialised-matrix path
    are the map RotatedSample.dense(): dense and one-hot uses together, in chunks smaller than the batch,
    with a side longer than k count-sketched first (150 > 48 rows, blocks of 48; 200 > 48 columns)."""
    from winnow.grads.accumulators import _project_matrices
    from winnow.grads.kernels import _direct_grads, _rotated_outer_project
    from winnow.grads.rules import Outer

    g = torch.Generator().manual_seed(3)
    (m, n), B, k = view, 5, 48
    uses = [
        Outer(torch.randn(B, 6, m, generator=g, dtype=torch.float64), torch.randn(B, 6, n, generator=g, dtype=torch.float64)),
        Outer(torch.randint(0, m, (B, 9), generator=g), torch.randn(B, 9, n, generator=g, dtype=torch.float64)),
    ]  # fmt: skip
    rs = projection_factors("w", (m, n), k, seed=1, kind="kfjlt")
    G = _direct_grads(uses, 0, B, m, n)
    want = G.reshape(B, -1) @ rs.dense().t()
    got = _rotated_outer_project(uses, rs, budget=2 * k * k)
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(_project_matrices(G, rs), want, atol=1e-10)


def test_kfjlt_variance_is_a_dense_maps():
    """Over seeds, ||P x||^2 / ||x||^2 of a rank-1 and of a rank-4 matrix (what per-example gradients of
    short sequences are) spreads like a dense Gaussian map's, sqrt(2 / k): within 1.4x of it, where the
    Kronecker map's spread is several times larger (the reason TensorSketch and kfjlt exist)."""
    g = torch.Generator().manual_seed(0)
    m, n, k, seeds = 40, 60, 64, 150
    X = torch.stack(
        [
            torch.outer(torch.randn(m, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)),
            torch.randn(m, 4, generator=g, dtype=torch.float64) @ torch.randn(4, n, generator=g, dtype=torch.float64),
        ]
    )  # fmt: skip
    norms = X.reshape(2, -1).norm(dim=1) ** 2

    def spread(kind: str) -> torch.Tensor:
        r = []
        for s in range(seeds):
            f = projection_factors("w", (m, n), k, seed=s, kind=kind)
            P = (
                f.project_matrices(X)
                if kind == "kfjlt"
                else torch.matmul(torch.matmul(f[0], X), f[1].t()).reshape(2, -1)
            )
            r.append(P.norm(dim=1) ** 2 / norms)
        return torch.stack(r).std(0)

    dense = (2 / k) ** 0.5
    assert float(spread("kfjlt").max()) < 1.4 * dense
    assert float(spread("rademacher").min()) > 2 * dense


def test_kfjlt_in_half_precision_stays_within_its_rounding():
    """With ``low`` (the engine passes the records' half precision on CUDA) the rotations and the product
    run in bf16 with fp32 accumulation: the projection stays within bf16 rounding of the fp64 one."""
    from winnow.grads.kernels import _rotated_outer_project
    from winnow.grads.rules import Outer

    g = torch.Generator().manual_seed(5)
    B, m, n, k = 4, 40, 24, 256
    uses = [Outer(torch.randn(B, 16, m, generator=g), torch.randn(B, 16, n, generator=g))]
    rs = projection_factors("w", (m, n), k, seed=0, kind="kfjlt")
    want = _rotated_outer_project(
        [Outer(u.left.double(), u.right.double()) for u in uses], rs.to("cpu", torch.float64)
    )
    got = _rotated_outer_project(uses, rs.to("cpu", torch.float32), low=torch.bfloat16)
    assert got.dtype == torch.float32
    rel = float((got.double() - want).norm() / want.norm())
    assert 1e-5 < rel < 2e-2  # rounded (not silently fp32), but only by bf16's 2^-8 per step
