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
examples whose key is not in that shard's cache file are scored; the rest are read back. A changed
scorer, model or tokenizer is a new fingerprint, so everything is scored again. The cache's layout,
compaction and garbage collection: ``score_cache.py``; the merge of the parts: ``score_merge.py``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import winnow
from winnow.pipeline.atomic import fingerprint, tmp_name
from winnow.pipeline.collate import Example, Featurizer, length_batches
from winnow.pipeline.layout import RunLayout, checkpoint_suffix
from winnow.pipeline.models import load_checkpoint, resolve_device
from winnow.pipeline.recipe import Recipe
from winnow.pipeline.score_cache import read_shard_cache, write_shard_cache
from winnow.pipeline.sources import InputShard, iter_raw_batches
from winnow.pipeline.steps import Checkpoint, RunContext, ScorePart, Step, progress, register_step
from winnow.pipeline.store import write_parquet
from winnow.scorers import get_scorer


def ckpt_suffix(ck: Checkpoint) -> str:
    return checkpoint_suffix(ck.seed, ck.step)


def build_scorers(recipe: Recipe) -> list[Any]:
    return [get_scorer(s.name, **s.params) for s in recipe.scoring.scorers]


def score_fingerprint(
    recipe: Recipe, shard: InputShard, ckpts: list[Checkpoint], tokenizer_fp: str | None
) -> str:
    return fingerprint(
        "score",
        shard.fingerprint,
        recipe.data.model_dump(exclude={"read_batch_size", "source"}),
        recipe.model.max_length,
        [s.model_dump() for s in recipe.scoring.scorers],
        [c.fingerprint for c in ckpts],
        tokenizer_fp,
        winnow.__version__,
    )


