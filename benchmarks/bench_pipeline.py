"""The whole product on the GPU: ``winnow run`` (the CLI, a fresh run folder) on 10^5-10^6 rows of real
text with a GPT-2-small proxy, against the kernels' own speed measured in the same process on the same
model.

``prepare`` (any machine with the full install) writes ``corpus.parquet``: about 70k rows (~480
characters) of this machine's real text, eight domains (English, German and French manual pages, the
standard library's sources and tests, Debian changelogs, licences, pydoc prose; the domains of
benchmarks/gpu_downstream.py without its noise). ``run`` (the GPU machine, wheels from
benchmarks/gpu_wheels.py) replicates it to ``--rows`` rows (a row past the corpus's end gets a
``[copy k]`` suffix, so every row is distinct), writes them as ``--shards`` parquet files and runs

    winnow run: GPT-2-small (12 x 768, 12 heads), a 32k BPE trained on the data, max_length --max-length,
    one seed, --train-steps proxy steps (batch 16), one checkpoint, the --scorer (EL2N by default,
    batch --batch-size), score selection of half, weighted shards

sampling GPU utilisation (NVML) and the run's RSS (its process tree) every 0.2 s. Then, in this process,
on the run's own checkpoint and tokenizer: the EL2N (or GraNd) kernel alone on pre-collated,
length-sorted batches already on the GPU (real tokens/s), and the plain training step (AdamW, bf16
autocast, batch 16 x max_length) for the proxy's step time. Reported: for the scoring step (the score
parts' own start and duration) and for the whole run, rows/s, real tokens/s, mean GPU utilisation,
peak RSS and the ratios to the kernels.

    .venv/bin/python benchmarks/bench_pipeline.py prepare --out .bench/pipe
    python3 benchmarks/bench_pipeline.py run --corpus .bench/pipe/corpus.parquet --rows 100000 --out $OUT
    .venv/bin/python benchmarks/bench_pipeline.py --smoke --out DIR      # CPU, tiny: checks the script
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._proc import Sampler, start_server  # noqa: E402
from benchmarks.gpu_downstream import DOMAINS as _DOWNSTREAM  # noqa: E402
from benchmarks.gpu_downstream import NOISE

DOMAINS = {d: n for d, n in _DOWNSTREAM.items() if d != NOISE}  # gpu_downstream's corpus without its noise


def prepare(out: Path, scale: float) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.gpu_downstream import corpus_rows

    want = {d: max(10, int(n * scale)) for d, n in DOMAINS.items()}
    rows = corpus_rows(want, held=0)
    texts, doms = [], []
    for d, (train, _) in rows.items():
        texts += train
        doms += [d] * len(train)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "corpus.parquet"
    pq.write_table(pa.table({"text": texts, "domain": doms}), path, compression="zstd")
    print(f"{path}: {len(texts)} rows, {sum(map(len, texts)) / 1e6:.1f}M characters", flush=True)
    return path


def _write_inputs(corpus: Path, rows: int, shards: int, where: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(corpus)
    text, dom = t.column("text").to_pylist(), t.column("domain").to_pylist()
    n = len(text)
    where.mkdir(parents=True, exist_ok=True)
    per = -(-rows // shards)
    for s in range(shards):
        lo, hi = s * per, min(rows, (s + 1) * per)
        if lo >= hi:
            break
        # fewer rows than the corpus: every (n / rows)-th row, so that every domain is in (the corpus is
        # written domain after domain: its first 20,000 rows were all man-en, and a mixture run refused them)
        src = [(i * n) // rows if rows < n else i % n for i in range(lo, hi)]
        tx = [
            text[j] if i < n else f"{text[j]} [copy {i // n}]"
            for i, j in zip(range(lo, hi), src, strict=True)
        ]
        pq.write_table(
            pa.table({"text": tx, "domain": [dom[j] for j in src]}),
            where / f"part-{s:03d}.parquet",
            compression="zstd",
        )
    return where


def _write_target(corpus: Path, rows: int, where: Path) -> None:
    """The influence target: the last ``rows`` rows of the corpus's first domain (the training rows
    hold copies of them: the influence of a row on its own copy is what a user's target set has too)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(corpus)
    first = t.column("domain")[0].as_py()
    t = t.filter(pc.equal(t.column("domain"), first))
    where.mkdir(parents=True, exist_ok=True)
    pq.write_table(t.slice(max(0, t.num_rows - rows)), where / "target.parquet")


