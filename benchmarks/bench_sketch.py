"""Projections of per-example gradients per parameter shape: TensorSketch's FFT path and its
materialised-gradient (``direct``) path, the rotated-and-folded map (``kfjlt``) and the Kronecker map,
side by side on GPT-2-small's parameter shapes, in one run.

Each case is one parameter's factors as the engine records them (B examples, T positions, bf16 under
autocast): the attention and MLP matrices (dense left and right), the token embedding's input use
(one-hot left) and its output use (the logits' gradient, T x 50257, as the left factor). Times are the
median of 5 calls after 2 warm-ups, per batch; the ``auto`` column is the path the engine takes and the
``rule`` its m n / (T k) ratio against the threshold in winnow/grads/kernels.py.

    python3 benchmarks/bench_sketch.py --out $OUT          # on the GPU machine
    python3 benchmarks/bench_sketch.py --smoke             # tiny shapes on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from winnow.grads import kernels  # noqa: E402
from winnow.grads.projection import projection_factors  # noqa: E402
from winnow.grads.rules import Outer  # noqa: E402

SHAPES = {  # name: (m, n, one-hot left)
    "c_attn 768x2304": (768, 2304, False),
    "attn c_proj 768x768": (768, 768, False),
    "mlp c_fc 768x3072": (768, 3072, False),
    "mlp c_proj 3072x768": (3072, 768, False),
    "wte input (one-hot) 50257x768": (50257, 768, True),
    "wte output (logits grad) 50257x768": (50257, 768, False),
}


def timed(fn, device, reps: int = 5) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def case(name: str, m: int, n: int, onehot: bool, B: int, T: int, k: int, device, dtype, g) -> dict:
    """One parameter's factors, timed by every path."""
    if onehot:
        left = torch.randint(0, m, (B, T), device=device, generator=g)
    else:
        left = torch.randn(B, T, m, device=device, dtype=dtype, generator=g)
    uses = [Outer(left, torch.randn(B, T, n, device=device, dtype=dtype, generator=g))]
    sk = projection_factors(name, (m, n), k, seed=0, kind="tensor_sketch").to(device, torch.float32)
    PL, PR = projection_factors(name, (m, n), k, seed=0, kind="rademacher")
    PL, PR = PL.to(device, dtype), PR.to(device, dtype)
    row: dict = {"shape": name, "m": m, "n": n, "onehot": onehot, "B": B, "T": T, "k": k}
    row["rule_ratio"] = m * n / (T * k)
    row["auto"] = "direct" if onehot or row["rule_ratio"] <= kernels._SKETCH_DIRECT_RATIO else "fft"
    for method in ("fft", "direct"):
        try:
            row[f"{method}_ms"] = 1e3 * timed(
                lambda method=method: kernels._sketch_outer_project(uses, sk, method=method), device
            )
        except torch.OutOfMemoryError:
            row[f"{method}_ms"] = None
            torch.cuda.empty_cache()
    row["kronecker_ms"] = 1e3 * timed(lambda: kernels._outer_project(uses, PL, PR), device)
    from winnow.grads import projection

    for label, dense_max in (("kfjlt", projection.ROT_DENSE), ("kfjlt_dense4096", 4096)):
        saved, projection.ROT_DENSE = projection.ROT_DENSE, dense_max  # variant: dense rotations up to 4096
        rs = projection_factors(name, (m, n), k, seed=0, kind="kfjlt").to(device, torch.float32)
        projection.ROT_DENSE = saved
        try:
            row[f"{label}_ms"] = 1e3 * timed(lambda rs=rs: kernels._rotated_outer_project(uses, rs), device)
        except torch.OutOfMemoryError:
            row[f"{label}_ms"] = None
            torch.cuda.empty_cache()
    a_ = kernels._sketch_outer_project(uses, sk, method="fft")
    b_ = kernels._sketch_outer_project(uses, sk, method="direct")
    row["max_rel_diff"] = float((a_ - b_).abs().max() / a_.abs().max())
    return row


