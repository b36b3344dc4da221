"""Cost of a domain-mixture step against a plain training step, GPT-2-small shape, 7 domains, one GPU.

Variants (fp32 weights under bf16 autocast, AdamW step included in every variant):
  plain         forward + backward of the batch's mean token loss + optimizer step
  doremi        proxy forward (per-token NLL) + reference forward (no grad) + excess-loss weight update +
                backward of the alpha-weighted per-domain token means + optimizer step
  doge_code     the DoGE public code's way: one backward per domain (retain_graph), flattened per-domain
                gradients, their Gram, the weight update, the model's gradient sum_i alpha_i g_i, step
  doge_engine   winnow: ONE backward; the engine's group sums of the domains' mean gradients from bf16
                factors (fp32 sums, factor_dtype="input"), their Gram, the weight update, and the model's
                gradient sum_i alpha_i S_i read off the kept sums (group_coeffs), step
  dga_engine    the same with a target group in the batch (DGA's update step)
  doge_engine_v1  the previous engine path (run 2): fp32 factors, per-group index_select copies, and the
                model's gradient from a second product of the factors (grad_coeffs)
  *_fast_paths  plain and doremi with the engine's exact fast paths (aligned head, fused GELU) applied
  plain_fast_paths_again  the plain fast-path step timed again last: drift between the first and last
                variants of the run

    python3 benchmarks/bench_mixture.py --out $OUT      # on the GPU machine
    python3 benchmarks/bench_mixture.py --smoke         # tiny shapes on CPU
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

from winnow.grads import GradEngine, fast_paths, per_example_loss, token_nll  # noqa: E402
from winnow.selectors.mixture import (  # noqa: E402
    dga_update,
    doge_update,
    doremi_excess,
    doremi_token_weights,
    doremi_update,
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--per-domain", type=int, default=4)
    ap.add_argument("--domains", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--profile",
        action="store_true",
        help="also print the top kernels of plain_fast_paths and doge_engine (torch.profiler)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    seq = 32 if a.smoke else a.seq
    cfg = GPT2Config(
        n_layer=2 if a.smoke else 12,
        n_embd=64 if a.smoke else 768,
        n_head=4 if a.smoke else 12,
        vocab_size=500 if a.smoke else 50257,
        n_positions=max(64, seq),
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(dev).train()
    ref = GPT2LMHeadModel(cfg).to(dev).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    K = a.domains
    B = K * a.per_domain
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, seq), generator=g).to(dev)
    mask = torch.ones_like(ids)
    dom = torch.arange(K).repeat_interleave(a.per_domain).to(dev)
    batch = {"input_ids": ids, "attention_mask": mask}
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
    params = list(model.parameters())
    state = {
        "alpha": torch.full((K,), 1 / K, dtype=torch.float64),
        "hat": torch.full((K,), 1 / K, dtype=torch.float64),
    }

    def nll_of(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        return token_nll(logits, ids[:, 1:])

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain():
        with torch.autocast(**amp):
            loss = nll_of(model).mean()
        loss.backward()
        step()

    ref_bf16 = None

    def doremi(bf16_ref: bool = False):
        with torch.autocast(**amp):
            if bf16_ref:  # the frozen reference held in bf16 weights, run in inference mode
                with torch.inference_mode():
                    r = nll_of(ref_bf16)
            else:
                with torch.no_grad():
                    r = nll_of(ref)
            n = nll_of(model)
        valid = torch.ones_like(n, dtype=torch.bool)
        lam = doremi_excess(n.detach(), r, valid, dom, K)
        state["alpha"] = doremi_update(state["alpha"], lam.cpu())
        w = doremi_token_weights(state["alpha"].to(dev), valid, dom).to(n.dtype)
        (n * w).sum().backward()
        step()

    def domain_grads() -> torch.Tensor:
        """(K, parameters): each domain's mean-token gradient, one backward per domain (DoGE's code)."""
        with torch.autocast(**amp):
            n = nll_of(model)
        losses = [n[dom == i].mean() for i in range(K)]
        flat = []
        for i in range(K):
            gr = torch.autograd.grad(losses[i], params, retain_graph=i < K - 1)
            flat.append(torch.cat([x.reshape(-1).float() for x in gr]))
        return torch.stack(flat)

    def doge_code():
        Fm = domain_grads()
        G = (Fm @ Fm.t()).double().cpu()
        state["alpha"], _ = doge_update(state["alpha"], G, 1e-4)
        comb = (state["alpha"].to(dev).float().unsqueeze(1) * Fm).sum(0)
        off = 0
        for p in params:
            p.grad = comb[off : off + p.numel()].view_as(p).to(p.dtype)
            off += p.numel()
        del Fm
        step()

    eng = GradEngine(model, check=False, factor_dtype="input")  # bf16 factors under autocast, fp32 sums
    eng_v1 = None
    tok_share = torch.full((B,), 1.0 / a.per_domain, device=dev)  # equal lengths: each example's share

    def weights(out, target):
        G = out["group_gram"].double().cpu()
        if target:  # domain K-1 plays the target; the others train
            tr = list(range(K - 1))
            new, hat = dga_update(
                state["alpha"][: K - 1] / state["alpha"][: K - 1].sum(),
                state["hat"][: K - 1] / state["hat"][: K - 1].sum(),
                G[tr][:, K - 1],
            )
            full = torch.zeros(K, dtype=torch.float64)
            full[tr] = new
            return full
        state["alpha"], _ = doge_update(state["alpha"], G, 1e-4)
        return state["alpha"].clone()

    def doge_engine(target: bool = False):
        with torch.autocast(**amp):
            eng.compute(
                lambda: per_example_loss(model, batch, "causal_lm") * tok_share,
                sqnorm=False,
                groups=dom,
                num_groups=K,
                group_coeffs=lambda out: weights(out, target),
            )
        step()

    def doge_engine_v1():
        nonlocal eng_v1
        if eng_v1 is None:  # the run-2 path: fp32 factors, the gradient from a second product
            eng.close()
            eng_v1 = GradEngine(model, check=False)
        with torch.autocast(**amp):
            eng_v1.compute(
                lambda: per_example_loss(model, batch, "causal_lm") * tok_share,
                sqnorm=False,
                groups=dom,
                num_groups=K,
                grad_coeffs=lambda out: weights(out, False).to(dev)[dom].float(),
            )
        step()

    res: dict = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "batch": B,
        "domains": K,
        "seq": seq,
        "params": sum(p.numel() for p in params),
    }

    def doremi_fast():  # the proxy and the frozen reference through the engine's exact fast paths
        with fast_paths(model), fast_paths(ref):
            doremi()

    def doremi_fast_bf16ref():
        nonlocal ref_bf16
        if ref_bf16 is None:
            import copy

            ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16) if dev.type == "cuda" else ref
        with fast_paths(model), fast_paths(ref_bf16):
            doremi(bf16_ref=True)

    def plain_fast():
        with fast_paths(model):
            plain()

    variants = [
        ("plain", plain),
        ("doremi", doremi),
        ("plain_fast_paths", plain_fast),
        ("doremi_fast_paths", doremi_fast),
        ("doremi_fast_paths_bf16_ref", doremi_fast_bf16ref),
        ("doge_code", doge_code),
        ("doge_engine", doge_engine),
        ("dga_engine", lambda: doge_engine(True)),
        ("doge_engine_v1", doge_engine_v1),
        ("plain_fast_paths_again", plain_fast),
    ]
    for name, fn in variants:
        try:
            for _ in range(a.warmup):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(a.iters):
                t = time.perf_counter()
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ts.append(time.perf_counter() - t)
            ts.sort()
            res[name] = {
                "ms": ts[len(ts) // 2] * 1e3,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
            }
        except torch.OutOfMemoryError as e:
            res[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
            torch.cuda.empty_cache()
        print(name, res[name], flush=True)
    if dev.type == "cuda":  # the Gram of kept group sums: one long fp32 GEMM against batched slices
        from winnow.grads.kernels import _rows_gram

        X = torch.randn(K + 1, 768 * 3072, device=dev)
        probe = {}
        for name, fn in (("mm", lambda: X @ X.t()), ("sliced", lambda: _rows_gram(X))):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                G = fn()
            torch.cuda.synchronize()
            probe[name + "_ms"] = (time.perf_counter() - t) / 20 * 1e3
        probe["rel_diff"] = float(
            (_rows_gram(X).double() - (X.double() @ X.double().t())).norm()
            / (X.double() @ X.double().t()).norm()
        )
        res["gram_probe_8x2.4M"] = probe
        print("gram probe", probe, flush=True)
        del X, G
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        if eng_v1 is not None:
            eng_v1.close()
            eng_v1 = None
            eng = GradEngine(model, check=False, factor_dtype="input")
        for name, fn in (("plain_fast_paths", plain_fast), ("doge_engine", doge_engine)):
            fn()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                fn()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            try:
                table = prof.key_averages().table(sort_by=key, row_limit=30)
            except (AttributeError, KeyError, ValueError):
                table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30)
            print(f"== profile {name}\n{table}", flush=True)
            if a.out:
                Path(a.out).mkdir(parents=True, exist_ok=True)
                (Path(a.out) / f"profile_{name}.txt").write_text(table)
    (eng_v1 or eng).close()
    # agreement on one batch: the engine's Gram and gradient (bf16 factors, fp32 sums) against the
    # backward-per-domain way (autograd under the same autocast)
    fixed = torch.linspace(1.0, 2.0, K, dtype=torch.float64)
    fixed /= fixed.sum()
    model.eval()  # no dropout: both ways see the same function
    opt.zero_grad(set_to_none=True)
    with GradEngine(model, check=False, factor_dtype="input") as e2, torch.autocast(**amp):
        o = e2.compute(
            lambda: per_example_loss(model, batch, "causal_lm") * tok_share,
            sqnorm=False,
            groups=dom,
            num_groups=K,
            group_coeffs=lambda out: fixed,
        )
    g_eng = torch.cat([p.grad.reshape(-1).float() for p in params])
    opt.zero_grad(set_to_none=True)
    Fm = domain_grads()
    G_ref = (Fm @ Fm.t()).double()
    g_ref = (fixed.to(dev).float().unsqueeze(1) * Fm).sum(0)
    res["check"] = {
        "gram_rel_err": float((o["group_gram"].double() - G_ref).norm() / G_ref.norm()),
        "grad_rel_err": float((g_eng - g_ref).norm() / g_ref.norm()),
    }
    del Fm
    print("check", res["check"], flush=True)
    base = res["plain"]["ms"]
    fast = res["plain_fast_paths"].get("ms")
    for name, _ in variants[1:]:
        if "ms" in res[name]:
            res[name]["x_plain"] = res[name]["ms"] / base
            if fast:
                res[name]["x_plain_fast_paths"] = res[name]["ms"] / fast
    print(json.dumps(res, indent=2), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "bench_mixture.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
