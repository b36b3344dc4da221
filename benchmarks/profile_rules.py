"""Per-parameter time of the engine's rules on a GPT-2-small shape (CUDA-synchronised timers).

python3 benchmarks/profile_rules.py --batch 32 [--precision fp32|input]
python3 benchmarks/profile_rules.py --smoke       (a tiny GPT-2 on the CPU: checks the script)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import winnow.grads.accumulators as acc  # noqa: E402  (the squared norms' kernel is looked up here)
import winnow.grads.engine as ge  # noqa: E402
from winnow.grads import per_example_loss  # noqa: E402


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
    ap.add_argument("--out", default=None, help="also write the table to OUT/profile_rules.txt")
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
    times: dict[str, float] = defaultdict(float)
    orig_uses, orig_sq, orig_grad = ge.GradEngine._uses, acc._outer_sqnorm, torch.autograd.grad

    def timed(label, fn):
        def wrap(*args, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*args, **kw)
            sync()
            times[label if isinstance(label, str) else label(args)] += time.perf_counter() - t
            return out

        return wrap

    ge.GradEngine._uses = timed(
        lambda args: (
            "factors " + args[1].split(".")[-2] + "." + args[1].split(".")[-1]
            if "." in args[1]
            else "factors " + args[1]
        ),
        orig_uses,
    )
    acc._outer_sqnorm = timed(
        lambda args: f"sqnorm T={args[0][0].right.shape[1]} m={args[2]} n={args[3]} uses={len(args[0])}",
        orig_sq,
    )
    torch.autograd.grad = timed("autograd.grad", orig_grad)
    eng = ge.GradEngine(model, check=False, factor_dtype=a.precision)

    def run():
        with torch.autocast(**amp):
            loss_fn = timed("forward", lambda: per_example_loss(model, batch, "causal_lm"))
            return eng.compute(loss_fn, sqnorm=True)

    run()
    times.clear()
    sync()
    t = time.perf_counter()
    n = 3
    for _ in range(n):
        run()
    sync()
    wall = (time.perf_counter() - t) / n
    agg: dict[str, float] = defaultdict(float)
    for k, v in times.items():
        agg[k] += v / n
    lines = [f"engine wall {wall * 1e3:.1f} ms per call (B={a.batch})"]
    lines += [f"{v * 1e3:8.2f} ms  {k}" for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:25]]
    print("\n".join(lines))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "profile_rules.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
