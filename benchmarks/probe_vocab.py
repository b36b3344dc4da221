# ruff: noqa: B023  (the closures are called inside the loop iteration that defines them)
"""Diagnostic: how much of the engine's GPT-2 time is the unaligned 50257-way vocabulary?

Times (bf16, H100) the output-layer matmuls at V=50257 and V=50304 (a multiple of 64), the per-example
loss forward, the engine (bf16 factors) and vmap(grad) on GPT-2-small shapes with either vocabulary.

    python3 benchmarks/probe_vocab.py --out $OUT
    python3 benchmarks/probe_vocab.py --smoke          (tiny shapes on the CPU: checks the script)
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
from winnow.grads import GradEngine, per_example_loss  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tm(fn, iters=5, warm=2):
    for _ in range(warm):
        fn()
    _sync()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the script)")
    a = ap.parse_args()
    dev = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = True
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__}
    # (tokens, width, vocabularies, batches, sequence, layers)
    M, K, vocabs, batches, T, layers = (
        (32 * 512, 768, (50257, 50304), (32, 64), 512, 12)
        if not a.smoke
        else (64, 32, (1001, 1024), (2,), 16, 1)
    )
    for V in vocabs:
        h = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        W = torch.randn(V, K, device=dev, dtype=torch.bfloat16)
        g = torch.randn(M, V, device=dev, dtype=torch.bfloat16)
        res[f"mm_fwd_V{V}_ms"] = tm(lambda: h @ W.t()) * 1e3
        res[f"mm_dh_V{V}_ms"] = tm(lambda: g @ W) * 1e3
        res[f"mm_dW_V{V}_ms"] = tm(lambda: g.t() @ h) * 1e3
        x = torch.randn(M, V, device=dev, dtype=torch.bfloat16)
        y = torch.randint(0, V, (M,), device=dev)
        res[f"ce_fp32_V{V}_ms"] = (
            tm(lambda: torch.nn.functional.cross_entropy(x.float(), y, reduction="none")) * 1e3
        )
        print(res, flush=True)
    from torch.func import functional_call, grad, vmap
    from transformers import GPT2Config, GPT2LMHeadModel

    amp = dict(device_type=dev, dtype=torch.bfloat16)
    for V in vocabs:
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=V,
                n_positions=1024,
                n_embd=K,
                n_layer=layers,
                n_head=12 if K % 12 == 0 else 4,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        ).to(dev)
        model.config.use_cache = False
        res[f"attn_impl_V{V}"] = str(getattr(model.config, "_attn_implementation", None))
        for B in batches:
            ids = torch.randint(0, vocabs[0], (B, T), device=dev)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

            def fwd():
                with torch.no_grad(), torch.autocast(**amp):
                    per_example_loss(model, batch, "causal_lm")

            def fwdbwd():
                with torch.autocast(**amp):
                    loss = per_example_loss(model, batch, "causal_lm").sum()
                loss.backward()
                model.zero_grad(set_to_none=True)

            eng = GradEngine(model, check=False, factor_dtype="input")

            def engine():
                with torch.autocast(**amp):
                    eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), sqnorm=True)

            for name, fn in (("fwd_nograd", fwd), ("plain_fwdbwd", fwdbwd), ("engine_bf16", engine)):
                s = tm(fn) if not a.smoke else tm(fn, iters=1, warm=0)
                res[f"{name}_V{V}_B{B}_ms"] = s * 1e3
                res[f"{name}_V{V}_B{B}_ex_s"] = B / s
            eng.close()
            print(res, flush=True)
        params = {n: p.detach() for n, p in model.named_parameters()}

        def loss_one(p, x):
            with torch.autocast(**amp):
                out = functional_call(model, p, (x[None],), {"use_cache": False})
            return torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), x[1:])

        vg = vmap(grad(loss_one), in_dims=(None, 0))
        nv, chunk = (32, 16) if not a.smoke else (2, 2)
        ids = torch.randint(0, vocabs[0], (nv, T), device=dev)

        def run_vmap():
            for k in range(0, nv, chunk):
                gs = vg(params, ids[k : k + chunk])
                torch.stack([v.float().flatten(1).pow(2).sum(1) for v in gs.values()]).sum(0)
                del gs

        s = tm(run_vmap, iters=3 if not a.smoke else 1, warm=1)
        res[f"vmap_V{V}_ex_s"] = nv / s
        print(res, flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    if a.out:
        Path(a.out, "probe_vocab.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