def _recipe(a: argparse.Namespace, inputs: Path, run_dir: Path, smoke: bool) -> dict[str, Any]:
    L = a.max_length
    model = (
        {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 32, "n_positions": max(64, L)}
        if smoke
        else {"model_type": "gpt2", "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": max(1024, L)}
    )
    scorer = {"name": "el2n" if a.scorer == "influence" else a.scorer}
    if scorer["name"] == "el2n":
        scorer["params"] = {"reduction": "mean"}
    r: dict[str, Any] = {
        "name": "bench-pipeline",
        "data": {"source": str(inputs / "*.parquet"), "text_column": "text", "domain_column": "domain"},
        "model": {
            "task": "causal_lm",
            "config": model,
            "tokenizer": {"train": {"vocab_size": 512 if smoke else 32000, "max_rows": 50_000}},
            "max_length": L,
        },
        "train": {"steps": a.train_steps, "batch_size": 16, "lr": 5e-4, "warmup_steps": 10, "seeds": [0]},
        "scoring": {
            "scorers": [scorer],
            "batch_size": a.batch_size,
            "batch_tokens": a.batch_tokens,
            "compile": a.compile,
            "loader_workers": a.loader_workers,
            "loader": a.loader,
            "bucket_rows": a.bucket_rows,
            "pad_multiple": a.pad_multiple,
            "sdpa_backends": a.sdpa if a.sdpa in ("auto", "torch") else a.sdpa.split(","),
        },
        "select": {"method": "score", "score": a.scorer, "fraction": 0.5, "keep": "highest"},
        "output": {"dir": str(run_dir), "shard_max_rows": 100_000},
        "runner": {"kind": "thread", "max_workers": a.max_workers},
    }
    if a.mixture:  # a domain-mixture run beside the spine: its proxy (and DoReMi's reference) steps
        r["mixture"] = {"method": a.mixture, "steps": a.mixture_steps, "batch_size": 16, "lr": 3e-3}
    if a.scorer == "influence":  # LESS features of the last checkpoint against a held-out slice
        r["scoring"]["influence"] = {
            "target": str(inputs.parent / "target" / "*.parquet"),
            "proj_dim": a.proj_dim,
            "neighbours": 10,
            "batch_size": a.batch_size,
            "checkpoints": "last",
        }
    return r


def _sorted_batches(
    enc: list[list[int]], pad: int, batch_size: int, device: Any, tokens: int = 0
) -> list[dict[str, Any]]:
    """Token-id lists as length-sorted, padded, masked batches already on ``device``, grouped as the
    pipeline groups them (``batch_size`` rows, or ``tokens`` padded tokens a batch: ``length_groups``)."""
    import torch

    from winnow.pipeline.collate import length_groups

    batches = []
    for idx in length_groups(np.array([len(e) for e in enc]), batch_size, tokens):
        grp = [enc[i] for i in idx]
        T = max(1, max(map(len, grp)))
        ids = torch.full((len(grp), T), pad, dtype=torch.long)
        mask = torch.zeros((len(grp), T), dtype=torch.long)
        for j, e in enumerate(grp):
            ids[j, : len(e)] = torch.tensor(e)
            mask[j, : len(e)] = 1
        batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return batches


def _tokens(a: argparse.Namespace, device: Any) -> int:
    """--batch-tokens as the run resolves it (``scoring.batch_tokens``)."""
    from winnow.pipeline.scoring import AUTO_BATCH_TOKENS

    if a.batch_tokens == "auto":
        return AUTO_BATCH_TOKENS if device.type == "cuda" and a.scorer == "el2n" else 0
    return int(a.batch_tokens)