def scatter_variants(device, k: int, smoke: bool) -> dict:
    """The scatter step by several kernels: sketch_dense's (a materialised (c, m, n) block into (c, k)) and
    _count_sketch's (positions' (N, d) rows into (N, k)): index_add_ (winnow's), index_add_ along dim 0 of
    the example-minor transpose, and a CSR sparse-dense product (cuSPARSE SpMM on CUDA)."""
    from winnow.grads.kernels import _count_sketch
    from winnow.grads.projection import sketch_dense

    c, m, n = (2, 16, 64) if smoke else (16, 768, 3072)
    G = torch.randn(c, m, n, device=device)
    sk = projection_factors("x", (m, n), k, seed=0, kind="tensor_sketch").to(device, torch.float32)
    idx = ((sk.h1[:, None] + sk.h2[None, :]) % k).reshape(-1)
    sign = (sk.s1[:, None] * sk.s2[None, :]).reshape(-1)
    mn = m * n
    # S (k x mn): column e has its sign in row idx[e]
    S = torch.sparse_coo_tensor(torch.stack([idx, torch.arange(mn, device=device)]), sign, (k, mn)).coalesce()
    S_csr = S.to_sparse_csr()

    def transposed() -> torch.Tensor:
        GT = G.reshape(c, mn).t().contiguous()
        out = torch.zeros(k, c, device=device)
        return out.index_add_(0, idx, GT * sign[:, None]).t()

    def spmm() -> torch.Tensor:
        return (S_csr @ G.reshape(c, mn).t().contiguous()).t()

    def spmm_view() -> torch.Tensor:
        return (S_csr @ G.reshape(c, mn).t()).t()

    r: dict = {"c_m_n": [c, m, n], "k": k}
    ref = sketch_dense(G, sk)
    for name, fn in (
        ("index_add_dim1", lambda: sketch_dense(G, sk)),
        ("index_add_transposed", transposed),
        ("csr_spmm", spmm),
        ("csr_spmm_view", spmm_view),
    ):
        try:
            r[f"{name}_ms"] = 1e3 * timed(fn, device)
            r[f"{name}_err"] = float((fn() - ref).abs().max())
        except Exception as e:  # noqa: BLE001  (a kernel this torch lacks is reported, not fatal)
            r[f"{name}_ms"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    # count sketch of positions: N rows of d (the logits' gradient: d = vocabulary)
    N, d = (64, 500) if smoke else (64 * 32, 50257)
    X = torch.randn(N, d, device=device).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    sk2 = projection_factors("y", (d, 8), k, seed=0, kind="tensor_sketch").to(device, torch.float32)
    C = torch.sparse_coo_tensor(
        torch.stack([sk2.h1, torch.arange(d, device=device)]), sk2.s1, (k, d)
    ).coalesce()
    C_csr = C.to_sparse_csr()
    ref2 = _count_sketch(X.float(), sk2.h1, sk2.s1, k)
    r["count_N_d"] = [N, d]
    for name, fn in (
        ("count_index_add", lambda: _count_sketch(X.float(), sk2.h1, sk2.s1, k)),
        ("count_csr_spmm", lambda: (C_csr @ X.float().t()).t()),
        ("count_csr_spmm_bf16", lambda: (C_csr.to(X.dtype) @ X.t()).t()),
    ):
        try:
            r[f"{name}_ms"] = 1e3 * timed(fn, device)
            r[f"{name}_err"] = float((fn().float() - ref2).abs().max())
        except Exception as e:  # noqa: BLE001
            r[f"{name}_ms"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--T", type=int, nargs="+", default=[512])
    ap.add_argument("--k", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--scatter-only", action="store_true", help="only the scatter kernels' comparison")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    B = 2 if a.smoke else a.B
    Ts = [16] if a.smoke else a.T
    ks = [64] if a.smoke else a.k
    shapes = (
        {n: (max(1, m // 48), max(1, nn // 48), oh) for n, (m, nn, oh) in SHAPES.items()}
        if a.smoke
        else SHAPES
    )
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for T in [] if a.scatter_only else Ts:
        for k in ks:
            for name, (m, n, onehot) in shapes.items():
                row = case(name, m, n, onehot, B, T, k, device, dtype, g)
                rows.append(row)
                print(json.dumps(row), flush=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    res_scatter = scatter_variants(device, ks[-1], a.smoke)
    res = {
        "scatter": res_scatter,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    res["rows"] = rows
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_sketch.json").write_text(json.dumps(res, indent=2))
    print(
        "| shape | T | k | m n / T k | TS fft ms | TS direct ms | TS auto | kfjlt ms | kfjlt dense<=4096 | Kronecker ms |"
    )
    for r in rows:
        f = lambda v: "OOM" if v is None else f"{v:.2f}"  # noqa: E731
        print(
            f"| {r['shape']} | {r['T']} | {r['k']} | {r['rule_ratio']:.2f} | {f(r['fft_ms'])} | "
            f"{f(r['direct_ms'])} | {r['auto']} | {f(r['kfjlt_ms'])} | {f(r['kfjlt_dense4096_ms'])} | "
            f"{r['kronecker_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
