"""Downstream proof on the GPU: a GPT-2-small-shaped model trained for one token budget on the data winnow
selects or reweights, with per-domain and worst-domain perplexity on held-out text.

Two phases, because the GPU machine has torch, transformers and numpy but not the pipeline's stack:

``prepare`` (this machine, full install) builds a multi-domain corpus from this machine's real text
(English, German and French manual pages, the standard library's sources and tests, pydoc prose, licences,
Debian changelogs, and a random-hex noise domain; unequal sizes, as real corpora are), holds out
``--eval-rows`` rows of every domain, and runs winnow through its CLI on the rest:

- ``mixture.method: doremi`` and ``doge`` (universal target) with the defaults of
  ``configs/mixture-doremi.yaml`` (a small proxy) give the domain weights (mixture.json);
- EL2N scoring with ``select.method: score, keep: band, offset: 0.1, fraction: 0.5`` (Paul et al. 2021,
  Sec. 4: skip the hardest 10%, keep the next 50%) and ``select.method: random, fraction: 0.5`` give the
  kept rows (selection.parquet).

It then tokenizes every row once with the run's tokenizer and writes one ``bundle.npz`` (uint16 tokens,
row offsets, domains, the held-out rows, the weights and the kept masks) small enough to carry.

``train`` (the GPU machine: torch, transformers, numpy) trains, for every configuration and seed, a fresh
GPT-2-small-shaped model (12 layers, 768 wide, 12 heads, context 512; the bundle's 8,192-token vocabulary)
for exactly the same number of tokens: sequences are packed from rows drawn with replacement, by domain
weight then uniformly within the domain (``uniform``, ``doremi``, ``doge``), or uniformly from the kept
rows (``all``, ``random50``, ``el2n50``). AdamW (lr 6e-4, betas 0.9/0.95, weight decay 0.1), 2% warm-up,
cosine to 10%, bf16 autocast, batch 64 x 512 tokens. The per-domain loss on the held-out rows gives the
perplexities; ``worst`` is the worst over the real domains (noise is reported but not in the worst).

    .venv/bin/python benchmarks/gpu_downstream.py prepare --work /tmp/gd --out benchmarks/data/gd
    python3 benchmarks/gpu_downstream.py train --bundle benchmarks/data/gd/bundle.npz --out $OUT \\
        --seeds 0 --budget-s 480          # measures throughput, fixes the token budget, writes it
    python3 benchmarks/gpu_downstream.py train ... --seeds 1 --tokens N   # the same budget again
    python3 benchmarks/gpu_downstream.py train --smoke ...                  # CPU, tiny: checks the script
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIXTURES = ("uniform", "doremi", "doge")
SELECTIONS = ("all", "random50", "el2n50")
NOISE = "noise"

# domain -> rows (before the held-out rows are taken), chunks of about 480 characters
DOMAINS = {
    "man-en": 24000,
    "code": 16000,
    "changelogs": 12000,
    "licenses": 6000,
    "tests": 6000,
    "man-de": 2500,
    "man-fr": 2500,
    "prose": 2000,
    NOISE: 6000,
}


# ---------------------------------------------------------------------------------------------------------
# prepare (full install)


def _file_rows(
    paths: list[Path], read, rng: np.random.Generator, held: int, want: int
) -> tuple[list[str], list[str]]:
    """Chunks of the files in a seeded random order: the first files' chunks are held out (``held`` rows),
    the next files' chunks are the training rows (``want``), so no file gives both."""
    from winnow.pipeline.demo import _chunks

    train: list[str] = []
    out: list[str] = []
    for i in rng.permutation(len(paths)):
        try:
            chunks = list(_chunks(read(paths[i])))
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        if len(out) < held:
            out.extend(chunks[: held - len(out)])
        else:
            train.extend(chunks)
            if len(train) >= want:
                break
    return train[:want], out


