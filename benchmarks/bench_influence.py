"""Influence features (per-example projected gradients, k = 8192) on a GPT-2-small shape: winnow's
engine against the LESS way, in one run on one GPU.

Variants (all parameters, --seq tokens, random init, random tokens, fp32 weights under bf16 autocast):
  less_way      LESS (Xia et al. 2024) / TRAK's projector as LESS uses it: batch size 1, a backward per
                example, the flattened full gradient kept in a buffer of 16 examples, projected every 16
                examples by a blockwise Rademacher matrix generated block by block from a seed (bf16
                matmuls); the examples/s of the whole loop, and of its backward alone
  engine        GradEngine(proj_dim=k): one batched backward, the projection applied to the factors
  engine_adam   the same with an Adam preconditioner (rank one per matrix, from a synthetic state)
  engine_less   the same with LESS's Adam update direction (winnow.grads.AdamUpdate, synthetic moments: the
                pipeline's default scoring.influence.precondition), which materialises each example's gradient

Quality: both projections' inner products against the exact inner products of the materialised
gradients (from the LESS loop's buffer), as relative errors over all pairs of the first 16 examples.

    python3 benchmarks/bench_influence.py --out $OUT        # on the GPU machine
    python3 benchmarks/bench_influence.py --smoke           # tiny shapes on CPU
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

from winnow.grads import AdamUpdate, GradEngine, per_example_loss  # noqa: E402
from winnow.scorers.influence import adam_preconditioner  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--less-examples", type=int, default=32, help="examples timed in the LESS loop")
    ap.add_argument("--block", type=int, default=1 << 15, help="columns per Rademacher block")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument(
        "--kinds",
        default="tensor_sketch,rademacher",
        help="projection kinds, default first; tensor_sketch_fft: TensorSketch by its earlier FFT-only path",
    )
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    seq = 32 if a.smoke else a.seq
    k = 256 if a.smoke else a.k
    cfg = GPT2Config(
        n_layer=2 if a.smoke else 12,
        n_embd=64 if a.smoke else 768,
        n_head=4 if a.smoke else 12,
        vocab_size=500 if a.smoke else 50257,
        n_positions=max(64, seq),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).to(device).eval()
    params = [p for p in model.parameters()]
    D = sum(p.numel() for p in params)
    V = cfg.vocab_size
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    g = torch.Generator().manual_seed(0)
    n_less = 4 if a.smoke else a.less_examples
    ids = torch.randint(0, V, (max(64, n_less), seq), generator=g).to(device)
    res: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": D,
        "seq": seq,
        "k": k,
    }
    print(f"GPT-2 {D / 1e6:.1f}M params, T={seq}, k={k}, {device}", flush=True)

    # ---------------- the LESS way
    buf_n = 16
    buf = torch.zeros(buf_n, D, dtype=torch.float32, device=device)
    block = min(a.block, D)
    gen = torch.Generator(device=device)
    wdtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def project_buffer(G: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(G.shape[0], k, dtype=torch.float32, device=device)
        Gw = G.to(wdtype)
        for bi, lo in enumerate(range(0, D, block)):
            hi = min(D, lo + block)
            gen.manual_seed(1000 + bi)
            R = (
                torch.empty(k, hi - lo, dtype=wdtype, device=device)
                .bernoulli_(0.5, generator=gen)
                .mul_(2)
                .sub_(1)
            )
            out += (Gw[:, lo:hi] @ R.t()).float()
        return out / k**0.5

    def grad_one(i: int) -> torch.Tensor:
        one = {"input_ids": ids[i : i + 1], "attention_mask": torch.ones_like(ids[i : i + 1])}
        with torch.autocast(**amp):
            loss = per_example_loss(model, one, "causal_lm").sum()
        grads = torch.autograd.grad(loss, params)
        return torch.cat([gr.reshape(-1).float() for gr in grads])

    less_proj = []

    def less_loop(count: int, project: bool = True) -> None:
        for s in range(0, count, buf_n):
            n = min(buf_n, count - s)
            for j in range(n):
                buf[j] = grad_one(s + j)
            if project:
                less_proj.append(project_buffer(buf[:n]))

    less_loop(buf_n if not a.smoke else 2)  # warm-up
    less_proj.clear()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    less_loop(n_less)
    sync(device)
    s = time.perf_counter() - t
    res["less_way"] = {
        "examples_per_s": n_less / s,
        "peak_gib": _peak(device),
        "buffer": buf_n,
        "block": block,
    }
    t = time.perf_counter()
    less_loop(n_less, project=False)
    sync(device)
    s2 = time.perf_counter() - t
    res["less_way_backward_only"] = {"examples_per_s": n_less / s2}
    print("less_way", res["less_way"], "backward only", res["less_way_backward_only"], flush=True)
    # exact gradients of the first 16 examples for the quality check (the buffer holds the last 16)
    for j in range(buf_n):
        buf[j] = grad_one(j)
    G = buf.double()
    exact = G @ G.t()
    nrm = G.norm(dim=1)
    scale = torch.outer(nrm, nrm)
    Pl = project_buffer(buf).double()
    res["less_way_ip_rel_err_rms"] = float((((Pl @ Pl.t()) - exact) / scale).square().mean().sqrt())
    buf = G = None  # free the full-gradient buffer before the engine runs
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # ---------------- the engine, with each projection kind (the first is the default)
    for kind in a.kinds.split(","):
        _engine(a, res, model, ids, g, amp, device, k, kind, exact, scale)
    best = max(
        v["examples_per_s"] for kk, v in res.items() if kk.startswith("engine_b") and "examples_per_s" in v
    )
    best_adam = max(
        v["examples_per_s"]
        for kk, v in res.items()
        if kk.startswith("engine_adam_b") and "examples_per_s" in v
    )
    best_less = max(
        [
            v["examples_per_s"]
            for kk, v in res.items()
            if kk.startswith("engine_less_b") and "examples_per_s" in v
        ]
        or [float("nan")]
    )
    res["engine_less_vs_engine"] = best_less / best
    res["engine_vs_less_way"] = best / res["less_way"]["examples_per_s"]
    res["engine_adam_vs_less_way"] = best_adam / res["less_way"]["examples_per_s"]
    res["engine_vs_less_backward_only"] = best / res["less_way_backward_only"]["examples_per_s"]
    print(json.dumps({kk: v for kk, v in res.items() if not isinstance(v, dict)}, indent=2), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_influence.json").write_text(json.dumps(res, indent=2))


def _engine(a, res, model, ids, g, amp, device, k, kind, exact, scale) -> None:
    """The engine's examples/s at B = 16, 32, 64 with projection ``kind``, plain and Adam-preconditioned,
    and its inner-product error on the first 16 examples; keys ``engine[_adam][_<kind>]_b<B>`` (no suffix
    for the first kind of --kinds, the default)."""
    from winnow.grads import kernels

    suffix = "" if kind == a.kinds.split(",")[0] else f"_{kind}"
    kernels.SKETCH_METHOD["method"] = "fft" if kind == "tensor_sketch_fft" else "auto"
    kind = "tensor_sketch" if kind == "tensor_sketch_fft" else kind
    eng = GradEngine(model, params="all", proj_dim=k, proj_seed=0, check=False, proj_kind=kind)
    fake = {
        n: torch.rand(p.shape, generator=g, dtype=torch.float32) ** 2 * 1e-6 for n, p in eng.params.items()
    }
    pre = adam_preconditioner(
        eng.views, eng.kinds, {n: p.numel() for n, p in eng.params.items()}, fake, 100, 0.999, 1e-8
    )
    pre = {
        n: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)) for n, v in pre.items()
    }
    # LESS's training-side features (the pipeline's default precondition): Adam's update direction from
    # the checkpoint's moments and each example's own g^2, which needs each example's gradient materialised
    less = {
        n: AdamUpdate(
            (torch.randn(p.shape, generator=g) * 1e-3).to(device),
            (torch.rand(p.shape, generator=g) ** 2 * 1e-6).to(device),
        )
        for n, p in eng.params.items()
    }
    for B in [4] if a.smoke else [16, 32, 64]:
        for name, pc in (("engine", None), ("engine_adam", pre), ("engine_less", less)):
            batch = {"input_ids": ids[:B], "attention_mask": torch.ones_like(ids[:B])}

            def run(batch=batch, pc=pc):
                with torch.autocast(**amp):
                    return eng.compute(
                        lambda: per_example_loss(model, batch, "causal_lm"),
                        sqnorm=False,
                        project=True,
                        precondition=pc,
                    )["proj"]

            try:
                run()
                run()
                sync(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(5):
                    t = time.perf_counter()
                    out = run()
                    sync(device)
                    times.append(time.perf_counter() - t)
                times.sort()
                key = f"{name}{suffix}_b{B}"
                res[key] = {"examples_per_s": B / times[2], "peak_gib": _peak(device)}
                if name == "engine" and B == (4 if a.smoke else 16):
                    P = out.double()
                    res[f"engine{suffix}_ip_rel_err_rms"] = float(
                        (((P @ P.t()) - exact[:B, :B]) / scale[:B, :B]).square().mean().sqrt()
                    )
            except torch.OutOfMemoryError as e:
                key = f"{name}{suffix}_b{B}"
                res[key] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
                torch.cuda.empty_cache()
            print(key, res[key], flush=True)
    eng.close()


def _peak(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


if __name__ == "__main__":
    main()
