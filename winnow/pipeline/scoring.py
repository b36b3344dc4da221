"""Scoring one input shard with every scorer at every proxy checkpoint.

Each checkpoint (seed × step) is loaded once per shard and the shard is streamed through it in
length-sorted batches; one model is in memory at a time. Per checkpoint the scorer's columns are
kept as `<column>@s<seed>k<step>`, and their mean over checkpoints (ignoring NaN) is `<column>`:
the average over seeds and checkpoints that Paul et al. (2021) use for EL2N.

Incremental rescoring. Every example's scores are also kept in a content-keyed cache,
``scores/cache/<fingerprint>/``, where the fingerprint covers everything a score depends on except the
data: the scorers and their parameters, the checkpoints' fingerprints (the model), the tokenizer, the
columns that shape an example and the package version. An example's key is the sha256 of what the model
sees (its token ids or pixels, and its label). When a shard changed (rows appended to a file, say), only
examples whose key is not in the cache are scored; the rest are read back. A changed scorer, model or
tokenizer is a new fingerprint, so everything is scored again.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

import winnow
from winnow.pipeline.atomic import fingerprint
from winnow.pipeline.collate import Example, Featurizer, length_batches
from winnow.pipeline.models import load_checkpoint, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.sources import InputShard, iter_raw_batches
from winnow.pipeline.store import read_parquet, write_parquet
from winnow.scorers import get_scorer


def ckpt_suffix(ck: dict[str, Any]) -> str:
    return f"@s{ck['seed']}k{ck['step']}"


def build_scorers(recipe: Recipe) -> list[Any]:
    return [get_scorer(s.name, **s.params) for s in recipe.scoring.scorers]


def score_fingerprint(
    recipe: Recipe, shard: InputShard, ckpts: list[dict[str, Any]], tokenizer_fp: str | None
) -> str:
    return fingerprint(
        "score",
        shard.fingerprint,
        recipe.data.model_dump(exclude={"read_batch_size", "source"}),
        recipe.model.max_length,
        [s.model_dump() for s in recipe.scoring.scorers],
        [c["fingerprint"] for c in ckpts],
        tokenizer_fp,
        winnow.__version__,
    )


def cache_fingerprint(recipe: Recipe, ckpts: list[dict[str, Any]], tokenizer_fp: str | None) -> str:
    """What every example's scores depend on, apart from the example itself."""
    return fingerprint(
        "score-cache",
        recipe.data.model_dump(exclude={"read_batch_size", "source", "id_column", "domain_column"}),
        recipe.model.max_length,
        [s.model_dump() for s in recipe.scoring.scorers],
        [c["fingerprint"] for c in ckpts],
        tokenizer_fp,
        winnow.__version__,
    )


def example_key(e: Example) -> str:
    """The cache key of an example: sha256 of what the model sees (features and label)."""
    h = hashlib.sha256()
    f = e.features
    h.update(np.asarray(f, dtype=np.int64 if isinstance(f, list) else None).tobytes())
    h.update(f"|{e.label}".encode())
    return h.hexdigest()[:32]


def _read_cache(cache_dir: Path) -> pl.DataFrame | None:
    frames = [read_parquet(f) for f in sorted(cache_dir.glob("frag-*.parquet"))]
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed").unique(subset="key", keep="first", maintain_order=True)


def part_paths(run_dir: Path, shard: InputShard, fp: str) -> tuple[Path, Path]:
    parts = run_dir / "scores" / "parts"
    return (
        parts / f"scores-{shard.index:05d}-{fp[:12]}.parquet",
        parts / f"rows-{shard.index:05d}-{fp[:12]}.parquet",
    )


def _stream(recipe: Recipe, shard: InputShard, feat: Featurizer):
    offset = 0
    for raw in iter_raw_batches(recipe.data, shard):
        exs = feat.featurize(raw, shard.location, offset)
        offset += len(exs)
        yield exs