def corpus_rows(n: dict[str, int], held: int, seed: int = 0) -> dict[str, tuple[list[str], list[str]]]:
    """{domain: (training rows, held-out rows)}: ``n[domain]`` training rows (fewer if the files run out)
    and ``held`` held-out rows from other files of the same kind."""
    import gzip
    import sysconfig

    from winnow.pipeline.demo import noise_rows, prose_rows, strip_roff

    rng = np.random.default_rng(seed)
    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def gz(p: Path) -> str:
        return gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")

    def man_page(p: Path) -> str:
        src = gz(p)
        return "" if src.lstrip().startswith(".so ") else strip_roff(src)

    def man(lang: str) -> list[Path]:
        root = Path("/usr/share/man") / ("" if lang == "en" else lang)
        return sorted(p for sec in ("man1", "man5", "man8") for p in (root / sec).glob("*.gz"))

    files = {
        "man-en": (man("en"), man_page),
        "man-de": (man("de"), man_page),
        "man-fr": (man("fr"), man_page),
        "code": (
            sorted(
                p for p in stdlib.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts
            ),
            lambda p: p.read_text(encoding="utf-8"),
        ),
        "tests": (sorted((stdlib / "test").rglob("test_*.py")), lambda p: p.read_text(encoding="utf-8")),
        "changelogs": (sorted(Path("/usr/share/doc").glob("*/changelog.Debian.gz")), gz),
        "licenses": (
            sorted(Path("/usr/share/doc").glob("*/copyright")),
            lambda p: p.read_text(errors="replace"),
        ),
    }
    out: dict[str, tuple[list[str], list[str]]] = {}
    for dom, want in n.items():
        if dom == NOISE:
            rows = [t for t, _ in noise_rows("hex", want + held, seed=seed)]
            out[dom] = (rows[held:], rows[:held])
        elif dom == "prose":  # one file (pydoc's topics): rows split at random
            rows = [t for t, _ in prose_rows(10**9)]
            order = rng.permutation(len(rows))
            out[dom] = ([rows[i] for i in order[held : held + want]], [rows[i] for i in order[:held]])
        else:
            paths, read = files[dom]
            out[dom] = _file_rows(paths, read, rng, held, want)
        if dom == "licenses":  # the same licence text recurs across packages: no row in both halves
            seen = set(out[dom][1])
            out[dom] = ([t for t in dict.fromkeys(out[dom][0]) if t not in seen], out[dom][1])
    return out


def _run(recipe: dict[str, Any], path: Path) -> Path:
    import yaml

    from winnow.cli import main

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    code = main(["run", str(path)])
    if code != 0:
        raise SystemExit(f"winnow run {path} exited {code}")
    return Path(recipe["output"]["dir"])


