"""How well do winnow's gradient projections keep the inner products TracIn / LESS rank by?

On a small GPT-2 (2 layers, 128 wide, byte-level, 128 tokens) briefly trained on real text (pydoc's
topics, the standard library's sources and its tests: 20 rows each), the exact per-example gradients of
60 examples are materialised (autograd, float64 products), and every pair's exact inner product is
compared with its projection at k = 256, 1024, 4096, 8192 by:

- ``dense``: a dense Gaussian k x D map (the JL reference; applied in column blocks);
- ``tensor_sketch``, ``kfjlt`` and ``rademacher`` (Kronecker): the engine's own ``compute(project=True)``.

Reported per k and map, mean over 3 seeds: the Spearman correlation of projected with exact pair products
(what a ranking sees), the rms relative error of the pair products over ||x|| ||y||, and the projected
squared norms over the true ones (mean and standard deviation over examples: a map whose blocks share a
draw can be biased for every example at once).

    python3 benchmarks/probe_projection.py --out $OUT          # CPU or GPU; torch, transformers, numpy
    python3 benchmarks/probe_projection.py --smoke --out /tmp/p
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from winnow.grads import GradEngine, per_example_loss  # noqa: E402


def texts(n: int) -> list[str]:
    import sysconfig
    from pydoc_data.topics import topics

    prose = [v.strip()[:600] for _, v in sorted(topics.items()) if len(v.strip()) > 300][:n]
    lib = Path(sysconfig.get_paths()["stdlib"])
    code = [p.read_text(encoding="utf-8")[2000:2600] for p in sorted(lib.glob("[a-p]*.py"))][:n]
    tests = [p.read_text(encoding="utf-8")[1500:2100] for p in sorted((lib / "test").glob("test_[a-p]*.py"))][
        :n
    ]
    return prose + code + tests


def ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--ks", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    torch.manual_seed(0)
    n, T = (6, 32) if a.smoke else (20, 128)
    ks = [64, 256] if a.smoke else a.ks
    seeds = 1 if a.smoke else a.seeds
    rows = [torch.tensor(list(t.encode("utf-8")[:T])) for t in texts(n)]
    rows = [r for r in rows if len(r) == T]
    B = len(rows)
    ids = torch.stack(rows).to(device)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32 if a.smoke else 128, n_positions=T, vocab_size=260)
    model = GPT2LMHeadModel(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(10 if a.smoke else 60):  # briefly trained: gradients of a model that has learned something
        pick = torch.randint(0, B, (8,), generator=g)
        loss = model(input_ids=ids[pick], labels=ids[pick]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model = model.double().eval()
    params = [p for _, p in model.named_parameters()]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    flat = []
    for i in range(B):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        gr = torch.autograd.grad(per_example_loss(model, one, "causal_lm").sum(), params)
        flat.append(torch.cat([x.reshape(-1) for x in gr]))
    G = torch.stack(flat)  # (B, D) float64
    D = G.shape[1]
    exact = (G @ G.t()).cpu().numpy()
    iu = np.triu_indices(B, 1)
    nrm = np.sqrt(np.diag(exact))
    scale = np.outer(nrm, nrm)[iu]

    def dense(k: int, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(seed)
        out = torch.zeros(B, k, dtype=torch.float64, device=device)
        for lo in range(0, D, 1 << 15):
            hi = min(D, lo + (1 << 15))
            P = torch.randn(k, hi - lo, generator=gen, dtype=torch.float64, device=device)
            out += G[:, lo:hi] @ P.t()
        return out / math.sqrt(k)

    def engine(kind: str):
        def f(k: int, seed: int) -> torch.Tensor:
            with GradEngine(model, "all", proj_dim=k, proj_seed=seed, proj_kind=kind) as eng:
                return eng.compute(lambda: per_example_loss(model, batch, "causal_lm"), project=True)["proj"]

        return f

    res: dict = {"device": str(device), "examples": B, "tokens": T, "params": D, "rows": []}
    for k in ks:
        for name, fn in (
            ("dense", dense),
            ("tensor_sketch", engine("tensor_sketch")),
            ("kfjlt", engine("kfjlt")),
            ("rademacher", engine("rademacher")),
        ):
            sp, err, sq_m, sq_s = [], [], [], []
            t = time.time()
            for s in range(seeds):
                P = fn(k, s).double()
                pp = (P @ P.t()).cpu().numpy()
                sp.append(spearman(exact[iu], pp[iu]))
                err.append(float(np.sqrt((((pp[iu] - exact[iu]) / scale) ** 2).mean())))
                ratio = np.diag(pp) / np.diag(exact)
                sq_m.append(float(ratio.mean()))
                sq_s.append(float(ratio.std()))
            row = {
                "k": k,
                "map": name,
                "spearman": float(np.mean(sp)),
                "rel_err_rms": float(np.mean(err)),
                "sqnorm_ratio_mean": float(np.mean(sq_m)),
                "sqnorm_ratio_sd": float(np.mean(sq_s)),
                "seconds": round(time.time() - t, 2),
            }
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    print("| k | map | Spearman | rms rel. error | ‖Px‖²/‖x‖² mean ± sd |")
    print("| ---: | --- | ---: | ---: | --- |")
    for r in res["rows"]:
        print(
            f"| {r['k']} | {r['map']} | {r['spearman']:.3f} | {r['rel_err_rms']:.4f} | "
            f"{r['sqnorm_ratio_mean']:.3f} ± {r['sqnorm_ratio_sd']:.3f} |"
        )
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "probe_projection.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
