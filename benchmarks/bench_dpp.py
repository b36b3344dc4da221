#!/usr/bin/env python3
"""Benchmark: greedy DPP MAP (Chen, Zhang, Zhou, NeurIPS 2018, Algorithm 1) with ``winnow.selectors.dpp``.

GPU part: N random unit embeddings of dim d (fp32, on the GPU), k picks. The cosine kernel has rank
at most d, so greedy MAP on it ends after at most d picks (the stopping threshold); the k = 10,000 run
therefore uses the von Mises-Fisher kernel ``exp(kappa (x^T y - 1))`` on the same unit vectors, which
costs the same per step (one matrix-vector product over X plus a few elementwise passes) and is full
rank. A cosine run with k < d is timed next to it. Reported: seconds, picks/s, peak GPU memory, and
the memory-traffic floor ``2 N k^2`` bytes (reading the fp32 Cholesky factor c, t rows at step t) at
3 TB/s, with the ratio to it; the floor including the kernel rows (``+ 4 N d k`` bytes) is given too.
Correctness: the first 200 GPU picks on the first 20,000 rows equal those of a float64 NumPy
implementation of Algorithm 1 written here.

CPU part: N = 20,000, k = 1,000 (same kernel), ``greedy_map`` (float64) next to the NumPy
implementation (float64): seconds for each and whether the picks are equal.

Needs only torch, numpy and this repository (put on sys.path here). Usage:

    python3 benchmarks/bench_dpp.py --out $OUT        # on the GPU machine
    python3 benchmarks/bench_dpp.py --smoke           # tiny shapes, checks the script (CPU is fine)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from winnow.selectors.dpp import greedy_map  # noqa: E402

BANDWIDTH = 3e12  # bytes/s, the figure for HBM


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def numpy_chen(X: np.ndarray, k: int, kappa: float, eps: float = 1e-10) -> list[int]:
    """Plain NumPy Algorithm 1 of Chen et al. 2018 for the vMF kernel on unit rows of X (float64).

    Kernel rows are computed on demand, ``L[j, :] = exp(kappa (X X[j] - 1))``; ``c`` is (k, N), ``d2``
    starts at the diagonal (1). Ties in argmax go to the lowest index (``np.argmax``).
    """
    n = X.shape[0]
    c = np.zeros((k, n))
    d2 = np.ones(n)
    picks: list[int] = []
    for t in range(min(k, n)):
        j = int(np.argmax(d2))
        if not d2[j] >= eps:
            break
        row = np.exp(kappa * (X @ X[j] - 1.0))
        e = (row - c[:t, j] @ c[:t]) / math.sqrt(d2[j])
        c[t] = e
        d2 -= e * e
        d2[j] = -np.inf
        picks.append(j)
    return picks


def timed(fn, sync):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def cpu_compare(args: argparse.Namespace, res: dict, n_cpu: int, k_cpu: int) -> None:
    """CPU side by side: winnow's greedy_map against the plain NumPy Algorithm 1, same picks checked."""
    # --- CPU: greedy_map float64 against NumPy float64 -------------------------------------------
    Xc = torch.randn(n_cpu, args.d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    Xc /= torch.linalg.vector_norm(Xc, dim=1, keepdim=True)
    Xn = Xc.numpy()
    t0 = time.perf_counter()
    ours = greedy_map(Xc, k_cpu, kernel="vmf", kappa=args.kappa, dtype=torch.float64)
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    base = numpy_chen(Xn, k_cpu, args.kappa)
    t_np = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours32 = greedy_map(Xc.float(), k_cpu, kernel="vmf", kappa=args.kappa)
    t_ours32 = time.perf_counter() - t0
    res["cpu"] = {
        "N": n_cpu,
        "k": k_cpu,
        "torch_threads": torch.get_num_threads(),
        "seconds_winnow_fp64": t_ours,
        "seconds_numpy_fp64": t_np,
        "seconds_winnow_fp32": t_ours32,
        "equal_picks_fp64": ours.picks.tolist() == base,
        "equal_picks_fp32_vs_numpy": ours32.picks.tolist() == base,
    }
    log(
        f"CPU N={n_cpu} k={k_cpu}: winnow fp64 {t_ours:.2f} s, NumPy fp64 {t_np:.2f} s, "
        f"winnow fp32 {t_ours32:.2f} s; same picks fp64 {res['cpu']['equal_picks_fp64']}, "
        f"fp32 {res['cpu']['equal_picks_fp32_vs_numpy']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None, help="folder for bench_dpp.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10_000)
    ap.add_argument("--kappa", type=float, default=2.0)
    ap.add_argument("--cpu-only", action="store_true", help="only the CPU comparison (N=20,000, k=1,000)")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.d, args.k = 5_000, 64, 100
    n_cpu, k_cpu, n_ver, k_ver = (20_000, 1_000, 20_000, 200) if not args.smoke else (2_000, 60, 2_000, 40)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    res: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu_count": os.cpu_count(),
        "argv": sys.argv,
        "N": args.n,
        "d": args.d,
        "k": args.k,
        "kernel": "vmf",
        "kappa": args.kappa,
    }
    log(f"device {res['device']}, torch {torch.__version__}, N={args.n} d={args.d} k={args.k}")
    if args.cpu_only:
        res["device"] = platform.processor() or "cpu"
        cpu_compare(args, res, n_cpu, k_cpu)
        print(json.dumps(res, indent=1))
        return

    g = torch.Generator(device=dev).manual_seed(0)
    X = torch.randn(args.n, args.d, device=dev, generator=g)
    X /= torch.linalg.vector_norm(X, dim=1, keepdim=True)
    sync()

    # --- correctness on a prefix: GPU fp32 against NumPy fp64 (also the warm-up) -------------
    Xv = X[:n_ver]
    gpu_v, t_v = timed(lambda: greedy_map(Xv, k_ver, kernel="vmf", kappa=args.kappa), sync)
    Xv64 = Xv.double().cpu().numpy()
    Xv64 /= np.linalg.norm(Xv64, axis=1, keepdims=True)
    ref_v = numpy_chen(Xv64, k_ver, args.kappa)
    same_v = gpu_v.picks.tolist() == ref_v
    first = next(
        (i for i, (a, b) in enumerate(zip(gpu_v.picks.tolist(), ref_v, strict=False)) if a != b), None
    )
    res["verify"] = {
        "N": n_ver,
        "k": k_ver,
        "equal_picks": same_v,
        "first_difference": first,
        "seconds_gpu": t_v,
    }
    log(f"verify N={n_ver} k={k_ver}: GPU fp32 picks == NumPy fp64 picks: {same_v} (first diff {first})")

    # --- the big run ------------------------------------------------------------------------
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    r, t = timed(lambda: greedy_map(X, args.k, kernel="vmf", kappa=args.kappa), sync)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    floor_c = 2 * args.n * args.k**2 / BANDWIDTH
    floor_all = (2 * args.n * args.k**2 + 4 * args.n * args.d * args.k) / BANDWIDTH
    res["main"] = {
        "seconds": t,
        "picks": int(r.picks.numel()),
        "picks_per_s": r.picks.numel() / t,
        "stopped": r.stopped,
        "logdet": r.logdet,
        "peak_gib": peak,
        "floor_c_seconds": floor_c,
        "ratio_to_floor_c": t / floor_c,
        "floor_c_plus_rows_seconds": floor_all,
        "ratio_to_floor_c_plus_rows": t / floor_all,
    }
    log(
        f"main: {t:.2f} s, {r.picks.numel()} picks ({r.stopped}), {r.picks.numel() / t:.1f} picks/s, "
        f"peak {peak} GiB; floor 2Nk^2/3TB/s = {floor_c:.2f} s -> ratio {t / floor_c:.3f}; "
        f"with kernel rows {floor_all:.2f} s -> ratio {t / floor_all:.3f}"
    )
    del r
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    # --- cosine, k < d -----------------------------------------------------------------------
    k_cos = min(1000, args.d - 24) if not args.smoke else 40
    rc, tc = timed(lambda: greedy_map(X, k_cos, kernel="cosine"), sync)
    res["cosine"] = {
        "k": k_cos,
        "seconds": tc,
        "picks": int(rc.picks.numel()),
        "stopped": rc.stopped,
        "floor_c_seconds": 2 * args.n * k_cos**2 / BANDWIDTH,
    }
    log(f"cosine N={args.n} k={k_cos}: {tc:.2f} s, {rc.picks.numel()} picks ({rc.stopped})")
    del rc
    X = None  # free the GPU embeddings
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    cpu_compare(args, res, n_cpu, k_cpu)

    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "bench_dpp.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
