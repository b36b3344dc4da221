"""Where the per-example gradient engine spends its time on a GPT-2-small shape (CUDA profiler).

    python3 benchmarks/profile_engine.py --batch 32 [--out $OUT]
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

from winnow.scorers.grad_engine import GradEngine, per_example_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--precision", choices=["fp32", "input"], default="input",
                    help="the engine's factor_dtype (GraNd uses 'input')")
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.backends.cuda.matmul.allow_tf32 = True
    model = GPT2LMHeadModel(GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).cuda()
    ids = torch.randint(0, 50257, (a.batch, a.seq), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    amp = dict(device_type="cuda", dtype=torch.bfloat16)
    eng = GradEngine(model, check=False, factor_dtype=a.precision)

    def run():
        with torch.autocast(**amp):
            return eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), sqnorm=True)

    for _ in range(2):
        run()
    torch.cuda.synchronize()
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
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        print(f"{name}: {(time.perf_counter() - t) / 3 * 1e3:.1f} ms", flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    print(table)
    cpu = prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60)
    print(cpu)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "profile.txt").write_text(table + "\n\n" + cpu)


if __name__ == "__main__":
    main()