def prepare(work: Path, out: Path, eval_rows: int, scale: float, smoke: bool = False) -> None:
    import polars as pl

    from winnow.pipeline.models import load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    data.mkdir(exist_ok=True)
    split = corpus_rows({d: max(50, int(n * scale)) for d, n in DOMAINS.items()}, eval_rows)
    held: dict[str, list[str]] = {d: h for d, (_, h) in split.items()}
    rows = {d: t for d, (t, _) in split.items()}
    for dom, train in rows.items():
        (data / f"{dom}.jsonl").write_text(
            "".join(
                json.dumps({"id": f"{dom}-{i:06d}", "text": t, "domain": dom}) + "\n"
                for i, t in enumerate(train)
            )
        )
        print(f"{dom}: {len(train)} training rows, {len(held[dom])} held out", flush=True)
    base: dict[str, Any] = {
        "data": {
            "source": f"{data}/*.jsonl",
            "id_column": "id",
            "text_column": "text",
            "domain_column": "domain",
        },
        "model": {
            "task": "causal_lm",
            "config": {"model_type": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 128},
            "tokenizer": {"train": {"vocab_size": 8192}},
            "max_length": 128,
        },
        "train": {"steps": 200, "batch_size": 32, "lr": 1e-3, "seeds": [0], "checkpoints": [100, 200]},
        "scoring": {"scorers": ["el2n"], "batch_size": 64},
    }
    if smoke:
        base["model"]["config"].update(n_layer=1, n_embd=32)
        base["model"]["tokenizer"]["train"]["vocab_size"] = 512
        base["train"].update(steps=4, checkpoints=[2, 4])
    # every recipe runs in ONE run folder, one after the other: the tokenizer, the proxy and its scores are
    # computed once and read back from the folder's step records; each run's outputs are copied aside
    runs: dict[str, Path] = {}
    shared = work / "runs" / "main"

    def keep(name: str) -> Path:
        import shutil

        dest = work / "outputs" / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("selection.parquet", "mixture.json", "manifest.json"):
            if (shared / f).exists():
                shutil.copy2(shared / f, dest / f)
        return dest

    for name, select in (
        ("el2n50", {"method": "score", "score": "el2n", "fraction": 0.5, "keep": "band", "offset": 0.1}),
        ("random50", {"method": "random", "fraction": 0.5, "seed": 0}),
        ("all", {"method": "all"}),
    ):
        r = dict(base, name="main", select=select, output={"dir": str(shared)})
        _run(r, work / f"{name}.yaml")
        runs[name] = keep(name)
    # configs/mixture-doremi.yaml's settings (steps 400, the reference 800, batch 16, lr 3e-3); DoGE 200 steps
    mix = {"batch_size": 16, "lr": 3e-3}
    for name, m in (
        ("doremi", {"method": "doremi", "steps": 4 if smoke else 400, **mix}),
        ("doge", {"method": "doge", "steps": 4 if smoke else 200, **mix}),
        ("uniform", {"method": "uniform"}),
    ):
        r = dict(base, name="main", select={"method": "all"}, mixture=m, output={"dir": str(shared)})
        _run(r, work / f"{name}.yaml")
        runs[name] = keep(name)
    # tokenize every row once with the runs' tokenizer
    tok = load_tokenizer(next(shared.glob("tokenizer-*")))
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    ids, doms, toks = [], [], []
    for dom in rows:
        for line in open(data / f"{dom}.jsonl"):
            r = json.loads(line)
            ids.append(r["id"])
            doms.append(dom)
            toks.append(r["text"])
    names = sorted(rows)
    enc = tok(toks, add_special_tokens=False)["input_ids"]
    lens = np.array([len(e) + 1 for e in enc], dtype=np.int64)
    flat = np.fromiter((t for e in enc for t in (*e, eos)), dtype=np.uint16, count=int(lens.sum()))
    offsets = np.concatenate([[0], np.cumsum(lens)])
    dom_id = np.array([names.index(d) for d in doms], dtype=np.int16)
    henc = {d: tok(held[d], add_special_tokens=False)["input_ids"] for d in names}
    hflat = {d: np.fromiter((t for e in henc[d] for t in (*e, eos)), dtype=np.uint16) for d in names}
    id_index = {i: j for j, i in enumerate(ids)}
    bundle: dict[str, Any] = {
        "tokens": flat,
        "offsets": offsets,
        "domain": dom_id,
        "domain_names": np.array(names),
        "vocab_size": np.array(len(tok)),
    }
    for d in names:
        bundle[f"held/{d}"] = hflat[d]
    for name in SELECTIONS:
        sel = pl.read_parquet(runs[name] / "selection.parquet").select("id", "kept")
        mask = np.zeros(len(ids), dtype=bool)
        for i, k in zip(sel["id"].to_list(), sel["kept"].to_list(), strict=True):
            mask[id_index[i]] = bool(k)
        bundle[f"kept/{name}"] = mask
    weights: dict[str, dict[str, float]] = {}
    for name in MIXTURES:
        w = json.loads((runs[name] / "mixture.json").read_text())["weights"]
        bundle[f"weights/{name}"] = np.array([w[d] for d in names], dtype=np.float64)
        weights[name] = w
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "bundle.npz", **bundle)
    info = {
        "rows": {d: int((dom_id == i).sum()) for i, d in enumerate(names)},
        "tokens": {d: int(lens[dom_id == i].sum()) for i, d in enumerate(names)},
        "held_tokens": {d: int(hflat[d].size) for d in names},
        "weights": weights,
        "kept": {
            n: {d: int(bundle[f"kept/{n}"][dom_id == i].sum()) for i, d in enumerate(names)}
            for n in SELECTIONS
        },
    }
    (out / "bundle.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


# ---------------------------------------------------------------------------------------------------------
# train (torch, transformers, numpy)


def _stream(b: dict[str, np.ndarray], config: str, n_tokens: int, rng: np.random.Generator) -> np.ndarray:
    """``n_tokens`` tokens packed from rows drawn with replacement by the configuration's rule."""
    offsets, dom = b["offsets"], b["domain"]
    lens = np.diff(offsets)
    mean_len = float(lens.mean())
    if config in MIXTURES:
        w = b[f"weights/{config}"] / b[f"weights/{config}"].sum()
        per_dom = [np.flatnonzero(dom == i) for i in range(len(w))]
    else:
        pool = np.flatnonzero(b[f"kept/{config}"])
    parts, have = [], 0
    while have < n_tokens:
        n = int((n_tokens - have) / mean_len * 1.1) + 16
        if config in MIXTURES:
            d = rng.choice(len(w), size=n, p=w)
            rows = np.empty(n, dtype=np.int64)
            for i, idx in enumerate(per_dom):
                sel = d == i
                if sel.any():
                    rows[sel] = idx[rng.integers(0, len(idx), int(sel.sum()))]
        else:
            rows = pool[rng.integers(0, len(pool), n)]
        chunk = np.concatenate([b["tokens"][offsets[r] : offsets[r + 1]] for r in rows])
        parts.append(chunk)
        have += chunk.size
    return np.concatenate(parts)[:n_tokens]


def _model(vocab: int, smoke: bool, device: Any):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=512,
        n_embd=64 if smoke else 768,
        n_layer=2 if smoke else 12,
        n_head=4 if smoke else 12,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).to(device=device, dtype=torch.float32)


