"""Downstream check of a learned domain mixture: a small LM trained for the same number of tokens on the
DoReMi mixture and on the uniform one, with per-domain and worst-domain held-out perplexity for both
(DoReMi, Xie et al. 2023, Section 3: the main model is trained on the proxy's averaged weights).

Real multi-domain text from this machine: the demo corpus's six domains (Python sources, pydoc prose,
English/German/French man pages, licences) plus a seventh of random tokens (irreducible loss). Each
domain's last ``--eval-rows`` rows are held out for evaluation. winnow itself produces both mixtures
through the CLI: a recipe with ``data.source: {domain: file}`` and ``mixture.method: doremi`` (or
``uniform``). The main model then trains on batches drawn by the manifest's
``interleave.probabilities``, as a trainer consuming the manifest would.

This runs on CPU with the full install (the pipeline makes the mixture), not on the GPU machine:

    .venv/bin/python benchmarks/bench_mixture_downstream.py --out /tmp/downstream [--seeds 0 1 2]
    .venv/bin/python benchmarks/bench_mixture_downstream.py --smoke --out /tmp/smoke   (checks the script)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(
    work: Path, per_domain: int, eval_rows: int, vocab: int
) -> tuple[dict[str, Path], dict[str, list[str]], Path]:
    from winnow.pipeline.demo import build_demo_corpus
    from winnow.pipeline.models import load_tokenizer, train_tokenizer
    from winnow.pipeline.recipe import recipe_from_dict

    corpus = work / "corpus"
    if not corpus.exists():
        build_demo_corpus(corpus, per_domain=per_domain, rows_per_file=per_domain)
    rows: dict[str, list[dict]] = {}
    for f in sorted(corpus.glob("*.jsonl")):
        for line in open(f):
            r = json.loads(line)
            rows.setdefault(r["domain"], []).append(r)
    tok_dir = work / "tok"
    if not tok_dir.exists():
        texts = [r["text"] for rs in rows.values() for r in rs[:-eval_rows]]
        rec = recipe_from_dict(
            {
                "name": "tok",
                "data": {"source": "x", "text_column": "text"},
                "model": {
                    "task": "causal_lm",
                    "config": {"model_type": "gpt2"},
                    "tokenizer": {"train": {"vocab_size": vocab}},
                },
                "select": {"method": "all"},
            }
        )
        train_tokenizer(texts, rec, tok_dir)
    tok = load_tokenizer(tok_dir)
    rng = random.Random(0)
    n_noise = min(len(v) for v in rows.values())
    rows["noise"] = [
        {"id": f"noise-{i:05d}", "text": tok.decode([rng.randrange(3, len(tok)) for _ in range(60)])}
        for i in range(n_noise)
    ]
    train_files, held = {}, {}
    (work / "train").mkdir(exist_ok=True)
    for d, rs in sorted(rows.items()):
        f = work / "train" / f"{d}.jsonl"
        f.write_text("".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rs[:-eval_rows]))
        train_files[d] = f
        held[d] = [r["text"] for r in rs[-eval_rows:]]
    return train_files, held, tok_dir


def make_mixture(
    work: Path, name: str, files: dict[str, Path], tok_dir: Path, mixture: dict, proxy: dict
) -> dict:
    import yaml

    from winnow.cli import main as cli

    recipe = {
        "name": name,
        "data": {"source": {d: str(f) for d, f in files.items()}, "id_column": "id", "text_column": "text"},
        "model": {
            "task": "causal_lm",
            "config": {"model_type": "gpt2", "n_positions": 128, **proxy},
            "tokenizer": {"path": str(tok_dir)},
            "max_length": 64,
        },
        # the spine still trains and scores a proxy in every recipe; keep it minimal
        "train": {"steps": 2, "batch_size": 8, "seeds": [0], "checkpoints": [2]},
        "scoring": {"scorers": [{"name": "loss"}], "batch_size": 64},
        "select": {"method": "all"},
        "mixture": mixture,
        "output": {"dir": str(work / "runs" / name)},
        "runner": {"kind": "thread", "max_workers": 2},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    t = time.time()
    if cli(["run", str(path)]) != 0:
        raise SystemExit(f"winnow run {path} failed")
    man = json.loads((work / "runs" / name / "manifest.json").read_text())
    mix = json.loads((work / "runs" / name / "mixture.json").read_text())
    probs = dict(zip(man["interleave"]["names"], man["interleave"]["probabilities"], strict=True))
    return {"probabilities": probs, "mixture": mix["weights"], "seconds": round(time.time() - t, 1)}


def encode(tok, texts: list[str], max_length: int) -> list[torch.Tensor]:
    return [torch.tensor(ids[:max_length]) for ids in tok(texts)["input_ids"] if len(ids) >= 2]


def collate(seqs: list[torch.Tensor], pad: int) -> dict[str, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def train_and_eval(
    probs: dict[str, float],
    train: dict[str, list[torch.Tensor]],
    held: dict[str, list[torch.Tensor]],
    vocab: int,
    pad: int,
    tokens: int,
    batch: int,
    seed: int,
    width: int,
    layers: int,
    lr: float,
) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    from winnow.grads import next_token_losses

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=128,
            n_embd=width,
            n_layer=layers,
            n_head=4,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=pad,
        )
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    names = sorted(probs)
    p = np.array([probs[d] for d in names], dtype=np.float64)
    p /= p.sum()
    g = np.random.default_rng(seed)
    mean_len = sum(p[i] * np.mean([len(s) for s in train[d]]) for i, d in enumerate(names))
    steps_est = max(1, int(tokens / (batch * mean_len)))
    seen, step = 0, 0
    model.train()
    while seen < tokens:
        frac = min(1.0, step / steps_est)
        for gr in opt.param_groups:  # linear warm-up over 5%, cosine to 10%
            gr["lr"] = lr * (
                min(1.0, frac / 0.05) if frac < 0.05 else 0.1 + 0.45 * (1 + math.cos(math.pi * frac))
            )
        doms = g.choice(len(names), size=batch, p=p)
        seqs = [train[names[i]][g.integers(len(train[names[i]]))] for i in doms]
        b = collate(seqs, pad)
        nll, valid = next_token_losses(model, b)
        loss = nll.sum() / valid.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += int(valid.sum())
        step += 1
    model.eval()
    ppl = {}
    with torch.no_grad():
        for d, seqs in held.items():
            tot, cnt = 0.0, 0
            for i in range(0, len(seqs), 64):
                nll, valid = next_token_losses(model, collate(seqs[i : i + 64], pad))
                tot += float(nll.sum())
                cnt += int(valid.sum())
            ppl[d] = math.exp(tot / cnt)
    return {"perplexity": ppl, "steps": step, "tokens": seen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--per-domain", type=int, default=300)
    ap.add_argument("--eval-rows", type=int, default=40)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--proxy-steps", type=int, default=300)
    ap.add_argument("--proxy-batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=1_500_000, help="training tokens of each main model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes (checks the script; figures mean nothing)"
    )
    a = ap.parse_args()
    if a.smoke:
        a.per_domain, a.eval_rows, a.vocab, a.proxy_steps, a.proxy_batch = 30, 5, 300, 4, 8
        a.tokens, a.batch, a.width, a.layers, a.seeds = 4000, 8, 32, 1, [0]
    work = Path(a.out).absolute()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    files, held_text, tok_dir = build(work, a.per_domain, a.eval_rows, a.vocab)
    proxy = {"n_layer": 2, "n_embd": 64, "n_head": 4}
    common = {"steps": a.proxy_steps, "batch_size": a.proxy_batch, "lr": 3e-3, "warmup_steps": 10}
    mixtures = {
        "uniform": make_mixture(work, "uniform", files, tok_dir, {"method": "uniform"}, proxy),
        "doremi": make_mixture(
            work,
            "doremi",
            files,
            tok_dir,
            {"method": "doremi", "reference_steps": 2 * a.proxy_steps, **common},
            proxy,
        ),
    }
    from winnow.pipeline.models import load_tokenizer

    tok = load_tokenizer(tok_dir)
    pad = tok.pad_token_id
    train = {d: encode(tok, [json.loads(line)["text"] for line in open(f)], 64) for d, f in files.items()}
    held = {d: encode(tok, t, 64) for d, t in held_text.items()}
    res: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "args": vars(a),
        "mixtures": mixtures,
        "runs": {},
    }
    for name, mx in mixtures.items():
        for seed in a.seeds:
            t = time.time()
            r = train_and_eval(
                mx["probabilities"],
                train,
                held,
                len(tok),
                pad,
                a.tokens,
                a.batch,
                seed,
                a.width,
                a.layers,
                a.lr,
            )
            r["seconds"] = round(time.time() - t, 1)
            res["runs"][f"{name}/{seed}"] = r
            print(
                name,
                seed,
                {d: round(v, 2) for d, v in r["perplexity"].items()},
                r["steps"],
                "steps",
                r["tokens"],
                "tokens",
                flush=True,
            )
    domains = sorted(held)
    real = [d for d in domains if d != "noise"]
    lines = [
        "| domain | DoReMi weight | "
        + " | ".join(f"{m} ppl (mean of {len(a.seeds)} seeds)" for m in mixtures)
        + " |",
        "| --- | ---: |" + " ---: |" * len(mixtures),
    ]
    summary = {}
    for m in mixtures:
        per = {
            d: float(np.mean([res["runs"][f"{m}/{s}"]["perplexity"][d] for s in a.seeds])) for d in domains
        }
        worst_by_seed = [max(res["runs"][f"{m}/{s}"]["perplexity"][d] for d in real) for s in a.seeds]
        summary[m] = {
            "per_domain": per,
            "avg_real": float(np.mean([per[d] for d in real])),
            "worst_real": max(per[d] for d in real),
            "worst_real_by_seed": worst_by_seed,
            "worst_all": max(per.values()),
        }
    for d in domains:
        lines.append(
            f"| {d} | {mixtures['doremi']['mixture'].get(d, 0):.3f} | "
            + " | ".join(f"{summary[m]['per_domain'][d]:.2f}" for m in mixtures)
            + " |"
        )
    lines.append(
        "| **average over the 6 real domains** | | "
        + " | ".join(f"**{summary[m]['avg_real']:.2f}**" for m in mixtures)
        + " |"
    )
    lines.append(
        "| **worst real domain** | | "
        + " | ".join(f"**{summary[m]['worst_real']:.2f}**" for m in mixtures)
        + " |"
    )
    res["summary"] = summary
    res["table"] = "\n".join(lines)
    print(res["table"], flush=True)
    (work / "bench_mixture_downstream.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