def _kernels(a: argparse.Namespace, run_dir: Path, corpus_texts: list[str], device: Any) -> dict[str, Any]:
    """The scorer alone and the plain training step, on the run's checkpoint and tokenizer."""
    import torch

    from winnow.grads import checks, per_example_loss
    from winnow.pipeline.models import load_checkpoint, load_tokenizer
    from winnow.scorers import get_scorer

    tok_dir = sorted(run_dir.glob("tokenizer-*"))[0]
    ck = sorted((run_dir / "checkpoints").glob("*/seed-*/step-*"))[-1]
    tok = load_tokenizer(tok_dir)
    n = min(len(corpus_texts), 256 if a.smoke else 4096 if a.scorer == "grand" else 16384)
    enc = tok(corpus_texts[:n], truncation=True, max_length=a.max_length)["input_ids"]
    batches = _sorted_batches(enc, tok.pad_token_id or 0, a.batch_size, device, _tokens(a, device))
    real = sum(len(e) for e in enc)
    model = load_checkpoint(ck, "causal_lm").to(device).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    scorer = get_scorer(a.scorer, **({"reduction": "mean"} if a.scorer == "el2n" else {}))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def score_all() -> None:
        for b in batches:
            with torch.set_grad_enabled(bool(getattr(scorer, "needs_grad", False))):
                scorer.score_batch(model, b, "causal_lm")

    def best(fn: Any) -> float:
        fn()  # warm-up (and cuBLAS plans)
        times = []
        for _ in range(1 if a.smoke else 3):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
        return min(times)  # best of 3

    def score_deferred() -> None:
        with checks.deferred():  # as the pipeline calls it: no host wait inside a window
            score_all()

    s = best(score_all)
    sd = best(score_deferred)
    out: dict[str, Any] = {"score_kernel": {"rows": n, "real_tokens": real, "seconds": s}}
    out["score_kernel"]["rows_per_s"] = n / s
    out["score_kernel"]["real_tokens_per_s"] = real / s
    out["score_kernel_deferred"] = {"seconds": sd, "rows_per_s": n / sd, "real_tokens_per_s": real / sd}
    out["score_kernel"]["batch_tokens"] = _tokens(a, device)
    out["score_kernel"]["batches"] = len(batches)
    sweep = {}
    for t in a.kernel_tokens:  # the kernel (deferred) at other batchings: 0 is --batch-size rows a batch
        batches = _sorted_batches(enc, tok.pad_token_id or 0, a.batch_size, device, t)
        sweep[str(t)] = real / best(score_deferred)
    if sweep:
        out["kernel_by_batch_tokens"] = sweep
    # the plain training step: AdamW, bf16 autocast, batch 16 x max_length of real tokens, fp32 weights
    model = load_checkpoint(ck, "causal_lm").to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    flat = torch.tensor([t for e in enc for t in e], dtype=torch.long)
    L = a.max_length
    need = 16 * L
    flat = flat.repeat(-(-need * 4 // max(1, len(flat))))
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(i: int) -> None:
        ids = flat[(i % 4) * need : (i % 4 + 1) * need].view(16, L).to(device)
        with torch.autocast(**amp):
            loss = per_example_loss(
                model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "causal_lm"
            )
        loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(3):
        step(i)
    sync()
    steps = 3 if a.smoke else 20
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    sync()
    out["train_step_s"] = (time.perf_counter() - t) / steps
    return out


def _influence_engine(
    a: argparse.Namespace, run_dir: Path, corpus_texts: list[str], device: Any
) -> dict[str, Any]:
    """The influence features' engine alone, as compute_features calls it (LESS's Adam update direction
    from the checkpoint's optimizer state, bf16 autocast, projection to --proj-dim), on pre-collated,
    length-sorted batches already on the device: examples/s."""
    import torch

    from winnow.grads import AdamUpdate, GradEngine, per_example_loss
    from winnow.pipeline.influence import _adam_state, _load_optimizer
    from winnow.pipeline.models import load_checkpoint, load_tokenizer

    tok = load_tokenizer(sorted(run_dir.glob("tokenizer-*"))[0])
    ck = sorted((run_dir / "checkpoints").glob("*/seed-*/step-*"), key=lambda p: int(p.name.split("-")[1]))[
        -1
    ]
    n = min(len(corpus_texts), 64 if a.smoke else 2048)
    enc = tok(corpus_texts[:n], truncation=True, max_length=a.max_length)["input_ids"]
    batches = _sorted_batches(enc, tok.pad_token_id or 0, a.batch_size, device)
    model = load_checkpoint(ck, "causal_lm").to(device).eval()
    eng = GradEngine(model, proj_dim=a.proj_dim, proj_seed=0, proj_kind="kfjlt")
    st = _load_optimizer(ck)
    sq, _, _, _ = _adam_state(ck, model, st=st)
    avg, _, _, _ = _adam_state(ck, model, "exp_avg", st=st)
    pre = {}
    for nm, p_ in eng.params.items():
        zero = torch.zeros_like(p_, dtype=torch.float32, device="cpu")
        pre[nm] = AdamUpdate(avg.get(nm, zero).to(device), sq.get(nm, zero).to(device))
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def all_batches() -> None:
        for b in batches:
            with torch.autocast(**amp):
                out = eng.compute(
                    lambda b=b: per_example_loss(model, b, "causal_lm"),
                    sqnorm=True,
                    project=True,
                    precondition=pre,
                )
            eng.check = False
            out["proj"].float().norm(dim=1)

    with eng:
        all_batches()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        all_batches()
        if device.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t
    return {"influence_engine": {"rows": n, "seconds": s, "rows_per_s": n / s}}


def _train_timing(run_dir: Path) -> dict[str, Any] | None:
    """Proxy training's own seconds (init, first step, the other steps, saves) from its last checkpoint."""
    last = sorted(
        (run_dir / "checkpoints").glob("*/seed-*/step-*/state.json"),
        key=lambda p: int(p.parent.name.split("-")[1]),
    )
    return json.loads(last[-1].read_text()).get("timing") if last else None


def _influence_parts(run_dir: Path) -> list[dict[str, Any]]:
    """The training-role influence feature parts' provenance (rows, seconds)."""
    import pyarrow.parquet as pq

    from winnow.pipeline.layout import PROVENANCE_KEY

    out = []
    for p in sorted((run_dir / "influence" / "parts").glob("featmeta-*.parquet")):
        md = pq.read_schema(p).metadata or {}
        prov = json.loads(md.get(PROVENANCE_KEY, b"{}"))
        out.append({"rows": pq.read_metadata(p).num_rows, "seconds": float(prov["seconds"])})
    return out


def _between_shards(provs: list[dict[str, Any]]) -> list[float]:
    spans = []
    for p in provs:
        m = p.get("marks", {})
        if "finished@0" in m:
            start = p["started"] + m.get("slot@0", m.get("first_batch", 0.0))
            spans.append((start, p["started"] + m["finished@0"]))
    spans.sort()
    return [round(b[0] - a[1], 3) for a, b in itertools.pairwise(spans)]


def run(a: argparse.Namespace) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import torch
    import yaml

    out = Path(a.out or tempfile.mkdtemp(prefix="bench-pipeline-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-pipeline-work-"))
    inputs = _write_inputs(Path(a.corpus), a.rows, a.shards, work / "inputs")
    if a.scorer == "influence":
        _write_target(Path(a.corpus), a.target_rows, work / "target")
    run_dir = work / "run"
    recipe = _recipe(a, inputs, run_dir, a.smoke)
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ)
    env.setdefault("PREFECT_HOME", str(work / "prefect"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
    )
    server = start_server(env, work) if a.server else None
    cmd = [sys.executable, "-m", "winnow", "run", str(work / "recipe.yaml")]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(out / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        with Sampler(proc.pid) as smp:
            rc = proc.wait()
    wall = time.time() - t0
    if server is not None:
        server.terminate()
        server.wait(timeout=60)
    if rc != 0:
        print((out / "run.log").read_text()[-4000:], file=sys.stderr)
        raise SystemExit(f"winnow run failed (exit {rc})")
    from winnow.pipeline.layout import RunLayout

    # the score steps' timing: merge-scores keeps each (removed) part's in scores/timing.json
    timing = run_dir / "scores" / "timing.json"
    provs = [p for p in json.loads(timing.read_text()).values() if "started" in p] if timing.exists() else []
    if not provs:
        raise SystemExit(f"bench_pipeline: no score step timing in {timing}")
    lo = min(p["started"] for p in provs)
    hi = max(p["started"] + p["seconds"] for p in provs)

    rows_t = pq.read_table(RunLayout(run_dir).rows, columns=["n_tokens"])
    real = int(np.asarray(rows_t.column("n_tokens")).sum())
    # the scoring window (first shard's start to the last one's end): with runner.max_workers > 1 the score
    # tasks overlap (each featurizes while another holds the GPU), so the sum of their times is no wall time
    score_s = hi - lo
    res: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "rows": a.rows,
        "max_length": a.max_length,
        "scorer": a.scorer,
        "batch_size": a.batch_size,
        "batch_tokens": a.batch_tokens,
        "train_steps": a.train_steps,
        "loader_workers": a.loader_workers,
        "loader": a.loader,
        "bucket_rows": a.bucket_rows,
        "pad_multiple": a.pad_multiple,
        "sdpa_backends": a.sdpa,
        "max_workers": a.max_workers,
        "server": a.server,
        "whole_run": {"wall_s": wall, "rows_per_s": a.rows / wall, **smp.window(t0, t0 + wall)},
        "scoring": {
            "seconds": score_s,
            "task_seconds_sum": sum(p["seconds"] for p in provs),
            "rows_per_s": a.rows / score_s,
            "real_tokens": real,
            "real_tokens_per_s": real / score_s,
            "per_shard_s": [round(p["seconds"], 2) for p in sorted(provs, key=lambda p: p["started"])],
            # each shard's own marks (seconds from its start: first featurized batch, last launch, device
            # drained) and what came after them (frames, cache, part files)
            "per_shard_marks": [
                {**p.get("marks", {}), "seconds": p["seconds"]}
                for p in sorted(provs, key=lambda p: p["started"])
            ],
            # the device's idle seconds between one shard's last result and the next shard's first launch
            # (its slot, or its first featurized batch where a score task held the GPU for all of it)
            "between_shards_s": _between_shards(provs),
            **smp.window(lo, hi),
        },
    }
    res["train_timing"] = _train_timing(run_dir)
    if a.mixture:
        mj = json.loads(RunLayout(run_dir).mixture_json.read_text())
        res["mixture"] = {"method": a.mixture, "steps": mj["steps"], "seconds": mj["seconds"], **mj["timing"]}
    device = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    texts = pq.read_table(a.corpus, columns=["text"]).column("text").to_pylist()
    if a.scorer == "influence":
        parts = _influence_parts(run_dir)
        if not parts:
            raise SystemExit(
                f"bench_pipeline: no influence feature parts in {run_dir / 'influence' / 'parts'}"
            )
        f_rows, f_s = sum(p["rows"] for p in parts), sum(p["seconds"] for p in parts)
        res["influence_features"] = {
            "rows": f_rows,
            "seconds": f_s,
            "rows_per_s": f_rows / f_s,
            "per_shard_s": [round(p["seconds"], 2) for p in parts],
            "proj_dim": a.proj_dim,
        }
        res.update(_influence_engine(a, run_dir, texts, device))
        res["influence_features"]["vs_engine"] = (
            res["influence_features"]["rows_per_s"] / res["influence_engine"]["rows_per_s"]
        )
        a = argparse.Namespace(**{**vars(a), "scorer": "el2n"})  # the run's EL2N against its kernel
    res.update(_kernels(a, run_dir, texts, device))
    # the baseline is the faster of the kernel's two ways of being called (plain, or checks deferred)
    k = max(res["score_kernel"]["real_tokens_per_s"], res["score_kernel_deferred"]["real_tokens_per_s"])
    res["scoring"]["vs_kernel"] = res["scoring"]["real_tokens_per_s"] / k
    kernel_sum = a.train_steps * res["train_step_s"] + real / k
    if "influence_engine" in res:  # and the features: every training and target row at the engine's speed
        kernel_sum += (res["influence_features"]["rows"] + a.target_rows) / res["influence_engine"][
            "rows_per_s"
        ]
    if "mixture" in res:  # the proxy's steps (and DoReMi's reference: 2x as many) against the plain step
        mx = res["mixture"]
        mx["s_per_step"] = mx["steps_s"] / max(1, mx["steps"])
        mx["vs_plain_step"] = mx["s_per_step"] / res["train_step_s"]
        if a.mixture == "doremi":
            mx["reference_s_per_step"] = mx["setup_s"] / (2 * max(1, mx["steps"]))
            mx["reference_vs_plain_step"] = mx["reference_s_per_step"] / res["train_step_s"]
    res["whole_run"]["kernel_sum_s"] = kernel_sum
    res["whole_run"]["vs_kernel_sum"] = wall / kernel_sum
    (out / "bench_pipeline.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", choices=["prepare", "run"], default="run")
    ap.add_argument("--out", default=os.environ.get("OUT") or None)
    ap.add_argument("--work", default=None, help="inputs and the run folder (default: a temporary folder)")
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--scale", type=float, default=1.0, help="prepare: corpus size against the default")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument(
        "--scorer",
        default="el2n",
        choices=["el2n", "grand", "influence"],
        help="influence: EL2N plus LESS features of the last checkpoint against --target-rows held-out rows",
    )
    ap.add_argument("--mixture", default=None, choices=["doremi", "doge", "dga"], help="a mixture run beside")
    ap.add_argument("--mixture-steps", type=int, default=100, help="mixture.steps")
    ap.add_argument("--proj-dim", type=int, default=8192, help="influence: scoring.influence.proj_dim")
    ap.add_argument("--target-rows", type=int, default=256, help="influence: target examples")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--batch-tokens",
        default="auto",
        type=lambda v: v if v == "auto" else int(v),
        help="scoring.batch_tokens (0: --batch-size rows a batch); the kernel baseline is batched the same",
    )
    ap.add_argument(
        "--kernel-tokens",
        default=[],
        type=lambda v: [int(x) for x in v.split(",") if x],
        help="comma-separated batch_tokens to time the kernel at as well (0: --batch-size rows)",
    )
    ap.add_argument("--train-steps", type=int, default=100)
    ap.add_argument("--compile", action="store_true", help="scoring.compile: torch.compile the model")
    ap.add_argument("--loader-workers", default="auto", type=lambda v: v if v == "auto" else int(v))
    ap.add_argument("--max-workers", type=int, default=1, help="runner.max_workers: shards scored at once")
    ap.add_argument("--loader", default="auto", choices=["auto", "threads", "processes"])
    ap.add_argument(
        "--server", action="store_true", help="a Prefect server started before the run (a user's own)"
    )
    ap.add_argument("--bucket-rows", default="auto", type=lambda v: v if v == "auto" else int(v))
    ap.add_argument("--pad-multiple", type=int, default=1, help="scoring.pad_multiple")
    ap.add_argument(
        "--sdpa", default="auto", help="scoring.sdpa_backends: auto, torch, or a comma-separated list"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny corpus, model and run on CPU")
    a = ap.parse_args()
    if a.smoke:
        out = Path(a.out or tempfile.mkdtemp())
        a.corpus = str(prepare(out / "corpus", 0.004))
        a.rows, a.shards, a.max_length, a.batch_size, a.train_steps = 300, 2, 64, 16, 4
        a.proj_dim, a.target_rows = min(a.proj_dim, 256), min(a.target_rows, 16)
        a.mixture_steps = min(a.mixture_steps, 4)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        run(a)
        return
    if a.mode == "prepare":
        prepare(Path(a.out or ".bench/pipe"), a.scale)
    else:
        if not a.corpus:
            ap.error("run needs --corpus (made by `prepare`)")
        run(a)


if __name__ == "__main__":
    main()
