import sys
import time

import torch

sys.path.insert(0, ".")
from transformers import GPT2Config, GPT2LMHeadModel

from winnow.grads import GradEngine, per_example_loss

dev = "cuda"
model = GPT2LMHeadModel(GPT2Config(n_positions=1024, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(dev)
g = torch.Generator(device=dev).manual_seed(0)
ids = torch.randint(0, 50257, (64, 512), device=dev, generator=g)
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
for kind in ["kfjlt", "rademacher"]:
    with GradEngine(model, params="all", proj_dim=8192, proj_kind=kind, check=True) as eng:

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)["proj"]

        run()
        run()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            p = run()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / 3
        print(kind, "check=True", round(64 / dt, 1), "ex/s", p.dtype, float(p.norm()), flush=True)