def cache_fingerprint(recipe: Recipe, ckpts: list[Checkpoint], tokenizer_fp: str | None) -> str:
    """What every example's scores depend on, apart from the example itself."""
    return fingerprint(
        "score-cache",
        recipe.data.model_dump(exclude={"read_batch_size", "source", "id_column", "domain_column"}),
        recipe.model.max_length,
        [s.model_dump() for s in recipe.scoring.scorers],
        [c.fingerprint for c in ckpts],
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


def part_paths(run_dir: Path, shard: InputShard, fp: str) -> tuple[Path, Path]:
    layout = RunLayout(run_dir)
    return layout.score_part(shard.index, fp), layout.rows_part(shard.index, fp)


def loader_workers(recipe: Recipe, device: torch.device) -> int:
    """``scoring.loader_workers`` resolved: auto is min(4, cores - 1) on CUDA, 0 (inline) on CPU."""
    w = recipe.scoring.loader_workers
    if w == "auto":
        return min(4, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0
    return int(w)


def bucket_rows(recipe: Recipe, device: torch.device) -> int:
    """``scoring.bucket_rows`` resolved: auto is 8192 on CUDA, ``data.read_batch_size`` on CPU."""
    b = recipe.scoring.bucket_rows
    if b == "auto":
        return 8192 if device.type == "cuda" else recipe.data.read_batch_size
    return int(b)


def _stream(
    recipe: Recipe, shard: InputShard, feat: Featurizer, workers: int = 0
) -> Iterator[list[tuple[Example, str]]]:
    """The shard's read batches as (example, cache key) pairs, in order. With ``workers`` > 0, threads
    featurize (validate, tokenize, key) up to 2 x ``workers`` read batches ahead of the consumer, each
    with its own copy of the featurizer (a fast tokenizer is not safe to call from two threads at once;
    its Rust encoder runs without the GIL, so the threads tokenize in parallel)."""

    def work(f: Featurizer, raw: dict[str, list], offset: int) -> list[tuple[Example, str]]:
        return [(e, example_key(e)) for e in f.featurize(raw, shard.location, offset)]

    def batches() -> Iterator[tuple[dict[str, list], int]]:
        offset = 0
        for raw in iter_raw_batches(recipe.data, shard):
            n = len(next(iter(raw.values()))) if raw else 0
            yield raw, offset
            offset += n

    if workers <= 0:
        for raw, offset in batches():
            yield work(feat, raw, offset)
        return
    local = threading.local()

    def threaded(raw: dict[str, list], offset: int) -> list[tuple[Example, str]]:
        if not hasattr(local, "feat"):
            local.feat = copy.deepcopy(feat)
        return work(local.feat, raw, offset)

    pending: deque[Future[list[tuple[Example, str]]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="winnow-featurize") as pool:
        try:
            for raw, offset in batches():
                pending.append(pool.submit(threaded, raw, offset))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def score_shard(
    recipe: Recipe,
    run_dir: Path,
    shard: InputShard,
    ckpts: list[Checkpoint],
    feat: Featurizer,
    fp: str,
    progress: Callable[[int], None] | None = None,
    cache_fp: str | None = None,
) -> ScorePart:
    """Score one shard; write its score and rows parts atomically; return its part (``scored``: examples
    scored now, ``reused``: examples whose scores came from the cache under ``cache_fp``)."""
    scores_path, rows_path = part_paths(run_dir, shard, fp)
    if scores_path.exists() and rows_path.exists():
        n = pq.read_metadata(rows_path).num_rows
        return ScorePart(
            shard.index,
            n,
            RunLayout(run_dir).rel(scores_path),
            RunLayout(run_dir).rel(rows_path),
            skipped=True,
            scored=0,
            reused=n,
        )
    scorers = build_scorers(recipe)
    task = recipe.model.task
    bs = recipe.scoring.batch_size
    t0 = time.time()
    # this shard's own compacted cache file, never the whole cache (winnow/pipeline/score_cache.py)
    cached = read_shard_cache(RunLayout(run_dir), cache_fp, shard) if cache_fp else None
    known = set(cached["key"].to_list()) if cached is not None else set()
    rows_out = _RowsWriter(rows_path)  # the rows (previews included) go to disk batch by batch
    ids: list[str] = []
    keys: list[str] = []
    todo: set[str] = set()  # keys not in the cache: found while the first checkpoint's pass reads the shard
    new_keys: list[str] = []  # keys of the examples scored, in the order every pass scores them
    per_ckpt: dict[str, list[np.ndarray]] = {}
    device = resolve_device(recipe.scoring.device)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    workers, window = loader_workers(recipe, device), bucket_rows(recipe, device)
    try:
        for ci, ck in enumerate(ckpts):
            if ci > 0 and not todo:
                break  # the first pass found nothing new: no other checkpoint needs loading
            model = None  # loaded at the first example that needs scoring
            chunks: dict[str, list[np.ndarray]] = {}
            waiting: list[Example] = []  # examples to score, length-sorted together once `window` are here
            for exs_k in _stream(recipe, shard, feat, workers):
                if ci == 0:
                    rows_out.write([e for e, _ in exs_k])
                    for e, k in exs_k:
                        ids.append(e.id)
                        keys.append(k)
                        if k not in known:
                            todo.add(k)
                            new_keys.append(k)
                waiting.extend(e for e, k in exs_k if k in todo)
                if len(waiting) >= window:
                    if model is None:
                        model = _scoring_model(recipe, run_dir / ck.path, device, use_bf16)
                    for col, arr in _score_examples(scorers, model, waiting, feat, task, device, bs).items():
                        chunks.setdefault(col + ckpt_suffix(ck), []).append(arr)
                    waiting = []
                if progress is not None:
                    progress(len(exs_k))
            if waiting:
                if model is None:
                    model = _scoring_model(recipe, run_dir / ck.path, device, use_bf16)
                for col, arr in _score_examples(scorers, model, waiting, feat, task, device, bs).items():
                    chunks.setdefault(col + ckpt_suffix(ck), []).append(arr)
            for col, arrs in chunks.items():
                per_ckpt[col] = [np.concatenate(arrs)] if arrs else [np.zeros(0)]
            del model
    except BaseException:
        rows_out.abort()
        raise
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
    have = fresh if cached is None else pl.concat([fresh, cached.select(order)], how="vertical")
    key_df = pl.DataFrame({"id": ids, "key": keys}, schema={"id": pl.Utf8, "key": pl.Utf8})
    have = have.unique(subset="key", keep="first").join(key_df.select("key").unique(), on="key", how="semi")
    if cache_fp and (fresh.height or cached is None or cached.height != have.height):
        # compacted: exactly the entries this shard's rows use now
        write_shard_cache(RunLayout(run_dir), cache_fp, shard, have.sort("key"))
    df = key_df.join(have, on="key", how="left", maintain_order="left").drop("key")
    scored = sum(1 for k in keys if k in todo)
    prov = {
        "shard": shard.to_dict(),
        "fingerprint": fp,
        "started": round(t0, 3),
        "seconds": round(time.time() - t0, 3),
        "scored": scored,
        "reused": len(keys) - scored,
    }
    rows_out.close()
    write_parquet(df, scores_path, prov)
    return ScorePart(
        shard.index,
        len(ids),
        RunLayout(run_dir).rel(scores_path),
        RunLayout(run_dir).rel(rows_path),
        skipped=False,
        scored=scored,
        reused=len(keys) - scored,
    )


class _RowsWriter:
    """A shard's rows part (id, domain, label, n_tokens, preview) written batch by batch under a temporary
    name, renamed onto its path by ``close`` (``abort`` removes it): the scoring task never holds the
    shard's previews."""

    SCHEMA = pa.schema(
        [
            ("id", pa.string()),
            ("domain", pa.string()),
            ("label", pa.string()),
            ("n_tokens", pa.int64()),
            ("preview", pa.string()),
        ]
    )

    def __init__(self, path: Path):
        self.path, self.tmp = path, tmp_name(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.tmp, self.SCHEMA, compression="zstd")

    def write(self, exs: list[Example]) -> None:
        cols = [
            [e.id for e in exs],
            [e.domain for e in exs],
            [e.label_name for e in exs],
            [e.n_tokens for e in exs],
            [e.preview for e in exs],
        ]
        self.writer.write_table(
            pa.Table.from_arrays(
                [pa.array(c, f.type) for c, f in zip(cols, self.SCHEMA, strict=True)], schema=self.SCHEMA
            )
        )

    def close(self) -> None:
        self.writer.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def _scoring_model(recipe: Recipe, path: Path, device: torch.device, use_bf16: bool) -> Any:
    """A checkpoint loaded for scoring: on ``device``, in eval mode, bf16 where the GPU has it, compiled
    when ``scoring.compile``."""
    model = load_checkpoint(path, recipe.model.task, recipe.model.trust_remote_code).to(device).eval()
    if use_bf16:
        model = model.to(torch.bfloat16)
    if recipe.scoring.compile and device.type == "cuda":
        getattr(model, model.base_model_prefix, model).compile(dynamic=True)
    return model


def _score_examples(
    scorers: list[Any],
    model: Any,
    exs: list[Example],
    feat: Featurizer,
    task: str,
    device: torch.device,
    bs: int,
) -> dict[str, np.ndarray]:
    """Score examples in length-sorted batches; return columns in the examples' order. On CUDA the
    batches are copied from pinned memory without waiting and the scores stay on the GPU until every
    batch is queued (one copy back at the end), so collating the next batch overlaps the model."""
    n = len(exs)
    pos = {id(e): i for i, e in enumerate(exs)}
    pin = device.type == "cuda"
    parts: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {}
    for group in length_batches(exs, bs):
        cpu = feat.collate(group)
        batch = {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in cpu.items()}
        idx = np.array([pos[id(e)] for e in group])
        for s in scorers:
            # gradient scorers (GraNd, ...) run their own backward; the rest need no autograd graph
            with torch.set_grad_enabled(bool(getattr(s, "needs_grad", False))):
                res = s.score_batch(model, batch, task)
            for col, t in res.items():
                parts.setdefault(col, []).append((idx, t.detach().float()))
    out: dict[str, np.ndarray] = {}
    for col, got in parts.items():
        arr = out.setdefault(col, np.full(n, np.nan))
        vals = torch.cat([t.reshape(-1) for _, t in got]).cpu().numpy()
        arr[np.concatenate([i for i, _ in got])] = vals
    return out


@register_step
class ScoreStep(Step):
    """One input shard through every scorer at every checkpoint (``score``): its score and rows parts."""

    name = "score"
    result = ScorePart

    def fingerprint(
        self, ctx: RunContext, shard: Any = None, ckpts: Any = (), tok_fp: str | None = None
    ) -> str:
        return score_fingerprint(ctx.config, shard, [Checkpoint.of(c) for c in ckpts], tok_fp)

    def run(
        self, ctx: RunContext, fp: str, shard: Any = None, ckpts: Any = (), cache_fp: str | None = None
    ) -> Any:
        recipe = ctx.setup(ctx.threads)
        feat, _, _ = ctx.featurizer()
        sh = InputShard.from_dict(shard)
        bar = progress(f"score {sh.name}", None, "row")
        try:
            part = score_shard(
                recipe,
                ctx.root,
                sh,
                [Checkpoint.of(c) for c in ckpts],
                feat,
                fp,
                progress=bar.update,
                cache_fp=cache_fp,
            )
        finally:
            bar.close()
        return self.dump(part)

    def present(self, ctx: RunContext, result: Any, fp: str) -> bool:
        """The part's files, or (once merged, its files removed) the store holding it whole."""
        from winnow.pipeline.score_merge import is_absorbed

        part = self.load(result)
        on_disk = (ctx.root / part.scores).exists() and (ctx.root / part.rows_file).exists()
        return on_disk or is_absorbed(ctx.config, ctx.layout, part)

    def on_cached(self, result: ScorePart) -> ScorePart:
        from dataclasses import replace

        return replace(result, scored=0, reused=result.rows)  # nothing was scored by this run