def _evaluate(model, b: dict[str, np.ndarray], T: int, device: Any) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    out = {}
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for d in b["domain_names"].tolist():
            s = torch.from_numpy(b[f"held/{d}"].astype(np.int64))
            n = (s.numel() - 1) // T
            x = s[: n * T].reshape(n, T).to(device)
            y = s[1 : n * T + 1].reshape(n, T).to(device)
            tot, cnt = 0.0, 0
            for lo in range(0, n, 32):
                logits = model(input_ids=x[lo : lo + 32]).logits.float()
                tot += float(
                    F.cross_entropy(logits.flatten(0, 1), y[lo : lo + 32].flatten(), reduction="sum")
                )
                cnt += y[lo : lo + 32].numel()
            out[d] = tot / cnt
    model.train()
    return out


def train_one(b, config: str, seed: int, n_tokens: int, args, device) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    T, B = args.context, args.batch
    torch.manual_seed(seed)
    rng = np.random.default_rng(1000 * seed + (MIXTURES + SELECTIONS).index(config))
    steps = n_tokens // (B * (T + 1))
    stream = torch.from_numpy(_stream(b, config, steps * B * (T + 1), rng).astype(np.int64))
    stream = stream.reshape(steps, B, T + 1).to(device)
    model = _model(int(b["vocab_size"]), args.smoke, device)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    warm = max(1, steps // 50)

    def lr_at(t: int) -> float:
        if t < warm:
            return args.lr * (t + 1) / warm
        p = (t - warm) / max(1, steps - warm)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.time()
    losses = []
    for t in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(t)
        seq = stream[t]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=seq[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), seq[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if t % 50 == 0 or t == steps - 1:
            losses.append((t, float(loss.detach())))
    if device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.time() - t0
    held = _evaluate(model, b, T, device)
    real = {d: v for d, v in held.items() if d != NOISE}
    worst = max(real, key=real.get)
    return {
        "config": config,
        "seed": seed,
        "steps": steps,
        "tokens": steps * B * T,
        "train_seconds": round(secs, 1),
        "tokens_per_s": round(steps * B * T / secs),
        "final_train_loss": losses[-1][1],
        "held_loss": held,
        "ppl": {d: math.exp(v) for d, v in held.items()},
        "mean_ppl_real": float(np.mean([math.exp(v) for v in real.values()])),
        "worst_domain": worst,
        "worst_ppl": math.exp(real[worst]),
        "loss_curve": losses,
    }


def train(args) -> None:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    b = dict(np.load(args.bundle))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = args.configs.split(",")
    if args.smoke:
        args.context, args.batch = 64, 4
    T, B = args.context, args.batch
    n_tokens = args.tokens
    info: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    if n_tokens is None:
        # throughput of the model on this device, then the budget that fits --budget-s for every run
        probe = train_one(b, configs[0], 99, 20 * B * (T + 1), args, device)
        tps = probe["tokens_per_s"]
        n_runs = len(configs) * len(args.seeds)
        per_run = args.budget_s / n_runs
        # at least 10 steps a run: a busy machine's probe must not make the budget round down to nothing
        n_tokens = max(10, int(tps * per_run * 0.85) // (B * (T + 1))) * (B * (T + 1))
        info.update(probe_tokens_per_s=tps, budget_s=args.budget_s)
        print(f"probe: {tps:,} tokens/s; {n_tokens:,} tokens per run", flush=True)
    info["tokens_per_run"] = n_tokens
    results = []
    for seed in args.seeds:
        for c in configs:
            r = train_one(b, c, seed, n_tokens, args, device)
            results.append(r)
            print(
                json.dumps(
                    {
                        k: r[k]
                        for k in (
                            "config",
                            "seed",
                            "tokens",
                            "train_seconds",
                            "mean_ppl_real",
                            "worst_domain",
                            "worst_ppl",
                        )
                    }
                ),
                flush=True,
            )
            (out / f"downstream-s{'-'.join(map(str, args.seeds))}.json").write_text(
                json.dumps({"info": info, "results": results}, indent=1)
            )
    print(table(results))


def table(results: list[dict[str, Any]]) -> str:
    doms = list(results[0]["ppl"])
    head = "| config | seed | " + " | ".join(doms) + " | mean (real) | worst (real) |"
    lines = [head, "| --- | ---: |" + " ---: |" * (len(doms) + 2)]
    for r in results:
        lines.append(
            f"| {r['config']} | {r['seed']} | "
            + " | ".join(f"{r['ppl'][d]:.2f}" for d in doms)
            + f" | {r['mean_ppl_real']:.2f} | {r['worst_ppl']:.2f} ({r['worst_domain']}) |"
        )
    return "\n".join(lines)


def smoke(out: Path) -> None:
    """Both phases, tiny, on CPU (benchmarks/smoke.py): the numbers mean nothing."""
    prepare(out / "work", out / "bundle", eval_rows=20, scale=0.005, smoke=True)
    a = argparse.Namespace(
        bundle=str(out / "bundle" / "bundle.npz"),
        out=str(out / "train"),
        configs=",".join(MIXTURES + SELECTIONS),
        seeds=[0],
        tokens=None,
        budget_s=2.0,
        context=64,
        batch=4,
        lr=6e-4,
        smoke=True,
    )
    train(a)


def main() -> None:
    if sys.argv[1:2] == ["--smoke"]:
        ap = argparse.ArgumentParser()
        ap.add_argument("--smoke", action="store_true")
        ap.add_argument("--out", required=True)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        smoke(Path(ap.parse_args().out).absolute())
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--eval-rows", type=int, default=300)
    p.add_argument("--scale", type=float, default=1.0, help="times the rows per domain of DOMAINS")
    p.add_argument("--smoke", action="store_true", help="tiny proxies (checks the script)")
    t = sub.add_parser("train")
    t.add_argument("--bundle", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--configs", default=",".join(MIXTURES + SELECTIONS))
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    t.add_argument("--tokens", type=int, default=None, help="tokens per run (default: from --budget-s)")
    t.add_argument("--budget-s", type=float, default=480.0, help="training seconds for all runs together")
    t.add_argument("--context", type=int, default=512)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=6e-4)
    t.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.cmd == "prepare":
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        prepare(Path(a.work).absolute(), Path(a.out).absolute(), a.eval_rows, a.scale, a.smoke)
    else:
        train(a)


if __name__ == "__main__":
    main()
