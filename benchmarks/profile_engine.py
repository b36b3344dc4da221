"""Where the per-example gradient engine spends its time on a GPT-2-small shape (CUDA profiler).

    python3 benchmarks/profile_engine.py --batch 32 [--out $OUT]
    python3 benchmarks/profile_engine.py --batch 64 --proj-kind kfjlt   (projected features, k = --k)
    python3 benchmarks/profile_engine.py --smoke      (a tiny GPT-2 on the CPU: checks the script)
Prints the top CUDA kernels of one engine call and the wall time of its stages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from winnow.grads import GradEngine, per_example_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--precision",
        choices=["fp32", "input"],
        default="input",
        help="the engine's factor_dtype (GraNd uses 'input')",
    )
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--proj-kind", default=None, help="profile projected features of this kind, not norms")
    ap.add_argument("--k", type=int, default=8192)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--smoke", action="store_true", help="a tiny GPT-2 on the CPU (checks the script)")
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    dev = "cpu" if a.smoke or not torch.cuda.is_available() else "cuda"
    shape = {} if not a.smoke else {"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 1001}
    if a.smoke:
        a.batch, a.seq = 2, 16
    torch.backends.cuda.matmul.allow_tf32 = True
    model = GPT2LMHeadModel(
        GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    ).to(dev)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device=dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    amp = dict(device_type=dev, dtype=torch.bfloat16)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    proj = {} if a.proj_kind is None else {"proj_dim": 64 if a.smoke else a.k, "proj_kind": a.proj_kind}
    eng = GradEngine(model, check=False, factor_dtype=a.precision, **proj)
    what = {"sqnorm": True} if a.proj_kind is None else {"sqnorm": False, "project": True}

    def run():
        with torch.autocast(**amp):
            return eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), **what)

    for _ in range(2):
        run()
    sync()

    # stages: forward only, forward+backward to outputs (no rules), full
    def fwd():
        with torch.autocast(**amp):
            per_example_loss(model, batch, "causal_lm").sum()

    def fwd_bwd():
        with torch.autocast(**amp):
            loss = per_example_loss(model, batch, "causal_lm").sum()
        loss.backward()
        model.zero_grad(set_to_none=True)

    for name, fn in [("forward", fwd), ("forward+backward (weights too)", fwd_bwd), ("engine", run)]:
        fn()
        sync()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        sync()
        print(f"{name}: {(time.perf_counter() - t) / 3 * 1e3:.1f} ms", flush=True)

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        run()
        sync()
    table = prof.key_averages().table(
        sort_by="cuda_time_total" if dev == "cuda" else "cpu_time_total",
        row_limit=30,
        max_name_column_width=60,
    )
    print(table)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
    print(cpu)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "profile.txt").write_text(table + "\n\n" + cpu)


if __name__ == "__main__":
    main()