def score_shard(
    recipe: Recipe,
    run_dir: Path,
    shard: InputShard,
    ckpts: list[dict[str, Any]],
    feat: Featurizer,
    fp: str,
    progress: Callable[[int], None] | None = None,
    cache_fp: str | None = None,
) -> dict[str, Any]:
    """Score one shard; write its score and rows parts atomically; return a summary (``scored``: examples
    scored now, ``reused``: examples whose scores came from the cache under ``cache_fp``)."""
    scores_path, rows_path = part_paths(run_dir, shard, fp)
    if scores_path.exists() and rows_path.exists():
        n = read_parquet(rows_path).height
        return {
            "shard": shard.index,
            "rows": n,
            "scores": str(scores_path),
            "rows_file": str(rows_path),
            "skipped": True,
            "scored": 0,
            "reused": n,
        }
    scorers = build_scorers(recipe)
    task = recipe.model.task
    bs = recipe.scoring.batch_size
    t0 = time.time()
    cache_dir = run_dir / "scores" / "cache" / cache_fp[:16] if cache_fp else None
    cached = _read_cache(cache_dir) if cache_dir is not None else None
    known = set(cached["key"].to_list()) if cached is not None else set()
    rows: dict[str, list] = {"id": [], "domain": [], "label": [], "n_tokens": [], "preview": []}
    keys: list[str] = []
    todo: set[str] = set()  # keys not in the cache: found while the first checkpoint's pass reads the shard
    new_keys: list[str] = []  # keys of the examples scored, in the order every pass scores them
    per_ckpt: dict[str, list[np.ndarray]] = {}
    device = resolve_device(recipe.scoring.device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    for ci, ck in enumerate(ckpts):
        if ci > 0 and not todo:
            break  # the first pass found nothing new: no other checkpoint needs loading
        model = None  # loaded at the first example that needs scoring
        chunks: dict[str, list[np.ndarray]] = {}
        for exs in _stream(recipe, shard, feat):
            exs_k = [(e, example_key(e)) for e in exs]
            if ci == 0:
                for e, k in exs_k:
                    rows["id"].append(e.id)
                    rows["domain"].append(e.domain)
                    rows["label"].append(e.label_name)
                    rows["n_tokens"].append(e.n_tokens)
                    rows["preview"].append(e.preview)
                    keys.append(k)
                    if k not in known:
                        todo.add(k)
                        new_keys.append(k)
            new = [e for e, k in exs_k if k in todo]
            if new:
                if model is None:
                    model = (
                        load_checkpoint(run_dir / ck["path"], task, recipe.model.trust_remote_code)
                        .to(device)
                        .eval()
                    )
                    if use_bf16:
                        model = model.to(torch.bfloat16)
                    if recipe.scoring.compile and device.type == "cuda":
                        getattr(model, model.base_model_prefix, model).compile(dynamic=True)
                out = _score_examples(scorers, model, new, feat, task, device, bs)
                for col, arr in out.items():
                    chunks.setdefault(col + ckpt_suffix(ck), []).append(arr)
            if progress is not None:
                progress(len(exs))
        for col, arrs in chunks.items():
            per_ckpt[col] = [np.concatenate(arrs)] if arrs else [np.zeros(0)]
        del model
    data: dict[str, Any] = {"key": new_keys}
    base_cols: list[str] = []
    for s in scorers:
        base_cols.extend(getattr(s, "columns", None) or [s.name])
    for col in base_cols:
        mats = [per_ckpt.get(col + ckpt_suffix(ck), [np.full(len(new_keys), np.nan)])[0] for ck in ckpts]
        for ck, m in zip(ckpts, mats, strict=True):
            data[col + ckpt_suffix(ck)] = m.astype(np.float64)
        stack = np.stack(mats) if mats and len(mats[0]) else np.zeros((len(ckpts), 0))
        with np.errstate(all="ignore"):
            counts = np.sum(~np.isnan(stack), axis=0)
            mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
        data[col] = mean.astype(np.float64)
    order = ["key"] + base_cols + [c for c in data if "@" in c]
    fresh = pl.DataFrame(
        {k: data[k] for k in order}, schema_overrides={"key": pl.Utf8, **{c: pl.Float64 for c in order[1:]}}
    )
    fresh = fresh.unique(subset="key", keep="first", maintain_order=True)
    if cache_dir is not None and fresh.height:
        write_parquet(
            fresh, cache_dir / f"frag-{shard.index:05d}-{fp[:12]}.parquet", {"cache_fingerprint": cache_fp}
        )
    have = fresh if cached is None else pl.concat([fresh, cached.select(order)], how="vertical")
    df = (
        pl.DataFrame({"id": rows["id"], "key": keys}, schema={"id": pl.Utf8, "key": pl.Utf8})
        .join(have.unique(subset="key", keep="first"), on="key", how="left", maintain_order="left")
        .drop("key")
    )
    rows_df = pl.DataFrame(
        rows,
        schema={"id": pl.Utf8, "domain": pl.Utf8, "label": pl.Utf8, "n_tokens": pl.Int64, "preview": pl.Utf8},
    )
    scored = sum(1 for k in keys if k in todo)
    prov = {
        "shard": shard.to_dict(),
        "fingerprint": fp,
        "seconds": round(time.time() - t0, 3),
        "scored": scored,
        "reused": len(keys) - scored,
    }
    write_parquet(rows_df, rows_path)
    write_parquet(df, scores_path, prov)
    return {
        "shard": shard.index,
        "rows": rows_df.height,
        "scores": str(scores_path),
        "rows_file": str(rows_path),
        "skipped": False,
        "scored": scored,
        "reused": len(keys) - scored,
    }


def _score_examples(
    scorers: list[Any],
    model: Any,
    exs: list[Example],
    feat: Featurizer,
    task: str,
    device: torch.device,
    bs: int,
) -> dict[str, np.ndarray]:
    """Score examples in length-sorted batches; return columns in the examples' order."""
    n = len(exs)
    pos = {id(e): i for i, e in enumerate(exs)}
    out: dict[str, np.ndarray] = {}
    for group in length_batches(exs, bs):
        batch = {k: v.to(device) for k, v in feat.collate(group).items()}
        idx = np.array([pos[id(e)] for e in group])
        for s in scorers:
            # gradient scorers (GraNd, ...) run their own backward; the rest need no autograd graph
            with torch.set_grad_enabled(bool(getattr(s, "needs_grad", False))):
                res = s.score_batch(model, batch, task)
            for col, t in res.items():
                arr = out.setdefault(col, np.full(n, np.nan))
                arr[idx] = t.detach().float().cpu().numpy()
    return out
